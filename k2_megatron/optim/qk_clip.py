"""QK-Clip for multi-head latent attention (K2 report section 2), as pure functions.

After an optimizer step, every head h whose largest softmax input S_max^h (scaled, masked q.k over the
global batch) exceeds tau is rescaled by gamma_h = tau / S_max^h:
    q_C rows of W_q_up  *= gamma^alpha          (per-head, non-rotary query part)
    k_C rows of W_kv_up *= gamma^(1 - alpha)    (per-head, non-rotary key part)
    q_R rows of W_q_up  *= gamma                (per-head rotary query part; its key k_R is shared by all
                                                 heads, so the whole factor goes on the query side)
The v rows of W_kv_up and the shared k_R (in W_kv_down) are never touched. Every logit of the head then
scales by exactly gamma, so its new maximum is tau. Heads at or below tau are multiplied by exactly 1.0,
which leaves them bit-identical, so the whole layer is one vectorised update with no host round trip
beyond the finiteness check of the logits.

Weight layouts (megatron-core's and Hugging Face's alike): W_q_up [h * (d_nope + d_rope), q_lora_rank] with
rows per head [q_C | q_R]; W_kv_up [h * (d_nope + d_v), kv_lora_rank] with rows per head [k_C | v]. Under
tensor parallelism each rank holds whole heads, so the same function applies to each rank's shard.
"""

import math
from dataclasses import dataclass

import torch

QK_CLIP_TAU = 100.0
QK_CLIP_ALPHA = 0.5


@dataclass(frozen=True)
class MLAHeadLayout:
    """Per-head row layout of an MLA layer's up-projections (num_heads: heads held by this rank)."""

    num_heads: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int

    def __post_init__(self):
        for name in ("num_heads", "qk_nope_head_dim", "v_head_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"MLAHeadLayout: {name} must be positive, got {getattr(self, name)}")
        if self.qk_rope_head_dim < 0:
            raise ValueError(f"MLAHeadLayout: qk_rope_head_dim must be >= 0, got {self.qk_rope_head_dim}")

    @property
    def q_rows_per_head(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def kv_rows_per_head(self) -> int:
        return self.qk_nope_head_dim + self.v_head_dim


def check_qk_clip_args(tau: float, alpha: float) -> None:
    if not (isinstance(tau, (int, float)) and math.isfinite(tau) and tau > 0):
        raise ValueError(f"QK-Clip: tau must be a positive finite number, got {tau!r}")
    if not (isinstance(alpha, (int, float)) and 0.0 <= alpha <= 1.0):
        raise ValueError(f"QK-Clip: alpha must be in [0, 1], got {alpha!r}")


def check_mla_weights(w_q_up: torch.Tensor, w_kv_up: torch.Tensor, layout: MLAHeadLayout) -> None:
    """Raises if the up-projection shapes do not match the head layout."""
    h = layout.num_heads
    if w_q_up.dim() != 2 or w_q_up.shape[0] != h * layout.q_rows_per_head:
        raise ValueError(f"QK-Clip: w_q_up must be [num_heads * (qk_nope + qk_rope) = {h * layout.q_rows_per_head}, "
                         f"q_lora_rank], got shape {tuple(w_q_up.shape)}")
    if w_kv_up.dim() != 2 or w_kv_up.shape[0] != h * layout.kv_rows_per_head:
        raise ValueError(f"QK-Clip: w_kv_up must be [num_heads * (qk_nope + v) = {h * layout.kv_rows_per_head}, "
                         f"kv_lora_rank], got shape {tuple(w_kv_up.shape)}")


def check_max_logits(max_logits, num_heads: int, where: str = "QK-Clip") -> None:
    """Shape, dtype and finiteness of a per-head max-logit vector (the finiteness check syncs the host)."""
    if not isinstance(max_logits, torch.Tensor):
        raise TypeError(f"{where}: max_logits must be a tensor, got {type(max_logits).__name__}")
    if max_logits.dim() != 1 or max_logits.shape[0] != num_heads:
        raise ValueError(f"{where}: max_logits must have shape [{num_heads}] (one per head), "
                         f"got {tuple(max_logits.shape)}")
    if not max_logits.is_floating_point():
        raise TypeError(f"{where}: max_logits must be a float tensor, got {max_logits.dtype}")
    if not bool(torch.isfinite(max_logits).all()):
        raise ValueError(f"{where}: max_logits has non-finite values {max_logits.tolist()}; refusing to clip "
                         "(the attention forward overflowed or produced NaN)")


def qk_clip_factors(max_logits: torch.Tensor, tau: float = QK_CLIP_TAU,
                    alpha: float = QK_CLIP_ALPHA) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-head float64 factors (q_C, k_C, q_R) and the bool mask of clipped heads."""
    s = max_logits.detach().to(torch.float64)
    clipped = s > tau
    gamma = torch.where(clipped, tau / s, torch.ones_like(s))
    return gamma.pow(alpha), gamma.pow(1.0 - alpha), gamma, clipped


@torch.no_grad()
def qk_clip_(w_q_up: torch.Tensor, w_kv_up: torch.Tensor, max_logits: torch.Tensor, layout: MLAHeadLayout, *,
             tau: float = QK_CLIP_TAU, alpha: float = QK_CLIP_ALPHA) -> torch.Tensor:
    """Applies QK-Clip to one MLA layer's up-projection weights in place; returns the clipped-heads mask [h].

    ``max_logits`` [num_heads] must already be the global maximum (all-reduced over data/context parallel
    ranks). Works on any float dtype: the factor is rounded to at least fp32 and the product is rounded
    once to the weight's dtype.
    """
    check_qk_clip_args(tau, alpha)
    check_mla_weights(w_q_up, w_kv_up, layout)
    check_max_logits(max_logits, layout.num_heads)
    f_q_nope, f_k_nope, f_q_rope, clipped = qk_clip_factors(max_logits.to(w_q_up.device), tau, alpha)
    nope = layout.qk_nope_head_dim

    def scale_rows_(w: torch.Tensor, rows_per_head: int, row_slice: slice, factor: torch.Tensor) -> None:
        per_head = w.view(layout.num_heads, rows_per_head, w.shape[1])
        per_head[:, row_slice].mul_(factor.to(torch.promote_types(w.dtype, torch.float32))[:, None, None])

    scale_rows_(w_q_up, layout.q_rows_per_head, slice(0, nope), f_q_nope)
    scale_rows_(w_q_up, layout.q_rows_per_head, slice(nope, None), f_q_rope)
    scale_rows_(w_kv_up, layout.kv_rows_per_head, slice(0, nope), f_k_nope.to(w_kv_up.device))
    return clipped
