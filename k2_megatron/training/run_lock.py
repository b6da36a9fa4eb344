"""One run per directory: ``k2-pretrain`` locks its output directory (and its checkpoint directory when that lies
elsewhere) for as long as it runs, so that a second run pointed at the same directory stops at startup with one
line naming the first, instead of deleting its save in progress, resuming its checkpoint and interleaving its
metrics.

The lock is a file, ``<dir>/.k2_run.lock``, created with O_CREAT | O_EXCL (atomic on local and NFS file systems,
whichever host creates it) holding JSON: pid, host, start time, command, and what tells a live holder from a dead
one. Only rank 0 of a job takes it (``take_run_lock``, collective: every rank learns the outcome); it is removed
when the run ends, however it ends short of kill -9. A lock left by a killed run is stale, and taken over with a
note, when there is evidence that its holder is gone:

- on this host: its pid is not running, is a zombie, is another process now (a different start time), or the host
  has rebooted since (a different boot id);
- on another host (shared storage: that host's processes cannot be seen from here): the holder touches the file
  every ``HEARTBEAT_SECONDS``; a lock not touched for ``STALE_AFTER_SECONDS`` is stale. Until then it is refused,
  and the message says which file to remove once you know that run is gone.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import shlex
import socket
import sys
import threading
import time
import uuid

LOCK_NAME = ".k2_run.lock"
HEARTBEAT_SECONDS = 60.0
STALE_AFTER_SECONDS = 15 * 60.0  # many missed heartbeats, far beyond clock skew between hosts


class RunLockError(RuntimeError):
    """Another run holds the directory (or the lock cannot be taken); the message names it."""


class RunLock:
    """The lock files this process holds, kept fresh by a heartbeat thread until ``release``."""

    def __init__(self, paths: list[str], token: str):
        self.paths, self._token = paths, token
        self._stop = threading.Event()
        self._heartbeat = threading.Thread(target=self._beat, name="k2-run-lock-heartbeat", daemon=True)
        self._heartbeat.start()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            for path in self.paths:
                with contextlib.suppress(OSError):
                    os.utime(path)

    def release(self) -> None:
        """Removes the lock files that are still ours."""
        self._stop.set()
        for path in self.paths:
            holder = _read(path)
            if holder is not None and holder.get("token") == self._token:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
        self.paths = []


def locked_directories(output_dir: str, checkpoint_dir: str | None) -> list[str]:
    """The directories a run writes: its output directory, and its checkpoint directory when not inside it."""
    dirs = [output_dir]
    if checkpoint_dir:
        out, ckpt = os.path.realpath(output_dir), os.path.realpath(checkpoint_dir)
        if os.path.commonpath([out, ckpt]) != out:
            dirs.append(checkpoint_dir)
    return dirs


def take_run_lock(directories: list[str], *, rank: int, world: int, note=print) -> RunLock | None:
    """Collective: rank 0 locks ``directories`` (``acquire``); every rank raises RunLockError if that failed.
    Returns the lock on rank 0, None elsewhere."""
    lock, error = None, None
    if rank == 0:
        try:
            lock = acquire(directories, note=note)
        except RunLockError as e:
            error = str(e)
    if world > 1:
        import torch.distributed as dist

        errors = [None] * world  # an object collective, as the loop's others (the rank's device under NCCL)
        dist.all_gather_object(errors, error)
        error = errors[0]
    if error is not None:
        raise RunLockError(error)
    return lock


def acquire(directories: list[str], *, note=print) -> RunLock:
    """Locks every directory (created if missing) for this process, or raises RunLockError naming the run that
    holds one (and holds none of them then). ``note(text)`` reports a stale lock taken over."""
    info = _this_process()
    taken: list[str] = []
    try:
        for directory in directories:
            taken.append(_lock_directory(directory, info, note))
    except BaseException:
        for path in taken:
            with contextlib.suppress(OSError):
                os.unlink(path)
        raise
    return RunLock(taken, info["token"])


def describe(holder: dict) -> str:
    """'pid P on host H, started T: COMMAND' of a lock's holder."""
    return (f"pid {holder.get('pid')} on host {holder.get('host')}, started {holder.get('started')}: "
            f"{holder.get('command')}")


# ----- one directory -----

def _lock_directory(directory: str, info: dict, note) -> str:
    path = os.path.join(directory, LOCK_NAME)
    try:
        os.makedirs(directory, exist_ok=True)
        with _host_mutex(directory):  # same-host starters in turn: one of them takes a stale lock over
            for _ in range(3):
                if _create(path, info):
                    return path
                holder = _read_settled(path)
                if holder is None:
                    raise RunLockError(f"{directory} is locked by {path}, which is not a k2-pretrain lock this "
                                       "version can read; if no run uses the directory, remove that file")
                reason = _stale_reason(path, holder)
                if reason is None:
                    raise RunLockError(_in_use_message(directory, path, holder))
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                note(f"k2-pretrain: took over the stale lock {path} of {describe(holder)} ({reason})")
    except OSError as e:
        raise RunLockError(f"cannot lock {directory}: {e.strerror} ({e.filename or path})") from None
    raise RunLockError(f"cannot lock {directory}: {path} keeps reappearing (another run is starting there)")


def _in_use_message(directory: str, path: str, holder: dict) -> str:
    elsewhere = "" if holder.get("host") == socket.gethostname() else (
        f"; it runs on another host, so whether it still runs cannot be checked from here: its lock is stale "
        f"{STALE_AFTER_SECONDS / 60:.0f} minutes after its last heartbeat")
    return (f"{directory} is in use by another run: {describe(holder)} (lock {path}{elsewhere}; if that run is "
            "gone, remove the lock file; or give this run another output.dir / checkpoint.dir)")


def _create(path: str, info: dict) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(json.dumps(info, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())
    return True


def _read(path: str) -> dict | None:
    try:
        with open(path, encoding="utf-8") as f:
            holder = json.load(f)
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) and "pid" in holder and "host" in holder else None


def _read_settled(path: str, wait: float = 2.0) -> dict | None:
    """The holder of ``path``, waiting a moment for a lock just created (possibly on another host) to be written."""
    deadline = time.monotonic() + wait
    while True:
        holder = _read(path)
        if holder is not None or time.monotonic() >= deadline or not os.path.exists(path):
            return holder
        time.sleep(0.1)


@contextlib.contextmanager
def _host_mutex(directory: str):
    """flock on the directory: serialises the starters on this host. Where the file system has no flock (some
    shared ones), O_EXCL alone keeps two starters apart; only a stale lock's takeover could then race."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        yield
        return
    try:
        import fcntl

        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the flock


# ----- is the holder alive? -----

def _this_process() -> dict:
    pid = os.getpid()
    return {"pid": pid, "host": socket.gethostname(), "token": uuid.uuid4().hex,
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": shlex.join(getattr(sys, "orig_argv", sys.argv)),
            "boot_id": _boot_id(), "process_start": _process_start(pid)}


def _stale_reason(path: str, holder: dict) -> str | None:
    """Why the holder of ``path`` is certainly gone, or None when it may be running."""
    if holder.get("host") != socket.gethostname():
        try:
            idle = time.time() - os.stat(path).st_mtime
        except FileNotFoundError:
            return "removed meanwhile"
        if idle > STALE_AFTER_SECONDS:
            return f"no heartbeat for {idle / 60:.0f} minutes"
        return None
    pid = holder.get("pid")
    if holder.get("boot_id") and _boot_id() and holder["boot_id"] != _boot_id():
        return "the host has rebooted since"
    if not isinstance(pid, int) or not _running(pid):
        return f"process {pid} is not running"
    started = _process_start(pid)
    if holder.get("process_start") is not None and started is not None and started != holder["process_start"]:
        return f"pid {pid} is another process now"
    return None


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return _proc_stat(pid)[0:1] != ["Z"]  # a zombie has exited


def _proc_stat(pid: int) -> list[str]:
    """The fields of /proc/<pid>/stat after the command name (state first); [] without /proc."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError:
        return []
    return text[text.rfind(")") + 2:].split()


def _process_start(pid: int) -> int | None:
    """The process's start time in clock ticks after boot (proc(5) field 22): a reused pid has another."""
    fields = _proc_stat(pid)
    return int(fields[19]) if len(fields) > 19 else None


def _boot_id() -> str | None:
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="utf-8") as f:
            return f.read().strip()
    except OSError:
        return None


__all__ = ["LOCK_NAME", "RunLock", "RunLockError", "acquire", "describe", "locked_directories", "take_run_lock"]
