"""Megatron checkpoints of a training run: dist_checkpointing, written to a temporary directory and published
atomically.

Layout under the checkpoint root:

    <root>/iter_0000100/      a complete checkpoint (dist_checkpointing files + k2_meta.json + integrity manifest)
    <root>/latest             one line, "iter_0000100": the checkpoint to resume from (replaced atomically)
    <root>/.tmp-iter_*/       a save in progress (or one interrupted by a crash: ignored, removed by the next save)

Save protocol (every rank calls ``save_checkpoint``): rank 0 makes ``.tmp-iter_N``; every rank writes its shards
(model, optimizer state, its RNG states); rank 0 writes ``k2_meta.json`` (step, data-stream state, model config,
parallel layout, metric history) and fsyncs, renames the directory to ``iter_N`` and only then replaces
``latest`` (write ``latest.tmp``, fsync, ``os.replace``). A crash anywhere before the last rename leaves the
previous ``latest`` and its directory untouched; a crash between the two renames leaves a complete but
unpublished ``iter_N`` (the next save of that step replaces it).

Load: ``latest`` -> directory -> ``k2_meta.json`` checked against the current model config and layout
(``CheckpointMismatchError`` names the fields that differ) -> dist_checkpointing.load with its integrity manifest
verified (``CheckpointCorruptError`` for a missing, truncated or altered file).
"""

from __future__ import annotations

import json
import os
import random
import shutil

import numpy as np
import torch
import torch.distributed as dist

from k2_megatron.checkpoint.errors import CheckpointCorruptError, CheckpointMismatchError

LATEST = "latest"
META = "k2_meta.json"
FORMAT_VERSION = 1


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _fsync_dir(path: str) -> None:
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


def _atomic_write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


def iter_dir_name(step: int) -> str:
    return f"iter_{step:07d}"


def latest_checkpoint(root: str) -> str | None:
    """The published checkpoint directory named by ``<root>/latest``, or None when there is none.
    ``root`` may also be a checkpoint directory itself (holding k2_meta.json)."""
    if os.path.isfile(os.path.join(root, META)):
        return root
    pointer = os.path.join(root, LATEST)
    if not os.path.isfile(pointer):
        return None
    with open(pointer, encoding="utf-8") as f:
        name = f.read().strip()
    path = os.path.join(root, name)
    if not name or os.sep in name or not os.path.isdir(path):
        raise CheckpointCorruptError(f"{pointer} names {name!r}, which is not a checkpoint directory under {root}")
    return path


# ----- state -----

def _rng_state() -> dict:
    from megatron.core import tensor_parallel

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
             "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _sharded_state(model_chunks, optimizer, *, is_loading: bool, with_rng: bool) -> dict:
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    if len(model_chunks) == 1:
        model_sd = {"model": model_chunks[0].module.sharded_state_dict()}
    else:
        model_sd = {f"model{i}": c.module.sharded_state_dict() for i, c in enumerate(model_chunks)}
    state = dict(model_sd)
    state["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=is_loading)
    if with_rng:
        world = dist.get_world_size() if dist.is_initialized() else 1
        state["rng_state"] = ShardedObject("rng_state", _rng_state(), (world,), (_rank(),), replica_id=0)
    return state


def save_checkpoint(root: str, step: int, model_chunks, optimizer, meta: dict, *, keep: int = 2,
                    _before_publish=None) -> str:
    """Saves on every rank and publishes ``<root>/iter_<step>`` atomically; returns its path.

    meta: JSON-serialisable run state (step, data stream state, model config, layout, history); written by
    rank 0. ``_before_publish``: a test hook called on rank 0 after the files are written, before publishing."""
    from megatron.core import dist_checkpointing

    final = os.path.join(root, iter_dir_name(step))
    tmp = os.path.join(root, ".tmp-" + iter_dir_name(step))
    if _rank() == 0:
        os.makedirs(root, exist_ok=True)
        for name in os.listdir(root):  # leftovers of interrupted saves
            if name.startswith(".tmp-iter_"):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)
        os.makedirs(tmp)
    _barrier()
    state = _sharded_state(model_chunks, optimizer, is_loading=False, with_rng=True)
    dist_checkpointing.save(state, tmp, verify_integrity=True)
    _barrier()
    if _rank() == 0:
        meta = {"format_version": FORMAT_VERSION, "step": step, **meta}
        _atomic_write_text(os.path.join(tmp, META), json.dumps(meta, indent=1, sort_keys=True, default=str))
        _fsync_dir(tmp)
        if _before_publish is not None:
            _before_publish(tmp)
        if os.path.exists(final):  # an unpublished directory of the same step (crash between the renames)
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(root)
        _atomic_write_text(os.path.join(root, LATEST), iter_dir_name(step) + "\n")
        _prune(root, keep)
    _barrier()
    return final


def _prune(root: str, keep: int) -> None:
    current = latest_checkpoint(root)
    done = sorted(n for n in os.listdir(root) if n.startswith("iter_") and os.path.isdir(os.path.join(root, n)))
    for name in done[:-keep] if keep > 0 else []:
        path = os.path.join(root, name)
        if os.path.abspath(path) != os.path.abspath(current):
            shutil.rmtree(path, ignore_errors=True)


def read_meta(path: str) -> dict:
    meta_path = os.path.join(path, META)
    if not os.path.isfile(meta_path):
        raise CheckpointCorruptError(f"{path} is not a complete K2 pretraining checkpoint: {META} is missing")
    try:
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointCorruptError(f"{meta_path} is unreadable: {e}") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointMismatchError(f"{path}: checkpoint format {meta.get('format_version')!r}, this code reads "
                                      f"{FORMAT_VERSION}")
    return meta


def check_compatible(meta: dict, expected: dict, path: str, ignore_model_keys=()) -> None:
    """Raises CheckpointMismatchError listing every field of ``expected`` (model config, layout) that differs."""
    diffs = []
    for section, want in expected.items():
        have = meta.get(section)
        if isinstance(want, dict) and isinstance(have, dict):
            have = {k: v for k, v in have.items() if k not in ignore_model_keys}
            for k in sorted(set(want) | set(have)):
                if want.get(k) != have.get(k):
                    diffs.append(f"{section}.{k}: checkpoint {have.get(k)!r}, this run {want.get(k)!r}")
        elif want != have:
            diffs.append(f"{section}: checkpoint {have!r}, this run {want!r}")
    if diffs:
        raise CheckpointMismatchError(f"checkpoint {path} was written for a different configuration:\n  "
                                      + "\n  ".join(diffs))


def load_checkpoint(path: str, model_chunks, optimizer, expected: dict, ignore_model_keys=()) -> dict:
    """Loads the checkpoint directory ``path`` into the model chunks and optimizer (every rank); returns its meta.

    expected: {section: value} that must equal the checkpoint's (model config, parallel layout);
    ignore_model_keys: fields of dict sections not compared (rope settings when a new stage starts)."""
    from megatron.core import dist_checkpointing

    meta = read_meta(path)
    check_compatible(meta, expected, path, ignore_model_keys)
    world = dist.get_world_size() if dist.is_initialized() else 1
    same_world = meta.get("world_size") == world
    state = _sharded_state(model_chunks, optimizer, is_loading=True, with_rng=same_world)
    try:
        loaded = dist_checkpointing.load(state, path, verify_integrity=True)
    except Exception as e:  # megatron raises assorted types for missing / damaged files
        raise CheckpointCorruptError(f"checkpoint {path} could not be loaded ({type(e).__name__}: {e}); it is "
                                     "corrupt or incomplete. Remove it (and fix 'latest') or load another one "
                                     "with checkpoint.load=...") from e
    with torch.no_grad():
        if len(model_chunks) == 1:
            model_chunks[0].module.load_state_dict(loaded["model"])
        else:
            for i, c in enumerate(model_chunks):
                c.module.load_state_dict(loaded[f"model{i}"])
    optimizer.load_state_dict(loaded["optimizer"])
    if same_world and "rng_state" in loaded:
        _set_rng_state(loaded["rng_state"])
    return meta
