"""MoE expert computation: ``grouped_gemm`` (forward, dgrad, wgrad), every expert's matmul in one call.

K2 sends each token to 8 of 384 experts (K2 report section 1); on an expert-parallel rank the local
experts each get a variable number of tokens. ``permute`` (k2_megatron.ops.moe_permute) sorts the token copies
by expert and returns the per-expert counts, ``grouped_gemm`` runs every expert's matmul on its rows in one
call, and ``unpermute`` combines each token's k expert outputs weighted by the router probabilities.

Routing: the C++ schemas live in k2_megatron._C (csrc/ops.cpp). With the extension loaded, CPU (and
meta/fake) tensors go through ``torch.ops.k2_megatron.*``, whose CPU kernels are the references; CUDA
tensors go there too when a CUDA kernel is registered for the op, runs on the device and supports the
case (below). Everything else (no extension, a CUDA device without a kernel, an unsupported case) calls
the references directly, with the same autograd formulas. Host synchronisations: see
k2_megatron.ops.reference.grouped_gemm.

Cases the CUDA kernels (csrc/grouped_gemm/) take: bfloat16 x, w (and dy), with K and N positive multiples
of 8 (16-byte rows; TMA and cp.async need them) and 16-byte aligned starts; non-contiguous operands are
made contiguous first. sm_90 with the sm_90a build runs a CUTLASS 3 TMA/wgmma kernel, other GPUs of
compute capability >= 8.0 a CUTLASS 2 mma.sync kernel (``K2_GROUPED_GEMM_KERNEL=sm80`` selects it on
sm_90 too); both accumulate in fp32. Other dtypes and sizes (fp16, fp32, fp64, odd K or N) run the
reference loop. ``grouped_gemm_path`` says which one a call takes.
"""

import torch

from k2_megatron import _extension
from k2_megatron.ops._checks import check_same_device, check_tensor
from k2_megatron.ops._registration import RegisteredOp, register_op
from k2_megatron.ops.reference import grouped_gemm as ref

# What the CUDA kernels take (module docstring); the C++ entry points reject anything else.
_GEMM_KERNEL_ALIGN = 8  # bf16 elements per 16 bytes


def _gemm_operands(op: RegisteredOp, *operands: torch.Tensor) -> tuple[torch.Tensor, ...] | None:
    """The operands for the registered ``op``, or None when the reference must run instead.

    CPU/meta: the registered op (its CPU kernel is the reference) whenever the schema exists. CUDA: only the
    kernels' cases: bf16, every dimension after the first a positive multiple of 8, contiguous (made so
    here) and starting 16 bytes into an allocation (checked on the storage offset, which fake tensors have).
    """
    if not op.dispatches(operands[0]):
        return None
    if operands[0].device.type != "cuda":
        return operands
    for t in operands:
        if t.dtype != torch.bfloat16 or any(d <= 0 or d % _GEMM_KERNEL_ALIGN for d in t.shape[1:]):
            return None
    operands = tuple(t.contiguous() for t in operands)
    if any(t.storage_offset() % _GEMM_KERNEL_ALIGN for t in operands):
        return None
    return operands


def grouped_gemm_path(x: torch.Tensor, w: torch.Tensor) -> str:
    """Which implementation ``grouped_gemm(x, w, ...)`` (and its backward, for these operands) runs:
    "sm90 (CUTLASS 3, TMA + wgmma)", "sm80 (CUTLASS 2, mma.sync)" or "reference"."""
    if x.device.type != "cuda" or _gemm_operands(_GROUPED_GEMM, x, w) is None:
        return "reference"
    if _extension.sm90a_kernels(x, "K2_GROUPED_GEMM_KERNEL"):
        return "sm90 (CUTLASS 3, TMA + wgmma)"
    return "sm80 (CUTLASS 2, mma.sync)"


# Unvalidated entry points, used by the backward formulas; differentiable on both paths (double backward).
def _grouped_gemm(x, w, batch_sizes, trans_b):
    operands = _gemm_operands(_GROUPED_GEMM, x, w)
    if operands is not None:
        return _GROUPED_GEMM(*operands, batch_sizes, trans_b)
    return _GROUPED_GEMM.reference(x, w, batch_sizes, trans_b)


def _grouped_gemm_wgrad(x, dy, batch_sizes, trans_b):
    operands = _gemm_operands(_WGRAD, x, dy)
    if operands is not None:
        return _WGRAD(*operands, batch_sizes, trans_b)
    return _WGRAD.reference(x, dy, batch_sizes, trans_b)


# ---------------------------------------------------------------------------------------------------------
# autograd formulas (of the registered op and of its reference path)


def _grouped_gemm_setup_context(ctx, inputs, output):
    # Keep only what the needed gradients read: w for dx, x for dw.
    x, w, batch_sizes, trans_b = inputs
    needs_x, needs_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    ctx.save_for_backward(x if needs_w else None, w if needs_x else None, batch_sizes)
    ctx.trans_b = trans_b


def _grouped_gemm_backward(ctx, grad):
    # out = x @ w_e  =>  dx = grad @ w_e^T (a grouped GEMM with the other trans_b), dw_e = x_e^T grad_e.
    x, w, batch_sizes = ctx.saved_tensors
    dx = dw = None
    if ctx.needs_input_grad[0]:
        dx = _grouped_gemm(grad, w, batch_sizes, not ctx.trans_b)
    if ctx.needs_input_grad[1]:
        dw = _grouped_gemm_wgrad(x, grad, batch_sizes, ctx.trans_b)
    return dx, dw, None, None


def _wgrad_setup_context(ctx, inputs, output):
    x, dy, batch_sizes, trans_b = inputs
    needs_x, needs_dy = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    ctx.save_for_backward(x if needs_dy else None, dy if needs_x else None, batch_sizes)
    ctx.trans_b = trans_b


def _wgrad_backward(ctx, grad):
    # dw_e = x_e^T dy_e (trans_b: dy_e^T x_e) with incoming g_e of dw_e's shape:
    # dx_e = dy_e g_e^T (trans_b: dy_e g_e), ddy_e = x_e g_e (trans_b: x_e g_e^T).
    x, dy, batch_sizes = ctx.saved_tensors
    dx = ddy = None
    if ctx.needs_input_grad[0]:
        dx = _grouped_gemm(dy, grad, batch_sizes, not ctx.trans_b)
    if ctx.needs_input_grad[1]:
        ddy = _grouped_gemm(x, grad, batch_sizes, ctx.trans_b)
    return dx, ddy, None, None


# ---------------------------------------------------------------------------------------------------------
# validation


def _check_sizes_values(op: str, batch_sizes: torch.Tensor, total: int) -> None:
    """Values of a host batch_sizes (never called on a device tensor: that would synchronise)."""
    if batch_sizes.numel() and int(batch_sizes.min()) < 0:
        values = batch_sizes.tolist()
        shown = values if len(values) <= 32 else f"a minimum of {min(values)}"
        raise ValueError(f"{op}: batch_sizes must be non-negative, got {shown}")
    if int(batch_sizes.sum()) != total:
        raise ValueError(f"{op}: sum(batch_sizes) must equal the number of rows of x ({total}), "
                         f"got {int(batch_sizes.sum())}")


def _check_gemm_operands(op: str, x, other_name: str, other, other_ndim: int, batch_sizes, trans_b) -> None:
    """What grouped_gemm and grouped_gemm_wgrad share: x [T, K], the other operand (w or dy) of x's dtype and device,
    int64 batch_sizes [E] on the host or x's device, a bool trans_b."""
    check_tensor(op, "x", x, ndim=2)
    check_tensor(op, other_name, other, ndim=other_ndim)
    check_tensor(op, "batch_sizes", batch_sizes, ndim=1, dtypes=(torch.int64,))
    if not isinstance(trans_b, bool):
        raise TypeError(f"{op}: trans_b must be a bool, got {type(trans_b).__name__}")
    if other.dtype != x.dtype:
        raise TypeError(f"{op}: {other_name} must have the dtype of x ({x.dtype}), got {other.dtype}")
    check_same_device(op, other_name, other, "x", x)
    if batch_sizes.device.type != "cpu" and batch_sizes.device != x.device:
        raise ValueError(f"{op}: batch_sizes must be on the host (cpu) or on x's device ({x.device}), "
                         f"got {batch_sizes.device}")


def _check_grouped_gemm(x, w, batch_sizes, trans_b) -> None:
    op = "grouped_gemm"
    _check_gemm_operands(op, x, "w", w, 3, batch_sizes, trans_b)
    if w.shape[0] == 0:
        raise ValueError(f"{op}: w must hold at least one expert, got shape {tuple(w.shape)}")
    if batch_sizes.shape[0] != w.shape[0]:
        raise ValueError(f"{op}: batch_sizes must have one entry per expert of w ({w.shape[0]}), "
                         f"got {batch_sizes.shape[0]}")
    k_w = w.shape[2] if trans_b else w.shape[1]
    if k_w != x.shape[1]:
        layout = "[E, N, K] (trans_b=True)" if trans_b else "[E, K, N] (trans_b=False)"
        raise ValueError(f"{op}: w {tuple(w.shape)} is {layout}, so its K ({k_w}) must equal x.shape[1] "
                         f"({x.shape[1]})")


# ---------------------------------------------------------------------------------------------------------
# the public op


def grouped_gemm(x: torch.Tensor, w: torch.Tensor, batch_sizes: torch.Tensor, *, trans_b: bool = False) -> torch.Tensor:
    """One matmul per expert on its rows: out[rows of e] = x[rows of e] @ w[e] (@ w[e]^T with ``trans_b``).

    x [T, K], rows grouped by expert (``permute`` produces this order); w [E, K, N], or [E, N, K] with
    ``trans_b=True`` (the nn.Linear layout); batch_sizes int64 [E], on the host or on x's device, zeros
    allowed, sum T. Returns out [T, N] in x's dtype. x and w share one float dtype and device.

    Autograd: dx = grouped_gemm(dy, w, trans_b=not trans_b), dw[e] = x_e^T dy_e (dy_e^T x_e with
    ``trans_b``); each is computed only when its input requires grad.

    Checks of the values of batch_sizes (non-negative, sum T) run when they are on the host, or when the
    reference runs on a device (it copies them to the host once per call). A CUDA kernel reading them on
    the device does not synchronise and leaves them unchecked.
    """
    _check_grouped_gemm(x, w, batch_sizes, trans_b)
    operands = _gemm_operands(_GROUPED_GEMM, x, w)
    if operands is not None:
        if batch_sizes.device.type == "cpu" and not torch.compiler.is_compiling():
            _check_sizes_values("grouped_gemm", batch_sizes, x.shape[0])
        return _GROUPED_GEMM(*operands, batch_sizes, trans_b)
    # Reference: one host copy of a device batch_sizes here, reused by forward and backward.
    batch_sizes = batch_sizes.cpu()
    if not torch.compiler.is_compiling():
        _check_sizes_values("grouped_gemm", batch_sizes, x.shape[0])
    return _GROUPED_GEMM.reference(x, w, batch_sizes, trans_b)


def grouped_gemm_wgrad(x: torch.Tensor, dy: torch.Tensor, batch_sizes: torch.Tensor, *,
                       trans_b: bool = False) -> torch.Tensor:
    """The weight gradient of ``out = grouped_gemm(x, w, batch_sizes, trans_b=trans_b)`` for the output gradient
    ``dy``: dw[e] = x_e^T dy_e, [E, K, N] (dy_e^T x_e, [E, N, K], with ``trans_b``); experts without rows get zeros.
    For a delayed weight-gradient pass (the backward computing dx only, dw later): the same kernels and reference as
    grouped_gemm's backward. x [T, K], dy [T, N] of one float dtype and device, batch_sizes int64 [E] summing to T.
    """
    op = "grouped_gemm_wgrad"
    _check_gemm_operands(op, x, "dy", dy, 2, batch_sizes, trans_b)
    if dy.shape[0] != x.shape[0]:
        raise ValueError(f"{op}: dy must have one row per row of x ({x.shape[0]}), got shape {tuple(dy.shape)}")
    if batch_sizes.device.type == "cpu" and not torch.compiler.is_compiling():
        _check_sizes_values(op, batch_sizes, x.shape[0])
    return _grouped_gemm_wgrad(x, dy, batch_sizes, trans_b)


# ---------------------------------------------------------------------------------------------------------
# fakes and the registrations on the C++ schemas


def _fake_grouped_gemm(x, w, batch_sizes, trans_b):
    return x.new_empty((x.shape[0], w.shape[1] if trans_b else w.shape[2]))


def _fake_wgrad(x, dy, batch_sizes, trans_b):
    e, k, n = batch_sizes.shape[0], x.shape[1], dy.shape[1]
    return x.new_empty((e, n, k) if trans_b else (e, k, n))


_GROUPED_GEMM = register_op("grouped_gemm", reference=ref.grouped_gemm, fake=_fake_grouped_gemm,
                            backward=_grouped_gemm_backward, setup_context=_grouped_gemm_setup_context)
_WGRAD = register_op("grouped_gemm_wgrad", reference=ref.grouped_gemm_wgrad, fake=_fake_wgrad,
                     backward=_wgrad_backward, setup_context=_wgrad_setup_context)
