"""tests/helpers/model.py::run_gloo_workers, the launcher of every gloo test: results in rank order, and failing fast
(a failed or crashed rank, or the one group deadline, kills the ranks still running instead of waiting for each in
turn: a deadlocked 4-rank test would otherwise cost 4 x its timeout).

The workers import as little as they can (torch only to save a result; this module imports the helper lazily, as
spawned ranks import this module): a rank that "hangs" sleeps, as a rank waiting in a collective for a dead peer
would."""

import os
import time

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.distributed]  # spawned processes (torch imported in some)

HANG_SECONDS = 600  # far beyond every timeout below: a hanging rank never finishes on its own


def _worker(rank, behaviour, result_path):
    action = behaviour[rank]
    if action == "ok":
        import torch

        torch.save({"rank": rank, "pid": os.getpid()}, result_path)
    elif action == "error":
        import torch

        torch.save({"error": f"rank {rank} failed on purpose"}, result_path)
    elif action == "crash":
        os._exit(3)
    elif action == "raise":
        raise RuntimeError("uncaught on purpose")
    elif action == "hang":
        time.sleep(HANG_SECONDS)


def _run(behaviour, timeout):
    from tests.helpers.model import run_gloo_workers

    t0 = time.monotonic()
    try:
        return run_gloo_workers(_worker, len(behaviour), lambda r, path: (r, behaviour, path), timeout=timeout), \
            time.monotonic() - t0
    except AssertionError as exc:
        return exc, time.monotonic() - t0


def test_results_come_back_in_rank_order():
    results, _ = _run(["ok", "ok"], timeout=300)
    assert [r["rank"] for r in results] == [0, 1]
    assert len({r["pid"] for r in results}) == 2


@pytest.mark.parametrize("failing,message", [("error", "rank 0: rank 0 failed on purpose"),
                                             ("crash", "rank 0: exited with code 3 without a result"),
                                             ("raise", "rank 0: exited with code 1 without a result")])
def test_one_failed_rank_stops_the_others_at_once(failing, message):
    """Rank 0 fails while ranks 1 and 2 hang: the failure is reported without waiting for the timeout (before
    the fix the launcher joined each hanging rank for the full timeout)."""
    timeout = 240
    exc, seconds = _run([failing, "hang", "hang"], timeout=timeout)
    assert isinstance(exc, AssertionError), exc
    assert seconds < timeout / 2, seconds
    assert message in str(exc) and "timed out" not in str(exc), str(exc)


def test_deadlock_fails_at_the_first_timeout():
    """Every rank hangs: one deadline for the group, not one timeout per rank joined in turn (3 x 6 s)."""
    timeout = 6
    exc, seconds = _run(["hang", "hang", "hang"], timeout=timeout)
    assert isinstance(exc, AssertionError), exc
    assert timeout <= seconds < 2 * timeout, seconds
    assert f"timed out after {timeout} s with rank(s) [0, 1, 2] still running" in str(exc), str(exc)
