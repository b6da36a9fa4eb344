"""``newton_schulz``: batched Newton-Schulz orthogonalisation for Muon (K2 report section 2)."""

import math
from collections.abc import Sequence

import torch

from k2_megatron.ops._checks import check_tensor
from k2_megatron.ops._registration import register_op
from k2_megatron.ops.reference import newton_schulz as reference

_OP = "newton_schulz"
_DTYPES = (torch.bfloat16, torch.float32)

# Keller Jordan's quintic (a, b, c), used by Moonlight and K2: normalised singular values >= ~3e-3 land in
# about [0.68, 1.21] after 5 steps.
DEFAULT_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def flatten_coefficients(steps: int, coefficients) -> list[float]:
    """One (a, b, c) for every step, or one triple per step -> the flat list the op takes (3 * steps)."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"{_OP}: steps must be a non-negative int, got {steps!r}")
    items = list(coefficients)
    if len(items) == 3 and all(isinstance(v, (int, float)) for v in items):
        triples = [tuple(items)] * steps
    else:
        triples = [tuple(t) if isinstance(t, (tuple, list)) else () for t in items]
        if len(triples) != steps or any(len(t) != 3 for t in triples):
            raise ValueError(f"{_OP}: coefficients must be one (a, b, c) triple or {steps} triples (one per step), "
                             f"got {coefficients!r}")
    flat = [float(v) for t in triples for v in t]
    if not all(math.isfinite(v) for v in flat):
        raise ValueError(f"{_OP}: coefficients must be finite, got {coefficients!r}")
    return flat


def newton_schulz(x: torch.Tensor, steps: int = 5, coefficients: Sequence = DEFAULT_COEFFICIENTS,
                  eps: float = 1e-7) -> torch.Tensor:
    """Orthogonalise every matrix of ``x`` [..., m, n] (bf16 or fp32) with ``steps`` Newton-Schulz iterations.

    Each matrix is normalised by its own Frobenius norm (+ ``eps``); m > n is handled by iterating on the
    transpose. Returns a contiguous tensor of x's shape and dtype. bf16 runs bf16 matmuls with fp32
    accumulation (the paper's setting); fp32 runs in fp32. A zero matrix gives zeros.
    On CUDA the whole batch runs in one launch sequence with symmetric (half-cost) X X^T and A A.
    """
    check_tensor(_OP, "x", x, min_dim=2, dtypes=_DTYPES)
    flat = flatten_coefficients(steps, coefficients)
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps > 0):
        raise ValueError(f"{_OP}: eps must be a positive finite float, got {eps!r}")
    if _NEWTON_SCHULZ.dispatches(x):
        return _NEWTON_SCHULZ(x, flat, float(eps))
    return _NEWTON_SCHULZ.reference(x, flat, float(eps))


def _fake(x, coefficients, eps):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def cuda_workspace_bytes(x: torch.Tensor, coefficients=(), eps: float = 0.0) -> int:
    """The most device bytes the CUDA kernel (csrc/newton_schulz/newton_schulz.cpp) holds at once besides ``x``, its
    output included: its fp32 copy of x (none for fp32 x) lives to the end; normalising holds the fp32 quotient, its
    cast to x's dtype and, for a tall matrix (iterated on the transpose), a contiguous copy; each step holds the
    iterate X, the next X and the [min(m, n)]^2 products A and B."""
    m, n = x.shape[-2], x.shape[-1]
    numel, size = x.numel(), x.element_size()
    r = min(m, n)
    fp32_copy = 0 if x.dtype == torch.float32 else 4 * numel
    normalise = 4 * numel + (0 if x.dtype == torch.float32 else size * numel) + (size * numel if m > n else 0)
    iterate = 2 * size * numel + 2 * size * (numel // (m * n) if m * n else 0) * r * r
    return fp32_copy + max(normalise, iterate)


# The schema and the CUDA kernel come from k2_megatron._C; the CPU kernel is the reference.
_NEWTON_SCHULZ = register_op("newton_schulz", reference=reference.newton_schulz, fake=_fake,
                             workspace=cuda_workspace_bytes)
