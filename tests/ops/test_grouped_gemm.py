"""k2_megatron.ops.grouped_gemm / permute / unpermute against float64 loops written out here.

Errors are measured as max|y - ref| / max|ref| against a float64 computation on the same (already rounded)
inputs, so they measure the op's arithmetic only: accumulation and one rounding of the result.
"""

import importlib
import math

import pytest
import torch

from k2_megatron import _extension
from k2_megatron.ops import grouped_gemm, grouped_gemm_wgrad, permute, unpermute
from k2_megatron.ops.reference import grouped_gemm as ref

# The op module by full name (k2_megatron.ops exports the function grouped_gemm under the module's name).
gg_mod = importlib.import_module("k2_megatron.ops.grouped_gemm")

requires_ext = pytest.mark.skipif(not _extension.op_registered("grouped_gemm"),
                                  reason="k2_megatron._C not built (or built without the grouped_gemm schemas)")

# Relative error (to the largest reference entry) allowed per dtype. bf16/fp16: one rounding of the
# result (2^-9 / 2^-12 relative) plus fp32 accumulation; measured ~3e-3 / ~4e-4. fp32: measured <= 5e-7.
TOL = {torch.float64: 1e-12, torch.float32: 5e-6, torch.float16: 1.5e-3, torch.bfloat16: 8e-3}
# Gradients: dw sums over up to a few hundred rows, dx over N; same bound shapes, a little more slack.
GRAD_TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 1e-2}


def rel_err(y: torch.Tensor, want: torch.Tensor) -> float:
    y, want = y.to(torch.float64), want.to(torch.float64)
    if want.numel() == 0:
        return 0.0
    return float((y - want).abs().max() / want.abs().max().clamp_min(1e-300))


def loop_float64(x, w, sizes, trans_b):
    """The oracle: one float64 matmul per expert on its rows."""
    outs, start = [], 0
    n = w.shape[1] if trans_b else w.shape[2]
    for e, size in enumerate(sizes):
        w_e = w[e].to(torch.float64)
        outs.append(x[start:start + size].to(torch.float64) @ (w_e.T if trans_b else w_e))
        start += size
    return torch.cat(outs) if outs else x.new_zeros((0, n), dtype=torch.float64)


def make_sizes(kind: str, e: int, t: int, gen: torch.Generator) -> list[int]:
    if kind == "random":  # multinomial: with t ~ e many experts get zero tokens
        if t == 0:
            return [0] * e
        return torch.multinomial(torch.ones(e), t, replacement=True, generator=gen).bincount(minlength=e).tolist()
    if kind == "zeros":  # every other expert empty, including the first and the last
        sizes = [0] * e
        live = list(range(1, e - 1, 2)) or [0]
        for i in range(t):
            sizes[live[i % len(live)]] += 1
        return sizes
    if kind == "one":  # all tokens on one expert
        sizes = [0] * e
        sizes[e // 2] = t
        return sizes
    raise ValueError(kind)


def make_inputs(e, k, n, sizes, dtype, trans_b, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(sum(sizes), k, generator=gen).to(device=device, dtype=dtype)
    w = torch.randn(e, n, k, generator=gen) if trans_b else torch.randn(e, k, n, generator=gen)
    w = (w / math.sqrt(k)).to(device=device, dtype=dtype)
    return x, w


# E, K, N, T, load: the grid (E in {1, 8, 24, 384}; K, N in {128, 2048} plus 7168 and odd sizes
# where cheap on CPU), zero-token experts and all tokens on one expert.
# The largest cases take seconds each on a CPU: slow (the fast loop keeps the others).
FWD_CASES = [
    (1, 128, 128, 37, "random"),
    (8, 128, 128, 300, "random"),
    (8, 128, 2048, 200, "zeros"),
    (8, 2048, 128, 200, "one"),
    pytest.param(4, 2048, 2048, 48, "random", marks=pytest.mark.slow),
    (24, 128, 128, 100, "random"),
    (24, 2048, 128, 300, "zeros"),
    pytest.param(384, 128, 128, 1000, "random", marks=pytest.mark.slow),
    pytest.param(384, 2048, 32, 300, "random", marks=pytest.mark.slow),
    pytest.param(2, 7168, 128, 40, "random", marks=pytest.mark.slow),
    pytest.param(2, 128, 7168, 40, "random", marks=pytest.mark.slow),
    (5, 7, 13, 29, "random"),
    (3, 129, 65, 1, "random"),
    (7, 1, 1, 20, "zeros"),
    (8, 33, 17, 0, "random"),  # no tokens at all
]


@pytest.mark.parametrize("trans_b", [False, True], ids=["w_KN", "w_NK"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("e,k,n,t,load", FWD_CASES, ids=lambda v: str(v))
def test_forward_matches_float64_loop(e, k, n, t, load, dtype, trans_b):
    sizes = make_sizes(load, e, t, torch.Generator().manual_seed(e * 7 + t))
    x, w = make_inputs(e, k, n, sizes, dtype, trans_b)
    out = grouped_gemm(x, w, torch.tensor(sizes), trans_b=trans_b)
    assert out.shape == (t, n) and out.dtype == dtype and out.device == x.device
    assert rel_err(out, loop_float64(x, w, sizes, trans_b)) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
def test_forward_other_float_dtypes(dtype):
    sizes = [3, 0, 11, 1, 0, 6]
    for trans_b in (False, True):
        x, w = make_inputs(6, 40, 24, sizes, dtype, trans_b)
        out = grouped_gemm(x, w, torch.tensor(sizes), trans_b=trans_b)
        assert out.dtype == dtype
        assert rel_err(out, loop_float64(x, w, sizes, trans_b)) < TOL[dtype]


def test_trans_b_is_the_transposed_layout():
    sizes = [5, 0, 9, 2]
    x, w = make_inputs(4, 24, 40, sizes, torch.float32, trans_b=False)
    bs = torch.tensor(sizes)
    a = grouped_gemm(x, w, bs)
    b = grouped_gemm(x, w.mT.contiguous(), bs, trans_b=True)
    c = grouped_gemm(x, w.mT.contiguous().mT, bs)  # a non-contiguous [E, K, N] view
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(a, c, rtol=1e-6, atol=1e-6)


def test_empty_experts_do_not_touch_other_rows():
    """Row blocks follow batch_sizes exactly: each expert's rows depend only on its own weights."""
    sizes = [0, 4, 0, 0, 3, 0]
    x, w = make_inputs(6, 16, 8, sizes, torch.float64, trans_b=False)
    bs = torch.tensor(sizes)
    out = grouped_gemm(x, w, bs)
    w2 = w.clone()
    w2[[0, 2, 3, 5]] = float("nan")  # experts without tokens: never read
    torch.testing.assert_close(grouped_gemm(x, w2, bs), out, rtol=0, atol=0)
    torch.testing.assert_close(out[:4], x[:4] @ w[1], rtol=0, atol=1e-12)
    torch.testing.assert_close(out[4:], x[4:] @ w[4], rtol=0, atol=1e-12)


GRAD_CASES = [
    (1, 64, 48, 30, "random"),
    (8, 128, 128, 200, "zeros"),
    (8, 96, 160, 50, "one"),
    (24, 128, 64, 100, "random"),
    pytest.param(384, 32, 16, 400, "random", marks=pytest.mark.slow),
    (5, 7, 13, 29, "random"),
    pytest.param(3, 2048, 128, 24, "random", marks=pytest.mark.slow),
]


def _grads_float64(x, w, sizes, trans_b, dy):
    x64 = x.detach().to(torch.float64).requires_grad_()
    w64 = w.detach().to(torch.float64).requires_grad_()
    loop_float64(x64, w64, sizes, trans_b).backward(dy.to(torch.float64))
    return x64.grad, w64.grad


@pytest.mark.parametrize("trans_b", [False, True], ids=["w_KN", "w_NK"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("e,k,n,t,load", GRAD_CASES, ids=lambda v: str(v))
def test_gradients_match_float64_loop(e, k, n, t, load, dtype, trans_b):
    sizes = make_sizes(load, e, t, torch.Generator().manual_seed(e + t))
    x, w = make_inputs(e, k, n, sizes, dtype, trans_b, seed=1)
    x.requires_grad_()
    w.requires_grad_()
    dy = torch.randn(t, n, generator=torch.Generator().manual_seed(2)).to(dtype)
    grouped_gemm(x, w, torch.tensor(sizes), trans_b=trans_b).backward(dy)
    dx64, dw64 = _grads_float64(x, w, sizes, trans_b, dy)
    assert x.grad.dtype == dtype and w.grad.dtype == dtype and w.grad.shape == w.shape
    assert rel_err(x.grad, dx64) < GRAD_TOL[dtype]
    assert rel_err(w.grad, dw64) < GRAD_TOL[dtype]
    for ex, size in enumerate(sizes):
        if size == 0:
            assert (w.grad[ex] == 0).all()  # experts without tokens get exactly zero


@pytest.mark.parametrize("trans_b", [False, True], ids=["w_KN", "w_NK"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("e,k,n,t,load", GRAD_CASES[:3] + GRAD_CASES[5:6], ids=lambda v: str(v))
def test_wgrad_is_the_weight_gradient_of_grouped_gemm(e, k, n, t, load, dtype, trans_b):
    """grouped_gemm_wgrad (a delayed weight-gradient pass) against float64 and, bit for bit, against autograd's dw."""
    sizes = make_sizes(load, e, t, torch.Generator().manual_seed(e + t))
    x, w = make_inputs(e, k, n, sizes, dtype, trans_b, seed=1)
    w.requires_grad_()
    dy = torch.randn(t, n, generator=torch.Generator().manual_seed(2)).to(dtype)
    grouped_gemm(x, w, torch.tensor(sizes), trans_b=trans_b).backward(dy)
    dw = grouped_gemm_wgrad(x, dy, torch.tensor(sizes), trans_b=trans_b)
    assert dw.dtype == dtype and dw.shape == w.shape
    assert rel_err(dw, _grads_float64(x, w, sizes, trans_b, dy)[1]) < GRAD_TOL[dtype]
    assert torch.equal(dw, w.grad)


@pytest.mark.parametrize("over,exc,match", [
    (dict(dy=torch.randn(5, 3)), ValueError, r"dy must have one row per row of x \(6\), got shape \(5, 3\)"),
    (dict(dy=torch.randn(6, 3, dtype=torch.float64)), TypeError, "dy must have the dtype of x"),
    (dict(batch_sizes=torch.tensor([1, 2, 2])), ValueError, r"sum\(batch_sizes\) must equal"),
    (dict(dy=torch.randn(6)), ValueError, "dy must be 2-D"),
    (dict(trans_b=1), TypeError, "trans_b must be a bool"),
])
def test_wgrad_bad_input(over, exc, match):
    args = {"x": torch.randn(6, 4), "dy": torch.randn(6, 3), "batch_sizes": torch.tensor([1, 2, 3]), "trans_b": False,
            **over}
    with pytest.raises(exc, match=match):
        grouped_gemm_wgrad(args["x"], args["dy"], args["batch_sizes"], trans_b=args["trans_b"])


@pytest.mark.slow
def test_gradcheck_float64():
    sizes = torch.tensor([3, 0, 4, 2])
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(9, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    for trans_b in (False, True):
        w = torch.randn(4, *((6, 5) if trans_b else (5, 6)), dtype=torch.float64, generator=gen, requires_grad=True)
        assert torch.autograd.gradcheck(lambda a, b: grouped_gemm(a, b, sizes, trans_b=trans_b), (x, w))
        assert torch.autograd.gradgradcheck(lambda a, b: grouped_gemm(a, b, sizes, trans_b=trans_b), (x, w))


@pytest.mark.parametrize("need", ["x", "w", "both"])
def test_backward_computes_only_what_is_needed(need, monkeypatch):
    calls = {"dgrad": 0, "wgrad": 0}
    dgrad, wgrad = gg_mod._grouped_gemm, gg_mod._grouped_gemm_wgrad

    def counting_dgrad(*args):
        calls["dgrad"] += 1
        return dgrad(*args)

    def counting_wgrad(*args):
        calls["wgrad"] += 1
        return wgrad(*args)

    monkeypatch.setattr(gg_mod, "_grouped_gemm", counting_dgrad)
    monkeypatch.setattr(gg_mod, "_grouped_gemm_wgrad", counting_wgrad)
    sizes = [4, 0, 3]
    x, w = make_inputs(3, 8, 6, sizes, torch.float32, trans_b=False)
    x.requires_grad_(need in ("x", "both"))
    w.requires_grad_(need in ("w", "both"))
    grouped_gemm(x, w, torch.tensor(sizes)).sum().backward()
    assert calls == {"dgrad": int(need != "w"), "wgrad": int(need != "x")}
    assert (x.grad is None) == (need == "w") and (w.grad is None) == (need == "x")


def test_reference_path_equals_op_path(monkeypatch):
    """Without the extension the same functions run the references through torch.autograd.Function:
    identical outputs and gradients."""
    sizes = [5, 0, 7, 1]
    x, w = make_inputs(4, 12, 10, sizes, torch.float32, trans_b=True, seed=4)
    tokens = torch.randn(9, 6)
    idx = torch.randint(0, 4, (9, 3), generator=torch.Generator().manual_seed(5))
    probs = torch.rand(9, 3)

    def run():
        xs, ws, ts, ps = (t.clone().requires_grad_() for t in (x, w, tokens, probs))
        out = grouped_gemm(xs, ws, torch.tensor(sizes), trans_b=True)
        permuted, row_map, counts = permute(ts, idx, 4)
        comb = unpermute(permuted * 2.0, row_map, ps)
        (out.square().sum() + comb.square().sum()).backward()
        return out, comb, counts, row_map, xs.grad, ws.grad, ts.grad, ps.grad

    first = run()
    monkeypatch.setattr(_extension, "dispatch_to_op", lambda name, t: False)
    for a, b in zip(first, run()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_device_batch_sizes_equal_host_batch_sizes():
    # On CPU "host" and "device" coincide; the CUDA variant is test_cuda_device_batch_sizes.
    sizes = [2, 0, 3]
    x, w = make_inputs(3, 8, 4, sizes, torch.float32, trans_b=False)
    torch.testing.assert_close(grouped_gemm(x, w, torch.tensor(sizes)), loop_float64(x, w, sizes, False).float())


# ---- bad input --------------------------------------------------------------------------------------------


def _gg_args(**over):
    args = dict(x=torch.randn(6, 4), w=torch.randn(3, 4, 5), batch_sizes=torch.tensor([1, 2, 3]))
    args.update(over)
    return args


@pytest.mark.parametrize("over,exc,match", [
    (dict(batch_sizes=torch.tensor([1, 2, 2])), ValueError, r"sum\(batch_sizes\) must equal .* \(6\), got 5"),
    (dict(batch_sizes=torch.tensor([4, -1, 3])), ValueError, "batch_sizes must be non-negative"),
    (dict(batch_sizes=torch.tensor([1, 2, 3, 0])), ValueError, r"one entry per expert of w \(3\), got 4"),
    (dict(batch_sizes=torch.tensor([1, 2, 3], dtype=torch.int32)), TypeError, "batch_sizes must have dtype"),
    (dict(batch_sizes=torch.tensor([[1, 2, 3]])), ValueError, "batch_sizes must be 1-D"),
    (dict(w=torch.randn(3, 5, 5)), ValueError, r"K \(5\) must equal x.shape\[1\] \(4\)"),
    (dict(w=torch.randn(3, 4, 5), trans_b=True), ValueError, r"trans_b=True\), so its K \(5\)"),
    (dict(w=torch.randn(3, 4, 5, dtype=torch.float64)), TypeError, "w must have the dtype of x"),
    (dict(x=torch.randint(0, 3, (6, 4)), w=torch.randint(0, 3, (3, 4, 5))), TypeError, "x must have dtype"),
    (dict(x=torch.randn(6, 4, 1)), ValueError, "x must be 2-D"),
    (dict(w=torch.randn(4, 5)), ValueError, "w must be 3-D"),
    (dict(w=torch.randn(0, 4, 5), batch_sizes=torch.zeros(0, dtype=torch.int64)), ValueError, "at least one expert"),
    (dict(x=[[1.0]]), TypeError, "x must be a torch.Tensor"),
    (dict(trans_b=1), TypeError, "trans_b must be a bool"),
    (dict(w=torch.randn(3, 4, 5, device="meta")), ValueError, "w must be on the same device as x"),
    (dict(batch_sizes=torch.tensor([1, 2, 3], device="meta")), ValueError, "batch_sizes must be on the host"),
])
def test_grouped_gemm_bad_input(over, exc, match):
    args = _gg_args(**over)
    trans_b = args.pop("trans_b", False)
    with pytest.raises(exc, match=match):
        grouped_gemm(args["x"], args["w"], args["batch_sizes"], trans_b=trans_b)


# ---- permute / unpermute ----------------------------------------------------------------------------------


def naive_permute(tokens, topk_indices, num_experts):
    """Python sort of the (expert, t, j) triples: the specification of permute's order."""
    t_count, k = topk_indices.shape
    triples = sorted((int(topk_indices[t, j]), t, j) for t in range(t_count) for j in range(k))
    source_token = torch.tensor([t for _, t, _ in triples], dtype=torch.int64)
    row_map = torch.empty(t_count, k, dtype=torch.int64)
    for p, (_, t, j) in enumerate(triples):
        row_map[t, j] = p
    counts = torch.zeros(num_experts, dtype=torch.int64)
    for ex, _, _ in triples:
        counts[ex] += 1
    return tokens[source_token], row_map, counts


def naive_unpermute(permuted, row_map, probs):
    gathered = permuted[row_map]  # [T, k, H]
    return (gathered * probs[..., None]).sum(1)


def routing(t, k, e, seed, distinct=True):
    gen = torch.Generator().manual_seed(seed)
    if distinct:  # a router's top-k: k distinct experts per token
        return torch.rand(t, e, generator=gen).topk(k, dim=1).indices
    return torch.randint(0, e, (t, k), generator=gen)


@pytest.mark.parametrize("t,k,e,distinct", [(1, 1, 1, True), (13, 2, 5, False), (64, 8, 384, True),
                                            (100, 8, 24, True), (50, 4, 3, False), (0, 8, 16, True)])
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_permute_matches_naive_sort(t, k, e, distinct, index_dtype):
    tokens = torch.randn(t, 9)
    idx = routing(t, k, e, seed=t + k, distinct=distinct).to(index_dtype)
    permuted, row_map, counts = permute(tokens, idx, e)
    want_p, want_map, want_counts = naive_permute(tokens, idx, e)
    assert permuted.shape == (t * k, 9) and row_map.shape == (t, k) and counts.shape == (e,)
    assert row_map.dtype == torch.int64 and counts.dtype == torch.int64
    torch.testing.assert_close(permuted, want_p, rtol=0, atol=0)
    torch.testing.assert_close(row_map, want_map, rtol=0, atol=0)
    torch.testing.assert_close(counts, want_counts, rtol=0, atol=0)
    # Invariants: the copy of token t for choice j sits at row_map[t, j], inside expert idx[t, j]'s block.
    for tt in range(t):
        for j in range(k):
            assert torch.equal(permuted[row_map[tt, j]], tokens[tt])
    starts = torch.cumsum(counts, 0) - counts
    ex = idx.to(torch.int64)
    assert ((row_map >= starts[ex]) & (row_map < starts[ex] + counts[ex])).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_is_exact(dtype):
    t, k, e = 200, 8, 384
    tokens = torch.randn(t, 64).to(dtype)
    idx = routing(t, k, e, seed=7)
    permuted, row_map, counts = permute(tokens, idx, e)
    assert int(counts.sum()) == t * k
    one_hot = torch.zeros(t, k).scatter_(1, torch.randint(0, k, (t, 1)), 1.0)
    torch.testing.assert_close(unpermute(permuted, row_map, one_hot), tokens, rtol=0, atol=0)
    # Uniform 1/k weights (k = 8, a power of two): exact for bf16 tokens (8-bit mantissa sums are exact in
    # fp32), and for fp32 up to the fp32 sum of 8 values.
    # None gives the plain sum of the k copies.
    rtol = 0 if dtype == torch.bfloat16 else 3e-7
    torch.testing.assert_close(unpermute(permuted, row_map, torch.full((t, k), 1.0 / k)), tokens, rtol=rtol, atol=0)
    torch.testing.assert_close(unpermute(permuted, row_map, None), tokens * k, rtol=rtol, atol=0)


@pytest.mark.parametrize("probs_dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unpermute_matches_naive(dtype, probs_dtype):
    t, k, e = 40, 8, 24
    permuted = torch.randn(t * k, 33).to(dtype)
    row_map = torch.randperm(t * k, generator=torch.Generator().manual_seed(8)).view(t, k)
    probs = torch.rand(t, k).to(probs_dtype)
    out = unpermute(permuted, row_map, probs)
    assert out.dtype == dtype and out.shape == (t, 33)
    want = naive_unpermute(permuted.double(), row_map, probs.double())
    tol = {torch.float32: 1e-6, torch.bfloat16: 8e-3}[dtype]
    assert rel_err(out, want) < tol


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_permute_unpermute_gradients_match_naive(dtype):
    t, k, e, h = 48, 8, 24, 20
    gen = torch.Generator().manual_seed(9)
    idx = routing(t, k, e, seed=10)
    tokens = torch.randn(t, h, generator=gen).to(dtype).requires_grad_()
    probs = torch.rand(t, k, generator=gen).to(dtype).requires_grad_()
    scale = torch.randn(t * k, h, generator=gen).to(dtype)  # makes d_permuted row-dependent
    dy = torch.randn(t, h, generator=gen).to(dtype)

    permuted, row_map, _ = permute(tokens, idx, e)
    unpermute(permuted * scale, row_map, probs).backward(dy)

    t64 = tokens.detach().double().requires_grad_()
    p64 = probs.detach().double().requires_grad_()
    perm64, map64, _ = naive_permute(t64, idx, e)
    naive_unpermute(perm64 * scale.double(), map64, p64).backward(dy.double())
    tol = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 2e-2}[dtype]
    assert tokens.grad.dtype == dtype and probs.grad.dtype == dtype
    assert rel_err(tokens.grad, t64.grad) < tol
    assert rel_err(probs.grad, p64.grad) < tol


@pytest.mark.parametrize("need", ["permuted", "probs"])
def test_unpermute_one_gradient_only(need):
    t, k = 12, 4
    row_map = torch.randperm(t * k, generator=torch.Generator().manual_seed(18)).view(t, k)
    permuted = torch.randn(t * k, 6, dtype=torch.float64, requires_grad=need == "permuted")
    probs = torch.rand(t, k, dtype=torch.float64, requires_grad=need == "probs")
    dy = torch.randn(t, 6, dtype=torch.float64)
    unpermute(permuted, row_map, probs).backward(dy)
    p64, q64 = permuted.detach().requires_grad_(), probs.detach().requires_grad_()
    naive_unpermute(p64, row_map, q64).backward(dy)
    got, want = (permuted.grad, p64.grad) if need == "permuted" else (probs.grad, q64.grad)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert (permuted.grad is None) == (need == "probs") and (probs.grad is None) == (need == "permuted")


@pytest.mark.slow
def test_permute_unpermute_gradcheck():
    idx = routing(10, 3, 4, seed=11, distinct=False)
    tokens = torch.randn(10, 5, dtype=torch.float64, requires_grad=True)
    probs = torch.rand(10, 3, dtype=torch.float64, requires_grad=True)
    _, row_map, _ = permute(tokens.detach(), idx, 4)

    def f(a, p):
        permuted = permute(a, idx, 4)[0]
        return unpermute(permuted.sin(), row_map, p)

    assert torch.autograd.gradcheck(f, (tokens, probs))
    assert torch.autograd.gradgradcheck(f, (tokens, probs))


def test_permute_is_deterministic():
    t, k, e = 300, 8, 384
    idx = routing(t, k, e, seed=12, distinct=False)  # duplicates inside a row too
    tokens = torch.randn(t, 16, requires_grad=True)
    probs = torch.rand(t, k, requires_grad=True)
    results = []
    for _ in range(3):
        tokens.grad = probs.grad = None
        permuted, row_map, counts = permute(tokens, idx, e)
        out = unpermute(permuted * 3.0, row_map, probs)
        out.square().sum().backward()
        results.append([permuted, row_map, counts, out, tokens.grad, probs.grad])
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


def test_moe_layer_end_to_end():
    """permute -> grouped_gemm (fc1, [E, K, N]) -> SiLU -> grouped_gemm (fc2, [E, N, K]) -> unpermute,
    against a per-token float64 loop over the k chosen experts; gradients for tokens, weights, probs."""
    t, k, e, h, f = 24, 4, 6, 16, 12
    gen = torch.Generator().manual_seed(13)
    idx = routing(t, k, e, seed=14)
    tokens = torch.randn(t, h, generator=gen, dtype=torch.float64, requires_grad=True)
    probs = torch.rand(t, k, generator=gen, dtype=torch.float64, requires_grad=True)
    w1 = torch.randn(e, h, f, generator=gen, dtype=torch.float64, requires_grad=True)
    w2 = torch.randn(e, h, f, generator=gen, dtype=torch.float64, requires_grad=True)

    permuted, row_map, counts = permute(tokens, idx, e)
    hidden = torch.nn.functional.silu(grouped_gemm(permuted, w1, counts))
    out = unpermute(grouped_gemm(hidden, w2, counts, trans_b=True), row_map, probs)
    grads = torch.autograd.grad(out.sin().sum(), (tokens, probs, w1, w2))

    want = torch.stack([
        sum(probs[tt, j] * (torch.nn.functional.silu(tokens[tt] @ w1[idx[tt, j]]) @ w2[idx[tt, j]].T)
            for j in range(k))
        for tt in range(t)])
    want_grads = torch.autograd.grad(want.sin().sum(), (tokens, probs, w1, w2))
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    for g, wg in zip(grads, want_grads):
        torch.testing.assert_close(g, wg, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("fn,exc,match", [
    (lambda: permute(torch.randn(4, 3), torch.tensor([[0], [1], [5], [2]]), 5), ValueError,
     r"topk_indices must lie in \[0, num_experts=5\), got values in \[0, 5\]"),
    (lambda: permute(torch.randn(4, 3), torch.tensor([[0], [-1], [2], [2]]), 5), ValueError, r"\[-1, 2\]"),
    (lambda: permute(torch.randn(4, 3), torch.zeros(3, 2, dtype=torch.int64), 5), ValueError, "one row per token"),
    (lambda: permute(torch.randn(4, 3), torch.zeros(4, 0, dtype=torch.int64), 5), ValueError, "k >= 1"),
    (lambda: permute(torch.randn(4, 3), torch.zeros(4, 2), 5), TypeError, "topk_indices must have dtype"),
    (lambda: permute(torch.randn(4, 3), torch.zeros(4, 2, dtype=torch.int64), 0), ValueError,
     "num_experts must be a positive int"),
    (lambda: permute(torch.randn(4, 3), torch.zeros(4, 2, dtype=torch.int64), True), ValueError, "num_experts"),
    (lambda: permute(torch.randn(4, 3, 2), torch.zeros(4, 2, dtype=torch.int64), 4), ValueError, "tokens must be 2-D"),
    (lambda: permute(torch.zeros(4, 3, dtype=torch.int64), torch.zeros(4, 2, dtype=torch.int64), 4), TypeError,
     "tokens must have dtype"),
    (lambda: permute(torch.randn(4, 3), torch.zeros(4, 2, dtype=torch.int64, device="meta"), 4), ValueError,
     "topk_indices must be on the same device as tokens"),
    (lambda: unpermute(torch.randn(8, 3), torch.zeros(4, 3, dtype=torch.int64), None), ValueError,
     r"T\*k = 12\), but permuted has 8 rows"),
    (lambda: unpermute(torch.randn(8, 3), torch.zeros(4, 2, dtype=torch.int32), None), TypeError,
     "row_map must have dtype"),
    (lambda: unpermute(torch.randn(8, 3), torch.zeros(4, 2, dtype=torch.int64), torch.rand(4, 3)), ValueError,
     "topk_probs must have row_map's shape"),
    (lambda: unpermute(torch.randn(8, 3), torch.zeros(4, 2, dtype=torch.int64), torch.ones(4, 2, dtype=torch.int64)),
     TypeError, "topk_probs must have dtype"),
    (lambda: unpermute(torch.randn(8, 3), torch.zeros(4, 2, dtype=torch.int64), torch.rand(4, 2, device="meta")),
     ValueError, "topk_probs must be on the same device as permuted"),
])
def test_permute_bad_input(fn, exc, match):
    with pytest.raises(exc, match=match):
        fn()


def test_permute_check_indices_off_skips_the_range_check():
    # The caller vouches for the indices (no host sync on a device); in range they give the same result.
    idx = routing(10, 2, 6, seed=15)
    tokens = torch.randn(10, 4)
    for a, b in zip(permute(tokens, idx, 6, check_indices=False), permute(tokens, idx, 6)):
        assert torch.equal(a, b)


# ---- registered ops ---------------------------------------------------------------------------------------


@requires_ext
class TestRegisteredOps:
    def test_schemas_and_cpu_kernels_registered(self):
        for name in ("grouped_gemm", "grouped_gemm_wgrad", "moe_permute", "moe_unpermute"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"k2_megatron::{name}", "CPU"), name

    @pytest.mark.parametrize("trans_b", [False, True])
    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    def test_opcheck_grouped_gemm(self, dtype, trans_b):
        sizes = torch.tensor([3, 0, 5, 2])
        x = torch.randn(10, 16, dtype=dtype, requires_grad=True)
        w = torch.randn(4, *((8, 16) if trans_b else (16, 8)), dtype=dtype, requires_grad=True)
        torch.library.opcheck(torch.ops.k2_megatron.grouped_gemm.default, (x, w, sizes, trans_b))
        dy = torch.randn(10, 8, dtype=dtype, requires_grad=True)
        torch.library.opcheck(torch.ops.k2_megatron.grouped_gemm_wgrad.default, (x, dy, sizes, trans_b))

    def test_opcheck_permute_unpermute(self):
        tokens = torch.randn(6, 5, requires_grad=True)
        idx = routing(6, 3, 4, seed=16, distinct=False)
        torch.library.opcheck(torch.ops.k2_megatron.moe_permute.default, (tokens, idx, 4))
        permuted, row_map, _ = torch.ops.k2_megatron.moe_permute(tokens.detach(), idx, 4)
        permuted.requires_grad_()
        probs = torch.rand(6, 3, requires_grad=True)
        torch.library.opcheck(torch.ops.k2_megatron.moe_unpermute.default, (permuted, row_map, probs))
        torch.library.opcheck(torch.ops.k2_megatron.moe_unpermute.default, (permuted, row_map, None))

    def test_cpu_kernels_are_the_references(self):
        sizes = torch.tensor([2, 0, 4])
        x, w = make_inputs(3, 6, 5, [2, 0, 4], torch.float32, trans_b=False)
        torch.testing.assert_close(torch.ops.k2_megatron.grouped_gemm(x, w, sizes, False),
                                   ref.grouped_gemm(x, w, sizes, False), rtol=0, atol=0)
        dy = torch.randn(6, 5)
        torch.testing.assert_close(torch.ops.k2_megatron.grouped_gemm_wgrad(x, dy, sizes, False),
                                   ref.grouped_gemm_wgrad(x, dy, sizes, False), rtol=0, atol=0)

    def test_fake_shapes_on_meta(self):
        x = torch.empty(10, 16, device="meta", dtype=torch.bfloat16)
        w = torch.empty(4, 8, 16, device="meta", dtype=torch.bfloat16)
        out = torch.ops.k2_megatron.grouped_gemm(x, w, torch.tensor([1, 2, 3, 4]), True)
        assert out.shape == (10, 8) and out.dtype == torch.bfloat16 and out.device.type == "meta"
        dw = torch.ops.k2_megatron.grouped_gemm_wgrad(x, torch.empty(10, 8, device="meta", dtype=torch.bfloat16),
                                                      torch.tensor([1, 2, 3, 4]), True)
        assert dw.shape == (4, 8, 16)
        tokens = torch.empty(7, 32, device="meta")
        permuted, row_map, counts = torch.ops.k2_megatron.moe_permute(
            tokens, torch.empty(7, 8, device="meta", dtype=torch.int32), 384)
        assert permuted.shape == (56, 32) and row_map.shape == (7, 8) and row_map.dtype == torch.int64
        assert counts.shape == (384,) and counts.dtype == torch.int64
        combined = torch.ops.k2_megatron.moe_unpermute(permuted, row_map, None)
        assert combined.shape == (7, 32)


# ---- CUDA -------------------------------------------------------------------------------------------------


def _cuda_kernel_registered(name: str) -> bool:
    return (_extension.op_registered(name)
            and torch._C._dispatch_has_kernel_for_dispatch_key(f"k2_megatron::{name}", "CUDA"))


def _require_kernel(name: str, t: torch.Tensor) -> None:
    """Skips unless the CUDA kernel of `name` runs on t's device (checked at test time, not at import)."""
    if not (_cuda_kernel_registered(name) and _extension.use_kernels(t)):
        pytest.skip(f"no CUDA kernel of k2_megatron::{name} runs on {t.device}")


# The two grouped-GEMM kernels: the device's default (sm90 on H100/H200, sm80 elsewhere) and the sm80 one
# forced by K2_GROUPED_GEMM_KERNEL=sm80 (the same as the default on an sm_8x GPU).
KERNELS = ["default", "sm80"]


@pytest.fixture(params=KERNELS)
def gemm_kernel(request, monkeypatch):
    if request.param == "sm80":
        monkeypatch.setenv("K2_GROUPED_GEMM_KERNEL", "sm80")
    else:
        monkeypatch.delenv("K2_GROUPED_GEMM_KERNEL", raising=False)
    return request.param


# Kernel tolerance, relative to the largest reference entry: the inputs are the same bf16 values, so the only
# errors are fp32 accumulation (<= ~1e-5 here) and one bf16 rounding of each result (<= 2^-9 of the entry).
KERNEL_TOL = 4e-3

# E, K, N, T, load: the grid on the kernels (E in {1, 8, 24, 384}; K, N in {128, 2048, 7168}),
# experts without tokens, all tokens on one expert, no tokens at all.
CUDA_CASES = [
    (1, 128, 128, 37, "random"),
    (8, 2048, 2048, 4000, "random"),
    (8, 128, 7168, 1000, "zeros"),
    (8, 7168, 128, 1000, "one"),
    (24, 7168, 4096, 3000, "random"),
    (24, 2048, 7168, 2000, "one"),
    (24, 2048, 2048, 0, "random"),
    (384, 128, 2048, 5000, "random"),
    (384, 2048, 128, 3000, "zeros"),
]


def _cuda_inputs(e, k, n, t, load, trans_b, seed=0):
    sizes = make_sizes(load, e, t, torch.Generator().manual_seed(e + t))
    x, w = make_inputs(e, k, n, sizes, torch.bfloat16, trans_b, device="cuda", seed=seed)
    return sizes, x, w


@pytest.mark.gpu
@pytest.mark.parametrize("trans_b", [False, True], ids=["w_KN", "w_NK"])
@pytest.mark.parametrize("e,k,n,t,load", CUDA_CASES, ids=lambda v: str(v))
def test_cuda_kernel_forward_vs_float64(e, k, n, t, load, trans_b, gemm_kernel):
    sizes, x, w = _cuda_inputs(e, k, n, t, load, trans_b)
    _require_kernel("grouped_gemm", x)
    assert gg_mod.grouped_gemm_path(x, w) != "reference"
    out = grouped_gemm(x, w, torch.tensor(sizes, device="cuda"), trans_b=trans_b)
    assert out.shape == (t, n) and out.dtype == torch.bfloat16
    assert rel_err(out, loop_float64(x, w, sizes, trans_b)) < KERNEL_TOL


@pytest.mark.gpu
@pytest.mark.parametrize("trans_b", [False, True], ids=["w_KN", "w_NK"])
@pytest.mark.parametrize("e,k,n,t,load", CUDA_CASES, ids=lambda v: str(v))
def test_cuda_kernel_gradients_vs_float64(e, k, n, t, load, trans_b, gemm_kernel):
    """dx (a forward with the other w layout) and dw (the wgrad kernel), experts without tokens exactly 0."""
    sizes, x, w = _cuda_inputs(e, k, n, t, load, trans_b, seed=1)
    _require_kernel("grouped_gemm_wgrad", x)
    # Leave NaNs in the memory the caching allocator hands out next: dw of an empty expert must be written.
    torch.full((2 * e * k * n,), float("nan"), device="cuda", dtype=torch.bfloat16)
    x.requires_grad_()
    w.requires_grad_()
    dy = torch.randn(t, n, generator=torch.Generator().manual_seed(2)).to("cuda", torch.bfloat16)
    grouped_gemm(x, w, torch.tensor(sizes, device="cuda"), trans_b=trans_b).backward(dy)
    dx64, dw64 = _grads_float64(x, w, sizes, trans_b, dy)
    assert x.grad.shape == x.shape and w.grad.shape == w.shape
    assert rel_err(x.grad, dx64) < KERNEL_TOL
    assert rel_err(w.grad, dw64) < KERNEL_TOL
    for ex, size in enumerate(sizes):
        if size == 0:
            assert (w.grad[ex] == 0).all(), f"expert {ex} has no tokens but a nonzero dw"


@pytest.mark.gpu
@pytest.mark.parametrize("trans_b", [False, True], ids=["w_KN", "w_NK"])
def test_cuda_host_and_device_batch_sizes_agree(trans_b, gemm_kernel):
    sizes, x, w = _cuda_inputs(8, 256, 128, 700, "zeros", trans_b)
    _require_kernel("grouped_gemm", x)
    dy = torch.randn(700, 128, device="cuda", dtype=torch.bfloat16)
    results = []
    for bs in (torch.tensor(sizes), torch.tensor(sizes, device="cuda")):
        xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
        out = grouped_gemm(xs, ws, bs, trans_b=trans_b)
        out.backward(dy)
        results.append((out, xs.grad, ws.grad))
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.gpu
def test_cuda_empty_experts_never_read(gemm_kernel):
    """Forward: the weights of experts without rows are never read (NaN there changes nothing)."""
    sizes = [0, 300, 0, 0, 129, 0, 1, 0]
    x, w = make_inputs(8, 256, 512, sizes, torch.bfloat16, trans_b=False, device="cuda")
    _require_kernel("grouped_gemm", x)
    bs = torch.tensor(sizes, device="cuda")
    out = grouped_gemm(x, w, bs)
    w2 = w.clone()
    w2[[0, 2, 3, 5, 7]] = float("nan")
    assert torch.equal(grouped_gemm(x, w2, bs), out)
    assert rel_err(out, loop_float64(x, w, sizes, False)) < KERNEL_TOL


@pytest.mark.gpu
def test_cuda_kernels_are_the_path_taken(monkeypatch):
    """With a kernel on this device, supported calls never reach the references (forward and backward)."""
    sizes = [5, 0, 70, 33]
    x, w = make_inputs(4, 64, 128, sizes, torch.bfloat16, trans_b=True, device="cuda")
    for op in ("grouped_gemm", "grouped_gemm_wgrad", "moe_permute", "moe_unpermute"):
        _require_kernel(op, x)

    def forbidden(*args, **kwargs):
        raise AssertionError("the reference ran although a CUDA kernel supports the call")

    for name in ("grouped_gemm", "grouped_gemm_wgrad", "permute", "unpermute"):
        monkeypatch.setattr(ref, name, forbidden)
    x.requires_grad_()
    w.requires_grad_()
    grouped_gemm(x, w, torch.tensor(sizes, device="cuda"), trans_b=True).square().sum().backward()
    tokens = torch.randn(40, 64, device="cuda", requires_grad=True)
    probs = torch.rand(40, 8, device="cuda", requires_grad=True)
    permuted, row_map, _ = permute(tokens, routing(40, 8, 24, seed=19).cuda(), 24)
    unpermute(permuted * 2.0, row_map, probs).square().sum().backward()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,k,n", [(torch.float32, 128, 128), (torch.float16, 128, 128),
                                       (torch.float64, 64, 32), (torch.bfloat16, 129, 64),
                                       (torch.bfloat16, 128, 65), (torch.bfloat16, 7, 13)])
def test_cuda_unsupported_cases_run_the_reference(dtype, k, n):
    """Other dtypes and sizes that are not multiples of 8 take the reference loop: correct results, with
    gradients; a direct call of the registered op with them fails with the argument named."""
    sizes = [3, 0, 40, 21]
    x, w = make_inputs(4, k, n, sizes, dtype, trans_b=False, device="cuda")
    assert gg_mod.grouped_gemm_path(x, w) == "reference"
    x.requires_grad_()
    w.requires_grad_()
    out = grouped_gemm(x, w, torch.tensor(sizes, device="cuda"))
    dy = torch.randn_like(out)
    out.backward(dy)
    dx64, dw64 = _grads_float64(x, w, sizes, False, dy)
    # cuBLAS may reduce fp16 products in fp16 (allow_fp16_reduced_precision_reduction): bf16's bounds then.
    tol, grad_tol = ((TOL, GRAD_TOL) if dtype != torch.float16 else
                     ({dtype: TOL[torch.bfloat16]}, {dtype: GRAD_TOL[torch.bfloat16]}))
    assert rel_err(out, loop_float64(x, w, sizes, False)) < tol[dtype]
    assert rel_err(x.grad, dx64) < grad_tol[dtype] and rel_err(w.grad, dw64) < grad_tol[dtype]
    if _cuda_kernel_registered("grouped_gemm"):
        match = "must be bfloat16" if dtype != torch.bfloat16 else "positive multiples of 8"
        with pytest.raises(RuntimeError, match=match):
            torch.ops.k2_megatron.grouped_gemm(x.detach(), w.detach(), torch.tensor(sizes), False)


@pytest.mark.gpu
def test_cuda_non_contiguous_operands(gemm_kernel):
    """Transposed views and a dy with zero strides (as .sum().backward() gives) are made contiguous."""
    sizes = [50, 0, 14, 64]
    x, w = make_inputs(4, 64, 96, sizes, torch.bfloat16, trans_b=False, device="cuda")
    w_view = w.mT.contiguous().mT  # [E, K, N], non-contiguous
    xs, ws = x.clone().requires_grad_(), w_view.clone().requires_grad_()
    out = grouped_gemm(xs, w_view, torch.tensor(sizes, device="cuda"))
    assert rel_err(out, loop_float64(x, w, sizes, False)) < KERNEL_TOL
    grouped_gemm(xs, ws, torch.tensor(sizes, device="cuda")).sum().backward()
    dx64, dw64 = _grads_float64(x, w, sizes, False, torch.ones(128, 96, device="cuda"))
    assert rel_err(xs.grad, dx64) < KERNEL_TOL and rel_err(ws.grad, dw64) < KERNEL_TOL


@pytest.mark.gpu
def test_cuda_no_host_sync_with_device_batch_sizes(gemm_kernel):
    """batch_sizes and the router on the device: forward, backward, permute and unpermute never synchronise."""
    sizes = [100, 0, 37, 300]
    x, w = make_inputs(4, 256, 128, sizes, torch.bfloat16, trans_b=False, device="cuda")
    for op in ("grouped_gemm", "grouped_gemm_wgrad", "moe_permute", "moe_unpermute"):
        _require_kernel(op, x)
    bs = torch.tensor(sizes, device="cuda")
    x.requires_grad_()
    w.requires_grad_()
    dy = torch.randn(437, 128, device="cuda", dtype=torch.bfloat16)
    idx = routing(64, 8, 24, seed=20).cuda()
    tokens = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    probs = torch.rand(64, 8, device="cuda", requires_grad=True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        grouped_gemm(x, w, bs).backward(dy)
        grouped_gemm(x.detach(), w.detach(), bs, trans_b=False)
        permuted, row_map, counts = permute(tokens, idx, 24, check_indices=False)
        unpermute(permuted, row_map, probs).float().square().sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert int(counts.sum()) == 64 * 8


@pytest.mark.gpu
@pytest.mark.parametrize("t,k,e,h,dtype,index_dtype", [
    (512, 8, 384, 256, torch.float32, torch.int64),
    (512, 8, 384, 7168, torch.bfloat16, torch.int32),
    (300, 8, 24, 9, torch.float16, torch.int64),      # 18-byte rows: 2-byte copies
    (100, 4, 3, 5, torch.float64, torch.int32),       # duplicates within a row (random, not top-k)
    (3000, 2, 5, 64, torch.bfloat16, torch.int64),    # several chunks of 1024 pairs
    (0, 8, 16, 32, torch.bfloat16, torch.int64),
])
def test_cuda_permute_matches_cpu(t, k, e, h, dtype, index_dtype):
    """The counting sort gives exactly the reference's stable order, counts and rows."""
    idx = routing(t, k, e, seed=t + e, distinct=k <= e and dtype != torch.float64).to(index_dtype)
    tokens = torch.randn(t, h).to(dtype)
    cpu = permute(tokens, idx, e)
    gpu = permute(tokens.cuda(), idx.cuda(), e)
    for a, b in zip(cpu, gpu):
        assert b.device.type == "cuda" and a.dtype == b.dtype
        assert torch.equal(a, b.cpu())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("probs_dtype", [torch.float32, torch.bfloat16, None])
def test_cuda_unpermute_matches_cpu(dtype, probs_dtype):
    """Same fp32 products and sums in the same order as the reference: bitwise equal (float64 runs the
    reference on the GPU: equal up to rounding)."""
    t, k, h = 200, 8, 7168 if dtype == torch.bfloat16 else 33
    permuted = torch.randn(t * k, h).to(dtype)
    row_map = torch.randperm(t * k, generator=torch.Generator().manual_seed(21)).view(t, k)
    probs = None if probs_dtype is None else torch.rand(t, k).to(probs_dtype)
    want = unpermute(permuted, row_map, probs)
    got = unpermute(permuted.cuda(), row_map.cuda(), None if probs is None else probs.cuda())
    assert got.dtype == dtype and got.shape == (t, h)
    if dtype == torch.float64:
        torch.testing.assert_close(got.cpu(), want, rtol=1e-12, atol=1e-12)
    else:
        assert torch.equal(got.cpu(), want)


@pytest.mark.gpu
def test_cuda_permute_unpermute_gradients_and_determinism():
    t, k, e = 512, 8, 384
    idx = routing(t, k, e, seed=17)
    tokens = torch.randn(t, 256)
    probs = torch.rand(t, k)
    scale = torch.randn(t * k, 256)

    def run(device):
        tk = tokens.to(device).requires_grad_()
        pr = probs.to(device).requires_grad_()
        permuted, row_map, _ = permute(tk, idx.to(device), e)
        out = unpermute(permuted * scale.to(device), row_map, pr)
        out.square().sum().backward()
        return out, tk.grad, pr.grad

    cpu = run("cpu")
    gpu = [run("cuda") for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*gpu))  # bitwise deterministic on the GPU
    for a, b in zip(cpu, gpu[0]):
        torch.testing.assert_close(b.cpu(), a, rtol=1e-5, atol=1e-5)
