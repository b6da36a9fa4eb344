"""``fp8_tile_quantize`` / ``fp8_tile_dequantize``: FP8-E4M3 storage of activations in 1x128 tiles with one
fp32 scale per tile (K2 report section 4: the inputs of the MoE up-projection and of SwiGLU are kept for
backward in this form while the compute stays BF16). Conventions in k2_megatron/ops/reference/fp8.py."""

import torch

from k2_megatron import _extension
from k2_megatron.ops import reference
from k2_megatron.ops._checks import check_tensor
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
    if _extension.dispatch_to_op(_Q, x):
        return torch.ops.k2_megatron.fp8_tile_quantize(x)
    return reference.fp8_tile_quantize(x)


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
    if _extension.dispatch_to_op(_DQ, q):
        return torch.ops.k2_megatron.fp8_tile_dequantize(q, scales, dtype)
    return reference.fp8_tile_dequantize(q, scales, dtype)


if _extension.extension_loaded() and _extension.op_registered(_Q):
    # The schemas and the CUDA kernels come from k2_megatron._C; the CPU kernels are the references.
    @torch.library.register_fake("k2_megatron::fp8_tile_quantize")
    def _(x):
        tiles = -(-x.shape[-1] // TILE)
        return (torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device),
                x.new_empty((*x.shape[:-1], tiles), dtype=torch.float32))

    @torch.library.register_fake("k2_megatron::fp8_tile_dequantize")
    def _(q, scales, dtype):
        return torch.empty(q.shape, dtype=dtype, device=q.device)

    torch.library.register_kernel("k2_megatron::fp8_tile_quantize", "cpu",
                                  lambda x: reference.fp8_tile_quantize(x))
    torch.library.register_kernel("k2_megatron::fp8_tile_dequantize", "cpu",
                                  lambda q, scales, dtype: reference.fp8_tile_dequantize(q, scales, dtype))
