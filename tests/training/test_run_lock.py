"""One run per output directory (k2_megatron.training.run_lock): the lock file names its holder; a live holder's
lock is refused, a dead one's taken over with a note; another host's lock only once its heartbeat has stopped; only
rank 0 takes it. End to end: a second k2-pretrain on the output directory of a running one stops at once with one
line naming the first (pid, host, start, command), touching none of its files, and after the first is killed -9 the
next run takes its lock over and resumes its checkpoint."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from k2_megatron.training import run_lock
from k2_megatron.training.run_lock import LOCK_NAME, RunLockError, acquire, locked_directories

from tests.helpers.model import require_no_cuda
from tests.helpers.torchrun import TINY_RUN, pretrain_process

HOLD = "import sys, time; from k2_megatron.training.run_lock import acquire; acquire(sys.argv[1:]); " \
       "print('locked', flush=True); time.sleep(600)"


def _holder(*directories) -> subprocess.Popen:
    """Another process holding the lock of ``directories`` until it is killed."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, *map(str, directories)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def _lock_of(directory) -> dict:
    with open(os.path.join(directory, LOCK_NAME), encoding="utf-8") as f:
        return json.load(f)


def test_a_live_holder_is_refused_by_name_and_a_dead_one_taken_over(tmp_path):
    notes = []
    holder = _holder(tmp_path)
    try:
        held = _lock_of(tmp_path)
        assert (held["pid"], held["host"]) == (holder.pid, socket.gethostname())
        with pytest.raises(RunLockError) as refused:
            acquire([str(tmp_path)], note=notes.append)
        message = str(refused.value)
        assert "\n" not in message and message.startswith(f"{tmp_path} is in use by another run: pid {holder.pid} "
                                                          f"on host {socket.gethostname()}, started {held['started']}")
        assert HOLD[:30] in message and str(tmp_path / LOCK_NAME) in message
        assert _lock_of(tmp_path) == held and notes == []  # refused: the holder's lock untouched
    finally:
        holder.kill()
        holder.wait()
    lock = acquire([str(tmp_path)], note=notes.append)
    assert len(notes) == 1 and f"took over the stale lock {tmp_path / LOCK_NAME} of pid {holder.pid}" in notes[0]
    assert f"(process {holder.pid} is not running)" in notes[0]
    assert _lock_of(tmp_path)["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / LOCK_NAME).exists()


def _write_lock(directory, **fields) -> str:
    info = {**run_lock._this_process(), **fields}
    path = os.path.join(directory, LOCK_NAME)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(info, f)
    return path


def test_a_reused_pid_or_a_reboot_is_stale_another_hosts_lock_only_without_heartbeat(tmp_path):
    notes = []
    # this very process, but with another start time: the pid was reused
    _write_lock(tmp_path, process_start=(run_lock._process_start(os.getpid()) or 0) + 1)
    acquire([str(tmp_path)], note=notes.append).release()
    assert notes[-1].endswith(f"(pid {os.getpid()} is another process now)")
    _write_lock(tmp_path, boot_id="another-boot")
    acquire([str(tmp_path)], note=notes.append).release()
    assert notes[-1].endswith("(the host has rebooted since)")
    # another host: its processes cannot be seen from here, so a fresh lock is refused even with a dead pid
    path = _write_lock(tmp_path, host="node-17", pid=2**22 + 1)
    with pytest.raises(RunLockError, match=r"pid 4194305 on host node-17, .*it runs on another host, so whether it "
                                           r"still runs cannot be checked from here"):
        acquire([str(tmp_path)], note=notes.append)
    stopped = time.time() - run_lock.STALE_AFTER_SECONDS - 60  # its heartbeat stopped long ago
    os.utime(path, (stopped, stopped))
    acquire([str(tmp_path)], note=notes.append).release()
    assert "of pid 4194305 on host node-17" in notes[-1] and notes[-1].endswith("(no heartbeat for 16 minutes)")


def test_an_unreadable_lock_is_refused_and_a_refusal_releases_what_was_taken(tmp_path):
    (tmp_path / LOCK_NAME).write_text("garbage")
    with pytest.raises(RunLockError, match=r"not a k2-pretrain lock this version can read; if no run uses the "
                                           r"directory, remove that file"):
        acquire([str(tmp_path)])
    out, ckpt = tmp_path / "out", tmp_path / "ckpt"
    assert locked_directories(str(out), str(out / "checkpoints")) == [str(out)]
    assert locked_directories(str(out), str(ckpt)) == [str(out), str(ckpt)]
    holder = _holder(ckpt)
    try:
        with pytest.raises(RunLockError, match=f"{ckpt} is in use by another run: pid {holder.pid}"):
            acquire(locked_directories(str(out), str(ckpt)))
        assert not (out / LOCK_NAME).exists()  # the output directory's lock, taken first, is given back
    finally:
        holder.kill()
        holder.wait()


def test_the_heartbeat_keeps_the_lock_fresh(tmp_path, monkeypatch):
    monkeypatch.setattr(run_lock, "HEARTBEAT_SECONDS", 0.05)
    lock = acquire([str(tmp_path)])
    old = time.time() - 3600
    os.utime(tmp_path / LOCK_NAME, (old, old))
    deadline = time.time() + 10
    while os.stat(tmp_path / LOCK_NAME).st_mtime < time.time() - 60 and time.time() < deadline:
        time.sleep(0.05)
    assert os.stat(tmp_path / LOCK_NAME).st_mtime > time.time() - 60
    lock.release()


def _lock_on_rank(rank: int, world: int, init_file: str, directory: str, held: bool) -> dict:
    import torch.distributed as dist

    from k2_megatron.training.run_lock import take_run_lock

    dist.init_process_group("gloo", rank=rank, world_size=world, init_method=f"file://{init_file}")
    try:
        lock = take_run_lock([directory], rank=rank, world=world)
        out = {"holds": lock is not None, "pid": os.getpid(), "lock_pid": _lock_of(directory)["pid"]}
        dist.barrier()
        if lock is not None:
            lock.release()
        return out
    except RunLockError as e:
        return {"refused": str(e)}
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_only_rank_0_takes_the_lock_and_every_rank_learns_a_refusal(tmp_path):
    from tests.helpers.model import run_gloo_bodies

    results = run_gloo_bodies(_lock_on_rank, 2, lambda r: (r, 2, str(tmp_path / "init1"), str(tmp_path), False))
    assert [r["holds"] for r in results] == [True, False]
    assert results[0]["lock_pid"] == results[1]["lock_pid"] == results[0]["pid"]
    assert not (tmp_path / LOCK_NAME).exists()
    holder = _holder(tmp_path)
    try:
        results = run_gloo_bodies(_lock_on_rank, 2, lambda r: (r, 2, str(tmp_path / "init2"), str(tmp_path), True))
    finally:
        holder.kill()
        holder.wait()
    assert all(r["refused"].startswith(f"{tmp_path} is in use by another run: pid {holder.pid}") for r in results)


def _files(directory) -> dict:
    """Every file under ``directory``: (size, mtime)."""
    out = {}
    for parent, _, names in os.walk(directory):
        for name in names:
            st = os.stat(os.path.join(parent, name))
            out[os.path.relpath(os.path.join(parent, name), directory)] = (st.st_size, st.st_mtime_ns)
    return out


def _wait_for(condition, proc, timeout: float = 240, interval: float = 0.02) -> bool:
    deadline = time.time() + timeout
    while not condition():
        if proc.poll() is not None or time.time() > deadline:
            return False
        time.sleep(interval)
    return True


@pytest.mark.slow
def test_a_second_run_on_the_same_output_dir_is_refused_and_a_killed_runs_lock_taken_over(tmp_path, capsys):
    from k2_megatron.checkpoint.megatron import latest_checkpoint
    from k2_megatron.training.pretrain import main

    require_no_cuda()
    # samples fixed: the sample order depends on them, and the last run resumes the first's checkpoint
    run, quiet = tmp_path / "run", ("output.tensorboard=false", "output.plot=false", "data.train_samples=4000")
    root = run / "checkpoints"
    with pretrain_process(run, "train.iters=500", "checkpoint.save_interval=1", *quiet) as first:
        assert _wait_for(lambda: (root / "latest").exists(), first.proc), first.output()
        in_save = _wait_for(lambda: any(n.startswith(".tmp-iter_") for n in os.listdir(root)), first.proc, 30, 0.005)
        os.kill(first.proc.pid, signal.SIGSTOP)  # frozen (mid-save when in_save): nothing of it changes meanwhile
        try:
            before = _files(run)
            status = main([f"output.dir={run}", *TINY_RUN, *quiet, "train.iters=3", "train.seed=7"])
            after = _files(run)
        finally:
            os.kill(first.proc.pid, signal.SIGCONT)
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.strip()]
        assert status == 2 and len(lines) == 1, err
        assert lines[0].startswith(f"k2-pretrain: RunLockError: {run} is in use by another run: pid {first.proc.pid} "
                                   f"on host {socket.gethostname()}, started "), lines[0]
        assert "-m k2_megatron.training.pretrain output.dir=" in lines[0]
        assert after == before, (in_save, sorted(set(before.items()) ^ set(after.items())))
        published = latest_checkpoint(str(root))
        assert _wait_for(lambda: latest_checkpoint(str(root)) != published, first.proc), first.output()  # it goes on
        first.proc.kill()  # kill -9: its lock stays behind
        first.proc.wait()
    assert _lock_of(run)["pid"] == first.proc.pid
    resumed_from = latest_checkpoint(str(root))
    status = main([f"output.dir={run}", *TINY_RUN, *quiet, "train.iters=1"])
    out, err = capsys.readouterr()
    assert status == 0, err
    assert f"took over the stale lock {run / LOCK_NAME} of pid {first.proc.pid} on host {socket.gethostname()}" in out
    assert f"(process {first.proc.pid} is not running)" in out and f"resumed from {resumed_from}" in out
    assert not (run / LOCK_NAME).exists()
