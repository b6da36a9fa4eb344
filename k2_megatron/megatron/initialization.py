"""Initial weights that are a function of the seed and the model alone, whatever the parallel layout.

megatron-core draws a rank's initial weights from its RNG in construction order: a pipeline stage starts
where the previous stage's draws would have ended (so PP changes every layer after the first stage), expert
parallel ranks draw their experts from per-rank RNG streams, and GPU initialisation (``use_cpu_initialization``
off) draws each tensor-parallel shard from a per-rank stream. Here every element of every global tensor
(megatron's sharded-state-dict keys: ``decoder.layers.7.mlp.experts.linear_fc1_weight`` etc.) has one value:
the global tensor is cut into chunks of whole rows along its first axis, and chunk c of tensor ``key`` is
N(0, std) drawn on the CPU from a generator seeded with hash(seed, key, c). A rank generates the chunks its
blocks touch (k2_megatron.megatron.sharding) and keeps its slice, so a TP/PP/EP/DP layout, or one process,
gets the same model for the same seed.

The distribution is megatron's: N(0, init_method_std) for every matrix, N(0, std / sqrt(2 * num_layers)) for
the output projections of the residual branches (attention ``linear_proj``, MLP ``linear_fc2``, the routed
experts' ``linear_fc2_weight``), as megatron's ``output_layer_init_method``; norm weights 1.
"""

from __future__ import annotations

import functools
import hashlib
import math

import torch

from k2_megatron.megatron.sharding import GlobalBlock, parameter_blocks

CHUNK_ELEMENTS = 1 << 22  # rows per generated chunk: as many as fit in 4 Mi elements (at least one row)
OUTPUT_PROJECTIONS = ("linear_proj.weight", "linear_fc2.weight", "linear_fc2_weight")


def _normal_std(init_method, field: str) -> float:
    """The std of a megatron init method (functools.partial(torch.nn.init.normal_, mean=0, std=...))."""
    if (isinstance(init_method, functools.partial) and init_method.func is torch.nn.init.normal_
            and init_method.keywords.get("mean", 0.0) == 0.0 and "std" in init_method.keywords):
        return float(init_method.keywords["std"])
    raise ValueError(f"layout-independent initialisation draws N(0, std); TransformerConfig.{field} is "
                     f"{init_method!r}, not megatron's init_method_normal / scaled_init_method_normal")


def chunk_seed(seed: int, key: str, chunk: int) -> int:
    digest = hashlib.blake2b(f"{seed}\0{key}\0{chunk}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def global_normal_block(block: GlobalBlock, seed: int, std: float) -> torch.Tensor:
    """The values of ``block`` (float32, its shape) in the global tensor N(0, std) of ``block.key``."""
    shape = block.global_shape or (1,)
    offset, size = block.global_offset or (0,), block.shape or (1,)
    row = math.prod(shape[1:])
    rows_per_chunk = max(1, CHUNK_ELEMENTS // max(row, 1))
    out = torch.empty(size, dtype=torch.float32)
    first, end = offset[0], offset[0] + size[0]
    inner = tuple(slice(o, o + s) for o, s in zip(offset[1:], size[1:]))
    for chunk in range(first // rows_per_chunk, (end - 1) // rows_per_chunk + 1):
        c0, c1 = chunk * rows_per_chunk, min((chunk + 1) * rows_per_chunk, shape[0])
        g = torch.Generator().manual_seed(chunk_seed(seed, block.key, chunk))
        values = torch.empty((c1 - c0, *shape[1:]), dtype=torch.float32).normal_(0.0, std, generator=g)
        r0, r1 = max(first, c0), min(end, c1)
        out[r0 - first:r1 - first] = values[(slice(r0 - c0, r1 - c0), *inner)]
    return out.view(block.shape)


def _std_of(name: str, param: torch.Tensor, std: float, output_std: float) -> float | None:
    """The std of parameter ``name`` (None: a norm weight, kept as its module built it: 1, the same everywhere)."""
    if param.dim() >= 2:
        return output_std if name.endswith(OUTPUT_PROJECTIONS) else std
    if "norm" in name.rsplit(".", 2)[-2]:
        return None
    raise ValueError(f"no layout-independent initialisation rule for the {param.dim()}-D parameter {name}")


@torch.no_grad()
def initialize_parameters(model, seed: int) -> None:
    """Sets every parameter of ``model`` (a megatron-core GPTModel, or one pipeline chunk of it, on any layout) to
    its layout-independent initial value for ``seed`` (see the module)."""
    std = _normal_std(model.config.init_method, "init_method")
    output_std = _normal_std(model.config.output_layer_init_method, "output_layer_init_method")
    embedding_init = getattr(model.config, "embedding_init_method", None)
    if embedding_init is not None and _normal_std(embedding_init, "embedding_init_method") != std:
        raise ValueError("layout-independent initialisation: embedding_init_method must equal init_method")
    params = dict(model.named_parameters())
    blocks = parameter_blocks(model.sharded_state_dict(), params.values())
    for name, param in params.items():
        param_std = _std_of(name, param, std, output_std)
        if param_std is None:
            continue
        flat = param.view(-1)
        for block in blocks[param]:
            values = global_normal_block(block, seed, param_std)
            flat[block.start:block.start + block.numel].copy_(values.reshape(-1))


__all__ = ["global_normal_block", "initialize_parameters"]
