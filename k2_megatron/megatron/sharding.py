"""Where each element of this rank's parameters lives in the model's global tensors.

megatron-core's ``sharded_state_dict()`` names every parameter by a layout-independent key
(``decoder.layers.7.mlp.experts.linear_fc1_weight``) with its global shape, and says which rectangular block of
that global tensor this rank holds (TP / EP / PP place it; megatron's ShardedTensorFactory splits a fused local
tensor such as SwiGLU's [gate; up] into two blocks). ``parameter_blocks`` turns that into, per parameter, the
blocks with the range of the parameter's flattened elements each one occupies, by passing a meta index tensor
(no memory) through the same sharding code. ``GlobalBlock.pieces`` cuts a flat range of a parameter (a ZeRO-1
shard) into rectangles of the global tensor.

Everything that must not depend on the parallel layout is written in these global coordinates: the optimizer
state in checkpoints (k2_megatron.megatron.optimizer_state) and the initial weights
(k2_megatron.megatron.initialization).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class GlobalBlock:
    """A rectangular block of global tensor ``key`` held by this rank: elements [start, start + numel) of the local
    parameter, flattened, are the block's elements in row-major order. Offsets and shape have the global rank
    (megatron's prepended axes are size-1 axes here)."""

    key: str
    global_shape: tuple[int, ...]
    global_offset: tuple[int, ...]
    shape: tuple[int, ...]
    start: int
    replica_id: object  # megatron's replica id of the block (main replica: all zeros)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def pieces(self, lo: int, hi: int) -> list[tuple[tuple[int, ...], tuple[int, ...], int, int]]:
        """The elements [lo, hi) of the local flattened parameter that fall in this block, as rectangles of the
        global tensor: (global offset, shape, first local element, end local element) each, in element order."""
        a, b = max(lo, self.start), min(hi, self.start + self.numel)
        out = []
        position = a
        for offset, shape in rectangles(self.shape, a - self.start, b - self.start):
            n = math.prod(shape)
            out.append((tuple(g + o for g, o in zip(self.global_offset, offset)), shape, position, position + n))
            position += n
        return out


def rectangles(shape: tuple[int, ...], a: int, b: int) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """The elements [a, b) of a row-major array of ``shape`` as (offset, shape) rectangles, each a contiguous
    range of the flat order, in order: a partial row, whole rows, a partial row at every level (at most
    2 * ndim - 1 rectangles)."""
    if a >= b:
        return []
    if not shape:
        return [((), ())]
    inner = math.prod(shape[1:])
    first, last = a // inner, (b - 1) // inner
    a_in, b_in = a - first * inner, b - last * inner
    tail = shape[1:]
    if first == last:
        return [((first, *o), (1, *s)) for o, s in rectangles(tail, a_in, b_in)]
    out = []
    if a_in > 0:
        out += [((first, *o), (1, *s)) for o, s in rectangles(tail, a_in, inner)]
        first += 1
    whole_end = last + 1 if b_in == inner else last
    if whole_end > first:
        out.append(((first, *(0,) * len(tail)), (whole_end - first, *tail)))
    if b_in < inner:
        out += [((last, *o), (1, *s)) for o, s in rectangles(tail, 0, b_in)]
    return out


def _sharded_entries(model_sharded_state_dict) -> dict:
    """{tensor: its ShardedTensor or ShardedTensorFactory} of a model's sharded state dict (parameters and
    buffers; megatron's sharded state dicts hold the tensors themselves, keep_vars=True)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    return {entry.data: entry for entry in nested_values(model_sharded_state_dict)
            if isinstance(entry, (ShardedTensor, ShardedTensorFactory)) and isinstance(entry.data, torch.Tensor)}


def _blocks_of(entry, shape: tuple[int, ...]) -> list[GlobalBlock]:
    """``entry`` (a ShardedTensor or ShardedTensorFactory of a local tensor of ``shape``) applied to a meta tensor
    of that shape: each resulting ShardedTensor's data is a view whose storage offset and strides locate it in the
    local tensor."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    index = torch.empty(shape, dtype=torch.uint8, device="meta")
    if isinstance(entry, ShardedTensorFactory):
        built = entry.build_fn(entry.key, index, entry.replica_id, None)
        parts = list(nested_values(built)) if isinstance(built, (dict, list)) else [built]
    else:
        parts = [dataclasses.replace(entry, data=index, dtype=index.dtype)]
    blocks = []
    for part in parts:
        if not isinstance(part, ShardedTensor) or part.flattened_range is not None:
            raise ValueError(f"{entry.key}: its sharding is a {type(part).__name__}; only rectangular blocks of a "
                             "global tensor are supported")
        view = part.data
        if not view.is_contiguous():
            raise ValueError(f"{entry.key}: a sharded block of it is not contiguous in the local tensor "
                             f"(strides {view.stride()} for shape {tuple(view.shape)})")
        prepend = part.prepend_axis_num
        blocks.append(GlobalBlock(part.key, tuple(part.global_shape), tuple(part.global_offset),
                                  (1,) * prepend + tuple(part.local_shape), view.storage_offset(), part.replica_id))
    covered = sorted((b.start, b.start + b.numel) for b in blocks)
    numel = math.prod(shape)
    if covered[0][0] != 0 or covered[-1][1] != numel or any(x[1] != y[0] for x, y in zip(covered, covered[1:])):
        raise ValueError(f"{entry.key}: its sharded blocks {covered} do not tile the local tensor of {numel} "
                         "elements")
    return blocks


def parameter_blocks(model_sharded_state_dict, tensors) -> dict[torch.Tensor, list[GlobalBlock]]:
    """{tensor: its GlobalBlocks} for each of ``tensors`` (parameters or buffers of the model whose sharded state
    dict is given); a tensor missing from it raises ValueError."""
    entries = _sharded_entries(model_sharded_state_dict)
    out = {}
    for t in tensors:
        if t not in entries:
            raise ValueError(f"a tensor of shape {tuple(t.shape)} is not in the model's sharded state dict")
        out[t] = _blocks_of(entries[t], tuple(t.shape))
    return out


def sharded_rectangles(sharded_state_dict):
    """(key, global shape, global offset, shape) of every rectangle of a global tensor in a sharded state dict
    (ShardedTensors, and the tensors megatron's factories build), offsets and shapes of the global rank."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    for entry in nested_values(sharded_state_dict):
        if isinstance(entry, ShardedTensor):
            shape = tuple(entry.local_shape)
        elif isinstance(entry, ShardedTensorFactory):
            shape = tuple(entry.data.shape)
        else:
            continue
        for block in _blocks_of(entry, shape):
            yield block.key, block.global_shape, block.global_offset, block.shape


__all__ = ["GlobalBlock", "parameter_blocks", "rectangles", "sharded_rectangles"]
