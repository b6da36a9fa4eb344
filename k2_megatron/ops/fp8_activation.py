"""``fp8_tile_quantize`` / ``fp8_tile_dequantize``: FP8-E4M3 storage of activations in 1x128 tiles with one
fp32 scale per tile (K2 report section 4: the inputs of the MoE up-projection and of SwiGLU are kept for
backward in this form while the compute stays BF16). Conventions in k2_megatron/ops/reference/fp8.py."""

import torch

from k2_megatron.ops._checks import check_tensor
from k2_megatron.ops._registration import register_op
from k2_megatron.ops.reference import fp8 as reference
from k2_megatron.ops.reference.fp8 import E4M3_MAX, TILE

_Q = "fp8_tile_quantize"
_DQ = "fp8_tile_dequantize"
_IN_DTYPES = (torch.bfloat16, torch.float16, torch.float32)

__all__ = ["E4M3_MAX", "TILE", "fp8_tile_dequantize", "fp8_tile_quantize"]


def fp8_tile_quantize(x: torch.Tensor, *, check_finite: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., n] (bf16, fp16 or fp32, n >= 1) -> (q float8_e4m3fn [..., n], scales float32 [..., ceil(n/128)]).

    check_finite=True raises ValueError when x holds inf or NaN (it costs a device-to-host sync); with False
    such a tile quantises to a NaN/inf scale and dequantises to NaN (see the reference's docstring).
    """
    check_tensor(_Q, "x", x, min_dim=1, dtypes=_IN_DTYPES)
    if check_finite and x.numel():
        bad = ~torch.isfinite(x)
        if bool(bad.any()):
            first = tuple(int(i) for i in bad.nonzero()[0])
            raise ValueError(f"{_Q}: x holds {int(bad.sum())} non-finite value(s) (inf/NaN), the first at index "
                             f"{first} = {x[first].item()}; FP8 storage needs finite activations")
    x = x.contiguous()
    if _QUANTIZE.dispatches(x):
        return _QUANTIZE(x)
    return _QUANTIZE.reference(x)


def fp8_tile_dequantize(q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """(q float8_e4m3fn [..., n], scales float32 [..., ceil(n/128)]) -> float tensor [..., n] of ``dtype``."""
    check_tensor(_DQ, "q", q, min_dim=1, dtypes=(torch.float8_e4m3fn,))
    check_tensor(_DQ, "scales", scales, min_dim=1, dtypes=(torch.float32,))
    if dtype not in _IN_DTYPES:
        raise TypeError(f"{_DQ}: dtype must be one of bfloat16, float16, float32, got {dtype}")
    expected = (*q.shape[:-1], -(-q.shape[-1] // TILE))
    if tuple(scales.shape) != expected:
        raise ValueError(f"{_DQ}: scales must have shape {expected} (one per 1x{TILE} tile of q "
                         f"{tuple(q.shape)}), got {tuple(scales.shape)}")
    if scales.device != q.device:
        raise ValueError(f"{_DQ}: scales must be on q's device {q.device}, got {scales.device}")
    q, scales = q.contiguous(), scales.contiguous()
    if _DEQUANTIZE.dispatches(q):
        return _DEQUANTIZE(q, scales, dtype)
    return _DEQUANTIZE.reference(q, scales, dtype)


def _fake_quantize(x):
    tiles = -(-x.shape[-1] // TILE)
    return (torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device),
            x.new_empty((*x.shape[:-1], tiles), dtype=torch.float32))


def _fake_dequantize(q, scales, dtype):
    return torch.empty(q.shape, dtype=dtype, device=q.device)


# The schemas and the CUDA kernels come from k2_megatron._C; the CPU kernels are the references (1x128 tiles:
# the schemas take no tile size).
_QUANTIZE = register_op(_Q, reference=lambda x: reference.fp8_tile_quantize(x), fake=_fake_quantize)
_DEQUANTIZE = register_op(_DQ, reference=lambda q, scales, dtype: reference.fp8_tile_dequantize(q, scales, dtype),
                          fake=_fake_dequantize)
