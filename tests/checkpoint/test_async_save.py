"""Asynchronous checkpoint saves (k2_megatron.checkpoint.megatron.Checkpointer, .writer), one process and two.

The writer process of a save is held at a gate (a file the test creates) so that what happens while it writes is
deterministic:
- training goes on while the writer writes: a whole optimizer step runs between ``save`` and the publication,
  ``poll`` publishes nothing until every rank's writer is done, and the checkpoint holds the state of the step it
  was taken at (not the one trained meanwhile), bit for bit;
- ``abandon`` kills the writer and removes the temporary directory; ``latest`` keeps the previous checkpoint;
  ``finish_within`` abandons a save still writing at the end of its grace period, publishes one done within it;
- kill -9 of the trainer while its writer writes: ``latest`` still names the previous, complete checkpoint
  (which loads), and no process the trainer started (writer, megatron's Manager, a resource_tracker) outlives it;
- a full disk in one rank's write fails the save on every rank, each naming that rank's errno and file.
"""

import os
import signal
import time

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

import pytest
import torch


pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def _hold_writers_at(gate: str) -> None:
    """Every writer (forked after this call) waits for the file ``gate`` before writing."""
    from tests.helpers.checkpoint import gated_writer
    from k2_megatron.checkpoint import writer

    writer._write_then_hash = gated_writer(gate)


def _alive(pids) -> list[int]:
    import psutil

    out = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
        except psutil.NoSuchProcess:
            pass
    return out


def _children() -> list[int]:
    import psutil

    return [p.pid for p in psutil.Process().children(recursive=True)]


def _async_run(rank, world, init_file, tmp):
    from tests.helpers.pretraining import build_zero1_bf16, train_step, whole_state
    from k2_megatron.checkpoint.megatron import Checkpointer, latest_checkpoint, load_checkpoint
    from k2_megatron.config import ParallelLayout

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    out = {}
    megatron_queue = filesystem_async._results_queue  # what megatron's own saves in this process use
    gate = os.path.join(tmp, "gate")
    _hold_writers_at(gate)
    cfg, chunks, opt = build_zero1_bf16(ParallelLayout(), rank, world, init_file, seed=1)
    root = os.path.join(tmp, "ckpt")
    checkpointer = Checkpointer(root, asynchronous=True)
    train_step(cfg, chunks, opt, seed=1)
    assert checkpointer.save(1, chunks, opt, {"note": "first"}) is None
    snapshot = whole_state(chunks, opt) if world == 1 else None
    out["writers_during"] = len(checkpointer.writer_pids())
    train_step(cfg, chunks, opt, seed=2)  # the step after the save, while the save is in flight
    out["published_after_step"] = checkpointer.poll()
    out["pending_after_step"] = checkpointer.pending_step
    out["latest_while_writing"] = latest_checkpoint(root)
    torch.distributed.barrier()
    if rank == 0:
        open(gate, "w").close()
    out["published"] = checkpointer.wait()
    out["latest"] = latest_checkpoint(root)
    out["children_after"] = _alive(_children())
    if world == 1:
        after_step_2 = whole_state(chunks, opt)
        load_checkpoint(out["latest"], chunks, opt, {})
        loaded = whole_state(chunks, opt)
        out["differs_from_snapshot"] = sorted(str(k) for k in snapshot if not torch.equal(loaded[k], snapshot[k]))
        out["step_2_changed"] = sum(not torch.equal(after_step_2[k], snapshot[k]) for k in snapshot)
    # abandon a save: the previous checkpoint stays
    if rank == 0:
        os.remove(gate)
    torch.distributed.barrier()
    checkpointer.save(2, chunks, opt, {})
    out["abandoned"] = checkpointer.abandon()
    out["latest_after_abandon"] = latest_checkpoint(root)
    out["leftovers"] = sorted(n for n in os.listdir(root) if n.startswith(".tmp"))
    out["children_after_abandon"] = _alive(_children())
    # a grace period (SIGTERM's): a writer still held when it ends is abandoned; one done within it is published
    checkpointer.save(3, chunks, opt, {})
    out["grace_ended"] = checkpointer.finish_within(0.5)
    out["latest_after_grace"] = latest_checkpoint(root)
    out["leftovers_after_grace"] = sorted(n for n in os.listdir(root) if n.startswith(".tmp"))
    torch.distributed.barrier()
    if rank == 0:
        open(gate, "w").close()
    checkpointer.save(3, chunks, opt, {})
    out["within_grace"] = checkpointer.finish_within(120)
    out["megatron_queue_restored"] = filesystem_async._results_queue is megatron_queue
    return out


@pytest.mark.parametrize("world", [1, 2])
def test_training_goes_on_while_the_writer_writes(tmp_path, world):
    from tests.helpers.model import run_gloo_bodies

    ranks = run_gloo_bodies(_async_run, world, lambda r: (r, world, str(tmp_path / "init"), str(tmp_path)))
    published = str(tmp_path / "ckpt" / "iter_0000001")
    for r in ranks:
        assert r["writers_during"] == 1
        assert r["published_after_step"] is None and r["pending_after_step"] == 1
        assert r["latest_while_writing"] is None
        assert r["published"] == published and r["latest"] == published
        assert r["children_after"] == []
        assert r["abandoned"] == 2 and r["latest_after_abandon"] == published and r["leftovers"] == []
        assert r["children_after_abandon"] == []
        assert r["grace_ended"] is None and r["latest_after_grace"] == published and r["leftovers_after_grace"] == []
        assert r["within_grace"] == str(tmp_path / "ckpt" / "iter_0000003")
        assert r["megatron_queue_restored"]  # a later megatron save (the converter's) is not sent to our files
    if world == 1:
        assert ranks[0]["step_2_changed"] > 100
        assert ranks[0]["differs_from_snapshot"] == []


def _killed_trainer(rank, world, init_file, tmp, result_path):
    """_save_sync_then_async_held, reported to the parent; then waits to be killed (a run_gloo_bodies body returns
    once it has reported)."""
    from tests.helpers.model import report_to_parent

    report_to_parent(_save_sync_then_async_held, result_path, rank, world, init_file, tmp)
    time.sleep(600)


def _save_sync_then_async_held(rank, world, init_file, tmp):
    """Saves step 1 synchronously and step 2 asynchronously (its writer held at a gate that never opens); its
    processes after each."""
    from tests.helpers.pretraining import build_zero1_bf16, train_step
    from k2_megatron.checkpoint import megatron as megatron_checkpoint
    from k2_megatron.config import ParallelLayout

    out = {}
    cfg, chunks, opt = build_zero1_bf16(ParallelLayout(), rank, world, init_file, seed=1)
    root = os.path.join(tmp, "ckpt")
    train_step(cfg, chunks, opt)
    megatron_checkpoint.save_checkpoint(root, 1, chunks, opt, {})
    out["children_after_sync_save"] = _children()
    if hasattr(megatron_checkpoint, "Checkpointer"):
        _hold_writers_at(os.path.join(tmp, "never"))
        train_step(cfg, chunks, opt, seed=2)
        megatron_checkpoint.Checkpointer(root, asynchronous=True).save(2, chunks, opt, {})
    out["children"] = _children()
    out["pid"] = os.getpid()
    return out


def _load_latest(rank, world, init_file, tmp):
    from tests.helpers.pretraining import build_zero1_bf16
    from k2_megatron.checkpoint.megatron import latest_checkpoint, load_checkpoint
    from k2_megatron.config import ParallelLayout

    out = {}
    cfg, chunks, opt = build_zero1_bf16(ParallelLayout(), rank, world, init_file, seed=3)
    out["latest"] = latest_checkpoint(os.path.join(tmp, "ckpt"))
    out["meta_step"] = load_checkpoint(out["latest"], chunks, opt, {})["step"]
    return out


def test_kill_9_during_an_async_save_leaves_latest_complete_and_nothing_running(tmp_path):
    import multiprocessing

    from tests.helpers.model import run_gloo_bodies

    result = tmp_path / "trainer.pt"
    trainer = multiprocessing.get_context("spawn").Process(
        target=_killed_trainer, args=(0, 1, str(tmp_path / "init1"), str(tmp_path), str(result)))
    trainer.start()
    try:
        deadline = time.time() + 240
        while not result.exists() and trainer.is_alive() and time.time() < deadline:
            time.sleep(0.2)
        time.sleep(0.5)  # the result file is complete
        out = torch.load(result, weights_only=False)
        assert "error" not in out, out.get("error")
        assert out["children_after_sync_save"] == []  # a synchronous save leaves no process behind
        assert len(out["children"]) == 1  # the writer of step 2, held at its gate
        os.kill(out["pid"], signal.SIGKILL)
        trainer.join(30)
    finally:
        if trainer.is_alive():
            trainer.kill()
    deadline = time.time() + 10
    while _alive(out["children"]) and time.time() < deadline:
        time.sleep(0.1)
    assert _alive(out["children"]) == []
    loaded = run_gloo_bodies(_load_latest, 1, lambda r: (r, 1, str(tmp_path / "init2"), str(tmp_path)))[0]
    assert loaded["latest"] == str(tmp_path / "ckpt" / "iter_0000001") and loaded["meta_step"] == 1


def _disk_full_on_rank_1(rank, world, init_file, tmp):
    import errno
    import functools

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from tests.helpers.pretraining import build_zero1_bf16
    from k2_megatron.checkpoint.errors import CheckpointSaveError
    from k2_megatron.checkpoint.megatron import Checkpointer, latest_checkpoint
    from k2_megatron.config import ParallelLayout

    write_item = filesystem_async._write_item

    @functools.wraps(write_item)  # megatron reads its signature
    def disk_full_at_step_2(*args, **kwargs):
        stream = next(a for a in args if hasattr(a, "write") and hasattr(a, "name"))
        if rank == 1 and ".tmp-iter_0000002" in stream.name:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return write_item(*args, **kwargs)

    filesystem_async._write_item = disk_full_at_step_2
    _, chunks, opt = build_zero1_bf16(ParallelLayout(), rank, world, init_file, seed=1)
    root = os.path.join(tmp, "ckpt")
    out = {}
    for asynchronous in (False, True):
        checkpointer = Checkpointer(root, asynchronous=asynchronous)
        checkpointer.save(1, chunks, opt, {})
        checkpointer.wait()
        try:
            checkpointer.save(2, chunks, opt, {})
            checkpointer.wait()
            out[asynchronous] = None
        except CheckpointSaveError as e:
            out[asynchronous] = str(e)
        torch.distributed.barrier()
        out[f"latest {asynchronous}"] = latest_checkpoint(root)
        out[f"leftovers {asynchronous}"] = sorted(n for n in os.listdir(root) if n.startswith(".tmp"))
    return out


def test_a_full_disk_on_one_rank_fails_the_save_on_every_rank_naming_it(tmp_path):
    """ENOSPC in rank 1's write, synchronous and asynchronous: every rank raises CheckpointSaveError (no rank waits
    for the others forever); rank 0 and rank 1 name rank 1's errno and file; nothing is left of the save."""
    from tests.helpers.model import run_gloo_bodies

    results = run_gloo_bodies(_disk_full_on_rank_1, 2, lambda r: (r, 2, str(tmp_path / "init"), str(tmp_path)))
    root = tmp_path / "ckpt"
    for asynchronous in (False, True):
        for rank in (0, 1):
            message = results[rank][asynchronous]
            assert message is not None and message.startswith(
                f"the save of step 2 failed: rank 1: [Errno 28] No space left on device (writing {root}/"
                ".tmp-iter_0000002/__1_0.distcp)"), (rank, asynchronous, message)
            assert message.endswith(f"{root / 'latest'} still names iter_0000001"), message
            assert results[rank][f"latest {asynchronous}"] == str(root / "iter_0000001")
            assert results[rank][f"leftovers {asynchronous}"] == []
