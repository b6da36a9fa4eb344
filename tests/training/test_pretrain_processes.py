"""Nothing of a k2-pretrain run outlives it: kill -9 of the trainer (as the OOM killer does) after its checkpoints
started leaves no process behind. megatron-core 0.19.2 would leave its checkpoint writer's results Manager (a
spawned ~560 MB process) and a multiprocessing resource_tracker running forever; k2_megatron.checkpoint.writer hands
results through a file or memory instead, and a forked writer dies with the trainer (PR_SET_PDEATHSIG).

Orphans are reparented away from the trainer: to the test process here, which makes itself a child subreaper for
the purpose (the machine's init may kill orphans it adopts, and would hide them), and the test finds every process
of the run by a marker in its environment (inherited by anything the trainer starts, however it starts it)."""

from __future__ import annotations

import contextlib
import ctypes
import os
import time
import uuid

import pytest

from tests.helpers.model import require_no_cuda
from tests.helpers.torchrun import pretrain_process

pytestmark = pytest.mark.slow


def _processes_marked(marker: str) -> list:
    """The live processes whose environment holds the marker (a zombie's cannot be read: it has ended)."""
    import psutil

    found = []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if proc.environ().get("K2_TEST_RUN") == marker:
                proc.cmdline()  # still readable: alive
                found.append(proc)
    return found


@contextlib.contextmanager
def _adopting_orphans():
    """This process as the child subreaper of its descendants (Linux prctl PR_SET_CHILD_SUBREAPER) for the block."""
    set_child_subreaper = 36
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(set_child_subreaper, 1, 0, 0, 0) != 0:
        pytest.skip("prctl(PR_SET_CHILD_SUBREAPER) is not available here")
    try:
        yield
    finally:
        libc.prctl(set_child_subreaper, 0, 0, 0, 0)


def test_kill_9_of_the_trainer_after_its_saves_leaves_no_process(tmp_path):
    import psutil

    require_no_cuda()
    marker = uuid.uuid4().hex
    root = tmp_path / "run" / "checkpoints"
    overrides = ("train.iters=500", "checkpoint.save_interval=1", "output.plot=false")
    with _adopting_orphans(), pretrain_process(tmp_path / "run", *overrides, env={"K2_TEST_RUN": marker}) as run:
        deadline = time.time() + 240
        while not (root / "iter_0000002").exists() and run.proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert (root / "iter_0000002").exists(), run.output()  # two saves published, a third under way
        started = [(p.pid, " ".join(p.cmdline())[:200]) for p in _processes_marked(marker)]
        run.proc.kill()
        run.proc.wait()
    deadline = time.time() + 10
    while _processes_marked(marker) and time.time() < deadline:
        time.sleep(0.1)
    survivors = _processes_marked(marker)
    described = [(p.pid, " ".join(p.cmdline())[:200]) for p in survivors]
    for proc in survivors:  # not left running after a failure (and reaped: they are this process's children now)
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(survivors, timeout=30)
    for pid, _ in started:  # the run's processes that ended as this process's children: reaped
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
    assert described == [], started
