"""FP8 (float8_e4m3fn, 128x128 block scales) dequantisation and quantisation of K2 / DeepSeek-V3 weights.

Oracle: the e4m3 bit patterns are decoded here by hand in float64 (sign, 4-bit exponent with bias 7,
3-bit mantissa, subnormals) and multiplied by the scale gathered at [i // 128, j // 128] in float64.
Tolerances: a float32 result must equal the float64 reference rounded to float32 exactly (q * s has at
most 4 + 24 significant bits: exact in float64, rounded once in float32); a bfloat16 result must equal
that float32 value rounded to bfloat16, so within 2^-8 (+ 2^-24 for the double rounding) of the reference.
"""

import math

import pytest
import torch

from tests.helpers.checkpoint import decode_e4m3_float64, random_fp8, reference_dequant
from k2_megatron.checkpoint.hf.fp8 import (
    FP8_E4M3_MAX,
    dequantize_fp8_blockwise,
    fp8_scale_shape,
    is_fp8_quantized_in_release,
    quantize_fp8_blockwise,
)

# (out, in): 576 = K2's kv_a_proj_with_mqa rows (4 full tiles + 64), odd and tiny column counts, a zero-size
SHAPES = [(576, 7168 // 16), (576, 300), (129, 257), (1, 1), (128, 256), (200, 127), (3, 385), (0, 130)]


def random_scales(shape, g) -> torch.Tensor:
    """Positive float32 scales with full 24-bit mantissas over a wide exponent range (like the release)."""
    m = 1 + torch.rand(shape, generator=g, dtype=torch.float64)
    e = torch.randint(-24, 4, shape, generator=g).to(torch.float64)
    return (m * torch.pow(2.0, e)).to(torch.float32)


def test_decoder_matches_torch_on_all_bit_patterns():
    q = torch.arange(256, dtype=torch.int64).to(torch.uint8).view(torch.float8_e4m3fn)
    finite = torch.isfinite(q.to(torch.float32))
    assert int(finite.sum()) == 254
    assert torch.equal(decode_e4m3_float64(q)[finite], q.to(torch.float64)[finite])
    assert decode_e4m3_float64(q)[finite].abs().max() == FP8_E4M3_MAX


@pytest.mark.parametrize("shape", SHAPES)
def test_dequantize_matches_float64_reference(shape):
    g = torch.Generator().manual_seed(sum(shape))
    q = random_fp8(shape, g)
    s = random_scales(fp8_scale_shape(shape), g)
    ref = reference_dequant(q, s)
    w32 = dequantize_fp8_blockwise(q, s, dtype=torch.float32)
    assert w32.dtype == torch.float32 and w32.shape == shape
    assert torch.equal(w32, ref.to(torch.float32))
    w16 = dequantize_fp8_blockwise(q, s, dtype=torch.bfloat16)
    assert w16.dtype == torch.bfloat16
    assert torch.equal(w16, w32.to(torch.bfloat16))
    assert ((w16.double() - ref).abs() <= ref.abs() * (2.0 ** -8 + 2.0 ** -24)).all()


def test_partial_tiles_use_their_own_scale():
    # 576 x 300: block rows 0..3 full, row block 4 holds rows 512..575; column block 2 holds columns 256..299
    q = torch.ones(576, 300).to(torch.float8_e4m3fn)
    s = torch.arange(1, 16, dtype=torch.float32).reshape(5, 3)
    w = dequantize_fp8_blockwise(q, s, dtype=torch.float32)
    assert w[511, 255] == s[3, 1] and w[512, 256] == s[4, 2] and w[575, 299] == s[4, 2] and w[575, 0] == s[4, 0]
    assert torch.equal(w[512:, 256:], torch.full((64, 44), float(s[4, 2])))


def test_scale_shape_is_ceil_division():
    assert fp8_scale_shape((576, 7168)) == (5, 56)
    assert fp8_scale_shape((7168, 576)) == (56, 5)
    assert fp8_scale_shape((1, 129)) == (1, 2)
    assert fp8_scale_shape((256, 256), 64) == (4, 4)


def test_dequantize_errors_name_the_tensor():
    q = torch.zeros(576, 300).to(torch.float8_e4m3fn)
    good = torch.ones(5, 3)
    name = "model.layers.1.self_attn.kv_a_proj_with_mqa.weight"
    with pytest.raises(ValueError, match=r"kv_a_proj_with_mqa\.weight_scale_inv: expected shape \(5, 3\).*\(4, 2\)"):
        dequantize_fp8_blockwise(q, torch.ones(4, 2), name=name)  # what weight.shape // scale.shape assumes
    with pytest.raises(TypeError, match=r"kv_a_proj_with_mqa\.weight_scale_inv: the scale must be float32"):
        dequantize_fp8_blockwise(q, good.bfloat16(), name=name)
    with pytest.raises(TypeError, match=r"kv_a_proj_with_mqa\.weight: the quantised weight must be float8_e4m3fn"):
        dequantize_fp8_blockwise(q.float(), good, name=name)
    with pytest.raises(ValueError, match="must be 2-D"):
        dequantize_fp8_blockwise(q[None], good, name=name)
    with pytest.raises(ValueError, match="bfloat16 or float32"):
        dequantize_fp8_blockwise(q, good, dtype=torch.float16, name=name)
    with pytest.raises(ValueError, match="block_size"):
        dequantize_fp8_blockwise(q, good, block_size=0)
    with pytest.raises(TypeError, match="torch.Tensors"):
        dequantize_fp8_blockwise(q, [[1.0]])


def test_other_block_sizes():
    g = torch.Generator().manual_seed(5)
    q = random_fp8((100, 70), g)
    s = random_scales(fp8_scale_shape((100, 70), 32), g)
    assert torch.equal(dequantize_fp8_blockwise(q, s, dtype=torch.float32, block_size=32),
                       reference_dequant(q, s, 32).to(torch.float32))


def _weights(shape, g):
    """Rows of very different magnitudes, so blocks get different scales."""
    w = torch.randn(shape, generator=g, dtype=torch.float64)
    return (w * torch.pow(2.0, torch.randint(-18, 8, (shape[0], 1), generator=g).to(torch.float64))).float()


@pytest.mark.parametrize("shape", SHAPES)
def test_quantize_error_and_scales(shape):
    g = torch.Generator().manual_seed(7 + sum(shape))
    w = _weights(shape, g)
    q, s = quantize_fp8_blockwise(w)
    assert q.dtype == torch.float8_e4m3fn and q.shape == shape
    assert s.dtype == torch.float32 and tuple(s.shape) == fp8_scale_shape(shape)
    if not w.numel():
        return
    rows, cols = torch.arange(shape[0]) // 128, torch.arange(shape[1]) // 128
    s_full = s.double()[rows][:, cols]
    # amax / 448 rounded to 5 significant bits: within 2^-5 relative
    amax = torch.zeros(s.shape, dtype=torch.float64)
    for bi in range(s.shape[0]):  # the oracle loops over blocks
        for bj in range(s.shape[1]):
            amax[bi, bj] = w[bi * 128:(bi + 1) * 128, bj * 128:(bj + 1) * 128].double().abs().max()
    assert ((s.double() - amax / 448).abs() <= amax / 448 * 2.0 ** -5).all()
    # every element within half an e4m3 step of the top binade (16 s); the block maximum maps to +-448
    err = (reference_dequant(q, s) - w.double()).abs()
    assert (err <= 16 * s_full).all()
    assert (decode_e4m3_float64(q).abs().amax() == 448)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_quantize_dequantize_round_trip_is_exact(shape, dtype):
    g = torch.Generator().manual_seed(11 + sum(shape))
    q, s = quantize_fp8_blockwise(_weights(shape, g))
    q2, s2 = quantize_fp8_blockwise(dequantize_fp8_blockwise(q, s, dtype=dtype))
    assert torch.equal(q2.view(torch.uint8), q.view(torch.uint8))
    assert torch.equal(s2, s)


def test_plain_amax_scales_round_trip_q_exactly_and_s_to_one_ulp():
    g = torch.Generator().manual_seed(3)
    q, s = quantize_fp8_blockwise(_weights((576, 300), g), round_scale=False)
    q2, s2 = quantize_fp8_blockwise(dequantize_fp8_blockwise(q, s, dtype=torch.float32), round_scale=False)
    assert torch.equal(q2.view(torch.uint8), q.view(torch.uint8))
    assert ((s2.double() - s.double()).abs() <= s.double() * 2.0 ** -23).all()


def test_quantize_zero_blocks_and_errors():
    w = torch.zeros(130, 130)
    w[129, 129] = 3.0
    q, s = quantize_fp8_blockwise(w)
    # 3 / 448 = 1.714 * 2^-8; nearest with 4 mantissa bits: 1.6875 * 2^-8
    assert s[0, 0] == 1 and s[0, 1] == 1 and s[1, 0] == 1 and s[1, 1] == 27 / 16 * 2.0 ** -8
    assert q.float()[:129, :129].abs().max() == 0 and q.float()[129, 129] == 448
    with pytest.raises(ValueError, match="w1: cannot quantise non-finite"):
        quantize_fp8_blockwise(torch.tensor([[1.0, math.inf]]), name="w1")
    with pytest.raises(ValueError, match="2-D"):
        quantize_fp8_blockwise(torch.ones(2, 2, 2))
    with pytest.raises(TypeError, match="floating-point"):
        quantize_fp8_blockwise(torch.ones(2, 2, dtype=torch.int32))


def test_which_release_tensors_are_quantised():
    p = "model.layers.3."
    quantised = ["self_attn.q_a_proj.weight", "self_attn.q_b_proj.weight", "self_attn.q_proj.weight",
                 "self_attn.kv_a_proj_with_mqa.weight", "self_attn.kv_b_proj.weight", "self_attn.o_proj.weight",
                 "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
                 "mlp.experts.17.gate_proj.weight", "mlp.experts.17.up_proj.weight", "mlp.experts.17.down_proj.weight",
                 "mlp.shared_experts.gate_proj.weight", "mlp.shared_experts.down_proj.weight"]
    plain = ["mlp.gate.weight", "mlp.gate.e_score_correction_bias", "input_layernorm.weight",
             "post_attention_layernorm.weight", "self_attn.q_a_layernorm.weight", "self_attn.kv_a_layernorm.weight",
             "mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    assert all(is_fp8_quantized_in_release(p + n) for n in quantised)
    assert not any(is_fp8_quantized_in_release(p + n) for n in plain)
    assert not any(is_fp8_quantized_in_release(n) for n in ("model.embed_tokens.weight", "lm_head.weight",
                                                              "model.norm.weight"))
