"""Integrity and safety of pretraining checkpoints (k2_megatron.checkpoint.megatron, .integrity, .dcp_metadata).

- Per rank (2 gloo processes, DP2): at save, each rank hashes exactly the files it wrote (rank 0 also the
  small files only it writes); at load, each rank hashes the files it reads, and rank 0 reads none of rank 1's;
  a file corrupted on rank 1's side is refused on both ranks with the same one-line error naming it.
- One process: an edited k2_meta.json, a truncated or altered shard, a missing manifest are refused with one line
  naming the file; a checkpoint whose .metadata, or whose pickled RNG state, pickles a foreign callable (crafted:
  its manifest updated to match) is refused without running it. What cannot be mapped (a checkpoint of format 1;
  optimizer state of a Muon parameter into one that is now AdamW's) is refused in one line saying what to do.
The hash functions of both k2_megatron and megatron-core are recorded, so the tests hold whoever hashes.
"""

import json
import os
import shutil

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

import pytest
import torch

from tests.helpers.checkpoint import RunsCode, plant_code_in_dcp_metadata

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def _record_hashing(calls: list) -> None:
    """Records the base name of every file hashed by k2_megatron's or megatron-core's integrity code."""
    from megatron.core.dist_checkpointing import validation

    from k2_megatron.checkpoint import integrity

    for module, name in ((integrity, "sha256_file"), (validation, "_compute_file_hash")):
        if hasattr(module, name):
            original = getattr(module, name)

            def recording(path, original=original):
                calls.append(os.path.basename(str(path)))
                return original(path)

            setattr(module, name, recording)


def _error(fn) -> tuple | None:
    try:
        fn()
    except Exception as e:  # the test inspects type and message
        return type(e).__name__, str(e)
    return None


def _per_rank(rank, world, init_file, tmp):
    from tests.helpers.pretraining import build_zero1_bf16, train_step
    from k2_megatron.checkpoint.megatron import load_checkpoint, save_checkpoint
    from k2_megatron.config import ParallelLayout

    out = {}
    cfg, chunks, opt = build_zero1_bf16(ParallelLayout(), rank, world, init_file, seed=1)
    train_step(cfg, chunks, opt)
    calls = []
    _record_hashing(calls)
    root = os.path.join(tmp, "ckpt")
    path = save_checkpoint(root, 1, chunks, opt, {})
    out["save_hashed"], calls[:] = sorted(set(calls)), []
    torch.distributed.barrier()
    out["files"] = sorted(os.listdir(path))
    load_checkpoint(path, chunks, opt, {})
    out["load_hashed"], calls[:] = sorted(set(calls)), []
    torch.distributed.barrier()
    if rank == 1:
        with open(os.path.join(path, "__1_0.distcp"), "r+b") as f:
            f.seek(os.path.getsize(f.name) // 2)
            f.write(b"\x00flipped\x00")
    torch.distributed.barrier()
    out["corrupt"] = _error(lambda: load_checkpoint(path, chunks, opt, {}))
    return out


def test_each_rank_hashes_what_it_writes_and_verifies_what_it_reads(tmp_path):
    from tests.helpers.model import run_gloo_bodies

    ranks = run_gloo_bodies(_per_rank, 2, lambda r: (r, 2, str(tmp_path / "init"), str(tmp_path)))
    files = ranks[0]["files"]
    shards = {r: sorted(f for f in files if f.startswith(f"__{r}_")) for r in (0, 1)}
    assert shards[0] and shards[1]
    rank0_only = [".metadata", "k2_meta.json", "metadata.json"]
    assert ranks[0]["save_hashed"] == sorted(shards[0] + rank0_only)
    assert ranks[1]["save_hashed"] == shards[1]
    # rank 0 holds the model (main replica) and its half of the optimizer state: its own file only
    assert ranks[0]["load_hashed"] == sorted(shards[0] + [".metadata", "k2_meta.json"])
    assert set(shards[1]) <= set(ranks[1]["load_hashed"]) <= set(shards[0] + shards[1] + rank0_only)
    kinds = {r["corrupt"][0] for r in ranks}
    assert kinds == {"CheckpointCorruptError"}, ranks[0]["corrupt"]
    for r in ranks:
        message = r["corrupt"][1]
        assert "__1_0.distcp" in message and "\n" not in message
    assert ranks[0]["corrupt"][1].startswith("rank 1: ")


# ----- one process: tampered checkpoints -----

def _rewrite_manifests(path: str, name: str) -> None:
    """What a crafted checkpoint would do: make every integrity manifest agree with the altered file ``name``."""
    from k2_megatron.checkpoint.integrity import sha256_file

    digest, size = sha256_file(os.path.join(path, name)), os.path.getsize(os.path.join(path, name))
    for manifest in ("k2_integrity.json", "integrity.json"):
        p = os.path.join(path, manifest)
        if os.path.isfile(p):
            with open(p) as f:
                m = json.load(f)
            entry = m["files"][name]
            if isinstance(entry, dict):
                entry.update(sha256=digest, bytes=size)
            else:
                m["files"][name] = digest
            with open(p, "w") as f:
                json.dump(m, f)


def _set_in_meta(path, key, value):
    p = os.path.join(path, "k2_meta.json")
    with open(p) as f:
        meta = json.load(f)
    meta[key] = value
    with open(p, "w") as f:
        json.dump(meta, f)


def _edit_meta(path, marker):
    _set_in_meta(path, "step", 0)


def _truncate_shard(path, marker):
    shard = os.path.join(path, "__0_0.distcp")
    os.truncate(shard, os.path.getsize(shard) - 10)


def _flip_shard(path, marker):
    with open(os.path.join(path, "__0_0.distcp"), "r+b") as f:
        f.seek(os.path.getsize(f.name) // 2)
        f.write(b"\x00flipped\x00")


def _drop_manifest(path, marker):
    for manifest in ("k2_integrity.json", "integrity.json"):
        if os.path.exists(os.path.join(path, manifest)):
            os.remove(os.path.join(path, manifest))


def _format_1(path, marker):
    _set_in_meta(path, "format_version", 1)
    _rewrite_manifests(path, "k2_meta.json")


def _metadata_runs_code(path, marker):
    plant_code_in_dcp_metadata(path, marker)
    _rewrite_manifests(path, ".metadata")


TAMPERED = {"edited_meta": _edit_meta, "truncated_shard": _truncate_shard, "flipped_shard": _flip_shard,
            "no_manifest": _drop_manifest, "format_1": _format_1, "metadata_runs_code": _metadata_runs_code}


def _tampered(rank, world, init_file, tmp):
    from tests.helpers.pretraining import build_zero1_bf16, train_step
    from k2_megatron.checkpoint import megatron as megatron_checkpoint
    from k2_megatron.config import ParallelLayout

    out = {}
    cfg, chunks, opt = build_zero1_bf16(ParallelLayout(), rank, world, init_file, seed=1)
    train_step(cfg, chunks, opt)
    good = megatron_checkpoint.save_checkpoint(os.path.join(tmp, "good"), 1, chunks, opt, {})
    for name, tamper in TAMPERED.items():
        path = os.path.join(tmp, name)
        shutil.copytree(good, path)
        marker = os.path.join(tmp, f"{name}.ran")
        tamper(path, marker)
        out[name] = (_error(lambda: megatron_checkpoint.load_checkpoint(path, chunks, opt, {})),
                     os.path.exists(marker))
    # an RNG state that pickles a callable, written by the regular save (its hashes are right)
    marker = os.path.join(tmp, "object_runs_code.ran")
    real_rng_state = megatron_checkpoint._rng_state
    megatron_checkpoint._rng_state = lambda: {"state": RunsCode(marker)}
    evil = megatron_checkpoint.save_checkpoint(os.path.join(tmp, "object"), 1, chunks, opt, {})
    megatron_checkpoint._rng_state = real_rng_state
    out["object_runs_code"] = (_error(lambda: megatron_checkpoint.load_checkpoint(evil, chunks, opt, {})),
                               os.path.exists(marker))
    out["good"] = _error(lambda: megatron_checkpoint.load_checkpoint(good, chunks, opt, {}))
    # what cannot change: the optimizer state of a parameter that was Muon's, into AdamW (no second moment)
    from k2_megatron.optim.muonclip import DEFAULT_ADAMW_PATTERNS

    _, chunks, opt = build_zero1_bf16(ParallelLayout(), rank, world, init_file, seed=1,
                                      adamw_patterns=(*DEFAULT_ADAMW_PATTERNS, "linear_proj"))
    out["other_optimizer_split"] = _error(lambda: megatron_checkpoint.load_checkpoint(good, chunks, opt, {}))
    out["other_split_weights_only"] = _error(
        lambda: megatron_checkpoint.load_checkpoint(good, chunks, opt, {}, weights_only=True))
    return out


@pytest.fixture(scope="module")
def tampered(tmp_path_factory):
    from tests.helpers.model import run_gloo_bodies

    tmp = tmp_path_factory.mktemp("tampered")
    return run_gloo_bodies(_tampered, 1, lambda r: (r, 1, str(tmp / "init"), str(tmp)))[0]


@pytest.mark.parametrize("name,kind,names", [
    ("edited_meta", "CheckpointCorruptError", "k2_meta.json"),
    ("truncated_shard", "CheckpointCorruptError", "__0_0.distcp"),
    ("flipped_shard", "CheckpointCorruptError", "__0_0.distcp"),
    ("no_manifest", "CheckpointCorruptError", "k2_integrity.json"),
    ("format_1", "CheckpointMismatchError", "format 1"),
    ("metadata_runs_code", "CheckpointUnsafeError", ".metadata"),
    ("object_runs_code", "CheckpointUnsafeError", "rng_state"),
])
def test_tampered_checkpoints_are_refused_in_one_line(tampered, name, kind, names):
    error, ran = tampered[name]
    assert error is not None and error[0] == kind, error
    assert names in error[1] and "\n" not in error[1], error[1]
    assert not ran  # nothing it pickled was called


def test_the_untampered_checkpoint_loads(tampered):
    assert tampered["good"] is None


def test_optimizer_state_that_cannot_map_is_refused_clearly_and_weights_only_still_loads(tampered):
    kind, message = tampered["other_optimizer_split"]
    assert kind == "CheckpointMismatchError"
    assert "optimizer.state.exp_avg_sq.decoder.layers.0.self_attention.linear_proj.weight" in message
    assert "weights only" in message and "\n" not in message
    assert tampered["other_split_weights_only"] is None
