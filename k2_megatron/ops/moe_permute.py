"""Token ``permute`` / ``unpermute`` for the MoE experts: sort each token's k copies by expert for
``grouped_gemm`` and combine the experts' outputs back, weighted by the router probabilities (conventions in
k2_megatron.ops.reference.moe_permute).

The C++ schemas (k2_megatron::moe_permute, moe_unpermute) live in k2_megatron._C (csrc/ops.cpp); CPU and meta
tensors go through them (their CPU kernels are the references), CUDA tensors when the kernels take the case:
permute any dtype with num_experts <= 4096; unpermute permuted and topk_probs in float32, float16 or bfloat16
(fp32 accumulation, as the reference; float64 runs the reference). Everything else calls the references
directly, with the same autograd formulas.
"""

import torch

from k2_megatron.ops._checks import FLOAT_DTYPES, check_same_device, check_tensor
from k2_megatron.ops._registration import register_op
from k2_megatron.ops.reference import moe_permute as ref

_INDEX_DTYPES = (torch.int32, torch.int64)
# What the CUDA kernels take (module docstring); the C++ entry points reject anything else.
_UNPERMUTE_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_PERMUTE_KERNEL_MAX_EXPERTS = 4096


def _unpermute_on_op(permuted: torch.Tensor, topk_probs: torch.Tensor | None) -> bool:
    if not _UNPERMUTE.dispatches(permuted):
        return False
    if permuted.device.type != "cuda":
        return True
    return permuted.dtype in _UNPERMUTE_KERNEL_DTYPES and (topk_probs is None or
                                                           topk_probs.dtype in _UNPERMUTE_KERNEL_DTYPES)


# The unvalidated entry point, used by permute's backward; differentiable on both paths.
def _unpermute(permuted, row_map, topk_probs):
    if _unpermute_on_op(permuted, topk_probs):
        return _UNPERMUTE(permuted, row_map, topk_probs)
    return _UNPERMUTE.reference(permuted, row_map, topk_probs)


# ---------------------------------------------------------------------------------------------------------
# autograd formulas (of the registered ops and of their reference paths)


def _permute_setup_context(ctx, inputs, output):
    ctx.save_for_backward(output[1])  # row_map


def _permute_backward(ctx, grad_permuted, grad_row_map=None, grad_counts=None):
    # d_tokens[t] = sum_j d_permuted[row_map[t, j]]: an unweighted unpermute (a gather, deterministic).
    (row_map,) = ctx.saved_tensors
    if grad_permuted is None or not ctx.needs_input_grad[0]:
        return None, None, None
    return _unpermute(grad_permuted, row_map, None), None, None


def _unpermute_setup_context(ctx, inputs, output):
    # d_permuted reads topk_probs, d_probs reads permuted.
    permuted, row_map, topk_probs = inputs
    needs_permuted, needs_probs = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
    ctx.save_for_backward(permuted if needs_probs else None, row_map, topk_probs if needs_permuted else None)
    ctx.probs_dtype = None if topk_probs is None else topk_probs.dtype


def _unpermute_backward(ctx, grad):
    permuted, row_map, topk_probs = ctx.saved_tensors
    d_permuted = d_probs = None
    if ctx.needs_input_grad[0]:
        d_permuted = ref.unpermute_grad_permuted(grad, row_map, topk_probs)
    if ctx.needs_input_grad[2] and ctx.probs_dtype is not None:
        d_probs = ref.unpermute_grad_probs(grad, permuted, row_map, ctx.probs_dtype)
    return d_permuted, None, d_probs


# ---------------------------------------------------------------------------------------------------------
# the public ops


def permute(tokens: torch.Tensor, topk_indices: torch.Tensor, num_experts: int, *,
            check_indices: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sort the k copies of every token by expert, for ``grouped_gemm``.

    tokens [T, H] (float); topk_indices [T, k] int32/int64, the router's expert choices, each in
    [0, num_experts); ``num_experts`` (E) is an argument, not inferred from the indices, so that the
    output shapes are static (the fake implementation needs them) and experts with no token still count.

    Returns ``(permuted [T*k, H], row_map [T, k] int64, tokens_per_expert [E] int64)``:
    permuted holds expert 0's rows first; within an expert rows keep the order t*k + j (a stable sort, so
    the result is deterministic); ``permuted[row_map[t, j]] == tokens[t]``; tokens_per_expert is the
    ``batch_sizes`` of ``grouped_gemm`` and is on tokens' device.
    Gradient: d_tokens[t] = sum_j d_permuted[row_map[t, j]] (a gather, deterministic).

    ``check_indices``: verify the index range; for device tensors this costs one host synchronisation
    (a min/max); pass False on a hot path whose indices come from a trusted router.
    """
    op = "permute"
    check_tensor(op, "tokens", tokens, ndim=2)
    check_tensor(op, "topk_indices", topk_indices, ndim=2, dtypes=_INDEX_DTYPES)
    check_same_device(op, "topk_indices", topk_indices, "tokens", tokens)
    if topk_indices.shape[0] != tokens.shape[0]:
        raise ValueError(f"{op}: topk_indices must have one row per token ({tokens.shape[0]}), "
                         f"got shape {tuple(topk_indices.shape)}")
    if topk_indices.shape[1] < 1:
        raise ValueError(f"{op}: topk_indices must have at least one column (k >= 1), got shape "
                         f"{tuple(topk_indices.shape)}")
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"{op}: num_experts must be a positive int, got {num_experts!r}")
    if check_indices and topk_indices.numel() and not torch.compiler.is_compiling():
        lo, hi = (int(v) for v in torch.aminmax(topk_indices))
        if lo < 0 or hi >= num_experts:
            raise ValueError(f"{op}: topk_indices must lie in [0, num_experts={num_experts}), "
                             f"got values in [{lo}, {hi}]")
    if _PERMUTE.dispatches(tokens) and (tokens.device.type != "cuda" or num_experts <= _PERMUTE_KERNEL_MAX_EXPERTS):
        return _PERMUTE(tokens, topk_indices, num_experts)
    return _PERMUTE.reference(tokens, topk_indices, num_experts)


def unpermute(permuted: torch.Tensor, row_map: torch.Tensor, topk_probs: torch.Tensor | None) -> torch.Tensor:
    """Combine each token's k expert outputs: out[t] = sum_j topk_probs[t, j] * permuted[row_map[t, j]].

    permuted [T*k, H] (float; rows in ``permute``'s order); row_map [T, k] int64 from ``permute``;
    topk_probs [T, k] float (any float dtype; None gives the plain sum). Returns [T, H] in permuted's
    dtype; the sum over j runs in at least fp32, in a fixed order. Gradients for permuted and topk_probs,
    deterministic (gathers only).
    """
    op = "unpermute"
    check_tensor(op, "permuted", permuted, ndim=2)
    check_tensor(op, "row_map", row_map, ndim=2, dtypes=(torch.int64,))
    check_same_device(op, "row_map", row_map, "permuted", permuted)
    if row_map.numel() != permuted.shape[0]:
        raise ValueError(f"{op}: row_map {tuple(row_map.shape)} must index every row of permuted once "
                         f"(T*k = {row_map.numel()}), but permuted has {permuted.shape[0]} rows")
    if row_map.shape[1] < 1:
        raise ValueError(f"{op}: row_map must have at least one column (k >= 1), got shape {tuple(row_map.shape)}")
    if topk_probs is not None:
        check_tensor(op, "topk_probs", topk_probs, dtypes=FLOAT_DTYPES)
        check_same_device(op, "topk_probs", topk_probs, "permuted", permuted)
        if topk_probs.shape != row_map.shape:
            raise ValueError(f"{op}: topk_probs must have row_map's shape {tuple(row_map.shape)}, "
                             f"got {tuple(topk_probs.shape)}")
    return _unpermute(permuted, row_map, topk_probs)


# ---------------------------------------------------------------------------------------------------------
# fakes and the registrations on the C++ schemas


def _fake_permute(tokens, topk_indices, num_experts):
    t, k = topk_indices.shape
    return (tokens.new_empty((t * k, tokens.shape[1])), topk_indices.new_empty((t, k), dtype=torch.int64),
            tokens.new_empty((num_experts,), dtype=torch.int64))


def _fake_unpermute(permuted, row_map, topk_probs):
    return permuted.new_empty((row_map.shape[0], permuted.shape[1]))


_PERMUTE = register_op("moe_permute", reference=ref.permute, fake=_fake_permute, backward=_permute_backward,
                       setup_context=_permute_setup_context)
_UNPERMUTE = register_op("moe_unpermute", reference=ref.unpermute, fake=_fake_unpermute, backward=_unpermute_backward,
                         setup_context=_unpermute_setup_context)
