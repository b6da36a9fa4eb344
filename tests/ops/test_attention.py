"""k2_megatron.ops.mla_attention(_varlen) against float64 naive attention written out here.

Checked: out, lse and max_logits (forward), dq, dk, dv (against autograd through the float64 naive
attention), max_logits exactly equal to the max of the masked, scaled logits, varlen = per-sequence dense
calls, strided inputs, the registered operators (opcheck, torch.compile), and errors on bad input.
The CUDA tests compare the kernel with the reference and skip without a GPU.
"""

import math

import pytest
import torch

from k2_megatron import _extension
from k2_megatron.ops import attention as attention_op
from k2_megatron.ops import mla_attention, mla_attention_varlen
from k2_megatron.ops.reference import attention as ref

from tests.helpers.attention import (TOL, assert_close_to, check_within_2x_sdpa, make_qkv, naive_attention,
                                     naive_grads, planted_logits)

requires_extension = pytest.mark.skipif(not _extension.extension_loaded(), reason="k2_megatron._C is not built")

HEAD_DIMS = [(192, 128), (64, 64)]  # K2's (d_qk, d_v) and an equal pair

# ------------------------------------------------------------------------------------------------- forward

FWD_GRID = [(b, s, h) for s in (1, 17, 128) for b in (1, 3) for h in (1, 3, 16)]


@pytest.mark.parametrize("d_qk,d_v", HEAD_DIMS)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("b,s,h", FWD_GRID, ids=lambda x: str(x))
def test_forward_float32(b, s, h, causal, d_qk, d_v):
    _check_forward(b, s, h, causal, d_qk, d_v, torch.float32)


MIXED_SIZES = [(b, s, h, d_qk, d_v) for b, s, h in [(3, 17, 3), (1, 128, 16)] for d_qk, d_v in HEAD_DIMS + [(128, 128)]]
# 1000-token sequences take seconds each on a CPU: slow (the fast loop keeps the shorter ones).
MIXED_SIZES += [pytest.param(b, s, h, d_qk, d_v, marks=pytest.mark.slow)
                for b, s, h in [(3, 1000, 1), (1, 1000, 3)] for d_qk, d_v in HEAD_DIMS]


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("b,s,h,d_qk,d_v", MIXED_SIZES, ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_forward_mixed_sizes(dtype, b, s, h, d_qk, d_v, causal):
    _check_forward(b, s, h, causal, d_qk, d_v, dtype)


@pytest.mark.slow
def test_forward_4096_causal():
    _check_forward(1, 4096, 1, True, 192, 128, torch.float32)


def test_forward_float16():
    _check_forward(2, 65, 3, True, 192, 128, torch.float16)


def _check_forward(b, s, h, causal, d_qk, d_v, dtype):
    q, k, v = make_qkv(b, s, h, d_qk, d_v, dtype, seed=s * 7 + h)
    scale = 1.0 / math.sqrt(d_qk)
    out, max_logits = mla_attention(q, k, v, causal=causal)
    _, lse, ml_ref = ref.mla_attention_fwd(q, k, v, causal, scale)
    out64, lse64, ml64 = naive_attention(q, k, v, causal, scale)
    assert out.shape == (b, s, h, d_v) and out.dtype == dtype and out.is_contiguous()
    assert max_logits.shape == (h,) and max_logits.dtype == torch.float32
    assert lse.shape == (b, h, s) and lse.dtype == torch.float32
    tol = TOL[dtype]
    assert_close_to(out, out64, tol["out"], "out")
    assert_close_to(lse, lse64, tol["lse"], "lse")
    assert_close_to(max_logits, ml64, tol["max_logits"], "max_logits")
    assert torch.equal(max_logits, ml_ref)


@pytest.mark.parametrize("chunk_size", [1, 5, 64, 1000])
@pytest.mark.parametrize("causal", [True, False])
def test_reference_chunking(chunk_size, causal):
    """Chunk boundaries (odd chunk sizes, a ragged last chunk) change nothing beyond rounding."""
    q, k, v = make_qkv(2, 67, 3, 40, 24, torch.float64, seed=3)
    g = torch.randn(2, 67, 3, 24, dtype=torch.float64)
    out, lse, ml = ref.mla_attention_fwd(q, k, v, causal, 0.3, chunk_size=chunk_size)
    out64, lse64, ml64 = naive_attention(q, k, v, causal, 0.3)
    torch.testing.assert_close(out, out64, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, lse64, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ml, ml64.float(), rtol=0, atol=0)
    grads = ref.mla_attention_bwd(g, q, k, v, out, lse, causal, 0.3, chunk_size=chunk_size)
    for name, got, want in zip("qkv", grads, naive_grads(q, k, v, causal, 0.3, g)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10, msg=lambda m: f"d{name}: {m}")


# ------------------------------------------------------------------------------------------------ backward

BWD_GRID = [(b, s, h) for s in (1, 17, 128) for b in (1, 3) for h in (1, 3)]


@pytest.mark.parametrize("d_qk,d_v", HEAD_DIMS)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("b,s,h", BWD_GRID, ids=str)
def test_backward_float32(b, s, h, causal, d_qk, d_v):
    _check_backward(b, s, h, causal, d_qk, d_v, torch.float32)


@pytest.mark.parametrize("b,s,h,causal,d_qk,d_v", [
    (3, 17, 3, True, 192, 128), (1, 128, 16, False, 64, 64), (2, 100, 3, True, 128, 128),
    (1, 1000, 2, True, 192, 128)], ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_backward_mixed_sizes(dtype, b, s, h, causal, d_qk, d_v):
    _check_backward(b, s, h, causal, d_qk, d_v, dtype)


def test_backward_float16():
    _check_backward(2, 65, 3, True, 192, 128, torch.float16)


def _check_backward(b, s, h, causal, d_qk, d_v, dtype):
    q, k, v = make_qkv(b, s, h, d_qk, d_v, dtype, seed=s + 11 * h, requires_grad=True)
    grad_out = torch.randn(b, s, h, d_v, generator=torch.Generator().manual_seed(5)).to(dtype)
    out, max_logits = mla_attention(q, k, v, causal=causal)
    assert not max_logits.requires_grad
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    expected = naive_grads(q, k, v, causal, 1.0 / math.sqrt(d_qk), grad_out)
    for name, got, want, x in zip("qkv", grads, expected, (q, k, v)):
        assert got.shape == x.shape and got.dtype == dtype
        assert_close_to(got, want, TOL[dtype]["grad"], f"d{name}", floor=1.0)


@pytest.mark.slow
@pytest.mark.parametrize("causal", [True, False])
def test_gradcheck_float64(causal):
    q, k, v = make_qkv(2, 7, 2, 6, 5, torch.float64, seed=1, requires_grad=True)
    assert torch.autograd.gradcheck(lambda q, k, v: mla_attention(q, k, v, causal=causal, softmax_scale=0.7)[0],
                                    (q, k, v))
    cu = torch.tensor([0, 3, 3, 7], dtype=torch.int32)
    q, k, v = (t[0].detach().requires_grad_() for t in (q, k, v))
    assert torch.autograd.gradcheck(lambda q, k, v: mla_attention_varlen(q, k, v, cu, cu, 4, 4, causal=causal)[0],
                                    (q, k, v))


def test_no_quadratic_tensor_saved():
    """The backward keeps O(s) tensors (q, k, v, out, lse), nothing of size s x s."""
    s = 512
    q, k, v = make_qkv(1, s, 1, 16, 16, torch.float32, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out, _ = mla_attention(q, k, v)
    assert saved and max(saved) < s * s // 8, saved


# ----------------------------------------------------------------------------------------------- max_logits

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("where", ["diagonal", "last_row", "last_row_diagonal"])
def test_max_logits_exact(where, dtype):
    s, h, b, d, head = 300, 3, 2, 64, 1
    row, col = {"diagonal": (150, 150), "last_row": (s - 1, 7), "last_row_diagonal": (s - 1, s - 1)}[where]
    q, k, v = planted_logits(s, h, b, d, head, row, col, masked_row=row - 1, masked_col=row, dtype=dtype)
    scale = 0.125  # a power of two keeps the scaled logits exact
    _, _, expected = naive_attention(q, k, v, True, scale)
    background = (d - 2) * scale
    assert expected[head] >= (256 - (d - 2)) * scale > background  # the planted logit is the max of its head
    assert expected[head] < 1024 * scale - background  # and the larger masked one is excluded
    for other in set(range(h)) - {head}:
        assert expected[other] <= background
    _, max_logits = mla_attention(q, k, v, causal=True, softmax_scale=scale)
    assert torch.equal(max_logits, expected.to(torch.float32)), (max_logits, expected)
    # Without the mask the larger logit counts.
    _, unmasked = mla_attention(q, k, v, causal=False, softmax_scale=scale)
    _, _, expected_unmasked = naive_attention(q, k, v, False, scale)
    assert expected_unmasked[head] >= (1024 - (d - 2)) * scale
    assert torch.equal(unmasked, expected_unmasked.to(torch.float32))


def test_max_logits_over_batch_and_varlen_sequences():
    """The max is over the whole batch; in varlen, over every sequence, and a key of the next sequence
    (another document) is never seen."""
    s, h, d = 40, 2, 16
    q, k, v = planted_logits(s, h, 3, d, head=0, row=5, col=5, masked_row=20, masked_col=21,
                              dtype=torch.float32)
    _, ml = mla_attention(q, k, v, softmax_scale=0.5)
    _, _, expected = naive_attention(q, k, v, True, 0.5)
    assert torch.equal(ml, expected.float())
    # Pack the last batch element as sequences [0, 20) and [20, 40), no mask: the planted (20, 21) pair lies
    # in the second sequence and counts; pairs across the two sequences never do.
    cu = torch.tensor([0, 20, 40], dtype=torch.int32)
    _, ml_var = mla_attention_varlen(q[-1], k[-1], v[-1], cu, cu, 20, 20, causal=False, softmax_scale=0.5)
    _, _, ml_a = naive_attention(q[-1:, :20], k[-1:, :20], v[-1:, :20], False, 0.5)
    _, _, ml_b = naive_attention(q[-1:, 20:], k[-1:, 20:], v[-1:, 20:], False, 0.5)
    assert torch.equal(ml_var, torch.maximum(ml_a, ml_b).float())


# --------------------------------------------------------------------------------------------------- varlen

@pytest.mark.parametrize("d_qk,d_v", HEAD_DIMS)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_varlen_equals_dense_per_sequence(dtype, causal, d_qk, d_v):
    lens_q = [5, 0, 17, 1, 130, 3]
    lens_k = [5, 0, 17, 1, 130, 3]
    _check_varlen(lens_q, lens_k, 3, d_qk, d_v, dtype, causal)


@pytest.mark.parametrize("causal", [True, False])
def test_varlen_different_query_and_key_lengths(causal):
    # s_q < s_k (a query chunk over a longer context) and s_q > s_k (rows without visible keys).
    _check_varlen([4, 9, 1, 6], [10, 9, 0, 2], 2, 64, 32, torch.float32, causal)


def _check_varlen(lens_q, lens_k, h, d_qk, d_v, dtype, causal):
    cu_q = torch.tensor([0] + list(torch.tensor(lens_q).cumsum(0)), dtype=torch.int32)
    cu_k = torch.tensor([0] + list(torch.tensor(lens_k).cumsum(0)), dtype=torch.int32)
    tq, tk = sum(lens_q), sum(lens_k)
    g = torch.Generator().manual_seed(len(lens_q))
    q = torch.randn(tq, h, d_qk, generator=g).to(dtype).requires_grad_()
    k = torch.randn(tk, h, d_qk, generator=g).to(dtype).requires_grad_()
    v = torch.randn(tk, h, d_v, generator=g).to(dtype).requires_grad_()
    grad_out = torch.randn(tq, h, d_v, generator=g).to(dtype)
    out, ml = mla_attention_varlen(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), causal=causal)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad_out)
    assert out.shape == (tq, h, d_v) and ml.shape == (h,)
    expected_ml = torch.full((h,), float("-inf"))
    for i in range(len(lens_q)):
        qs, qe, ks, ke = cu_q[i], cu_q[i + 1], cu_k[i], cu_k[i + 1]
        if qe == qs:
            continue
        qi, ki, vi = (t[a:e].detach().unsqueeze(0).requires_grad_() for t, a, e in ((q, qs, qe), (k, ks, ke),
                                                                                    (v, ks, ke)))
        if ke == ks:  # no key at all: zero output; the dense op needs at least the shapes to agree
            assert torch.equal(out[qs:qe], torch.zeros_like(out[qs:qe]))
            assert torch.equal(dq[qs:qe], torch.zeros_like(dq[qs:qe]))
            continue
        oi, mli = mla_attention(qi, ki, vi, causal=causal)
        dqi, dki, dvi = torch.autograd.grad(oi, (qi, ki, vi), grad_out[qs:qe].unsqueeze(0))
        torch.testing.assert_close(out[qs:qe], oi[0], rtol=0, atol=0)
        torch.testing.assert_close(dq[qs:qe], dqi[0], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(dk[ks:ke], dki[0], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(dv[ks:ke], dvi[0], rtol=1e-6, atol=1e-6)
        expected_ml = torch.maximum(expected_ml, mli)
        # and against float64 directly
        o64, _, _ = naive_attention(qi, ki, vi, causal, 1.0 / math.sqrt(d_qk))
        assert_close_to(out[qs:qe], o64[0], TOL[dtype]["out"], f"out of sequence {i}")
    assert torch.equal(ml, expected_ml)
    assert torch.isfinite(out).all() and all(torch.isfinite(t).all() for t in (dq, dk, dv))


def test_rows_without_visible_keys_are_zero_not_nan():
    """Causal with s_q > s_k (bottom-right aligned): the first s_q - s_k rows see no key."""
    q, k, v = make_qkv(2, 6, 2, 8, 8, torch.float64, s_k=2, requires_grad=True)
    out, lse, ml = ref.mla_attention_fwd(q, k, v, True, 0.5)
    out64, lse64, ml64 = naive_attention(q, k, v, True, 0.5)
    assert torch.equal(out[:, :4], torch.zeros_like(out[:, :4]))
    assert torch.isneginf(lse[:, :, :4]).all()
    torch.testing.assert_close(out, out64)
    torch.testing.assert_close(lse, lse64)
    torch.testing.assert_close(ml, ml64.float())
    g = torch.randn_like(out)
    dq, dk, dv = ref.mla_attention_bwd(g, q, k, v, out, lse, True, 0.5)
    assert torch.equal(dq[:, :4], torch.zeros_like(dq[:, :4]))
    for got, want in zip((dq, dk, dv), naive_grads(q, k, v, True, 0.5, g)):
        torch.testing.assert_close(got, want)
    # through the op, with no key at all
    out, ml = mla_attention(q, k[:, :0], v[:, :0], causal=False)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(ml).all()
    out.sum().backward()
    assert torch.equal(q.grad, torch.zeros_like(q))


@pytest.mark.parametrize("b,s_q,s_k", [(0, 5, 5), (2, 0, 0), (2, 0, 3)])
def test_zero_size(b, s_q, s_k):
    q, k, v = make_qkv(b, s_q, 3, 16, 8, torch.float32, s_k=s_k, requires_grad=True)
    out, ml = mla_attention(q, k, v, causal=False)
    assert out.shape == (b, s_q, 3, 8) and torch.isneginf(ml).all()
    out.sum().backward()
    assert q.grad.shape == q.shape and k.grad.shape == k.shape and v.grad.shape == v.shape


# ---------------------------------------------------------------------------------------------- layouts

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_strided_sbhd_inputs(dtype):
    """megatron-core's [s, b, h, d] tensors go in as transpose(0, 1) views."""
    s, b, h = 33, 3, 4
    g = torch.Generator().manual_seed(2)
    q_sb = torch.randn(s, b, h, 192, generator=g).to(dtype).requires_grad_()
    kv_sb = torch.randn(s, b, h, 192 + 128, generator=g).to(dtype).requires_grad_()
    q = q_sb.transpose(0, 1)
    k, v = kv_sb.transpose(0, 1).split([192, 128], dim=-1)  # v and k also non-contiguous in the last dims
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    out, ml = mla_attention(q, k, v)
    qc, kc, vc = (t.detach().contiguous().requires_grad_() for t in (q, k, v))
    out_c, ml_c = mla_attention(qc, kc, vc)
    torch.testing.assert_close(out, out_c, rtol=1e-6, atol=1e-6)
    assert torch.equal(ml, ml_c)
    grad_out = torch.randn(out.shape, generator=g).to(dtype)
    out.backward(grad_out)
    out_c.backward(grad_out)
    torch.testing.assert_close(q_sb.grad.transpose(0, 1), qc.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kv_sb.grad.transpose(0, 1), torch.cat([kc.grad, vc.grad], -1), rtol=1e-5, atol=1e-5)


def test_reference_path_without_extension(monkeypatch):
    """Without k2_megatron._C (or on a GPU without the kernel), the autograd.Function over the reference runs:
    same results as the registered operator."""
    q, k, v = make_qkv(2, 30, 3, 192, 128, torch.float32, requires_grad=True)
    cu = torch.tensor([0, 11, 30], dtype=torch.int32)
    results = []
    for registered in (True, False):
        if registered and not _extension.extension_loaded():
            continue
        monkeypatch.setattr(attention_op, "_use_registered_op", lambda q, v, r=registered: r)
        out, ml = mla_attention(q, k, v)
        out_v, ml_v = mla_attention_varlen(q[0], k[0], v[0], cu, cu, 19, 19)
        grads = torch.autograd.grad(out.sum() + out_v.square().sum(), (q, k, v))
        assert not ml.requires_grad and not ml_v.requires_grad
        results.append((out, ml, out_v, ml_v) + grads)
    expected = naive_attention(q, k, v, True, 192 ** -0.5)
    assert_close_to(results[-1][0], expected[0], TOL[torch.float32]["out"], "out")
    for a, b in zip(results[0], results[-1]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------- registered ops

def _opcheck_cases():
    q, k, v = make_qkv(2, 9, 3, 24, 16, torch.float32, seed=4, requires_grad=True)
    cu = torch.tensor([0, 4, 4, 9], dtype=torch.int32)
    qs = q.detach().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_()  # strided [s, b] storage
    d = [t.detach() for t in (q, k, v)]  # the backward operators have no autograd formula of their own
    out, lse, _ = ref.mla_attention_fwd(*d, True, 0.3)
    vout, vlse, _ = ref.mla_attention_varlen_fwd(*(t[0] for t in d), cu, cu, 5, 5, False, 0.3)
    g = torch.randn_like(out)
    return [
        ("mla_attention_fwd", (q, k, v, True, 0.3)),
        ("mla_attention_fwd", (qs, k, v, False, 0.3)),
        ("mla_attention_fwd", tuple(t.double() for t in (q, k, v)) + (True, 0.3)),
        ("mla_attention_bwd", (g, *d, out, lse, True, 0.3)),
        ("mla_attention_varlen_fwd", (q[0], k[0], v[0], cu, cu, 5, 5, True, 0.3)),
        ("mla_attention_varlen_bwd", (g[0], *(t[0] for t in d), vout, vlse, cu, cu, 5, 5, False, 0.3)),
    ]


@pytest.mark.slow
@requires_extension
@pytest.mark.parametrize("case", range(6))
def test_opcheck(case):
    name, args = _opcheck_cases()[case]
    torch.library.opcheck(getattr(torch.ops.k2_megatron, name), args)


@requires_extension
def test_torch_compile_fullgraph():
    q, k, v = make_qkv(2, 20, 3, 32, 16, torch.float32, requires_grad=True)
    cu = torch.tensor([0, 7, 20], dtype=torch.int32)

    def step(q, k, v):
        out, ml = mla_attention(q, k, v)
        out_v, ml_v = mla_attention_varlen(q[0], k[0], v[0], cu, cu, 13, 13)
        return out.square().sum() + out_v.sum(), torch.maximum(ml, ml_v)

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    loss, ml = compiled(q, k, v)
    grads = torch.autograd.grad(loss, (q, k, v))
    loss_e, ml_e = step(q, k, v)
    grads_e = torch.autograd.grad(loss_e, (q, k, v))
    torch.testing.assert_close(loss, loss_e)
    assert torch.equal(ml, ml_e)
    for a, b in zip(grads, grads_e):
        torch.testing.assert_close(a, b)


# ------------------------------------------------------------------------------------------------ errors

def _bad_inputs():
    q = torch.randn(2, 8, 4, 192)
    k = torch.randn(2, 8, 4, 192)
    v = torch.randn(2, 8, 4, 128)
    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    dense = [
        ((q, k[:, :, :3], v), {}, ValueError, r"k must have q's number of heads 4"),
        ((q, k, v[:, :, :2]), {}, ValueError, r"v must have q's number of heads 4"),
        ((q, k[:1], v[:1]), {}, ValueError, r"k must have q's batch size 2"),
        ((q, k, v[:1]), {}, ValueError, r"v must have q's batch size 2"),
        ((q, k, v[:, :5]), {}, ValueError, r"v must have as many keys as k"),
        ((q, k[..., :64], v), {}, ValueError, r"k must have q's head dim 192"),
        ((torch.randn(1, 4, 2, 288), torch.randn(1, 4, 2, 288), torch.randn(1, 4, 2, 64)), {}, ValueError,
         r"head dim of q .* \[1, 256\]"),
        ((q, k, torch.randn(2, 8, 4, 320)), {}, ValueError, r"head dim of v .* \[1, 256\]"),
        ((q.long(), k, v), {}, TypeError, r"q must have dtype in"),
        ((q, k.to(torch.int32), v), {}, TypeError, r"k must have dtype in"),
        ((q, k.double(), v), {}, TypeError, r"k must have q's dtype"),
        ((q, k, v.to("meta")), {}, ValueError, r"v must be on q's device"),
        ((q[0], k[0], v[0]), {}, ValueError, r"q must be 4-D"),
        ((q, k, "v"), {}, TypeError, r"v must be a torch.Tensor"),
        ((q, k, v), {"softmax_scale": -1.0}, ValueError, r"softmax_scale must be a positive finite"),
        ((q, k, v), {"softmax_scale": float("nan")}, ValueError, r"softmax_scale"),
        ((q, k, v), {"causal": 1}, TypeError, r"causal must be a bool"),
    ]
    qv, kv, vv = q[0], k[0], v[0]
    varlen = [
        ((qv, kv, vv, cu.long(), cu, 5, 5), TypeError, r"cu_seqlens_q must have dtype"),
        ((qv, kv, vv, cu, cu.view(1, 3), 5, 5), ValueError, r"cu_seqlens_k must be 1-D"),
        ((qv, kv, vv, cu, cu[:2], 5, 5), ValueError, r"same number of sequences"),
        ((qv, kv, vv, cu, cu.to("meta"), 5, 5), ValueError, r"cu_seqlens_k must be on q's device"),
        ((qv, kv, vv, cu[:0], cu[:0], 5, 5), ValueError, r"cu_seqlens_q must hold n \+ 1 >= 1"),
        ((qv, kv, vv, torch.tensor([0, 5, 3, 8], dtype=torch.int32), torch.tensor([0, 3, 5, 8], dtype=torch.int32),
          5, 5), ValueError, r"cu_seqlens_q must be non-decreasing"),
        ((qv, kv, vv, torch.tensor([1, 3, 8], dtype=torch.int32), cu, 5, 5), ValueError,
         r"cu_seqlens_q must start at 0"),
        ((qv, kv, vv, cu, torch.tensor([0, 3, 7], dtype=torch.int32), 5, 5), ValueError,
         r"cu_seqlens_k must end at the number of packed tokens 8"),
        ((qv, kv, vv, cu, cu, 4, 5), ValueError, r"max_seqlen_q = 4 is smaller than the longest sequence"),
        ((qv, kv, vv, cu, cu, 5, -1), ValueError, r"max_seqlen_k must be a non-negative int"),
        ((qv, kv[:, :2], vv, cu, cu, 5, 5), ValueError, r"k must have q's number of heads"),
        ((q, k, v, cu, cu, 5, 5), ValueError, r"q must be 3-D"),
    ]
    return dense, varlen


@pytest.mark.parametrize("case", range(17))
def test_bad_input_dense(case):
    args, kwargs, exc, match = _bad_inputs()[0][case]
    with pytest.raises(exc, match=r"mla_attention: .*" + match):
        mla_attention(*args, **kwargs)


@pytest.mark.parametrize("case", range(12))
def test_bad_input_varlen(case):
    args, exc, match = _bad_inputs()[1][case]
    with pytest.raises(exc, match=r"mla_attention_varlen: .*" + match):
        mla_attention_varlen(*args)


# -------------------------------------------------------------------------------------------------- CUDA

@pytest.mark.gpu
@pytest.mark.parametrize("forward_kernel", ["default", "sm80"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d_qk,d_v", HEAD_DIMS + [(128, 128)])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("b,s,h", [(1, 1, 1), (3, 17, 3), (1, 128, 16), (2, 1000, 3), (1, 4096, 16)], ids=str)
def test_cuda_matches_float64_within_2x_sdpa(b, s, h, causal, d_qk, d_v, dtype, forward_kernel, monkeypatch):
    """On CUDA (kernel where registered, else the reference): error at most 2x that of SDPA in the same
    precision, forward and backward; max_logits as exact as float32 allows. "sm80" forces the mma.sync
    kernels (K2_ATTENTION_KERNEL=sm80), so a Hopper GPU checks both the wgmma and the mma.sync kernels."""
    if forward_kernel == "sm80":
        monkeypatch.setenv("K2_ATTENTION_KERNEL", "sm80")
    q, k, v = (t.cuda().requires_grad_() for t in make_qkv(b, s, h, d_qk, d_v, dtype, seed=s + h))
    grad_out = torch.randn(b, s, h, d_v, device="cuda").to(dtype)
    out, ml = mla_attention(q, k, v, causal=causal)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    check_within_2x_sdpa(out, ml, grads, q, k, v, grad_out, causal, 1.0 / math.sqrt(d_qk))


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [True, False])
def test_cuda_varlen_and_strided_match_reference(causal):
    lens = [5, 0, 130, 1, 77]
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32)
    q, k, v = (t[0] for t in make_qkv(1, sum(lens), 4, 192, 128, torch.bfloat16, seed=9))
    out_ref, ml_ref = mla_attention_varlen(q, k, v, cu, cu, max(lens), max(lens), causal=causal)
    out, ml = mla_attention_varlen(q.cuda(), k.cuda(), v.cuda(), cu.cuda(), cu.cuda(), max(lens), max(lens),
                                   causal=causal)
    assert_close_to(out.cpu(), out_ref.double(), 2 * TOL[torch.bfloat16]["out"], "varlen out")
    torch.testing.assert_close(ml.cpu(), ml_ref, rtol=1e-5, atol=1e-5)
    x = torch.randn(64, 2, 4, 192 + 192 + 128, device="cuda", dtype=torch.bfloat16).transpose(0, 1)
    q, k, v = x.split([192, 192, 128], dim=-1)
    out, ml = mla_attention(q, k, v, causal=causal)
    out_ref, ml_ref = mla_attention(q.cpu(), k.cpu(), v.cpu(), causal=causal)
    assert_close_to(out.cpu(), out_ref.double(), 2 * TOL[torch.bfloat16]["out"], "strided out")
    torch.testing.assert_close(ml.cpu(), ml_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_cuda_max_logits_exact():
    q, k, v = planted_logits(300, 3, 2, 64, 1, 150, 150, 149, 150, torch.bfloat16)
    _, _, expected = naive_attention(q, k, v, True, 0.125)
    _, ml = mla_attention(q.cuda(), k.cuda(), v.cuda(), causal=True, softmax_scale=0.125)
    assert torch.equal(ml.cpu(), expected.float())
