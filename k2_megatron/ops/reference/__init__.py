"""Pure-PyTorch references of every k2_megatron op.

Each is the CPU implementation of its op and the oracle the CUDA kernels are tested against. They take
already-validated arguments (k2_megatron.ops validates) and run on any device and float dtype.
"""

from k2_megatron.ops.reference.attention import (mla_attention_bwd, mla_attention_fwd, mla_attention_varlen_bwd,
                                                 mla_attention_varlen_fwd)
from k2_megatron.ops.reference.fp8 import fp8_tile_dequantize, fp8_tile_quantize
from k2_megatron.ops.reference.grouped_gemm import grouped_gemm, grouped_gemm_wgrad, permute, unpermute
from k2_megatron.ops.reference.newton_schulz import newton_schulz

__all__ = ["fp8_tile_dequantize", "fp8_tile_quantize", "grouped_gemm", "grouped_gemm_wgrad", "mla_attention_bwd",
           "mla_attention_fwd", "mla_attention_varlen_bwd",
           "mla_attention_varlen_fwd", "newton_schulz", "permute", "unpermute"]
