"""Oracles shared by the attention tests (reference op, emulated kernels, CUDA kernels): float64 naive
attention, inputs, tolerances, and the "at most 2x SDPA's error" criterion of the kernels."""

import torch

# Tolerances against float64, relative to the largest magnitude of the float64 result (atol = tol * max|ref|,
# rtol = tol). The reference computes in float32 for fp32/bf16/fp16 inputs, so bf16's error is the rounding
# of its outputs (2^-9 relative) plus, for the gradients, that of the saved bf16 out in D = rowsum(dO * O).
TOL = {
    torch.float32: {"out": 2e-5, "lse": 1e-5, "max_logits": 1e-5, "grad": 1e-4},
    torch.bfloat16: {"out": 8e-3, "lse": 1e-5, "max_logits": 1e-5, "grad": 2e-2},
    torch.float16: {"out": 1e-3, "lse": 1e-5, "max_logits": 1e-5, "grad": 4e-3},
}


# ------------------------------------------------------------------------------------------------- oracles

def naive_attention(q, k, v, causal, scale):
    """float64 attention on [b, s, h, d]: (out [b, s_q, h, d_v], lse [b, h, s_q], max_logits [h]).
    Causal masks are bottom-right aligned; a row with no visible key gives out 0 and lse -inf."""
    q, k, v = (t.to(torch.float64).permute(0, 2, 1, 3) for t in (q, k, v))
    logits = torch.matmul(q, k.transpose(-1, -2)) * scale
    s_q, s_k = logits.shape[-2:]
    if causal:
        visible = torch.ones(s_q, s_k, dtype=torch.bool, device=logits.device).tril(diagonal=s_k - s_q)
        logits = logits.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)
    probs = torch.exp(logits - torch.where(torch.isneginf(lse), 0.0, lse).unsqueeze(-1))
    out = torch.matmul(probs, v).permute(0, 2, 1, 3)
    if logits.numel():
        max_logits = logits.amax(dim=(0, 2, 3))
    else:
        max_logits = torch.full((q.shape[1],), float("-inf"), dtype=torch.float64, device=q.device)
    return out, lse, max_logits


def make_qkv(b, s, h, d_qk, d_v, dtype, seed=0, s_k=None, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    s_k = s if s_k is None else s_k
    ts = (torch.randn(b, s, h, d_qk, generator=g), torch.randn(b, s_k, h, d_qk, generator=g),
          torch.randn(b, s_k, h, d_v, generator=g))
    return tuple(t.to(dtype).requires_grad_(requires_grad) for t in ts)


def assert_close_to(actual, expected, tol, what, floor=1e-30):
    """|actual - expected| <= tol * (|expected| + max(max|expected|, floor)). `floor` is the magnitude of the
    terms that cancel where the exact result is 0 (dq with a single key)."""
    expected = expected.to(torch.float64)
    scale = expected[torch.isfinite(expected)].abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual.to(torch.float64), expected, rtol=tol, atol=tol * max(scale, floor),
                               msg=lambda m: f"{what}: {m}")


def naive_grads(q, k, v, causal, scale, grad_out):
    q64, k64, v64 = (t.detach().to(torch.float64).requires_grad_() for t in (q, k, v))
    out, _, _ = naive_attention(q64, k64, v64, causal, scale)
    return torch.autograd.grad(out, (q64, k64, v64), grad_out.to(torch.float64))


def planted_logits(s, h, b, d, head, row, col, masked_row, masked_col, dtype):
    """Integer q, k (exact in bf16, exact logit sums in fp32): background logits in [-(d-2), d-2], a planted
    logit of 256 + background at (row, col) of head `head` in the last batch element, and a planted 1024 +
    background at (masked_row, masked_col) of the same head."""
    g = torch.Generator().manual_seed(row * 131 + col)
    q = torch.randint(-1, 2, (b, s, h, d), generator=g).to(torch.float64)
    k = torch.randint(-1, 2, (b, s, h, d), generator=g).to(torch.float64)
    q[..., d - 2:] = 0
    k[..., d - 2:] = 0
    q[b - 1, row, head, d - 2] = 16
    k[b - 1, col, head, d - 2] = 16
    q[b - 1, masked_row, head, d - 1] = 32
    k[b - 1, masked_col, head, d - 1] = 32
    v = torch.randn(b, s, h, d, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype)




def check_within_2x_sdpa(out, max_logits, grads, q, k, v, grad_out, causal, scale):
    """A kernel's out and (dq, dk, dv) are within 2x the error of torch SDPA in the same precision (on the
    same device) against float64, plus about an ulp at magnitude 1 (SDPA may be exact where the kernel
    rounds once more); max_logits within float32 accumulation error of the float64 value."""
    dtype = q.dtype
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    out64, _, ml64 = naive_attention(q64, k64, v64, causal, scale)
    grads64 = torch.autograd.grad(out64, (q64, k64, v64), grad_out.double())
    qs, ks, vs = (t.detach().requires_grad_() for t in (q, k, v))
    qt, kt, vt = (t.transpose(1, 2) for t in (qs, ks, vs))
    out_sdpa = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=causal,
                                                                scale=scale).transpose(1, 2)
    grads_sdpa = torch.autograd.grad(out_sdpa, (qs, ks, vs), grad_out)
    floor = {torch.bfloat16: 2 ** -9, torch.float16: 2 ** -12}[dtype]
    for name, got, base, want in [("out", out, out_sdpa, out64)] + list(zip(("dq", "dk", "dv"), grads, grads_sdpa,
                                                                             grads64)):
        magnitude = max(want.abs().max().item(), 1.0)  # dq is exactly 0 for s = 1 (terms of size ~1 cancel)
        err = (got.double() - want).abs().max().item()
        err_sdpa = (base.double() - want).abs().max().item()
        assert err <= 2 * err_sdpa + floor * magnitude, f"{name}: error {err:.3g} vs SDPA {err_sdpa:.3g}"
    finite = torch.isfinite(ml64)
    assert torch.equal(torch.isfinite(max_logits.cpu()), finite.cpu()), (max_logits, ml64)
    torch.testing.assert_close(max_logits.double()[finite], ml64[finite], rtol=1e-5,
                               atol=1e-5 * max(ml64[finite].abs().max().item(), 1.0) if finite.any() else 0.0)
