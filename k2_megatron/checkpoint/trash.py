"""Removing checkpoint directories off the critical path. A K2 checkpoint is ~14 TB; deleting one on a parallel
filesystem can take tens of minutes, and every rank would wait for rank 0 at the next collective. ``discard`` renames
each directory to a trash name in the same parent (``.trash-<name>-<random>``: one atomic metadata operation), then
deletes the trash in a background thread of this process; the caller returns at once.

A process that ends (or crashes) mid-delete leaves only trash directories, which ``trash_in(root)`` finds and the
next save discards. Nothing that was renamed can be a published checkpoint ``latest`` names (the callers in
k2_megatron.checkpoint.megatron trash only older checkpoints and temporary directories), and a trash name is never
read as a checkpoint (it matches neither ``iter_*`` nor ``latest``).
"""

from __future__ import annotations

import os
import shutil
import threading
import uuid

TRASH_PREFIX = ".trash-"

_lock = threading.Lock()
_deleting: set[str] = set()  # trash directories a thread of this process is deleting
_threads: list[threading.Thread] = []


def _rmtree(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


def trash_in(root: str) -> list[str]:
    """The trash directories under ``root`` (left by an earlier process, or being deleted by this one)."""
    return [os.path.join(root, n) for n in sorted(os.listdir(root)) if n.startswith(TRASH_PREFIX)]


def move_to_trash(path: str) -> str:
    """Renames ``path`` to a fresh trash name in its parent directory (atomic); returns the new path."""
    parent, name = os.path.split(os.path.abspath(path))
    trash = os.path.join(parent, f"{TRASH_PREFIX}{name}-{uuid.uuid4().hex[:12]}")
    os.rename(path, trash)
    return trash


def discard(paths: list[str]) -> list[str]:
    """Moves each path to the trash (trash directories stay where they are) and deletes them in one background
    thread; returns the trash paths. A directory another thread is already deleting is left to it."""
    trashed = [p if os.path.basename(p).startswith(TRASH_PREFIX) else move_to_trash(p) for p in paths]
    with _lock:
        mine = [os.path.abspath(p) for p in trashed if os.path.abspath(p) not in _deleting]
        _deleting.update(mine)
        if mine:
            thread = threading.Thread(target=_delete, args=(mine,), name="k2-checkpoint-trash", daemon=True)
            _threads.append(thread)
            thread.start()
    return trashed


def _delete(paths: list[str]) -> None:
    for path in paths:
        try:
            _rmtree(path)
        finally:
            with _lock:
                _deleting.discard(path)


def wait(timeout: float | None = None) -> bool:
    """Waits for this process's deletions (tests; a run does not wait: what is left is the next save's). Returns
    whether they are done."""
    with _lock:
        threads = list(_threads)
    for thread in threads:
        thread.join(timeout)
    with _lock:
        _threads[:] = [t for t in _threads if t.is_alive()]
        return not _threads


__all__ = ["TRASH_PREFIX", "discard", "move_to_trash", "trash_in", "wait"]
