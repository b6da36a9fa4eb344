"""k2_megatron.megatron.sharding: flat ranges of a parameter as rectangles of its global tensor, against brute
force (every element's position enumerated), and the blocks megatron's sharded state dict gives each parameter."""

import itertools
import math
import os

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

import pytest
import torch

from k2_megatron.megatron.sharding import GlobalBlock, rectangles


def _elements(offset, shape):
    return [tuple(o + i for o, i in zip(offset, idx)) for idx in itertools.product(*map(range, shape))]


@pytest.mark.parametrize("shape", [(7,), (3, 5), (2, 3, 4), (4, 1, 6), (1, 1), (5, 2, 1, 3)])
def test_rectangles_are_the_flat_range_in_order(shape):
    n = math.prod(shape)
    flat_index = list(itertools.product(*map(range, shape)))  # row-major
    for a in range(n + 1):
        for b in range(a, n + 1):
            rects = rectangles(shape, a, b)
            got = [e for off, sh in rects for e in _elements(off, sh)]
            assert got == flat_index[a:b], (shape, a, b, rects)
            assert len(rects) <= max(1, 2 * len(shape) - 1)
            assert all(len(o) == len(s) == len(shape) and min(s) > 0 for o, s in rects)


def test_block_pieces_map_local_elements_to_global_positions():
    # a [4, 6] block at global offset (2, 6) of a [8, 12] tensor, stored at local elements [10, 34)
    block = GlobalBlock("w", (8, 12), (2, 6), (4, 6), start=10, replica_id=0)
    local_to_global = {10 + i: (2 + i // 6, 6 + i % 6) for i in range(24)}
    for lo, hi in [(0, 100), (13, 30), (10, 16), (33, 34), (0, 10), (34, 50), (12, 13)]:
        pieces = block.pieces(lo, hi)
        got = []
        for offset, shape, first, end in pieces:
            assert end - first == math.prod(shape)
            got += list(zip(range(first, end), _elements(offset, shape)))
        want = [(i, local_to_global[i]) for i in range(max(lo, 10), min(hi, 34))]
        assert got == want, (lo, hi)


@pytest.mark.slow
def test_blocks_of_k2_tiny_tile_every_parameter():
    """One process: every parameter is one block covering its global tensor, except the fused SwiGLU fc1 weights,
    which megatron's factory splits into a gate and an up block (rows [0, F) and [F, 2F) of the global [2F, H])."""
    from tests.helpers.model import k2_like_tiny_config, require_no_cuda, teardown_megatron

    require_no_cuda()
    from k2_megatron.megatron import build_k2_model, init_distributed_cpu
    from k2_megatron.megatron.sharding import parameter_blocks

    init_distributed_cpu()
    try:
        model = build_k2_model(k2_like_tiny_config())
        params = dict(model.named_parameters())
        blocks = parameter_blocks(model.sharded_state_dict(), params.values())
        for name, p in params.items():
            bs = blocks[p]
            if name.endswith("linear_fc1.weight"):
                f = p.shape[0] // 2
                assert [(b.global_offset, b.shape, b.start) for b in bs] == [
                    ((0, 0), (f, p.shape[1]), 0), ((f, 0), (f, p.shape[1]), f * p.shape[1])], name
            else:
                assert len(bs) == 1 and bs[0].shape == bs[0].global_shape == tuple(p.shape), name
    finally:
        teardown_megatron()
