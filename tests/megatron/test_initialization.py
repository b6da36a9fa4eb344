"""Initial weights are a function of the seed and the model alone (k2_megatron.megatron.initialization).

The generator is checked against its definition (chunks of rows, each N(0, std) from its own seeded generator)
on odd sizes; then 2 gloo processes build k2-tiny with one seed under TP2, PP2, EP2 and DP2, each saving its
model with megatron's dist_checkpointing, and one process builds it alone and loads every one of those
checkpoints: all four must equal its own model bit for bit, and another seed must not.
"""

import math
import os

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

import pytest
import torch

from k2_megatron.megatron import initialization
from k2_megatron.megatron.initialization import chunk_seed, global_normal_block
from k2_megatron.megatron.sharding import GlobalBlock

SEED = 4321
LAYOUTS = {"TP2": (2, 1, 1), "PP2": (1, 2, 1), "EP2": (1, 1, 2), "DP2": (1, 1, 1)}  # (tensor, pipeline, expert)


def _reference_tensor(key, shape, seed, std, rows_per_chunk):
    """The definition: rows [c * rows_per_chunk, ...) of the global tensor drawn from generator hash(seed, key, c)."""
    rows = []
    for c in range(math.ceil(shape[0] / rows_per_chunk)):
        n = min(rows_per_chunk, shape[0] - c * rows_per_chunk)
        g = torch.Generator().manual_seed(chunk_seed(seed, key, c))
        rows.append(torch.randn((n, *shape[1:]), generator=g) * std)
    return torch.cat(rows)


@pytest.mark.parametrize("shape,offset,size", [((37, 11), (5, 3), (20, 7)), ((37, 11), (0, 0), (37, 11)),
                                               ((6, 5, 9), (2, 1, 4), (3, 4, 5)), ((13,), (4,), (9,))])
def test_a_block_is_its_slice_of_the_global_tensor(monkeypatch, shape, offset, size):
    monkeypatch.setattr(initialization, "CHUNK_ELEMENTS", 3 * math.prod(shape[1:]))  # 3 rows per chunk
    full = _reference_tensor("layer.w", shape, SEED, 0.02, 3)
    block = GlobalBlock("layer.w", shape, offset, size, start=0, replica_id=0)
    got = global_normal_block(block, SEED, 0.02)
    want = full[tuple(slice(o, o + s) for o, s in zip(offset, size))]
    torch.testing.assert_close(got, want, rtol=3e-7, atol=0)  # randn * std vs normal_(0, std): 1 ulp apart
    other_key = global_normal_block(GlobalBlock("layer.v", shape, offset, size, 0, 0), SEED, 0.02)
    assert not torch.equal(got, other_key)


def _save_layouts(rank, world, init_file, ckpt_root):
    from megatron.core import dist_checkpointing

    from tests.helpers.model import k2_like_tiny_config
    from k2_megatron.config import ParallelLayout
    from k2_megatron.megatron import build_k2_model, init_distributed_cpu

    for name, (tp, pp, ep) in LAYOUTS.items():
        layout = ParallelLayout(tensor_parallel=tp, pipeline_parallel=pp, expert_parallel=ep)
        init_distributed_cpu(layout, seed=SEED, rank=rank, world_size=world, init_method=f"file://{init_file}")
        model = build_k2_model(k2_like_tiny_config(), layout=layout)
        path = os.path.join(ckpt_root, name)
        if rank == 0:
            os.makedirs(path)
        torch.distributed.barrier()
        dist_checkpointing.save(model.sharded_state_dict(), path)
        torch.distributed.barrier()
    return {}


def _compare_alone(rank, world, init_file, ckpt_root):
    from megatron.core import dist_checkpointing

    from tests.helpers.model import k2_like_tiny_config
    from k2_megatron.megatron import build_k2_model, init_distributed_cpu

    init_distributed_cpu(seed=SEED, rank=0, world_size=1, init_method=f"file://{init_file}")
    cfg = k2_like_tiny_config()
    alone = build_k2_model(cfg)
    want = {n: p.detach().clone() for n, p in alone.named_parameters()}
    out = {"names": sorted(want), "differ": {}}
    for name in LAYOUTS:
        model = build_k2_model(cfg, init_seed=SEED + 1)  # overwritten by the load
        model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), os.path.join(ckpt_root, name)),
                              strict=False)
        out["differ"][name] = sorted(n for n, p in model.named_parameters() if not torch.equal(p, want[n]))
    other = build_k2_model(cfg, init_seed=SEED + 1)
    out["other_seed_differs"] = sorted(n for n, p in other.named_parameters()
                                       if not torch.equal(p, want[n]) and p.dim() >= 2)
    out["matrices"] = sorted(n for n, p in alone.named_parameters() if p.dim() >= 2)
    return out


@pytest.mark.slow
@pytest.mark.distributed
def test_same_seed_same_model_on_every_layout(tmp_path):
    from tests.helpers.model import run_gloo_bodies

    ckpt_root = str(tmp_path / "models")
    run_gloo_bodies(_save_layouts, 2, lambda r: (r, 2, str(tmp_path / "init2"), ckpt_root))
    alone = run_gloo_bodies(_compare_alone, 1, lambda r: (r, 1, str(tmp_path / "init1"), ckpt_root))[0]
    assert len(alone["names"]) > 40
    assert alone["differ"] == {name: [] for name in LAYOUTS}
    assert alone["other_seed_differs"] == alone["matrices"]
