"""FP8 block-quantised weights of the DeepSeek-V3 / Kimi K2 release: dequantise, quantise, which tensors.

Release format (the FP8 safetensors of moonshotai/Kimi-K2-Instruct, as DeepSeek-V3's): a linear weight ``q``
[out, in] is stored as float8_e4m3fn with a sibling ``<name>_scale_inv`` in float32 of shape
[ceil(out/128), ceil(in/128)], and

    w[i, j] = q[i, j] * s[i // 128, j // 128]                                   (1)

Partial tiles exist: kv_a_proj_with_mqa has 576 = 4*128 + 64 rows, so its scale has 5 block rows and the
last one covers 64 rows only. Block sizes are never inferred from ``q.shape // s.shape`` (which is what
gets partial tiles wrong); they are a parameter (128 in the release) and the scale shape is checked.

Quantisation (FP8 export) follows the same layout with per-block scales s = amax(|w| over the block) / 448
(448 is the largest finite float8_e4m3fn). By default the scale is rounded to nearest with 5 significant
bits (1 + 4 mantissa bits, still stored as float32), and w / s is saturated to +-448 before the cast.
Why: the rounding moves amax / s by at most a factor 1 +- 1/32, into [434.4, 462.5], so the block's largest
element always becomes q = +-448 (the e4m3 neighbours are 416 and saturation; the saturation error is below
the e4m3 half-step 16 * s). Dequantised, that element is 448 * s, exact in bfloat16 and float32 (3 + 5
significant bits <= 8), so quantising again finds the same amax, the same s (448 * s / 448 = s exactly), and
the same q (bf16 rounding of q * s moves it by < 2^-8 relative, far inside e4m3's half-step of >= 2^-5).
Hence quantize(dequantize(q, s)) == (q, s) bit for bit through a bf16 or an fp32 model.
``round_scale=False`` gives the plain float32 amax / 448 scale (the DeepSeek-V3 recipe), whose round trip
through fp32 keeps q but may move s by one float32 ulp.
Scales below float32's normal range (amax < ~5e-36) are outside these guarantees.
"""

from __future__ import annotations

import re

import torch

FP8_BLOCK_SIZE = 128
FP8_E4M3_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
SCALE_SUFFIX = "_scale_inv"

_OUT_DTYPES = (torch.bfloat16, torch.float32)
_FLOAT_IN = (torch.bfloat16, torch.float16, torch.float32, torch.float64)

# Tensors of the release that are NOT quantised: embeddings, lm_head, norms, the router (mlp.gate) and its
# correction bias. Everything else ending in "_proj.weight" (attention, dense / expert / shared FFN) is.
_NOT_QUANTISED = re.compile(r"(embed_tokens|lm_head|norm|layernorm|mlp\.gate)\.weight$|e_score_correction_bias$")
_QUANTISED = re.compile(r"_proj(_with_mqa)?\.weight$")


def is_fp8_quantized_in_release(name: str) -> bool:
    """Whether the release stores Hugging Face tensor ``name`` as float8_e4m3fn + ``name + '_scale_inv'``.

    Linear weights (q_a/q_b/q/kv_a/kv_b/o projections, dense, expert and shared-expert gate/up/down
    projections) are; embeddings, lm_head, norms, the router weight (mlp.gate) and
    e_score_correction_bias are not. Per-expert names only: fused ``mlp.experts.gate_up_proj`` tensors
    (transformers' in-memory layout) are 3-D and not a release format.
    """
    return bool(_QUANTISED.search(name)) and not _NOT_QUANTISED.search(name)


def scale_inv_name(name: str) -> str:
    return name + SCALE_SUFFIX


def fp8_scale_shape(shape, block_size: int = FP8_BLOCK_SIZE) -> tuple[int, int]:
    """[ceil(out / block), ceil(in / block)]: the scale shape of a 2-D weight of ``shape``."""
    if len(shape) != 2:
        raise ValueError(f"FP8 block quantisation is for 2-D weights, got shape {tuple(shape)}")
    rows, cols = (int(d) for d in shape)
    return (-(-rows // block_size), -(-cols // block_size))


def _check_block(block_size) -> None:
    if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size <= 0:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")


def dequantize_fp8_blockwise(q: torch.Tensor, scale_inv: torch.Tensor, *, dtype: torch.dtype = torch.bfloat16,
                             block_size: int = FP8_BLOCK_SIZE, name: str = "weight") -> torch.Tensor:
    """Equation (1): ``q`` (float8_e4m3fn [out, in]) times its per-block ``scale_inv`` (float32
    [ceil(out/block), ceil(in/block)]), computed in float32 and returned in ``dtype`` (bf16 or fp32).

    ``name`` only labels error messages (pass the checkpoint tensor name). Vectorised: the scale rows are
    expanded to one per weight row (a [out, ceil(in/block)] tensor), full column blocks are scaled through a
    [out, in // block, block] view and the partial last column block, if any, separately.
    """
    _check_block(block_size)
    if not isinstance(q, torch.Tensor) or not isinstance(scale_inv, torch.Tensor):
        raise TypeError(f"{name}: q and scale_inv must be torch.Tensors, got {type(q).__name__} and "
                        f"{type(scale_inv).__name__}")
    if q.dtype != torch.float8_e4m3fn:
        raise TypeError(f"{name}: the quantised weight must be float8_e4m3fn, got {q.dtype}")
    if q.dim() != 2:
        raise ValueError(f"{name}: the quantised weight must be 2-D, got shape {tuple(q.shape)}")
    if scale_inv.dtype != torch.float32:
        raise TypeError(f"{name}{SCALE_SUFFIX}: the scale must be float32, got {scale_inv.dtype}")
    expected = fp8_scale_shape(q.shape, block_size)
    if tuple(scale_inv.shape) != expected:
        raise ValueError(f"{name}{SCALE_SUFFIX}: expected shape {expected} = ceil({tuple(q.shape)} / {block_size}), "
                         f"got {tuple(scale_inv.shape)}")
    if dtype not in _OUT_DTYPES:
        raise ValueError(f"{name}: dequantised dtype must be bfloat16 or float32, got {dtype}")
    rows, cols = q.shape
    w = q.to(torch.float32)
    if w.numel():
        s_rows = scale_inv.to(w.device).repeat_interleave(block_size, dim=0)[:rows]  # [rows, ceil(cols/block)]
        full = cols // block_size
        if full:
            w[:, :full * block_size].view(rows, full, block_size).mul_(s_rows[:, :full, None])
        if cols % block_size:
            w[:, full * block_size:].mul_(s_rows[:, full:full + 1])
    return w if dtype == torch.float32 else w.to(dtype)


def _round_to_5_significant_bits(s: torch.Tensor) -> torch.Tensor:
    """s (float32, >= 0, finite) rounded to nearest with 5 significant bits (4 explicit mantissa bits)."""
    drop = 19  # float32 has 23 explicit mantissa bits; keep the top 4 (a carry moves into the exponent)
    bits = s.contiguous().view(torch.int32)
    return ((bits + (1 << (drop - 1))) & ~((1 << drop) - 1)).view(torch.float32)


def quantize_fp8_blockwise(w: torch.Tensor, *, block_size: int = FP8_BLOCK_SIZE, round_scale: bool = True,
                           name: str = "weight") -> tuple[torch.Tensor, torch.Tensor]:
    """(q float8_e4m3fn [out, in], scale_inv float32 [ceil(out/block), ceil(in/block)]) with w ~= (1).

    Per block: s = amax / 448 (rounded to 5 significant bits when ``round_scale``, which makes the round trip
    exact: see the module docstring), s = 1 for an all-zero block, q = round_to_e4m3(clamp(w / s, +-448)).
    Non-finite weights are an error.
    """
    _check_block(block_size)
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"{name}: must be a torch.Tensor, got {type(w).__name__}")
    if w.dtype not in _FLOAT_IN:
        raise TypeError(f"{name}: FP8 quantisation takes a floating-point weight, got {w.dtype}")
    if w.dim() != 2:
        raise ValueError(f"{name}: FP8 block quantisation is for 2-D weights, got shape {tuple(w.shape)}")
    rows, cols = w.shape
    nr, nc = fp8_scale_shape(w.shape, block_size)
    wp = torch.zeros(nr * block_size, nc * block_size, dtype=torch.float32, device=w.device)
    wp[:rows, :cols] = w
    if not torch.isfinite(wp).all():
        raise ValueError(f"{name}: cannot quantise non-finite values to FP8")
    blocks = wp.view(nr, block_size, nc, block_size)
    amax = blocks.abs().amax(dim=(1, 3))
    scale = amax / FP8_E4M3_MAX
    if round_scale:
        scale = _round_to_5_significant_bits(scale)
    scale = torch.where(amax > 0, scale, torch.ones_like(scale))
    blocks.div_(scale[:, None, :, None]).clamp_(-FP8_E4M3_MAX, FP8_E4M3_MAX)
    q = wp[:rows, :cols].to(torch.float8_e4m3fn)
    return q, scale.contiguous()
