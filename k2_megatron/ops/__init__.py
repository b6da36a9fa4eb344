"""k2_megatron ops: each runs its CUDA kernel (k2_megatron._C) on a supported GPU, else its pure-PyTorch
reference (k2_megatron.ops.reference). Arguments are validated here, with errors that name them."""

from k2_megatron.ops.attention import mla_attention, mla_attention_varlen
from k2_megatron.ops.fp8_activation import fp8_tile_dequantize, fp8_tile_quantize
from k2_megatron.ops.grouped_gemm import grouped_gemm, grouped_gemm_wgrad
from k2_megatron.ops.newton_schulz import DEFAULT_COEFFICIENTS, newton_schulz
from k2_megatron.ops.moe_permute import permute, unpermute

__all__ = ["DEFAULT_COEFFICIENTS", "fp8_tile_dequantize", "fp8_tile_quantize", "grouped_gemm", "grouped_gemm_wgrad",
           "mla_attention",
           "mla_attention_varlen", "newton_schulz",
           "permute", "unpermute"]
