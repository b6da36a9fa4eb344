"""The MuonClip update rules as pure functions (K2 report section 2; Moonlight for the update scaling).

Muon, for a hidden weight matrix W (n x m) with gradient G:
    M_t = mu * M_{t-1} + G_t                                  (momentum, mu = 0.95)
    U_t = G_t + mu * M_t if Nesterov else M_t
    O_t = NewtonSchulz(U_t) * scale * sqrt(max(n, m))          (scale = 0.2: update RMS matched to AdamW)
    W_t = W_{t-1} - lr * (O_t + lambda * W_{t-1})              (decoupled weight decay)
AdamW (embeddings, output head, norms, biases, everything not a hidden matrix) is the standard decoupled
AdamW with bias correction. These functions work in place on the tensors they are given (model weights or
a distributed optimizer's master shards alike); the optimizer classes only decide what to call them on.
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
