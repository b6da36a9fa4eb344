"""Writes that survive a crash: a file is complete under its final name or absent, and a rename is on disk once
the directory holding it is fsynced."""

from __future__ import annotations

import os


def fsync_dir(path: str) -> None:
    """Flushes a directory's entries (renames, new files); a no-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_file(path: str) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def atomic_write_text(path: str, text: str) -> None:
    """``text`` at ``path``: written to ``<path>.tmp``, fsynced, renamed into place, directory fsynced."""
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))


__all__ = ["atomic_write_text", "fsync_dir", "fsync_file"]
