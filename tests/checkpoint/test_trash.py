"""Checkpoint pruning and leftover cleanup off the critical path (k2_megatron.checkpoint.trash, used by
k2_megatron.checkpoint.megatron): directories are renamed to trash names at once and deleted by a background thread,
so the caller returns while the deletion is still running; ``latest`` never names a trashed directory, and trash left
by a process that ended mid-delete is removed by the next cleanup. The deletion is held on an Event: what is checked
is the order of events, not timings."""

from __future__ import annotations

import os
import shutil
import threading

import pytest

from k2_megatron.checkpoint import trash
from k2_megatron.checkpoint.megatron import LATEST, _prune, _remove_leftovers, latest_checkpoint

GUARD_SECONDS = 60


@pytest.fixture
def held_deletion(monkeypatch):
    """trash's rmtree blocked until ``release`` is set; ``started`` is set once a deletion has begun. Every path is
    deleted once."""
    started, release = threading.Event(), threading.Event()
    calls = []

    def rmtree(path):
        calls.append(path)
        started.set()
        assert release.wait(GUARD_SECONDS)
        shutil.rmtree(path)

    monkeypatch.setattr(trash, "_rmtree", rmtree)
    yield started, release
    release.set()
    assert trash.wait(GUARD_SECONDS)
    assert len(calls) == len(set(calls)), calls


def _checkpoints(root, steps, latest):
    for step in steps:
        d = root / f"iter_{step:07d}"
        d.mkdir(parents=True)
        (d / "__0_0.distcp").write_bytes(b"x" * 100)
        (d / "k2_meta.json").write_text("{}")
    (root / LATEST).write_text(f"iter_{latest:07d}\n")


def _names(root):
    return sorted(os.listdir(root))


def test_pruning_returns_before_the_deletion_ends(tmp_path, held_deletion):
    started, release = held_deletion
    _checkpoints(tmp_path, [1, 2, 3], latest=3)
    _prune(str(tmp_path), keep=1)  # returns although the deletion is held
    assert started.wait(GUARD_SECONDS)
    names = _names(tmp_path)
    assert [n for n in names if n.startswith("iter_")] == ["iter_0000003"]
    assert latest_checkpoint(str(tmp_path)) == str(tmp_path / "iter_0000003")
    trashed = [n for n in names if n.startswith(trash.TRASH_PREFIX)]
    assert sorted(n.split("-")[1] for n in trashed) == ["iter_0000001", "iter_0000002"]
    release.set()
    assert trash.wait(GUARD_SECONDS)
    assert _names(tmp_path) == ["iter_0000003", LATEST]


def test_the_checkpoint_latest_names_is_never_trashed(tmp_path, held_deletion):
    _checkpoints(tmp_path, [1, 2, 3], latest=1)  # e.g. a newer save published its directory but not latest yet
    _prune(str(tmp_path), keep=1)
    held_deletion[1].set()
    assert trash.wait(GUARD_SECONDS)
    assert _names(tmp_path) == ["iter_0000001", "iter_0000003", LATEST]
    assert latest_checkpoint(str(tmp_path)) == str(tmp_path / "iter_0000001")


def test_leftovers_and_the_trash_of_a_crashed_deletion_are_removed_in_the_background(tmp_path, held_deletion):
    started, release = held_deletion
    _checkpoints(tmp_path, [4], latest=4)
    (tmp_path / ".tmp-iter_0000005").mkdir()  # a save interrupted by a crash
    (tmp_path / ".tmp-iter_0000005" / "__0_0.distcp").write_bytes(b"partial")
    (tmp_path / ".tmp-iter_0000005.writer").mkdir()
    crashed = tmp_path / f"{trash.TRASH_PREFIX}iter_0000003-0123456789ab"  # a deletion cut short by a crash
    (crashed / "sub").mkdir(parents=True)
    (crashed / "sub" / "__1_0.distcp").write_bytes(b"left")
    _remove_leftovers(str(tmp_path))
    assert started.wait(GUARD_SECONDS)
    names = _names(tmp_path)
    assert not [n for n in names if n.startswith(".tmp-")]  # renamed at once: the save may use the names again
    assert len([n for n in names if n.startswith(trash.TRASH_PREFIX)]) == 3 and crashed.name in names
    release.set()
    assert trash.wait(GUARD_SECONDS)
    assert _names(tmp_path) == ["iter_0000004", LATEST]


def test_a_directory_being_deleted_is_not_deleted_twice(tmp_path, held_deletion):
    started, release = held_deletion
    (tmp_path / "old").mkdir()
    [path] = trash.discard([str(tmp_path / "old")])
    assert started.wait(GUARD_SECONDS)
    assert trash.discard(trash.trash_in(str(tmp_path))) == [path]  # the next sweep finds it in flight: left alone
    release.set()
    assert trash.wait(GUARD_SECONDS)
    assert _names(tmp_path) == []
