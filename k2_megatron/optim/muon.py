"""The MuonClip update rules as pure functions (K2 report section 2; Moonlight for the update scaling).

Muon, for a hidden weight matrix W (n x m) with gradient G:
    M_t = mu * M_{t-1} + G_t                                  (momentum, mu = 0.95)
    U_t = G_t + mu * M_t if Nesterov else M_t
    O_t = NewtonSchulz(U_t) * scale * sqrt(max(n, m))          (scale = 0.2: update RMS matched to AdamW)
    W_t = W_{t-1} - lr * (O_t + lambda * W_{t-1})              (decoupled weight decay)
AdamW (embeddings, output head, norms, biases, everything not a hidden matrix) is the standard decoupled
AdamW with bias correction. These functions work in place on the tensors they are given (model weights or
a distributed optimizer's master shards alike); the optimizer classes only decide what to call them on.

Muon works per weight matrix (K2 and Moonlight; the K2 release stores gate_proj and up_proj separately), and
NewtonSchulz([G; U]) is not [NewtonSchulz(G); NewtonSchulz(U)]. A parameter that stores several matrices
stacked along its rows (megatron-core's SwiGLU ``linear_fc1`` = [gate; up]) says so with
``set_row_matrices(param, 2)``; every optimizer orthogonalises each of them as its own matrix, with its own
scale (``matrices_of_update``).
"""

import math
from collections.abc import Sequence

import torch

from k2_megatron.ops import DEFAULT_COEFFICIENTS, newton_schulz

# Moonlight's update-RMS matching factor: 0.2 * sqrt(max(n, m)) gives Muon updates AdamW's typical RMS.
MUON_UPDATE_SCALE = 0.2


def muon_scale(shape: Sequence[int], scale: float = MUON_UPDATE_SCALE) -> float:
    """scale * sqrt(max(n, m)) for a matrix (or a stack of matrices) of the given shape [..., n, m]."""
    return scale * math.sqrt(max(shape[-2], shape[-1]))


# The attribute on a parameter that holds several matrices of equal height stacked along its rows (dim -2).
ROW_MATRICES_ATTR = "muon_row_matrices"


def set_row_matrices(param: torch.Tensor, count: int) -> None:
    """Marks ``param`` [..., count * n, m] as ``count`` matrices [n, m] stacked along its rows, each of which Muon
    orthogonalises on its own (megatron's SwiGLU fc1 [gate; up]: count 2; a TP shard [gate_r; up_r] alike)."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"set_row_matrices: count must be a positive int, got {count!r}")
    if param.dim() < 2 or param.shape[-2] % count:
        raise ValueError(f"set_row_matrices: a parameter of shape {tuple(param.shape)} cannot hold {count} matrices "
                         f"stacked along its rows (dim -2 must be a multiple of {count})")
    setattr(param, ROW_MATRICES_ATTR, count)


def row_matrices(param: torch.Tensor) -> int:
    """How many matrices ``param`` stacks along its rows (1 unless ``set_row_matrices`` said otherwise)."""
    return getattr(param, ROW_MATRICES_ATTR, 1)


def matrix_shape(param: torch.Tensor) -> tuple[int, int]:
    """(n, m) of each matrix Muon orthogonalises in ``param`` [..., rows, m]: rows / row_matrices(param)."""
    return param.shape[-2] // row_matrices(param), param.shape[-1]


def matrices_of_update(update: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``update`` (shaped like ``param``) as the stack [k, n, m] of the matrices Muon orthogonalises one by one:
    every leading (expert) index, and each of the row_matrices(param) blocks of its rows, in memory order."""
    return update.reshape(-1, *matrix_shape(param))


def muon_momentum_(momentum_buffer: torch.Tensor, grad: torch.Tensor, momentum: float,
                   nesterov: bool) -> torch.Tensor:
    """M_t = mu M_{t-1} + G_t in place; returns the matrix to orthogonalise (M_t, or G_t + mu M_t)."""
    momentum_buffer.mul_(momentum).add_(grad)
    return grad.add(momentum_buffer, alpha=momentum) if nesterov else momentum_buffer


def muon_orthogonalize(update: torch.Tensor, *, ns_steps: int = 5, ns_coefficients=DEFAULT_COEFFICIENTS,
                       ns_eps: float = 1e-7, ns_dtype: torch.dtype = torch.bfloat16,
                       scale: float = MUON_UPDATE_SCALE) -> torch.Tensor:
    """O = NewtonSchulz(U) * scale * sqrt(max(n, m)) for U [..., n, m] (every leading index a matrix).

    The iteration runs in ``ns_dtype`` (bf16 as in the paper, or fp32); the result is in U's dtype.
    """
    ortho = newton_schulz(update.to(ns_dtype), steps=ns_steps, coefficients=ns_coefficients, eps=ns_eps)
    return ortho.to(update.dtype).mul_(muon_scale(update.shape, scale))


def apply_decoupled_update_(param: torch.Tensor, update: torch.Tensor, lr: float, weight_decay: float) -> None:
    """W <- W - lr * (update + weight_decay * W), in place."""
    if weight_decay != 0:
        param.mul_(1.0 - lr * weight_decay)
    param.add_(update, alpha=-lr)


def adamw_step_(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                step: int, *, lr: float, betas: tuple[float, float], eps: float, weight_decay: float) -> None:
    """One decoupled AdamW step in place (``step`` counts from 1)."""
    beta1, beta2 = betas
    exp_avg.lerp_(grad, 1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
    bias_correction1 = 1.0 - beta1**step
    bias_correction2 = 1.0 - beta2**step
    denom = (exp_avg_sq / bias_correction2).sqrt_().add_(eps)
    if weight_decay != 0:
        param.mul_(1.0 - lr * weight_decay)
    param.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)
