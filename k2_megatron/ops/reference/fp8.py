"""Reference FP8-E4M3 tile quantisation (K2 activation storage: 1x128 tiles, one fp32 scale per tile).

A tile is ``tile`` consecutive elements of the last dimension of a row (the last tile of a row may be
shorter). For a tile t with amax_t = max |x| over t (in fp32):

    scale_t = amax_t / 448            (448 = largest finite float8_e4m3fn; at least 2^-126, the smallest
                                       normal fp32, so x / scale stays finite; 1 for an all-zero tile)
    q_i     = e4m3(x_i / scale_t)     (fp32 division, then round-to-nearest-even to e4m3, saturating)
    x_i    ~= float(q_i) * scale_t    (dequantise: one fp32 multiply, then rounded to the output dtype)

A tile holding inf or NaN gets scale NaN/inf, so it dequantises to NaN: a non-finite activation surfaces in
the gradients (and megatron's grad-norm check) instead of being clipped silently. ``fp8_tile_quantize`` in
k2_megatron.ops can also refuse such input up front (check_finite=True).
These are the CPU kernels of torch.ops.k2_megatron.fp8_tile_quantize / fp8_tile_dequantize and the oracle the
CUDA kernels (csrc/fp8/) are tested against; the CUDA kernels do the same fp32 arithmetic, so they agree bitwise.
"""

import torch

E4M3_MAX = 448.0
TILE = 128
FP32_TINY = 2.0 ** -126  # smallest normal float32


def fp8_tile_quantize(x: torch.Tensor, tile: int = TILE) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., n] float -> (q float8_e4m3fn [..., n], scales float32 [..., ceil(n / tile)])."""
    n = x.shape[-1]
    tiles = -(-n // tile)
    lead = x.shape[:-1]
    if x.numel() == 0:
        return (torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device),
                torch.empty(*lead, tiles, dtype=torch.float32, device=x.device))
    pad = tiles * tile - n
    xf = x.float().reshape(-1, n)
    if pad:
        xf = torch.nn.functional.pad(xf, (0, pad))
    xt = xf.reshape(xf.shape[0], tiles, tile)
    amax = xt.abs().amax(dim=-1, keepdim=True)  # NaN propagates (amax of a tile holding NaN is NaN)
    scale = amax / E4M3_MAX
    scale = torch.where(scale < FP32_TINY, torch.full_like(scale, FP32_TINY), scale)  # NaN stays NaN
    scale = torch.where(amax == 0, torch.ones_like(scale), scale)
    # |x / scale| <= 448 up to one fp32 rounding; clamp so the conversion saturates instead of overflowing.
    q = (xt / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    q = q.reshape(xf.shape[0], tiles * tile)[:, :n].reshape(x.shape)
    return q.contiguous(), scale.reshape(*lead, tiles)


def fp8_tile_dequantize(q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype, tile: int = TILE) -> torch.Tensor:
    """(q float8_e4m3fn [..., n], scales float32 [..., ceil(n / tile)]) -> x [..., n] of ``dtype``."""
    n = q.shape[-1]
    if q.numel() == 0:
        return torch.empty(q.shape, dtype=dtype, device=q.device)
    s = scales.float().repeat_interleave(tile, dim=-1)[..., :n]
    return (q.float() * s).to(dtype)
