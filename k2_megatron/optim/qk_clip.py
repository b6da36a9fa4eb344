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
tensor parallelism each rank holds whole heads, so the same function applies to each rank's shard; under a
ZeRO-1 optimizer each data-parallel rank holds a flat piece of it (``WeightShard``), scaled row by row.
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


def check_mla_weights(w_q_up, w_kv_up, layout: MLAHeadLayout) -> None:
    """Raises if the up-projection shapes (2-D weights, WeightShards, or None) do not match the head layout."""
    h = layout.num_heads
    for name, w, rows, what in (("w_q_up", w_q_up, layout.q_rows_per_head, "qk_nope + qk_rope"),
                                ("w_kv_up", w_kv_up, layout.kv_rows_per_head, "qk_nope + v")):
        if w is None:
            continue
        shape = (w.rows, w.cols) if isinstance(w, WeightShard) else tuple(w.shape)
        if len(shape) != 2 or shape[0] != h * rows:
            raise ValueError(f"QK-Clip: {name} must be [num_heads * ({what}) = {h * rows}, lora_rank], "
                             f"got shape {shape}")


def check_max_logits(max_logits, num_heads: int, where: str = "QK-Clip", *, finite: bool = True) -> None:
    """Shape, dtype and (``finite``) finiteness of a per-head max-logit vector. The finiteness check reads the device:
    a caller with many layers checks them all in one read instead (``finite=False`` here)."""
    if not isinstance(max_logits, torch.Tensor):
        raise TypeError(f"{where}: max_logits must be a tensor, got {type(max_logits).__name__}")
    if max_logits.dim() != 1 or max_logits.shape[0] != num_heads:
        raise ValueError(f"{where}: max_logits must have shape [{num_heads}] (one per head), "
                         f"got {tuple(max_logits.shape)}")
    if not max_logits.is_floating_point():
        raise TypeError(f"{where}: max_logits must be a float tensor, got {max_logits.dtype}")
    if finite and not bool(torch.isfinite(max_logits).all()):
        raise ValueError(f"{where}: max_logits has non-finite values {max_logits.tolist()}; refusing to clip "
                         "(the attention forward overflowed or produced NaN)")


def qk_clip_factors(max_logits: torch.Tensor, tau: float = QK_CLIP_TAU,
                    alpha: float = QK_CLIP_ALPHA) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-head float64 factors (q_C, k_C, q_R) and the bool mask of clipped heads."""
    s = max_logits.detach().to(torch.float64)
    clipped = s > tau
    gamma = torch.where(clipped, tau / s, torch.ones_like(s))
    return gamma.pow(alpha), gamma.pow(1.0 - alpha), gamma, clipped


def qk_clip_row_factors(max_logits: torch.Tensor, layout: MLAHeadLayout, *, tau: float = QK_CLIP_TAU,
                        alpha: float = QK_CLIP_ALPHA) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row float64 factors of W_q_up [h * (nope + rope)] and W_kv_up [h * (nope + v)], and the clipped mask."""
    f_q_nope, f_k_nope, f_q_rope, clipped = qk_clip_factors(max_logits, tau, alpha)
    nope, rope, v = layout.qk_nope_head_dim, layout.qk_rope_head_dim, layout.v_head_dim
    q_rows = torch.cat([f_q_nope[:, None].expand(-1, nope), f_q_rope[:, None].expand(-1, rope)], dim=1).reshape(-1)
    kv_rows = torch.cat([f_k_nope[:, None].expand(-1, nope), torch.ones_like(f_k_nope)[:, None].expand(-1, v)],
                        dim=1).reshape(-1)
    return q_rows, kv_rows, clipped


@dataclass(frozen=True)
class WeightShard:
    """A contiguous piece of a row-major [rows, cols] weight: ``flat`` holds its elements start..start+numel.

    The whole weight is ``WeightShard.of(w)``; a distributed optimizer's flat master-weight shard is
    ``WeightShard(shard, start, rows, cols)``. QK-Clip scales rows, wherever the shard boundaries fall.
    """

    flat: torch.Tensor
    start: int
    rows: int
    cols: int

    @staticmethod
    def of(weight: torch.Tensor) -> "WeightShard":
        if weight.dim() != 2 or not weight.is_contiguous():
            raise ValueError(f"QK-Clip: expected a contiguous 2-D weight, got shape {tuple(weight.shape)}")
        return WeightShard(weight.view(-1), 0, weight.shape[0], weight.shape[1])

    def __post_init__(self):
        if self.flat.dim() != 1 or self.start < 0 or self.start + self.flat.numel() > self.rows * self.cols:
            raise ValueError(f"WeightShard: elements {self.start}..{self.start + self.flat.numel()} do not fit a "
                             f"[{self.rows}, {self.cols}] weight (flat shape {tuple(self.flat.shape)})")


@torch.no_grad()
def scale_rows_(shard: WeightShard, row_factors: torch.Tensor) -> None:
    """shard *= row_factors[row of each element], in place; each product is rounded once to the shard's dtype
    (the factor is rounded to at least fp32)."""
    factors = row_factors.to(device=shard.flat.device, dtype=torch.promote_types(shard.flat.dtype, torch.float32))
    flat, cols, n = shard.flat, shard.cols, shard.flat.numel()
    pos, row = 0, shard.start // cols
    if shard.start % cols and n:  # partial first row
        k = min(cols - shard.start % cols, n)
        flat[:k].mul_(factors[row:row + 1])
        pos, row = k, row + 1
    full = (n - pos) // cols
    if full:
        flat[pos:pos + full * cols].view(full, cols).mul_(factors[row:row + full, None])
        pos, row = pos + full * cols, row + full
    if pos < n:  # partial last row
        flat[pos:].mul_(factors[row:row + 1])


@torch.no_grad()
def qk_clip_(w_q_up, w_kv_up, max_logits: torch.Tensor, layout: MLAHeadLayout, *,
             tau: float = QK_CLIP_TAU, alpha: float = QK_CLIP_ALPHA, checked_finite: bool = False) -> torch.Tensor:
    """Applies QK-Clip to one MLA layer's up-projection weights in place; returns the clipped-heads mask [h].
    ``checked_finite``: the caller has checked ``max_logits`` for inf / NaN already (MuonClip checks every layer's in
    one host read), so this layer's check would only add a read of its own.

    w_q_up, w_kv_up: the 2-D weights, or ``WeightShard``s of them (a distributed optimizer's flat master
    shards), or None for a weight of which this optimizer holds no piece. ``max_logits`` [num_heads] must already be the global maximum (all-reduced over data/context
    parallel ranks). Any float dtype: the factor is rounded to at least fp32 and each product is rounded once
    to the weight's dtype.
    """
    check_qk_clip_args(tau, alpha)
    w_q_up = w_q_up if w_q_up is None or isinstance(w_q_up, WeightShard) else WeightShard.of(w_q_up)
    w_kv_up = w_kv_up if w_kv_up is None or isinstance(w_kv_up, WeightShard) else WeightShard.of(w_kv_up)
    check_mla_weights(w_q_up, w_kv_up, layout)
    check_max_logits(max_logits, layout.num_heads, finite=not checked_finite)
    q_rows, kv_rows, clipped = qk_clip_row_factors(max_logits, layout, tau=tau, alpha=alpha)
    for shard, rows in ((w_q_up, q_rows), (w_kv_up, kv_rows)):
        if shard is not None:
            scale_rows_(shard, rows)
    return clipped
