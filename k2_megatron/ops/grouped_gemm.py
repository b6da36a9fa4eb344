"""MoE expert computation: ``grouped_gemm`` (forward, dgrad, wgrad) and token ``permute`` / ``unpermute``.

K2 sends each token to 8 of 384 experts (K2 report section 1); on an expert-parallel rank the local
experts each get a variable number of tokens. ``permute`` sorts the token copies by expert and returns
the per-expert counts, ``grouped_gemm`` runs every expert's matmul on its rows in one call, and
``unpermute`` combines each token's k expert outputs weighted by the router probabilities.

Routing: the C++ schemas live in k2_megatron._C (csrc/ops.cpp). With the extension loaded, CPU (and
meta/fake) tensors go through ``torch.ops.k2_megatron.*``, whose CPU kernels are the references; CUDA
tensors go there too when a CUDA kernel is registered for the op, runs on the device and supports the
case (below). Everything else (no extension, a CUDA device without a kernel, an unsupported case) calls
the references directly, with the same autograd formulas. Host synchronisations: see
k2_megatron.ops.reference.grouped_gemm.

Cases the CUDA kernels (csrc/grouped_gemm/) take:

* grouped GEMM (forward, dgrad, wgrad): bfloat16 x, w (and dy), with K and N positive multiples of 8
  (16-byte rows; TMA and cp.async need them) and 16-byte aligned starts; non-contiguous operands are
  made contiguous first. sm_90 with the sm_90a build runs a CUTLASS 3 TMA/wgmma kernel, other GPUs of
  compute capability >= 8.0 a CUTLASS 2 mma.sync kernel (``K2_GROUPED_GEMM_KERNEL=sm80`` selects it on
  sm_90 too); both accumulate in fp32. Other dtypes and sizes (fp16, fp32, fp64, odd K or N) run the
  reference loop. ``grouped_gemm_path`` says which one a call takes.
* permute: any dtype, num_experts <= 4096. unpermute: permuted and topk_probs float32, float16 or
  bfloat16 (fp32 accumulation, as the reference); float64 runs the reference.
"""

import importlib

import torch

from k2_megatron import _extension
from k2_megatron.ops._checks import FLOAT_DTYPES, check_tensor

# The reference module by its full name: k2_megatron.ops.reference exports functions with the module's name.
ref = importlib.import_module("k2_megatron.ops.reference.grouped_gemm")

_INDEX_DTYPES = (torch.int32, torch.int64)
# What the CUDA kernels take (module docstring); the C++ entry points reject anything else.
_GEMM_KERNEL_ALIGN = 8  # bf16 elements per 16 bytes
_UNPERMUTE_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_PERMUTE_KERNEL_MAX_EXPERTS = 4096


def _gemm_operands(op: str, *operands: torch.Tensor) -> tuple[torch.Tensor, ...] | None:
    """The operands for torch.ops.k2_megatron.<op>, or None when the reference must run instead.

    CPU/meta: the registered op (its CPU kernel is the reference) whenever the schema exists. CUDA: only the
    kernels' cases: bf16, every dimension after the first a positive multiple of 8, contiguous (made so
    here) and starting 16 bytes into an allocation (checked on the storage offset, which fake tensors have).
    """
    if not _extension.dispatch_to_op(op, operands[0]):
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
    if x.device.type != "cuda" or _gemm_operands("grouped_gemm", x, w) is None:
        return "reference"
    if _extension.sm90a_kernels(x, "K2_GROUPED_GEMM_KERNEL"):
        return "sm90 (CUTLASS 3, TMA + wgmma)"
    return "sm80 (CUTLASS 2, mma.sync)"


def _unpermute_on_op(permuted: torch.Tensor, topk_probs: torch.Tensor | None) -> bool:
    if not _extension.dispatch_to_op("moe_unpermute", permuted):
        return False
    if permuted.device.type != "cuda":
        return True
    return permuted.dtype in _UNPERMUTE_KERNEL_DTYPES and (topk_probs is None or
                                                           topk_probs.dtype in _UNPERMUTE_KERNEL_DTYPES)


# Unvalidated entry points, used by the backward formulas; differentiable on both paths (double backward).
def _grouped_gemm(x, w, batch_sizes, trans_b):
    operands = _gemm_operands("grouped_gemm", x, w)
    if operands is not None:
        return torch.ops.k2_megatron.grouped_gemm(*operands, batch_sizes, trans_b)
    return _GroupedGemmFunction.apply(x, w, batch_sizes, trans_b)


def _grouped_gemm_wgrad(x, dy, batch_sizes, trans_b):
    operands = _gemm_operands("grouped_gemm_wgrad", x, dy)
    if operands is not None:
        return torch.ops.k2_megatron.grouped_gemm_wgrad(*operands, batch_sizes, trans_b)
    return _GroupedGemmWgradFunction.apply(x, dy, batch_sizes, trans_b)


def _unpermute(permuted, row_map, topk_probs):
    if _unpermute_on_op(permuted, topk_probs):
        return torch.ops.k2_megatron.moe_unpermute(permuted, row_map, topk_probs)
    return _UnpermuteFunction.apply(permuted, row_map, topk_probs)


# ---------------------------------------------------------------------------------------------------------
# autograd formulas, shared by torch.library.register_autograd (extension) and torch.autograd.Function
# (no extension)


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


class _GroupedGemmFunction(torch.autograd.Function):
    @staticmethod
    def forward(x, w, batch_sizes, trans_b):
        return ref.grouped_gemm(x, w, batch_sizes, trans_b)

    setup_context = staticmethod(_grouped_gemm_setup_context)
    backward = staticmethod(_grouped_gemm_backward)


class _GroupedGemmWgradFunction(torch.autograd.Function):
    @staticmethod
    def forward(x, dy, batch_sizes, trans_b):
        return ref.grouped_gemm_wgrad(x, dy, batch_sizes, trans_b)

    setup_context = staticmethod(_wgrad_setup_context)
    backward = staticmethod(_wgrad_backward)


class _PermuteFunction(torch.autograd.Function):
    @staticmethod
    def forward(tokens, topk_indices, num_experts):
        return ref.permute(tokens, topk_indices, num_experts)

    setup_context = staticmethod(_permute_setup_context)
    backward = staticmethod(_permute_backward)


class _UnpermuteFunction(torch.autograd.Function):
    @staticmethod
    def forward(permuted, row_map, topk_probs):
        return ref.unpermute(permuted, row_map, topk_probs)

    setup_context = staticmethod(_unpermute_setup_context)
    backward = staticmethod(_unpermute_backward)


# ---------------------------------------------------------------------------------------------------------
# validation


def _same_device(op, name, t, other_name, other):
    if t.device != other.device:
        raise ValueError(f"{op}: {name} must be on the same device as {other_name} ({other.device}), got {t.device}")


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
    _same_device(op, other_name, other, "x", x)
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


def _compiling() -> bool:
    return torch.compiler.is_compiling()


# ---------------------------------------------------------------------------------------------------------
# public ops


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
    operands = _gemm_operands("grouped_gemm", x, w)
    if operands is not None:
        if batch_sizes.device.type == "cpu" and not _compiling():
            _check_sizes_values("grouped_gemm", batch_sizes, x.shape[0])
        return torch.ops.k2_megatron.grouped_gemm(*operands, batch_sizes, trans_b)
    # Reference: one host copy of a device batch_sizes here, reused by forward and backward.
    batch_sizes = batch_sizes.cpu()
    if not _compiling():
        _check_sizes_values("grouped_gemm", batch_sizes, x.shape[0])
    return _GroupedGemmFunction.apply(x, w, batch_sizes, trans_b)


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
    if batch_sizes.device.type == "cpu" and not _compiling():
        _check_sizes_values(op, batch_sizes, x.shape[0])
    return _grouped_gemm_wgrad(x, dy, batch_sizes, trans_b)


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
    _same_device(op, "topk_indices", topk_indices, "tokens", tokens)
    if topk_indices.shape[0] != tokens.shape[0]:
        raise ValueError(f"{op}: topk_indices must have one row per token ({tokens.shape[0]}), "
                         f"got shape {tuple(topk_indices.shape)}")
    if topk_indices.shape[1] < 1:
        raise ValueError(f"{op}: topk_indices must have at least one column (k >= 1), got shape "
                         f"{tuple(topk_indices.shape)}")
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"{op}: num_experts must be a positive int, got {num_experts!r}")
    if check_indices and topk_indices.numel() and not _compiling():
        lo, hi = (int(v) for v in torch.aminmax(topk_indices))
        if lo < 0 or hi >= num_experts:
            raise ValueError(f"{op}: topk_indices must lie in [0, num_experts={num_experts}), "
                             f"got values in [{lo}, {hi}]")
    if _extension.dispatch_to_op("moe_permute", tokens) and (
            tokens.device.type != "cuda" or num_experts <= _PERMUTE_KERNEL_MAX_EXPERTS):
        return torch.ops.k2_megatron.moe_permute(tokens, topk_indices, num_experts)
    return _PermuteFunction.apply(tokens, topk_indices, num_experts)


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
    _same_device(op, "row_map", row_map, "permuted", permuted)
    if row_map.numel() != permuted.shape[0]:
        raise ValueError(f"{op}: row_map {tuple(row_map.shape)} must index every row of permuted once "
                         f"(T*k = {row_map.numel()}), but permuted has {permuted.shape[0]} rows")
    if row_map.shape[1] < 1:
        raise ValueError(f"{op}: row_map must have at least one column (k >= 1), got shape {tuple(row_map.shape)}")
    if topk_probs is not None:
        check_tensor(op, "topk_probs", topk_probs, dtypes=FLOAT_DTYPES)
        _same_device(op, "topk_probs", topk_probs, "permuted", permuted)
        if topk_probs.shape != row_map.shape:
            raise ValueError(f"{op}: topk_probs must have row_map's shape {tuple(row_map.shape)}, "
                             f"got {tuple(topk_probs.shape)}")
    return _unpermute(permuted, row_map, topk_probs)


# ---------------------------------------------------------------------------------------------------------
# registration: fake (meta) implementations, CPU kernels (the references) and autograd of the C++ schemas

if _extension.op_registered("grouped_gemm"):
    @torch.library.register_fake("k2_megatron::grouped_gemm")
    def _(x, w, batch_sizes, trans_b):
        return x.new_empty((x.shape[0], w.shape[1] if trans_b else w.shape[2]))

    torch.library.register_kernel("k2_megatron::grouped_gemm", "cpu", ref.grouped_gemm)
    torch.library.register_autograd("k2_megatron::grouped_gemm", _grouped_gemm_backward,
                                    setup_context=_grouped_gemm_setup_context)

if _extension.op_registered("grouped_gemm_wgrad"):
    @torch.library.register_fake("k2_megatron::grouped_gemm_wgrad")
    def _(x, dy, batch_sizes, trans_b):
        e, k, n = batch_sizes.shape[0], x.shape[1], dy.shape[1]
        return x.new_empty((e, n, k) if trans_b else (e, k, n))

    torch.library.register_kernel("k2_megatron::grouped_gemm_wgrad", "cpu", ref.grouped_gemm_wgrad)
    torch.library.register_autograd("k2_megatron::grouped_gemm_wgrad", _wgrad_backward,
                                    setup_context=_wgrad_setup_context)

if _extension.op_registered("moe_permute"):
    @torch.library.register_fake("k2_megatron::moe_permute")
    def _(tokens, topk_indices, num_experts):
        t, k = topk_indices.shape
        return (tokens.new_empty((t * k, tokens.shape[1])), topk_indices.new_empty((t, k), dtype=torch.int64),
                tokens.new_empty((num_experts,), dtype=torch.int64))

    torch.library.register_kernel("k2_megatron::moe_permute", "cpu", ref.permute)
    torch.library.register_autograd("k2_megatron::moe_permute", _permute_backward,
                                    setup_context=_permute_setup_context)

if _extension.op_registered("moe_unpermute"):
    @torch.library.register_fake("k2_megatron::moe_unpermute")
    def _(permuted, row_map, topk_probs):
        return permuted.new_empty((row_map.shape[0], permuted.shape[1]))

    torch.library.register_kernel("k2_megatron::moe_unpermute", "cpu", ref.unpermute)
    torch.library.register_autograd("k2_megatron::moe_unpermute", _unpermute_backward,
                                    setup_context=_unpermute_setup_context)
