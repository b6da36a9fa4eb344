"""FP8-E4M3 1x128-tile quantisation (k2_megatron.ops.fp8_tile_quantize / fp8_tile_dequantize) against a
float64 oracle: tile maxima and scales, round-to-nearest-even, partial last tiles, zeros, inf/NaN."""

import math

import pytest
import torch

from k2_megatron import _extension
from k2_megatron.ops import fp8_tile_dequantize, fp8_tile_quantize
from k2_megatron.ops.reference.fp8 import E4M3_MAX, FP32_TINY, TILE

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SHAPES = [(1, 1), (3, 127), (2, 128), (5, 129), (2, 3, 300), (4, 512)]


def _e4m3_grid() -> tuple[torch.Tensor, torch.Tensor]:
    """All finite non-negative float8_e4m3fn values (float64, ascending) and whether their code is even."""
    codes = torch.arange(0, 128, dtype=torch.uint8)  # sign bit clear
    vals = codes.view(torch.float8_e4m3fn).double()
    keep = torch.isfinite(vals)
    return vals[keep], (codes[keep] % 2 == 0)


def _round_e4m3_f64(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 round-to-nearest-even onto the e4m3 grid, saturating at 448; also a mask of near-ties
    (within 1e-6 relative of a midpoint), where fp32 double rounding may legitimately decide otherwise."""
    grid, even = _e4m3_grid()
    a = v.abs().clamp(max=E4M3_MAX)
    hi = torch.searchsorted(grid, a).clamp(max=grid.numel() - 1)
    lo = (hi - 1).clamp(min=0)
    d_lo, d_hi = a - grid[lo], grid[hi] - a
    pick_hi = (d_hi < d_lo) | ((d_hi == d_lo) & even[hi] & ~even[lo])
    out = torch.where(pick_hi, grid[hi], grid[lo]) * torch.sign(v)
    gap = (grid[hi] - grid[lo]).clamp(min=1e-300)
    near_tie = ((d_lo - d_hi).abs() <= 1e-6 * gap) & (d_lo != d_hi)
    return out, near_tie


def _tiles64(x: torch.Tensor) -> torch.Tensor:
    """|x| tile maxima in float64: [rows, tiles]."""
    n = x.shape[-1]
    tiles = math.ceil(n / TILE)
    x64 = x.double().reshape(-1, n).abs()
    x64 = torch.nn.functional.pad(x64, (0, tiles * TILE - n))
    return x64.reshape(-1, tiles, TILE).amax(-1)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_quantize_against_float64_oracle(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed * 1000 + SHAPES.index(shape) * 10 + DTYPES.index(dtype))
    # per-row magnitudes spread over many binades, so tiles have very different scales
    x = (torch.randn(shape, generator=g) * torch.exp2(torch.randint(-12, 12, (*shape[:-1], 1), generator=g))).to(dtype)
    q, s = fp8_tile_quantize(x)
    tiles = math.ceil(shape[-1] / TILE)
    assert q.dtype == torch.float8_e4m3fn and q.shape == x.shape
    assert s.dtype == torch.float32 and s.shape == (*shape[:-1], tiles)
    amax64 = _tiles64(x)
    s2 = s.reshape(-1, tiles).double()
    # scale = amax / 448, one fp32 rounding
    torch.testing.assert_close(s2, amax64 / E4M3_MAX, rtol=2.0 ** -24, atol=0)
    # q = RNE_e4m3(x / scale): exact except at near-ties of the fp32 quotient
    n = shape[-1]
    scale_el = s2.repeat_interleave(TILE, dim=-1)[:, :n]
    expect, near_tie = _round_e4m3_f64(x.double().reshape(-1, n) / scale_el)
    got = q.reshape(-1, n).double()
    mismatch = (got != expect) & ~near_tie
    assert not bool(mismatch.any()), f"{int(mismatch.sum())} elements off the RNE oracle"
    # the largest element of every tile lands on +-448 (the tile maximum is representable)
    qmax = torch.nn.functional.pad(got.abs(), (0, tiles * TILE - n)).reshape(-1, tiles, TILE).amax(-1)
    assert bool((qmax == E4M3_MAX).all())
    # dequantise: float(q) * scale, then the output dtype; relative error of e4m3 (3 mantissa bits) <= 2^-4,
    # absolute error near zero <= half the subnormal step 2^-9 times the scale; then the output dtype's rounding
    for out_dtype in DTYPES:
        y = fp8_tile_dequantize(q, s, out_dtype)
        assert y.dtype == out_dtype and y.shape == x.shape
        torch.testing.assert_close(y, (got * scale_el).to(out_dtype).reshape(shape), rtol=0, atol=0)
        err = (y.double() - x.double()).abs().reshape(-1, n)
        out_eps = torch.finfo(out_dtype).eps
        # (+ 2^-20: the fp32 roundings of x / scale and of q * scale; + the output dtype's subnormal spacing)
        bound = ((2.0 ** -4 + out_eps + 2.0 ** -20) * x.double().abs().reshape(-1, n) + 2.0 ** -10 * scale_el
                 + torch.finfo(out_dtype).tiny * out_eps)
        assert bool((err <= bound).all()), float((err - bound).max())


def test_round_to_nearest_even_by_hand():
    # 448 in the tile makes the scale exactly 1, so q = RNE_e4m3(x)
    vals = [448.0, 1.0625, 1.1875, 17.0, 2.0 ** -10, 3 * 2.0 ** -10, -1.0625, 500.0 / 1.2, 0.0]
    expect = [448.0, 1.0, 1.25, 16.0, 0.0, 2.0 ** -8, -1.0, 416.0, 0.0]
    q, s = fp8_tile_quantize(torch.tensor([vals]))
    assert s.tolist() == [[1.0]]
    assert q.float()[0].tolist() == expect


def test_partial_last_tile_uses_only_its_own_elements():
    x = torch.zeros(2, 2 * TILE + 5)
    x[:, :TILE] = 100.0         # first tile
    x[:, TILE:2 * TILE] = 0.25  # second tile
    x[0, -5:] = torch.tensor([1.0, -3.0, 0.5, 2.0, 0.0])  # the 5-element last tile
    q, s = fp8_tile_quantize(x)
    assert s.shape == (2, 3)
    torch.testing.assert_close(s[0], torch.tensor([100.0 / 448, 0.25 / 448, 3.0 / 448]), rtol=2 ** -24, atol=0)
    assert s[1, 2].item() == 1.0  # all-zero partial tile
    y = fp8_tile_dequantize(q, s, torch.float32)
    assert y[0, -4].item() == pytest.approx(-3.0, rel=2 ** -22)
    assert y[0, TILE].item() == pytest.approx(0.25, rel=2 ** -22)


def test_zeros_and_empty():
    q, s = fp8_tile_quantize(torch.zeros(3, 200, dtype=torch.bfloat16))
    assert bool((s == 1).all()) and bool((q.float() == 0).all())
    assert bool((fp8_tile_dequantize(q, s, torch.bfloat16) == 0).all())
    x = torch.randn(2, 130)
    x[:, 7] = 0.0
    q, s = fp8_tile_quantize(x)
    assert bool((fp8_tile_dequantize(q, s, torch.float32)[:, 7] == 0).all())  # zeros stay exactly zero
    q, s = fp8_tile_quantize(torch.empty(0, 256))
    assert q.shape == (0, 256) and s.shape == (0, 2)
    assert fp8_tile_dequantize(q, s, torch.float32).shape == (0, 256)


def test_tiny_tiles_stay_finite():
    x = torch.tensor([[1e-40, -3e-41, 0.0, 1e-45]])  # fp32 subnormals: amax / 448 would underflow
    q, s = fp8_tile_quantize(x)
    assert s.item() == FP32_TINY
    y = fp8_tile_dequantize(q, s, torch.float32)
    assert bool(torch.isfinite(y).all()) and y[0, 2].item() == 0.0
    assert (y - x).abs().max().item() <= 1e-40 * 2 ** -4 + FP32_TINY * 2 ** -10


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_input(bad):
    x = torch.randn(2, 300)
    x[1, 140] = bad
    with pytest.raises(ValueError, match=r"fp8_tile_quantize: x holds 1 non-finite value.*\(1, 140\)"):
        fp8_tile_quantize(x)
    # unchecked: the tile holding it dequantises to NaN (visible to grad-norm checks), the others are intact
    q, s = fp8_tile_quantize(x, check_finite=False)
    y = fp8_tile_dequantize(q, s, torch.float32)
    assert bool(torch.isnan(y[1, TILE:2 * TILE]).all())
    finite = torch.ones_like(x, dtype=torch.bool)
    finite[1, TILE:2 * TILE] = False
    assert bool(torch.isfinite(y[finite]).all())
    torch.testing.assert_close(y[0], x[0], rtol=2 ** -4, atol=0)


def test_argument_errors():
    with pytest.raises(TypeError, match="fp8_tile_quantize: x must have dtype"):
        fp8_tile_quantize(torch.zeros(4, dtype=torch.int32))
    with pytest.raises(TypeError, match="fp8_tile_quantize: x must be a torch.Tensor"):
        fp8_tile_quantize([1.0])
    with pytest.raises(ValueError, match="fp8_tile_quantize: x must have at least 1 dimensions"):
        fp8_tile_quantize(torch.tensor(1.0))
    q, s = fp8_tile_quantize(torch.randn(2, 130))
    with pytest.raises(ValueError, match=r"fp8_tile_dequantize: scales must have shape \(2, 2\)"):
        fp8_tile_dequantize(q, s[:, :1])
    with pytest.raises(TypeError, match="fp8_tile_dequantize: q must have dtype"):
        fp8_tile_dequantize(q.float(), s)
    with pytest.raises(TypeError, match="fp8_tile_dequantize: scales must have dtype"):
        fp8_tile_dequantize(q, s.double())
    with pytest.raises(TypeError, match="fp8_tile_dequantize: dtype must be one of"):
        fp8_tile_dequantize(q, s, torch.int8)


def test_non_contiguous_input():
    x = torch.randn(130, 6).t()  # [6, 130] with stride (1, 6)
    q, s = fp8_tile_quantize(x)
    q2, s2 = fp8_tile_quantize(x.contiguous())
    assert torch.equal(q.view(torch.uint8), q2.view(torch.uint8)) and torch.equal(s, s2)


@pytest.mark.skipif(not _extension.op_registered("fp8_tile_quantize"), reason="k2_megatron._C without fp8 ops")
def test_opcheck_registered_ops():
    x = torch.randn(3, 200, dtype=torch.bfloat16)
    # test_faketensor only: opcheck's schema test compares tensors with allclose, which float8 does not implement
    torch.library.opcheck(torch.ops.k2_megatron.fp8_tile_quantize, (x,), test_utils=("test_faketensor",))
    q, s = torch.ops.k2_megatron.fp8_tile_quantize(x)
    torch.library.opcheck(torch.ops.k2_megatron.fp8_tile_dequantize, (q, s, torch.bfloat16),
                          test_utils=("test_faketensor",))
    q_meta, s_meta = torch.ops.k2_megatron.fp8_tile_quantize(x.to("meta"))
    assert q_meta.shape == q.shape and q_meta.dtype == q.dtype and s_meta.shape == s.shape == (3, 2)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES + [(4096, 7168), (3, 0)])
def test_cuda_kernel_matches_reference_bitwise(shape, dtype):
    from k2_megatron.ops.reference import fp8 as reference

    if not _extension.kernels_available():
        pytest.skip("k2_megatron._C kernels not built for this GPU")
    x = (torch.randn(shape) * 3).to(dtype)
    if x.numel():
        x.view(-1)[::97] = 0.0
    q, s = fp8_tile_quantize(x.cuda())
    q_ref, s_ref = reference.fp8_tile_quantize(x)
    assert torch.equal(q.cpu().view(torch.uint8), q_ref.view(torch.uint8))
    assert torch.equal(s.cpu(), s_ref)
    for out_dtype in DTYPES:
        y = fp8_tile_dequantize(q, s, out_dtype)
        assert torch.equal(y.cpu(), reference.fp8_tile_dequantize(q_ref, s_ref, out_dtype))
    if x.numel():  # non-finite tiles: NaN scale and NaN output, as the reference
        x.view(-1)[5] = float("nan")
        q, s = fp8_tile_quantize(x.cuda(), check_finite=False)
        q_ref, s_ref = reference.fp8_tile_quantize(x)
        torch.testing.assert_close(s.cpu(), s_ref, rtol=0, atol=0, equal_nan=True)
