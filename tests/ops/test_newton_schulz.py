"""k2_megatron.ops.newton_schulz against an independent float64 iteration and the SVD polar factor."""

import pytest
import torch

import k2_megatron
from k2_megatron import _extension
from k2_megatron.ops import DEFAULT_COEFFICIENTS, newton_schulz
from k2_megatron.ops.newton_schulz import cuda_workspace_bytes, flatten_coefficients
from k2_megatron.ops.reference import newton_schulz as reference

from tests.helpers.gpu import launched_kernels, reference_forbidden, require_cuda_kernel

# Worst per-matrix relative Frobenius error against the float64 iteration. bf16 is loose by nature: the
# quintic does not converge to a fixed point (singular values keep moving inside [0.68, 1.21]), so bf16
# rounding in each of the 15 products per call shows up at a few percent; a wrong iteration is O(1) off.
REL_TOL = {torch.float32: 2e-5, torch.bfloat16: 8e-2}


def ns_float64(x: torch.Tensor, steps: int = 5, coefficients=DEFAULT_COEFFICIENTS, eps: float = 1e-7) -> torch.Tensor:
    """The K2 report's iteration, written out independently in float64."""
    X = x.to(torch.float64)
    transposed = X.shape[-2] > X.shape[-1]
    if transposed:
        X = X.transpose(-2, -1)
    X = X / (torch.sqrt((X * X).sum(dim=(-2, -1), keepdim=True)) + eps)
    a, b, c = coefficients
    for _ in range(steps):
        A = X @ X.transpose(-2, -1)
        B = b * A + c * (A @ A)
        X = a * X + B @ X
    return X.transpose(-2, -1) if transposed else X


def max_rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    y, ref = y.to(torch.float64), ref.to(torch.float64)
    num = torch.linalg.matrix_norm(y - ref)
    den = torch.linalg.matrix_norm(ref).clamp_min(1e-30)
    return float((num / den).max())


SHAPES = [(1, 1), (1, 7), (8, 8), (17, 33), (33, 17), (64, 48), (130, 70), (3, 5, 9), (2, 3, 24, 40)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_float64_iteration(shape, dtype):
    torch.manual_seed(0)
    x = torch.randn(shape)
    y = newton_schulz(x.to(dtype))
    assert y.shape == x.shape and y.dtype == dtype and y.is_contiguous()
    assert max_rel_err(y, ns_float64(x)) < REL_TOL[dtype]


def _matrix_with_singular_values(m: int, n: int, s: torch.Tensor, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, len(s), dtype=torch.float64, generator=g))
    v, _ = torch.linalg.qr(torch.randn(n, len(s), dtype=torch.float64, generator=g))
    return u @ torch.diag(s) @ v.T, u, v


@pytest.mark.parametrize("dtype,lo,hi,off", [(torch.float32, 0.68, 1.21, 1e-4), (torch.bfloat16, 0.6, 1.3, 0.15)])
@pytest.mark.parametrize("m,n", [(48, 80), (80, 48)])
def test_polar_factor(m, n, dtype, lo, hi, off):
    """O = NS(M) shares M's singular vectors (U^T O V is diagonal) and maps every normalised singular value
    >= 3e-3 into about [0.68, 1.21] (exact arithmetic; bf16 gets slack)."""
    s = torch.logspace(0, -2.6, min(m, n), dtype=torch.float64)
    x, u, v = _matrix_with_singular_values(m, n, s)
    normalised = s / s.norm()
    assert (normalised < 3e-3).any() and (normalised >= 3e-3).sum() > 10  # the range is exercised
    d = u.T @ newton_schulz(x.to(dtype)).to(torch.float64) @ v
    diag = d.diagonal()
    kept = diag[normalised >= 3e-3]
    assert lo <= float(kept.min()) and float(kept.max()) <= hi
    assert float((d - torch.diag(diag)).abs().max()) < off
    # The float64 iteration itself (the arithmetic the op approximates) meets the exact bounds.
    d64 = u.T @ ns_float64(x) @ v
    assert 0.68 <= float(d64.diagonal()[normalised >= 3e-3].min()) and float(d64.diagonal().max()) <= 1.21


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batched_equals_per_slice(dtype):
    torch.manual_seed(1)
    x = torch.randn(2, 3, 20, 36, dtype=dtype)
    y = newton_schulz(x)
    for i in range(2):
        for j in range(3):
            torch.testing.assert_close(y[i, j], newton_schulz(x[i, j]), rtol=0, atol=0)


def test_zero_matrix_gives_zeros():
    x = torch.randn(3, 16, 24)
    x[1] = 0
    for dtype in (torch.float32, torch.bfloat16):
        y = newton_schulz(x.to(dtype))
        assert torch.isfinite(y).all()
        assert (y[1] == 0).all()
        torch.testing.assert_close(y[0], newton_schulz(x[0].to(dtype)), rtol=0, atol=0)


def test_tall_is_transpose_of_wide():
    torch.manual_seed(2)
    x = torch.randn(4, 50, 20)
    torch.testing.assert_close(newton_schulz(x), newton_schulz(x.mT.contiguous()).mT, rtol=1e-5, atol=2e-6)


def test_steps_and_per_step_coefficients():
    torch.manual_seed(3)
    x = torch.randn(12, 20, dtype=torch.float64)
    # Zero steps: just the Frobenius normalisation.
    y0 = newton_schulz(x.float(), steps=0)
    torch.testing.assert_close(y0.double(), x / x.norm(), rtol=1e-6, atol=1e-7)
    # A triple per step (here three distinct sets) is applied in order.
    coeffs = [(3.4445, -4.7750, 2.0315), (2.0, -1.5, 0.5), (1.875, -1.25, 0.375)]
    want = ns_float64(x, steps=1, coefficients=coeffs[0])
    for c in coeffs[1:]:
        want = _one_step(want, c)
    torch.testing.assert_close(newton_schulz(x.float(), steps=3, coefficients=coeffs).double(), want,
                               rtol=1e-5, atol=1e-6)


def _one_step(X, coefficients):
    a, b, c = coefficients
    A = X @ X.T
    return a * X + (b * A + c * (A @ A)) @ X


def test_empty_inputs():
    assert newton_schulz(torch.randn(0, 4, 5)).shape == (0, 4, 5)
    assert newton_schulz(torch.randn(3, 0, 5)).shape == (3, 0, 5)


@pytest.mark.parametrize("bad,exc,match", [
    (lambda: newton_schulz(torch.randn(5)), ValueError, "x must have at least 2 dimensions"),
    (lambda: newton_schulz(torch.randint(0, 3, (4, 4))), TypeError, "x must have dtype"),
    (lambda: newton_schulz(torch.randn(4, 4, dtype=torch.float64)), TypeError, "float64"),
    (lambda: newton_schulz([[1.0, 2.0]]), TypeError, "x must be a torch.Tensor"),
    (lambda: newton_schulz(torch.randn(4, 4), steps=-1), ValueError, "steps must be a non-negative int"),
    (lambda: newton_schulz(torch.randn(4, 4), steps=2, coefficients=[(1, 2, 3)] * 3), ValueError, "triples"),
    (lambda: newton_schulz(torch.randn(4, 4), coefficients=(1.0, 2.0)), ValueError, "coefficients"),
    (lambda: newton_schulz(torch.randn(4, 4), coefficients=(1.0, float("nan"), 2.0)), ValueError, "finite"),
    (lambda: newton_schulz(torch.randn(4, 4), eps=0.0), ValueError, "eps must be a positive"),
])
def test_bad_input(bad, exc, match):
    with pytest.raises(exc, match=match):
        bad()


def test_flatten_coefficients():
    assert flatten_coefficients(2, (1, 2, 3)) == [1.0, 2.0, 3.0, 1.0, 2.0, 3.0]
    assert flatten_coefficients(0, (1, 2, 3)) == []


def test_cuda_workspace_bytes_follow_the_kernels_allocations():
    """The CUDA kernel's working memory besides its input (what the rehearsal counts), from the allocations of
    csrc/newton_schulz/newton_schulz.cpp: bf16 wide [2, 256, 1024]: fp32 copy 4N + max(quotient 4N + bf16 2N,
    X + next X 4N + A, B 2 x 2 x 2 x 256^2 = N); tall: the transposed copy adds 2N; fp32 [3, 64, 64]: no copy,
    max(quotient 4N, X + next X 8N + A, B 2 x 4 x 3 x 64^2 = 8N)."""
    n = 2 * 256 * 1024
    assert cuda_workspace_bytes(torch.empty(2, 256, 1024, dtype=torch.bfloat16, device="meta")) == 10 * n
    assert cuda_workspace_bytes(torch.empty(2, 1024, 256, dtype=torch.bfloat16, device="meta")) == 12 * n
    assert cuda_workspace_bytes(torch.empty(3, 64, 64, device="meta")) == 16 * 3 * 64 * 64


def test_kernels_status_says_which_path():
    status = k2_megatron.kernels_status()
    if not torch.cuda.is_available():
        assert not k2_megatron.kernels_available()
        assert status.startswith("reference (pure PyTorch) for every op: ")
    else:
        assert status.startswith("CUDA kernels on ") == k2_megatron.kernels_available()


@pytest.mark.skipif(not _extension.extension_loaded(), reason="k2_megatron._C not built")
class TestRegisteredOp:
    def test_schema_and_cuda_kernel_registered(self):
        assert torch._C._dispatch_has_kernel_for_dispatch_key("k2_megatron::newton_schulz", "CUDA")
        assert torch._C._dispatch_has_kernel_for_dispatch_key("k2_megatron::newton_schulz", "CPU")
        archs = _extension.compiled_archs()
        assert archs and all(a.rstrip("a").isdigit() for a in archs)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    def test_opcheck(self, dtype):
        x = torch.randn(2, 6, 10, dtype=dtype)
        torch.library.opcheck(torch.ops.k2_megatron.newton_schulz.default,
                              (x, flatten_coefficients(5, DEFAULT_COEFFICIENTS), 1e-7))

    def test_cpu_kernel_is_the_reference(self):
        x = torch.randn(3, 9, 14)
        flat = flatten_coefficients(5, DEFAULT_COEFFICIENTS)
        torch.testing.assert_close(torch.ops.k2_megatron.newton_schulz(x, flat, 1e-7),
                                   reference.newton_schulz(x, flat, 1e-7), rtol=0, atol=0)


# ---- CUDA kernel ------------------------------------------------------------------------------------------


def kernels_only():
    """No call in the block may fall back to the reference (tests/helpers/gpu.py)."""
    return reference_forbidden("newton_schulz")


def test_kernels_only_catches_a_fallback(monkeypatch):
    """The guard of the GPU tests fails a call that falls back to the reference (here forced on CPU)."""
    monkeypatch.setattr(_extension, "dispatch_to_op", lambda name, t: False)
    with kernels_only(), pytest.raises(AssertionError, match="fell back to its reference"):
        newton_schulz(torch.randn(2, 4, 6))


def ns_bf16_baseline(x: torch.Tensor, coefficients=DEFAULT_COEFFICIENTS, steps: int = 5, eps: float = 1e-7):
    """The bf16 kernel's arithmetic in plain PyTorch, its same-precision baseline: bf16 operands, every product
    accumulated in fp32 and each of A = X X^T, B = b A + c A A (one fused fp32 epilogue) and X = a X + B X (one
    fp32 GEMM epilogue) rounded once to bf16; the Frobenius normalisation in fp32 (csrc/newton_schulz/)."""
    X = x.to(torch.float32)
    transposed = X.shape[-2] > X.shape[-1]
    if transposed:
        X = X.mT
    X = (X / (torch.linalg.matrix_norm(X, keepdim=True) + eps)).bfloat16()
    a, b, c = coefficients
    for _ in range(steps):
        A = (X.float() @ X.float().mT).bfloat16()
        B = (c * (A.float() @ A.float()) + b * A.float()).bfloat16()
        X = (a * X.float() + B.float() @ X.float()).bfloat16()
    return X.mT if transposed else X


def bf16_error_bound(x: torch.Tensor) -> float:
    """How far (worst per-matrix relative error against the float64 iteration) a bf16 Newton-Schulz of ``x`` may be:
    2x its same-precision baseline's error plus 2x the error of rounding the exact result to bf16 (as
    FlashAttention's tests bound a kernel). The PyTorch reference op rounds more often (8 roundings per step
    against 3) and is ~2.3x less accurate than the baseline, so it is not the yardstick."""
    want = ns_float64(x)
    return 2 * max_rel_err(ns_bf16_baseline(x), want) + 2 * max_rel_err(want.bfloat16(), want)


@pytest.mark.parametrize("shape", [(7, 15, 15), (3, 63, 129), (2, 65, 200), (2, 300, 100)], ids=str)
def test_bf16_error_bound_rejects_a_one_percent_coefficient_error(shape):
    """The bound of the GPU test below, checked on the CPU: the baseline's arithmetic with any one coefficient 1%
    off is outside it (measured 3-11x the baseline's error), the float32 iteration rounded to bf16 inside."""
    torch.manual_seed(4)
    x = torch.randn(shape)
    want, bound = ns_float64(x), bf16_error_bound(x)
    assert max_rel_err(newton_schulz(x).bfloat16(), want) <= bound
    for i in range(3):
        for factor in (0.99, 1.01):
            coefficients = list(DEFAULT_COEFFICIENTS)
            coefficients[i] *= factor
            err = max_rel_err(ns_bf16_baseline(x, coefficients), want)
            assert err > bound, (i, factor, err, bound)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(1, 1, 1), (7, 15, 15), (3, 63, 129), (2, 64, 64), (2, 65, 200), (5, 129, 131),
                                   (4, 200, 333), (2, 300, 100), (512, 16, 24), (1, 512, 1024)], ids=str)
def test_cuda_bf16_kernel_vs_float64(shape):
    """The kernel's bf16 error is within bf16_error_bound: 2x its same-precision PyTorch baseline's."""
    torch.manual_seed(4)
    x = torch.randn(shape, device="cuda")
    require_cuda_kernel("newton_schulz", x)
    with kernels_only():
        y = newton_schulz(x.bfloat16())
    err_kernel = max_rel_err(y, ns_float64(x))
    bound = bf16_error_bound(x)
    assert err_kernel <= bound, (err_kernel, bound)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(3, 17, 33), (2, 130, 70), (1, 256, 512)], ids=str)
def test_cuda_fp32_vs_float64(shape):
    torch.manual_seed(5)
    x = torch.randn(shape, device="cuda")
    require_cuda_kernel("newton_schulz", x)
    with kernels_only():
        y = newton_schulz(x)
    assert max_rel_err(y, ns_float64(x)) < REL_TOL[torch.float32]


@pytest.mark.gpu
@pytest.mark.parametrize("shape,dtype", [((8, 1024, 4096), torch.bfloat16), ((8, 4096, 1024), torch.bfloat16),
                                         ((4, 1024, 1024), torch.float32)], ids=str)
def test_cuda_workspace_bytes_are_what_the_kernel_allocates(shape, dtype):
    """cuda_workspace_bytes (counted by the rehearsal, planned by k2_megatron.config.memory) against the caching
    allocator's peak during one call, after a warm-up call (cuBLAS's workspace)."""
    x = torch.randn(shape, device="cuda", dtype=dtype)
    require_cuda_kernel("newton_schulz", x)
    with kernels_only():
        newton_schulz(x)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        y = newton_schulz(x)
        torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del y
    expected = cuda_workspace_bytes(x)
    assert abs(peak - expected) <= 0.02 * expected + 2**20, (peak, expected)


@pytest.mark.gpu
def test_cuda_batched_zero_and_strided():
    torch.manual_seed(6)
    x = torch.randn(6, 40, 72, device="cuda", dtype=torch.bfloat16)
    x[2] = 0
    require_cuda_kernel("newton_schulz", x)
    with kernels_only():
        y = newton_schulz(x)
        singles = [newton_schulz(x[i]) for i in (0, 5)]
        yt = newton_schulz(x.transpose(-2, -1))  # non-contiguous, tall
    assert torch.isfinite(y).all() and (y[2] == 0).all()
    for i, single in zip((0, 5), singles):
        torch.testing.assert_close(y[i], single, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(yt, y.transpose(-2, -1), rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
def test_cuda_polar_factor_bf16():
    s = torch.logspace(0, -2.6, 96, dtype=torch.float64)
    x, u, v = _matrix_with_singular_values(96, 160, s)
    xc = x.cuda().bfloat16()
    require_cuda_kernel("newton_schulz", xc)
    with kernels_only():
        y = newton_schulz(xc)
    d = u.T @ y.double().cpu() @ v
    kept = d.diagonal()[s / s.norm() >= 3e-3]
    assert 0.6 <= float(kept.min()) and float(kept.max()) <= 1.3


@pytest.mark.gpu
def test_cuda_bf16_launches_the_syrk_kernel():
    """The bf16 iteration runs the SYRK kernel (two per step; the profiler's view), not the reference."""
    x = torch.randn(4, 96, 160, device="cuda", dtype=torch.bfloat16)
    require_cuda_kernel("newton_schulz", x)
    with kernels_only():
        names = launched_kernels(lambda: newton_schulz(x))
    assert sum("syrk_bf16_kernel" in n for n in names) >= 2 * 5, names
