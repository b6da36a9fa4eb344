"""Integrity of a megatron checkpoint directory, per rank: each rank hashes what it writes and verifies what it reads.

Save: right after a rank's writer has written (and fsynced) its files, it SHA-256s them into
``k2_integrity.rank<r>.json`` (in the writer process when the save is asynchronous). At publish, rank 0 hashes
the files only it writes (torch DCP's ``.metadata``, megatron's ``metadata.json``, ``k2_meta.json``) and merges
everything into ``k2_integrity.json``:

    {"algorithm": "sha256", "files": {"__3_0.distcp": {"sha256": "...", "bytes": 123, "hashed_by": 3}, ...}}

Load: every rank verifies ``k2_meta.json`` and ``.metadata`` (every rank reads them) and the files holding the
pieces it requested (k2_megatron.checkpoint.dcp_metadata knows which), so the cost is what a rank reads, in
parallel, never the whole checkpoint on one rank while the others wait in a collective.
"""

from __future__ import annotations

import hashlib
import json
import os

from k2_megatron.checkpoint.durable import atomic_write_text
from k2_megatron.checkpoint.errors import CheckpointCorruptError

MANIFEST = "k2_integrity.json"
ALGORITHM = "sha256"
_RANK_MANIFEST = "k2_integrity.rank{rank:05d}.json"
_READ_CHUNK = 8 << 20


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_READ_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _entries(directory: str, names, rank: int) -> dict:
    return {name: {"sha256": sha256_file(os.path.join(directory, name)),
                   "bytes": os.path.getsize(os.path.join(directory, name)), "hashed_by": rank} for name in names}


def _write_json(path: str, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=True))


def write_rank_manifest(directory: str, rank: int, names) -> None:
    """Rank ``rank``'s hashes of the files ``names`` (relative to ``directory``) it has just written."""
    _write_json(os.path.join(directory, _RANK_MANIFEST.format(rank=rank)), _entries(directory, names, rank))


def merge_manifests(directory: str, own_names) -> None:
    """Rank 0 at publish: its hashes of ``own_names`` plus every rank's manifest into MANIFEST. Every file of the
    directory must be covered (a writer that left no manifest is an incomplete save)."""
    files = _entries(directory, own_names, 0)
    rank_manifests = sorted(n for n in os.listdir(directory) if n.startswith("k2_integrity.rank"))
    for name in rank_manifests:
        with open(os.path.join(directory, name), encoding="utf-8") as f:
            files.update(json.load(f))
    unlisted = sorted(n for n in os.listdir(directory) if os.path.isfile(os.path.join(directory, n))
                      and n not in files and n not in rank_manifests and n != MANIFEST)
    if unlisted:
        raise CheckpointCorruptError(f"{directory}: no rank hashed {', '.join(unlisted)} (a writer failed?)")
    _write_json(os.path.join(directory, MANIFEST), {"algorithm": ALGORITHM, "files": files})
    for name in rank_manifests:
        os.remove(os.path.join(directory, name))


def load_manifest(directory: str) -> dict:
    """{file name: {"sha256", "bytes", "hashed_by"}} of a checkpoint directory's manifest."""
    path = os.path.join(directory, MANIFEST)
    if not os.path.isfile(path):
        raise CheckpointCorruptError(f"{path} is missing: the checkpoint is incomplete, or was not written by this "
                                     "version of k2_megatron")
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
        files = manifest["files"]
        if manifest.get("algorithm") != ALGORITHM or not isinstance(files, dict):
            raise ValueError(f"algorithm {manifest.get('algorithm')!r}")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointCorruptError(f"{path} is unreadable: {e}") from None
    return files


def verify_files(directory: str, manifest: dict, names) -> None:
    """Raises CheckpointCorruptError naming the first of ``names`` that is missing, of another size or altered."""
    for name in sorted(names):
        path = os.path.join(directory, name)
        entry = manifest.get(name)
        if entry is None:
            raise CheckpointCorruptError(f"{path} is not in the checkpoint's {MANIFEST}")
        if not os.path.isfile(path):
            raise CheckpointCorruptError(f"{path} is missing")
        size = os.path.getsize(path)
        if size != entry["bytes"]:
            raise CheckpointCorruptError(f"{path} has {size} bytes, {entry['bytes']} were written (truncated or "
                                         "altered)")
        if sha256_file(path) != entry["sha256"]:
            raise CheckpointCorruptError(f"{path} is corrupt: its SHA-256 differs from the one recorded at save")


__all__ = ["MANIFEST", "load_manifest", "merge_manifests", "sha256_file", "verify_files", "write_rank_manifest"]
