"""Megatron checkpoints of a training run: dist_checkpointing, written to a temporary directory (synchronously, or
asynchronously by a writer process per rank) and published atomically once every rank is done.

Layout under the checkpoint root:

    <root>/iter_0000100/        a complete checkpoint: torch DCP files (``__<rank>_<n>.distcp``, ``.metadata``),
                                megatron's metadata.json, k2_meta.json, k2_integrity.json
    <root>/latest               one line, "iter_0000100": the checkpoint to resume from (replaced atomically)
    <root>/.tmp-iter_*/         a save in progress (or interrupted by a crash: ignored, removed by the next save)
    <root>/.tmp-iter_*.writer/  the writers' results of a save in progress
    <root>/.trash-*/            pruned checkpoints and leftovers being deleted in the background (what a crash
                                leaves of them is removed by the next save; k2_megatron.checkpoint.trash)

What a checkpoint holds (format 2) is independent of the parallel layout: the model under megatron's global keys,
the optimizer state in model space (k2_megatron.megatron.optimizer_state), every rank's RNG states (restored only
on the same layout), k2_meta.json (step, data-stream state, model config, layout; no metric history, so its size
does not grow with the step). A checkpoint written on any TP / PP / EP / DP layout loads on any other;
``load_checkpoint(..., weights_only=True)`` loads the model only (the optimizer starts afresh from the loaded
weights).

Save (every rank calls ``Checkpointer.save``): rank 0 makes ``.tmp-iter_N``; every rank plans and writes its
files and hashes them (k2_megatron.checkpoint.writer, .integrity); once every rank is done, rank 0 writes DCP's
.metadata and megatron's metadata.json (megatron's finalization), then publishes: k2_meta.json, a check that every
global tensor is completely written, the merged integrity manifest, fsync, rename to ``iter_N``, and only then
``latest`` (write ``latest.tmp``, fsync, ``os.replace``), then moves the checkpoints beyond ``keep`` to the trash
(deleted in the background). A crash or kill anywhere before the last rename leaves
the previous ``latest`` and its directory untouched; between the two renames, a complete but unpublished
``iter_N`` (the next save of that step replaces it). An asynchronous save is finalized by ``poll`` (collective,
cheap: call it every step) or ``wait``; ``abandon`` kills the writers and removes the temporary directory;
``finish_within(seconds)`` publishes it within a grace period (a SIGTERM's) or abandons it.

Load: integrity of k2_meta.json and .metadata -> k2_meta.json checked against the current model config
(``CheckpointMismatchError`` names the fields that differ) -> .metadata read without trusting it and every
pickled object this rank loads checked first (k2_megatron.checkpoint.dcp_metadata; ``CheckpointUnsafeError``) ->
each rank verifies the files it reads (``CheckpointCorruptError`` names a missing, truncated or altered file; every
rank raises the first rank's error) -> dist_checkpointing.load.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import time
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
import torch.distributed as dist

from k2_megatron.checkpoint import integrity, trash
from k2_megatron.checkpoint.dcp_metadata import (METADATA, check_objects, describe_problems, read_metadata,
                                                 read_plan, uncovered_tensors)
from k2_megatron.checkpoint.durable import atomic_write_text, fsync_dir, fsync_file
from k2_megatron.checkpoint.errors import (CheckpointCorruptError, CheckpointError, CheckpointMismatchError,
                                          CheckpointSaveError, CheckpointUnsafeError)

LATEST = "latest"
META = "k2_meta.json"
FORMAT_VERSION = 2
_TMP_PREFIX = ".tmp-iter_"
_RANK0_FILES = (METADATA, "metadata.json", META)  # written by rank 0 only, after every rank's writer


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


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

def parallel_layout() -> dict:
    """The sizes of the initialised parallel layout (what RNG states and rank files depend on)."""
    from megatron.core import parallel_state

    from k2_megatron.megatron.layout import initialized_layout

    if not parallel_state.model_parallel_is_initialized():
        return {"world_size": _world()}
    layout = initialized_layout()
    sizes = ("tensor_parallel", "pipeline_parallel", "virtual_pipeline_stages", "expert_parallel",
             "expert_tensor_parallel", "context_parallel", "data_parallel")
    return {"world_size": _world(), **{k: getattr(layout, k) for k in sizes}}


def _rng_state() -> dict:
    """This rank's RNG states as plain data and tensors (loadable with torch.load(weights_only=True))."""
    from megatron.core import tensor_parallel

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
             "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _model_state(model_chunks) -> dict:
    if len(model_chunks) == 1:
        return {"model": model_chunks[0].module.sharded_state_dict()}
    return {f"model{i}": c.module.sharded_state_dict() for i, c in enumerate(model_chunks)}


def _sharded_state(model_chunks, optimizer, *, is_loading: bool, with_rng: bool) -> dict:
    """The sharded state dict of a checkpoint: model chunks, the optimizer's state (None: none), this rank's RNG."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    state = _model_state(model_chunks)
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(dict(state), is_loading=is_loading)
    if with_rng:
        state["rng_state"] = ShardedObject("rng_state", _rng_state(), (_world(),), (_rank(),), replica_id=0)
    return state


# ----- save -----

@dataclass
class _Save:
    step: int
    tmp: str
    final: str
    results: str  # the writers' result files
    meta: dict
    before_publish: object = None
    queue: object = None  # this rank's writer's results (writer.ResultFile or ResultSlot)


def _agree(error: BaseException | None) -> None:
    """Collective: raises on every rank if ``error`` is set on any (this rank's own error as itself; another rank's
    as a CheckpointError of the same kind naming that rank)."""
    if _world() == 1:
        if error is not None:
            raise error
        return
    reports = [None] * _world()
    report = None if error is None else (type(error).__name__, str(error))
    dist.all_gather_object(reports, report)
    if error is not None:
        raise error
    kinds = {cls.__name__: cls for cls in (CheckpointCorruptError, CheckpointMismatchError, CheckpointUnsafeError)}
    for rank, r in enumerate(reports):
        if r is not None:
            raise kinds.get(r[0], CheckpointError)(f"rank {rank}: {r[1]}")


def _remove_leftovers(root: str) -> None:
    """Discards the temporary directories of interrupted saves and the trash of interrupted deletions (in the
    background: k2_megatron.checkpoint.trash)."""
    leftovers = [os.path.join(root, n) for n in sorted(os.listdir(root)) if n.startswith(_TMP_PREFIX)]
    trash.discard(leftovers + trash.trash_in(root))


class Checkpointer:
    """The checkpoints of one run under ``root``: every rank constructs one and calls its methods together (each
    is collective). ``asynchronous``: ``save`` returns once this rank's state is copied for writing and a writer
    process writes it while training goes on; ``poll`` / ``wait`` publish it. One save at a time: ``save`` first
    waits for the one in flight."""

    def __init__(self, root: str, *, keep: int = 2, asynchronous: bool = False):
        from k2_megatron.checkpoint.writer import AsyncWriter

        self.root, self.keep, self.asynchronous = root, keep, asynchronous
        self._writer = AsyncWriter() if asynchronous else None
        self._pending: _Save | None = None

    @property
    def pending_step(self) -> int | None:
        """The step of the save in flight (None: none)."""
        return self._pending.step if self._pending is not None else None

    def save(self, step: int, model_chunks, optimizer, meta: dict, *, _before_publish=None) -> str | None:
        """Saves step ``step`` (meta: JSON-serialisable run state, written by rank 0). Synchronous: returns the
        published directory. Asynchronous: returns None; ``poll`` returns the directory once published.
        ``_before_publish``: a test hook called on rank 0 with the complete temporary directory."""
        from megatron.core import dist_checkpointing

        from k2_megatron.checkpoint.writer import ResultFile, ResultSlot, results_through, with_hashing

        self.wait()
        name = iter_dir_name(step)
        save = _Save(step, os.path.join(self.root, _TMP_PREFIX + name[len("iter_"):]),
                     os.path.join(self.root, name), os.path.join(self.root, f"{_TMP_PREFIX}{step:07d}.writer"),
                     {"format_version": FORMAT_VERSION, "step": step, "parallel": parallel_layout(),
                      "world_size": _world(), **meta}, _before_publish)
        error = None
        if _rank() == 0:
            try:
                os.makedirs(self.root, exist_ok=True)
                _remove_leftovers(self.root)
                os.makedirs(save.tmp)
                os.makedirs(save.results)
            except OSError as e:
                error = CheckpointSaveError(f"cannot create a checkpoint under {self.root}: {e.strerror} "
                                            f"({e.filename})")
        _agree(error)
        save.queue = (ResultFile(os.path.join(save.results, f"rank{_rank():05d}.pkl")) if self.asynchronous
                      else ResultSlot())
        with torch.no_grad(), results_through(save.queue):
            state = _sharded_state(model_chunks, optimizer, is_loading=False, with_rng=True)
            request = dist_checkpointing.save(state, save.tmp, async_sharded_save=True, async_strategy="mcore")
        request = with_hashing(request, save.tmp, _rank())
        request = request._replace(finalize_fns=[*request.finalize_fns, partial(self._publish, save)])
        if not self.asynchronous:
            try:
                request.execute_sync()  # megatron: copy to host, write, barrier, finalize (and publish)
            except BaseException as e:  # noqa: BLE001 -- torch DCP's CheckpointException is a BaseException
                self._fail(save, e)  # (megatron's finalization and ours raise on every rank together)
            return save.final
        self._pending = save
        self._writer.start(request)
        return None

    def poll(self) -> str | None:
        """Collective: publishes the save in flight if every rank's writer is done; returns its directory then."""
        if self._pending is None:
            return None
        return self._finish(blocking=False)

    def wait(self) -> str | None:
        """Collective: blocks until the save in flight (if any) is published; returns its directory."""
        if self._pending is None:
            return None
        return self._finish(blocking=True)

    def finish_within(self, seconds: float, *, interval: float = 0.05) -> str | None:
        """Collective: publishes the save in flight if every rank's writer is done within ``seconds`` (a SIGTERM's
        grace period), else abandons it (``latest`` keeps naming the previous checkpoint). Returns the published
        directory; None when the save was abandoned or none was in flight."""
        from k2_megatron.megatron.layout import set_on_any_rank

        deadline = time.monotonic() + seconds
        while self._pending is not None:
            published = self.poll()
            if published is not None:
                return published
            if set_on_any_rank(time.monotonic() >= deadline)[0]:  # every rank takes the same branch
                self.abandon()
                return None
            time.sleep(interval)
        return None

    def _finish(self, blocking: bool) -> str | None:
        save = self._pending
        try:
            done = self._writer.poll(blocking=blocking)
        except BaseException as e:  # noqa: BLE001 -- a writer failed (megatron raises a CheckpointException, a
            self._pending = None  # BaseException, on every rank), or publishing did
            self._fail(save, e)
        if not done:
            return None
        self._pending = None
        return save.final

    def abandon(self) -> int | None:
        """Collective: gives up the save in flight (kills this rank's writer, removes the temporary directory);
        ``latest`` keeps naming the previous checkpoint. Returns the abandoned step."""
        save, self._pending = self._pending, None
        if save is None:
            return None
        self._writer.abandon()
        _barrier()
        self._discard(save)
        _barrier()
        return save.step

    def kill_writer(self) -> int | None:
        """Not collective (a rank that fails on its own): kills this rank's writer of the save in flight, which is
        never published (the next save removes its temporary directory). Returns its step."""
        save, self._pending = self._pending, None
        if save is None:
            return None
        self._writer.abandon()
        return save.step

    def writer_pids(self) -> list[int]:
        """This rank's writer processes (tests)."""
        return self._writer.writer_pids() if self._writer is not None else []

    def close(self) -> None:
        """Collective: waits for the save in flight; nothing of it is left running."""
        self.wait()

    def _fail(self, save: _Save, error: BaseException):
        """After a failed save: its temporary directory removed; a failure to write (a full disk, a writer's error
        gathered by megatron, a refused publication) raised as one CheckpointSaveError line, anything else as is."""
        from torch.distributed.checkpoint.api import CheckpointException

        self._discard(save)
        if isinstance(error, (OSError, CheckpointError, CheckpointException)):
            raise self._save_failed(save, error) from error
        raise error

    def _save_failed(self, save: _Save, error: BaseException) -> CheckpointSaveError:
        """One line for every rank: the first failure known here (this rank's own write, else what megatron
        gathered from the others), the errno and file, and what is left on disk."""
        previous = None
        with contextlib.suppress(OSError, CheckpointError):
            previous = latest_checkpoint(self.root)
        kept = (f"{os.path.join(self.root, LATEST)} still names {os.path.basename(previous)}" if previous else
                "no earlier checkpoint exists")
        return CheckpointSaveError(f"the save of step {save.step} failed: {_root_cause(save, error)}; nothing was "
                                   f"published, the partial {save.tmp} is removed and {kept}")

    def _discard(self, save: _Save) -> None:
        if _rank() == 0:
            shutil.rmtree(save.tmp, ignore_errors=True)
            shutil.rmtree(save.results, ignore_errors=True)

    def _publish(self, save: _Save) -> None:
        """Megatron's last finalize function, on every rank once every rank's files and rank 0's metadata are
        written: rank 0 publishes; every rank raises if that failed."""
        error = None
        if _rank() == 0:
            try:
                self._publish_on_rank0(save)
            except BaseException as e:  # noqa: BLE001 -- every rank must learn of it; the temporary dir goes
                error = e
                self._discard(save)
        _agree(error)

    def _publish_on_rank0(self, save: _Save) -> None:
        atomic_write_text(os.path.join(save.tmp, META), json.dumps(save.meta, indent=1, sort_keys=True, default=str))
        uncovered = uncovered_tensors(read_metadata(save.tmp))
        if uncovered:
            raise CheckpointCorruptError(f"{save.tmp}: the ranks' pieces of {len(uncovered)} tensors do not add up "
                                         f"to the whole tensor (first: {uncovered[0]}); not publishing it")
        for name in _RANK0_FILES:
            fsync_file(os.path.join(save.tmp, name))
        integrity.merge_manifests(save.tmp, _RANK0_FILES)
        fsync_dir(save.tmp)
        if save.before_publish is not None:
            save.before_publish(save.tmp)
        if os.path.exists(save.final):  # an unpublished directory of the same step (crash between the renames)
            trash.discard([save.final])
        os.rename(save.tmp, save.final)
        fsync_dir(self.root)
        atomic_write_text(os.path.join(self.root, LATEST), iter_dir_name(save.step) + "\n")
        shutil.rmtree(save.results, ignore_errors=True)
        _prune(self.root, self.keep)


def _root_cause(save: _Save, error: BaseException) -> str:
    """The text of a failed save's first cause: this rank's writer's CheckpointSaveError, else the first rank's
    failure in megatron's CheckpointException (the coordinator's holds every rank's, unpickled: their text only),
    else a CheckpointSaveError in the chain of ``error``, else ``error`` itself."""
    with contextlib.suppress(Exception):
        own = save.queue.get_nowait()
        if isinstance(own, CheckpointSaveError):
            return str(own)
    for rank in sorted(getattr(error, "failures", {})):  # torch DCP's CheckpointException: rank -> (exc, tb)
        failure = error.failures[rank][0]
        return str(failure).removeprefix("Worker failure: ")  # megatron's wrapper of a writer's error
    cause = error
    for _ in range(16):  # down the chain of causes
        if cause is None:
            break
        if isinstance(cause, CheckpointSaveError):
            return str(cause)
        cause = cause.__cause__ or cause.__context__
    if isinstance(error, OSError):
        return f"{error} ({error.filename or save.tmp})"
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"


def save_checkpoint(root: str, step: int, model_chunks, optimizer, meta: dict, *, keep: int = 2,
                    _before_publish=None) -> str:
    """Saves on every rank and publishes ``<root>/iter_<step>`` atomically (synchronously); returns its path."""
    return Checkpointer(root, keep=keep).save(step, model_chunks, optimizer, meta, _before_publish=_before_publish)


def _prune(root: str, keep: int) -> None:
    """Keeps the newest ``keep`` checkpoints (and the one ``latest`` names); the others go to the trash, deleted in
    the background (k2_megatron.checkpoint.trash): no rank waits for the deletion."""
    current = os.path.abspath(latest_checkpoint(root))
    done = sorted(n for n in os.listdir(root) if n.startswith("iter_") and os.path.isdir(os.path.join(root, n)))
    old = [os.path.join(root, n) for n in (done[:-keep] if keep > 0 else [])]
    trash.discard([p for p in old if os.path.abspath(p) != current])


# ----- load -----

def read_meta(path: str) -> dict:
    """k2_meta.json of checkpoint directory ``path``, verified against the checkpoint's integrity manifest."""
    meta_path = os.path.join(path, META)
    if not os.path.isfile(meta_path):
        raise CheckpointCorruptError(f"{path} is not a complete K2 pretraining checkpoint: {META} is missing")
    try:
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointCorruptError(f"{meta_path} is unreadable: {e}") from None
    version = meta.get("format_version")
    if version == 1:
        raise CheckpointMismatchError(
            f"{path}: checkpoint format 1 (written by an earlier k2_megatron: optimizer state by gradient-bucket "
            f"position, integrity hashed on rank 0), this code reads format {FORMAT_VERSION}; finish that run with "
            "the k2_megatron that wrote it")
    if version != FORMAT_VERSION:
        raise CheckpointMismatchError(f"{path}: checkpoint format {version!r}, this code reads {FORMAT_VERSION}")
    integrity.verify_files(path, integrity.load_manifest(path), [META])
    return meta


def check_compatible(meta: dict, expected: dict, path: str, ignore_model_keys=()) -> None:
    """Raises CheckpointMismatchError listing every field of ``expected`` (model config, tokenizer) that differs."""
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
        raise CheckpointMismatchError(f"checkpoint {path} was written for a different configuration: "
                                      + "; ".join(diffs))


def _check_readable(path: str, state: dict) -> None:
    """Collective: this rank's share of the checks before loading (see the module); every rank raises the first
    failure of any rank."""
    error = None
    try:
        manifest = integrity.load_manifest(path)
        integrity.verify_files(path, manifest, [METADATA])
        plan = read_plan(read_metadata(path), state)
        if plan.problems:
            raise describe_problems(path, plan.problems)
        integrity.verify_files(path, manifest, plan.files)
        check_objects(path, plan.objects)
    except CheckpointError as e:
        error = e
    _agree(error)


def load_checkpoint(path: str, model_chunks, optimizer, expected: dict, ignore_model_keys=(), *,
                    weights_only: bool = False) -> dict:
    """Loads the checkpoint directory ``path`` into the model chunks and optimizer (every rank); returns its meta.

    Any parallel layout loads a checkpoint of any other. expected: {section: value} that must equal the
    checkpoint's (model config, tokenizer); ignore_model_keys: fields of dict sections not compared (rope
    settings when a new stage starts). weights_only: the model alone; the optimizer (if given) takes its master
    weights from it and keeps its own state (a freshly built one: no momentum or moments, step 0). RNG states are
    restored on the same parallel layout."""
    from megatron.core import dist_checkpointing

    meta = read_meta(path)
    check_compatible(meta, expected, path, ignore_model_keys)
    with_optimizer = optimizer is not None and not weights_only
    with_rng = with_optimizer and meta.get("parallel") == parallel_layout()
    state = _sharded_state(model_chunks, optimizer if with_optimizer else None, is_loading=True, with_rng=with_rng)
    _check_readable(path, state)
    try:
        with torch.no_grad():
            loaded = dist_checkpointing.load(state, path)
    except Exception as e:  # megatron raises assorted types for damaged files
        raise CheckpointCorruptError(f"checkpoint {path} could not be loaded ({type(e).__name__}: {e}); it is "
                                     "corrupt or incomplete. Remove it (and fix 'latest') or load another one "
                                     "with checkpoint.load=...") from e
    with torch.no_grad():
        for i, chunk in enumerate(model_chunks):
            chunk.module.load_state_dict(loaded["model" if len(model_chunks) == 1 else f"model{i}"])
    if with_optimizer:
        optimizer.load_state_dict(loaded["optimizer"])
    elif optimizer is not None:
        optimizer.reload_model_params()
    if with_rng:
        _set_rng_state(loaded["rng_state"])
    return meta


__all__ = ["Checkpointer", "check_compatible", "latest_checkpoint", "load_checkpoint", "parallel_layout",
           "read_meta", "save_checkpoint"]
