"""``mla_attention``: softmax attention that also returns every head's max logit (QK-Clip, K2 report sections 1-2).

Two entry points:
- ``mla_attention(q, k, v)`` for dense batches, q, k [b, s, h, d_qk], v [b, s, h, d_v] (any strides: the
  [s, b, h, d] tensors of megatron-core go in as ``x.transpose(0, 1)`` views, without a copy);
- ``mla_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)`` for packed
  sequences, q [total_q, h, d_qk], like flash_attn_varlen_func (megatron's PackedSeqParams carry these).

Both return ``(out, max_logits)``: max_logits is float32 [h], the largest softmax_scale * q.k over batch,
queries and unmasked keys, and is not differentiable. ``out`` is differentiable in q, k and v; the backward
recomputes the probabilities from the forward's log-sum-exp, so no s x s tensor is kept.

The operators k2_megatron::mla_attention_{fwd,bwd} and k2_megatron::mla_attention_varlen_{fwd,bwd} (schemas
in csrc/ops.cpp) have the reference as their CPU kernel, the kernels of csrc/attention/ as their CUDA kernel
(bf16 / fp16 and the head dims of ``kernel_head_dims()``; other CUDA inputs run the reference), fake
implementations for torch.compile, and autograd formulas. Without the extension the same functions run the
reference directly.
"""

import functools
import math

import torch

from k2_megatron import _extension
from k2_megatron.ops._checks import FLOAT_DTYPES, check_tensor
from k2_megatron.ops._registration import register_op
from k2_megatron.ops.reference import attention as _ref

_OP = "mla_attention"
_OP_VARLEN = "mla_attention_varlen"
MAX_HEAD_DIM = 256
# The CUDA kernels take these; other float dtypes run through the reference.
_KERNEL_DTYPES = (torch.bfloat16, torch.float16)


# ---------------------------------------------------------------------------------------------- validation


def _check_qkv(op: str, q, k, v, ndim: int) -> None:
    layout = "[b, s, h, d]" if ndim == 4 else "[total, h, d]"
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(op, name, t, dtypes=FLOAT_DTYPES)
        if t.dim() != ndim:
            raise ValueError(f"{op}: {name} must be {ndim}-D {layout}, got shape {tuple(t.shape)}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{op}: {name} must have q's dtype {q.dtype}, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{op}: {name} must be on q's device {q.device}, got {t.device}")
    h = q.shape[-2]
    for name, t in (("k", k), ("v", v)):
        if t.shape[-2] != h:
            raise ValueError(f"{op}: {name} must have q's number of heads {h} (dimension {ndim - 2}), "
                             f"got shape {tuple(t.shape)} vs q {tuple(q.shape)}")
    if ndim == 4:
        for name, t in (("k", k), ("v", v)):
            if t.shape[0] != q.shape[0]:
                raise ValueError(f"{op}: {name} must have q's batch size {q.shape[0]} (dimension 0), "
                                 f"got shape {tuple(t.shape)} vs q {tuple(q.shape)}")
    if v.shape[-3] != k.shape[-3]:
        raise ValueError(f"{op}: v must have as many keys as k (dimension {ndim - 3}), "
                         f"got v {tuple(v.shape)} vs k {tuple(k.shape)}")
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(f"{op}: k must have q's head dim {q.shape[-1]}, got shape {tuple(k.shape)}")
    for name, t in (("q", q), ("v", v)):
        if not 1 <= t.shape[-1] <= MAX_HEAD_DIM:
            raise ValueError(f"{op}: the head dim of {name} (last dimension) must be in [1, {MAX_HEAD_DIM}], "
                             f"got shape {tuple(t.shape)}")


def _resolve_scale(op: str, softmax_scale, d_qk: int) -> float:
    if softmax_scale is None:
        return 1.0 / math.sqrt(d_qk)
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)) \
            or not math.isfinite(softmax_scale) or softmax_scale <= 0:
        raise ValueError(f"{op}: softmax_scale must be a positive finite float or None, got {softmax_scale!r}")
    return float(softmax_scale)


def _check_causal(op: str, causal) -> bool:
    if not isinstance(causal, bool):
        raise TypeError(f"{op}: causal must be a bool, got {causal!r}")
    return causal


def _check_cu_seqlens(q, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k) -> None:
    # Structure only: the values are read (checked) by the reference; a kernel must not sync to check them.
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        check_tensor(_OP_VARLEN, name, cu, ndim=1, dtypes=(torch.int32,))
        if cu.numel() < 1:
            raise ValueError(f"{_OP_VARLEN}: {name} must hold n + 1 >= 1 offsets, got shape {tuple(cu.shape)}")
        if cu.device != q.device:
            raise ValueError(f"{_OP_VARLEN}: {name} must be on q's device {q.device}, got {cu.device}")
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(f"{_OP_VARLEN}: cu_seqlens_q and cu_seqlens_k must describe the same number of sequences, "
                         f"got {cu_seqlens_q.numel()} and {cu_seqlens_k.numel()} offsets")
    for name, value in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{_OP_VARLEN}: {name} must be a non-negative int, got {value!r}")


# ------------------------------------------------------------------------------------------------- routing

@functools.lru_cache(maxsize=None)
def kernel_head_dims() -> tuple[tuple[int, int], ...]:
    """(d_qk, d_v) pairs the CUDA kernels are compiled for (csrc/attention/attention.h); () without _C."""
    if not _extension.extension_loaded():
        return ()
    return tuple(tuple(d) for d in _extension._C.attention_head_dims())


def _use_registered_op(q: torch.Tensor, v: torch.Tensor) -> bool:
    # CPU and meta: the registered op (reference kernel, fake). CUDA: the kernel for bf16 / fp16 and the
    # compiled head dims; other CUDA inputs run the reference (with the same autograd formula).
    if not _FWD.dispatches(q):
        return False
    return q.device.type != "cuda" or (q.dtype in _KERNEL_DTYPES and (q.shape[-1], v.shape[-1]) in kernel_head_dims())


# ------------------------------------------------------------------------------------------------- the ops


def mla_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True,
                  softmax_scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention softmax(softmax_scale * q k^T) v per head, and each head's max logit.

    q, k: [b, s, h, d_qk]; v: [b, s, h, d_v] (d_qk, d_v <= 256; K2: 192 and 128), one float dtype, any
    strides. k and v may have another length s_k than q; a causal mask is then aligned to the bottom-right
    corner (query i sees key j <= i + s_k - s_q). softmax_scale defaults to 1 / sqrt(d_qk).
    Returns out [b, s, h, d_v] (contiguous, q's dtype) and max_logits (float32 [h], not differentiable):
    the largest softmax_scale * q.k over batch, queries and unmasked keys (-inf for a head without any).
    """
    _check_qkv(_OP, q, k, v, ndim=4)
    causal = _check_causal(_OP, causal)
    scale = _resolve_scale(_OP, softmax_scale, q.shape[-1])
    fwd = _FWD if _use_registered_op(q, v) else _FWD.reference
    out, _, max_logits = fwd(q, k, v, causal, scale)
    return out, max_logits


def mla_attention_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                         cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, *, causal: bool = True,
                         softmax_scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``mla_attention`` on packed sequences: q [total_q, h, d_qk], k [total_k, h, d_qk], v [total_k, h, d_v].

    Sequence i is rows cu_seqlens_q[i]:cu_seqlens_q[i+1] of q and cu_seqlens_k[i]:cu_seqlens_k[i+1] of k and v
    (cu_seqlens int32 [n + 1], starting at 0, non-decreasing, ending at total; max_seqlen_* at least the
    longest length) and attends to itself only. Returns out [total_q, h, d_v] and max_logits float32 [h],
    the max over all sequences.
    """
    _check_qkv(_OP_VARLEN, q, k, v, ndim=3)
    _check_cu_seqlens(q, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    causal = _check_causal(_OP_VARLEN, causal)
    scale = _resolve_scale(_OP_VARLEN, softmax_scale, q.shape[-1])
    args = (q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale)
    fwd = _VARLEN_FWD if _use_registered_op(q, v) else _VARLEN_FWD.reference
    out, _, max_logits = fwd(*args)
    return out, max_logits


# ------------------------------------------------------------------- autograd, fakes and the registrations
# The backward recomputes the probabilities from the saved log-sum-exp; it runs the registered bwd operator when
# the forward ran the registered fwd operator (the same choice, made on the same q and v), else the reference.


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _save(ctx, q, k, v, output, causal, softmax_scale, *extra_tensors):
    out, lse, max_logits = output
    ctx.save_for_backward(q, k, v, out, lse, *extra_tensors)
    ctx.causal, ctx.softmax_scale = causal, softmax_scale
    ctx.mark_non_differentiable(lse, max_logits)


def _saved_with_grad(ctx, grad_out):
    q, k, v, out, lse, *extra = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    return (grad_out, q, k, v, out, lse), extra


def _setup_dense(ctx, inputs, output):
    q, k, v, causal, softmax_scale = inputs
    _save(ctx, q, k, v, output, causal, softmax_scale)


def _backward_dense(ctx, grad_out, grad_lse, grad_max_logits):
    saved, _ = _saved_with_grad(ctx, grad_out)
    q, v = saved[1], saved[3]
    bwd = _BWD if _use_registered_op(q, v) else _BWD.reference
    return *bwd(*saved, ctx.causal, ctx.softmax_scale), None, None


def _setup_varlen(ctx, inputs, output):
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, softmax_scale = inputs
    _save(ctx, q, k, v, output, causal, softmax_scale, cu_seqlens_q, cu_seqlens_k)
    ctx.max_seqlens = (max_seqlen_q, max_seqlen_k)


def _backward_varlen(ctx, grad_out, grad_lse, grad_max_logits):
    saved, cu_seqlens = _saved_with_grad(ctx, grad_out)
    q, v = saved[1], saved[3]
    bwd = _VARLEN_BWD if _use_registered_op(q, v) else _VARLEN_BWD.reference
    grads = bwd(*saved, *cu_seqlens, *ctx.max_seqlens, ctx.causal, ctx.softmax_scale)
    return *grads, None, None, None, None, None, None


def _fake_fwd(q, k, v, causal, softmax_scale):
    b, s, h, _ = q.shape
    return (q.new_empty((b, s, h, v.shape[-1])), q.new_empty((b, h, s), dtype=_lse_dtype(q.dtype)),
            q.new_empty((h,), dtype=torch.float32))


def _fake_varlen_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, softmax_scale):
    total, h, _ = q.shape
    return (q.new_empty((total, h, v.shape[-1])), q.new_empty((h, total), dtype=_lse_dtype(q.dtype)),
            q.new_empty((h,), dtype=torch.float32))


def _fake_bwd(grad_out, q, k, v, out, lse, *args):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))


_FWD = register_op("mla_attention_fwd", reference=_ref.mla_attention_fwd, fake=_fake_fwd,
                   backward=_backward_dense, setup_context=_setup_dense)
_BWD = register_op("mla_attention_bwd", reference=_ref.mla_attention_bwd, fake=_fake_bwd)
_VARLEN_FWD = register_op("mla_attention_varlen_fwd", reference=_ref.mla_attention_varlen_fwd,
                          fake=_fake_varlen_fwd, backward=_backward_varlen, setup_context=_setup_varlen)
_VARLEN_BWD = register_op("mla_attention_varlen_bwd", reference=_ref.mla_attention_varlen_bwd, fake=_fake_bwd)
