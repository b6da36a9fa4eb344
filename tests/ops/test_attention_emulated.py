"""The CUDA attention kernels (csrc/attention/kernels.cuh), run on this CPU by the warp emulator of
tests/emulation/ with the same host code (csrc/attention/host.cpp) as the CUDA op.

This checks, without a GPU, everything about the kernels except the hardware itself: the mma.sync /
ldmatrix fragment indexing, the wgmma kernels' descriptors and 128-byte swizzle, swizzling, masking (causal bottom-right, sequence ends, packed sequences),
the online softmax, the fused per-head max logits, the backward's recomputation, and the cp.async /
barrier discipline (the emulator applies a copy only when its thread waits for it). Speed, registers and
the real instructions need a GPU (tests/ops/test_attention.py's CUDA tests, benchmarks/attention.py).
The emulator is compiled with the host C++ compiler once per session (30-60 s) and needs the CUDA headers.
"""

import math
import os
from pathlib import Path

import pytest
import torch

from k2_megatron.ops.reference import attention as ref

from tests.helpers.attention import TOL, assert_close_to, check_within_2x_sdpa, make_qkv, planted_logits
from tests.helpers import REPO_ROOT

CUDA_INCLUDE = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "include"

pytestmark = [pytest.mark.slow,  # builds the emulated kernels (a C++ extension) first
              pytest.mark.skipif(not (CUDA_INCLUDE / "cuda_bf16.h").exists(),
                                 reason=f"CUDA headers not found at {CUDA_INCLUDE} (set CUDA_HOME)")]


@pytest.fixture(scope="module")
def kernels(tmp_path_factory):
    from torch.utils import cpp_extension

    # Built in a directory of this session, not torch's shared cache (~/.cache/torch_extensions): a build killed
    # there leaves its `lock` file behind, and every later load waits for it forever (it hung a CI run).
    return cpp_extension.load(
        name="k2_attention_emulated",
        build_directory=str(tmp_path_factory.mktemp("attention_emulated")),
        sources=[str(REPO_ROOT / "tests/emulation/attention_emulated.cpp"), str(REPO_ROOT / "csrc/attention/host.cpp")],
        extra_include_paths=[str(REPO_ROOT / "csrc"), str(REPO_ROOT / "tests"), str(CUDA_INCLUDE)],
        extra_cflags=["-O1", "-Wno-attributes"],
    )


class EmulatedAttention(torch.autograd.Function):
    """The emulated forward and backward kernels as one differentiable dense op."""

    @staticmethod
    def forward(ctx, kernels, q, k, v, causal, scale, wgmma=False):
        out, lse, max_logits = kernels.mla_attention_fwd(q, k, v, causal, scale, wgmma)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.kernels, ctx.causal, ctx.scale = kernels, causal, scale
        return out, lse, max_logits

    @staticmethod
    def backward(ctx, grad_out, grad_lse, grad_max_logits):
        q, k, v, out, lse = ctx.saved_tensors
        grads = ctx.kernels.mla_attention_bwd(grad_out, q, k, v, out, lse, ctx.causal, ctx.scale)
        return None, *grads, None, None, None


HEAD_DIMS = [(192, 128), (128, 128), (64, 64)]  # (q.k, v): one kernel instantiation each; K2's first


def covering(shapes: list[tuple], widest: tuple) -> list[tuple]:
    """(shape, causal, d_qk, d_v) cases: every head-dim pair with both masks on ``widest`` (several tiles each
    way, ragged ends), and every other shape with both masks on K2's head dims. The emulator costs about a second
    per tile, and the other shapes exercise what does not depend on the head dims (batch and head strides,
    single-token and partial tiles, s_q != s_k), so the full product would repeat them at three times the cost."""
    cases = [(widest, causal, *dims) for dims in HEAD_DIMS for causal in (True, False)]
    return cases + [(shape, causal, *HEAD_DIMS[0]) for shape in shapes if shape != widest for causal in (True, False)]


def _case_id(case) -> str:
    return "-".join(map(str, case)) if isinstance(case, tuple) else str(case)


@pytest.mark.parametrize("shape,causal,d_qk,d_v", covering([(1, 1, 1), (2, 17, 3), (1, 130, 2)], (1, 130, 2)),
                         ids=_case_id)
def test_matches_float64_within_2x_sdpa(kernels, shape, causal, d_qk, d_v):
    """The mma.sync forward and backward kernels."""
    b, s, h = shape
    q, k, v = (t.requires_grad_() for t in make_qkv(b, s, h, d_qk, d_v, torch.bfloat16, seed=s + h))
    grad_out = torch.randn(b, s, h, d_v, generator=torch.Generator().manual_seed(1)).bfloat16()
    out, _, max_logits = EmulatedAttention.apply(kernels, q, k, v, causal, 1.0 / math.sqrt(d_qk))
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    check_within_2x_sdpa(out, max_logits, grads, q, k, v, grad_out, causal, 1.0 / math.sqrt(d_qk))


SEQUENCE_LENGTHS = [(17, 80), (80, 17), (64, 0), (0, 64), (70, 70)]
# every (s_q, s_k) with both masks in bf16; fp16 (its own instantiation) with both masks and both orders of unequal
# lengths, where its rounding differs from bf16's
DTYPE_CASES = ([(lengths, causal, torch.bfloat16) for lengths in SEQUENCE_LENGTHS for causal in (True, False)] +
               [((70, 70), True, torch.float16), ((70, 70), False, torch.float16), ((17, 80), True, torch.float16),
                ((80, 17), False, torch.float16)])


@pytest.mark.parametrize("lengths,causal,dtype", DTYPE_CASES, ids=_case_id)
def test_matches_reference_everywhere(kernels, lengths, causal, dtype):
    """Against the float64 reference: out, lse, max_logits and gradients, with s_q != s_k (the causal mask
    aligned bottom-right, rows that see no key at all), empty sides, and fp16."""
    s_q, s_k = lengths
    q, k, v = make_qkv(2, s_q, 2, 192, 128, dtype, seed=s_q * 3 + s_k, s_k=s_k)
    grad_out = torch.randn(2, s_q, 2, 128, generator=torch.Generator().manual_seed(2)).to(dtype)
    scale = 192 ** -0.5
    out, lse, max_logits = kernels.mla_attention_fwd(q, k, v, causal, scale)
    out64, lse64, ml64 = ref.mla_attention_fwd(q.double(), k.double(), v.double(), causal, scale)
    assert_close_to(out, out64, 2 * TOL[dtype]["out"], "out")
    assert torch.equal(torch.isneginf(lse), torch.isneginf(lse64)), "rows without a visible key: lse = -inf"
    assert_close_to(lse.nan_to_num(neginf=0), lse64.nan_to_num(neginf=0), TOL[dtype]["lse"], "lse")
    assert torch.equal(torch.isneginf(max_logits), torch.isneginf(ml64.float()))
    assert_close_to(max_logits.nan_to_num(neginf=0), ml64.nan_to_num(neginf=0), TOL[dtype]["max_logits"],
                    "max_logits")
    grads = kernels.mla_attention_bwd(grad_out, q, k, v, out, lse, causal, scale)
    grads64 = ref.mla_attention_bwd(grad_out.double(), q.double(), k.double(), v.double(), out.double(),
                                    lse.double(), causal, scale)
    for name, got, want in zip(("dq", "dk", "dv"), grads, grads64):
        assert torch.isfinite(got).all(), name
        assert_close_to(got, want, 2 * TOL[dtype]["grad"], name, floor=1.0)


WGMMA_SHAPES = [(1, 1, 1, 1), (2, 17, 17, 3), (1, 130, 130, 2), (1, 40, 100, 2), (1, 100, 40, 1)]  # b, s_q, s_k, h


@pytest.mark.parametrize("d_qk,d_v", HEAD_DIMS)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("b,s_q,s_k,h", WGMMA_SHAPES, ids=str)
def test_wgmma_forward(kernels, b, s_q, s_k, h, causal, d_qk, d_v):
    """The sm_90a forward (wgmma from 128-byte-swizzled shared memory through matrix descriptors, P from
    registers) against float64, and equal to the mma.sync forward bit for bit: the emulator sums both in the
    same order, so any difference is a layout or descriptor mistake."""
    q, k, v = make_qkv(b, s_q, h, d_qk, d_v, torch.bfloat16, seed=s_q + 5 * s_k + h, s_k=s_k)
    scale = 1.0 / math.sqrt(d_qk)
    out, lse, max_logits = kernels.mla_attention_fwd(q, k, v, causal, scale, True)
    for got, want in zip((out, lse, max_logits), kernels.mla_attention_fwd(q, k, v, causal, scale, False)):
        assert torch.equal(got, want)
    out64, lse64, ml64 = ref.mla_attention_fwd(q.double(), k.double(), v.double(), causal, scale)
    assert_close_to(out, out64, 2 * TOL[torch.bfloat16]["out"], "out")
    assert torch.equal(torch.isneginf(lse), torch.isneginf(lse64))
    assert_close_to(lse.nan_to_num(neginf=0), lse64.nan_to_num(neginf=0), TOL[torch.bfloat16]["lse"], "lse")
    assert_close_to(max_logits.nan_to_num(neginf=0), ml64.nan_to_num(neginf=0), TOL[torch.bfloat16]["max_logits"],
                    "max_logits")


@pytest.mark.parametrize("shape,causal,d_qk,d_v", covering(WGMMA_SHAPES, (1, 130, 130, 2)), ids=_case_id)
def test_wgmma_backward(kernels, shape, causal, d_qk, d_v):
    """The sm_90a backward (dK/dV and dQ kernels on wgmma) equals the mma.sync backward bit for bit in the
    emulator, and matches the float64 reference."""
    b, s_q, s_k, h = shape
    q, k, v = make_qkv(b, s_q, h, d_qk, d_v, torch.bfloat16, seed=s_q + 7 * s_k + h, s_k=s_k)
    grad_out = torch.randn(b, s_q, h, d_v, generator=torch.Generator().manual_seed(3)).bfloat16()
    scale = 1.0 / math.sqrt(d_qk)
    out, lse, _ = kernels.mla_attention_fwd(q, k, v, causal, scale)
    grads = kernels.mla_attention_bwd(grad_out, q, k, v, out, lse, causal, scale, True)
    for got, want in zip(grads, kernels.mla_attention_bwd(grad_out, q, k, v, out, lse, causal, scale, False)):
        assert torch.equal(got, want)
    grads64 = ref.mla_attention_bwd(grad_out.double(), q.double(), k.double(), v.double(), out.double(),
                                    lse.double(), causal, scale)
    for name, got, want in zip(("dq", "dk", "dv"), grads, grads64):
        assert_close_to(got, want, 2 * TOL[torch.bfloat16]["grad"], name, floor=1.0)


@pytest.mark.parametrize("wgmma", [False, True], ids=["mma_sync", "wgmma"])
@pytest.mark.parametrize("where", ["diagonal", "last_row", "last_row_diagonal"])
def test_max_logits_exact(kernels, where, wgmma):
    """Integer inputs make every logit exact in float32: the fused max equals the float64 max exactly, with
    a larger planted logit just above the diagonal that the causal mask must exclude."""
    s, h, b, d, head = 150, 3, 2, 64, 1
    row, col = {"diagonal": (100, 100), "last_row": (s - 1, 7), "last_row_diagonal": (s - 1, s - 1)}[where]
    q, k, v = planted_logits(s, h, b, d, head, row, col, masked_row=row - 1, masked_col=row, dtype=torch.bfloat16)
    _, _, expected = ref.mla_attention_fwd(q.double(), k.double(), v.double(), True, 0.125)
    _, _, max_logits = kernels.mla_attention_fwd(q, k, v, True, 0.125, wgmma)
    assert torch.equal(max_logits, expected.float())


def test_varlen_matches_reference(kernels):
    """Packed sequences (an empty one, a single token, ones crossing block edges, k longer than q): out,
    lse, the max logit over all sequences and the gradients, against the reference per sequence."""
    lens_q, lens_k = [5, 0, 130, 1, 77], [5, 3, 130, 9, 64]
    cu_q = torch.tensor([0] + torch.tensor(lens_q).cumsum(0).tolist(), dtype=torch.int32)
    cu_k = torch.tensor([0] + torch.tensor(lens_k).cumsum(0).tolist(), dtype=torch.int32)
    g = torch.Generator().manual_seed(5)
    q = torch.randn(sum(lens_q), 3, 192, generator=g).bfloat16()
    k = torch.randn(sum(lens_k), 3, 192, generator=g).bfloat16()
    v = torch.randn(sum(lens_k), 3, 128, generator=g).bfloat16()
    grad_out = torch.randn(sum(lens_q), 3, 128, generator=g).bfloat16()
    for causal in (True, False):
        args = (cu_q, cu_k, max(lens_q), max(lens_k), causal, 192 ** -0.5)
        out, lse, max_logits = kernels.mla_attention_varlen_fwd(q, k, v, *args)
        for got, want in zip(kernels.mla_attention_varlen_fwd(q, k, v, *args, True), (out, lse, max_logits)):
            assert torch.equal(got, want), "wgmma forward"
        out64, lse64, ml64 = ref.mla_attention_varlen_fwd(q.double(), k.double(), v.double(), *args)
        assert_close_to(out, out64, 2 * TOL[torch.bfloat16]["out"], "varlen out")
        assert_close_to(lse.nan_to_num(neginf=0), lse64.nan_to_num(neginf=0), TOL[torch.bfloat16]["lse"], "lse")
        assert_close_to(max_logits, ml64, TOL[torch.bfloat16]["max_logits"], "max_logits")
        grads = kernels.mla_attention_varlen_bwd(grad_out, q, k, v, out, lse, *args)
        for got, want in zip(kernels.mla_attention_varlen_bwd(grad_out, q, k, v, out, lse, *args, True), grads):
            assert torch.equal(got, want), "wgmma backward"
        grads64 = ref.mla_attention_varlen_bwd(grad_out.double(), q.double(), k.double(), v.double(), out.double(),
                                               lse.double(), *args)
        for name, got, want in zip(("dq", "dk", "dv"), grads, grads64):
            assert_close_to(got, want, 2 * TOL[torch.bfloat16]["grad"], f"varlen {name}", floor=1.0)


def test_strided_and_misaligned_inputs(kernels):
    """megatron-core's [s, b, h, d] transposed to [b, s, h, d] goes in without a copy; a view the 16-byte
    loads cannot read (odd offset) is copied. Both give the contiguous result bit for bit."""
    x = torch.randn(70, 2, 4, 192 + 192 + 128, generator=torch.Generator().manual_seed(6)).bfloat16()
    q, k, v = x.transpose(0, 1).split([192, 192, 128], dim=-1)
    expected = kernels.mla_attention_fwd(q.contiguous(), k.contiguous(), v.contiguous(), True, 0.1)
    for got, want in zip(kernels.mla_attention_fwd(q, k, v, True, 0.1), expected):
        assert torch.equal(got, want)
    odd = torch.randn(q.numel() + 1).bfloat16()[1:].view(q.shape)
    odd.copy_(q)
    for got, want in zip(kernels.mla_attention_fwd(odd, k, v, True, 0.1), expected):
        assert torch.equal(got, want)


@pytest.mark.parametrize("case,match", [
    ("float32", "q must be bfloat16 or float16"),
    ("head_dims", r"no CUDA kernel for head dims \(q.k 96, v 96\); supported: \(192, 128\)"),
    ("heads", "k must have q's number of heads 2"),
    ("batch", "q, k and v must have the same batch size"),
    ("scale", "softmax_scale must be positive and finite"),
], ids=lambda x: x if isinstance(x, str) and " " not in x else "")
def test_bad_input(kernels, case, match):
    """The host checks the CUDA op runs (csrc/attention/host.cpp) name the argument."""
    q, k, v = make_qkv(2, 8, 2, 192, 128, torch.bfloat16)
    scale = 0.1
    if case == "float32":
        q, k, v = q.float(), k.float(), v.float()
    elif case == "head_dims":
        q, k, v = make_qkv(2, 8, 2, 96, 96, torch.bfloat16)
    elif case == "heads":
        k = k[:, :, :1]
    elif case == "batch":
        v = v[:1]
    elif case == "scale":
        scale = float("inf")
    with pytest.raises(RuntimeError, match=match):
        kernels.mla_attention_fwd(q, k, v, True, scale)


def test_backward_rejects_mismatched_lse(kernels):
    q, k, v = make_qkv(2, 8, 2, 192, 128, torch.bfloat16)
    out, lse, _ = kernels.mla_attention_fwd(q, k, v, True, 0.1)
    with pytest.raises(RuntimeError, match=r"lse must be float32 \[2, 2, 8\]"):
        kernels.mla_attention_bwd(out, q, k, v, out, lse[:, :, :4], True, 0.1)
    with pytest.raises(RuntimeError, match="cu_seqlens_q must be int32"):
        cu = torch.tensor([0, 8], dtype=torch.int64)
        kernels.mla_attention_varlen_fwd(q[0], k[0], v[0], cu, cu.int(), 8, 8, True, 0.1)
