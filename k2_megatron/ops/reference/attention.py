"""Reference MLA attention with per-head max logits (K2 report sections 1-2: QK-Clip needs S_max^h).

    S = softmax_scale * Q K^T  (masked positions -> -inf);  P = softmax(S) row-wise;  O = P V
    lse_i = log sum_j exp(S_ij);   max_logits[h] = max over batch, query i, unmasked key j of S_ij

Memory is O(s * chunk_size): the keys are processed in chunks with an online softmax (running row max m,
running sum l, rescaled accumulator), and the backward recomputes P = exp(S - lse) chunk by chunk from the
saved lse (FlashAttention-2's backward, D_i = sum_d dO_id O_id):

    dV = P^T dO;  dP = dO V^T;  dS = P * (dP - D);  dQ = scale * dS K;  dK = scale * dS^T Q

Conventions (shared by the CUDA kernels, which are tested against these functions):
- Dense layout: q, k [b, s, h, d_qk], v [b, s_k, h, d_v] with any strides; out [b, s_q, h, d_v] contiguous,
  lse [b, h, s_q]. Varlen (packed) layout: q [total_q, h, d_qk], k [total_k, h, d_qk], v [total_k, h, d_v],
  cu_seqlens_{q,k} int32 [n + 1] (offsets of the n sequences, like flash_attn_varlen_func); out
  [total_q, h, d_v], lse [h, total_q].
- Causal masking with s_q != s_k is aligned to the bottom-right corner (FlashAttention >= 2.1): query i
  sees key j iff j <= i + s_k - s_q. For s_q == s_k this is the usual lower triangle.
- Arithmetic in float32 for bf16/fp16/fp32 inputs, float64 for float64 inputs; out, dq, dk, dv come back
  in the input dtype, lse in the compute dtype, max_logits always float32 [h].
- A query row with no visible key gets out = 0, lse = -inf and zero gradients (never NaN); a head with no
  visible (query, key) pair at all gets max_logits = -inf.
"""

import torch

# Keys per chunk: the score tile is [b, h, s_q, chunk_size] in the compute dtype.
DEFAULT_CHUNK_SIZE = 256


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _bhsd(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # One contiguous [b, h, s, d] copy in the compute dtype, so that the per-chunk matmuls need no copies.
    return x.permute(0, 2, 1, 3).to(dtype, memory_format=torch.contiguous_format)


def _first_visible_row(c0: int, s_q: int, s_k: int, causal: bool) -> int:
    """First query row that sees any key of a chunk starting at key c0 (earlier rows are fully masked)."""
    return max(0, c0 - (s_k - s_q)) if causal else 0


def _chunk_scores(qh, kh, q0, c0, c1, s_q, s_k, causal, scale):
    """S for query rows q0.. and keys c0..c1-1: [b, h, s_q - q0, c1 - c0], masked entries -inf."""
    scores = torch.matmul(qh[:, :, q0:], kh[:, :, c0:c1].transpose(-1, -2)) * scale
    if causal:
        rows = torch.arange(q0, s_q, device=scores.device).unsqueeze(1) + (s_k - s_q)
        cols = torch.arange(c0, c1, device=scores.device).unsqueeze(0)
        scores = scores.masked_fill(cols > rows, float("-inf"))
    return scores


def _dense_forward(q, k, v, causal, softmax_scale, chunk_size):
    """Core of the forward on [b, s, h, d] views: (out, lse, max_logits) with out in the compute dtype."""
    cdt = _compute_dtype(q.dtype)
    b, s_q, h, _ = q.shape
    s_k, d_v = k.shape[1], v.shape[3]
    qh, kh, vh = (_bhsd(t, cdt) for t in (q, k, v))
    row_max = torch.full((b, h, s_q), float("-inf"), dtype=cdt, device=q.device)
    row_sum = torch.zeros((b, h, s_q), dtype=cdt, device=q.device)
    acc = torch.zeros((b, h, s_q, d_v), dtype=cdt, device=q.device)
    for c0 in range(0, s_k, chunk_size):
        c1 = min(c0 + chunk_size, s_k)
        q0 = _first_visible_row(c0, s_q, s_k, causal)
        if q0 >= s_q:
            break  # causal: later chunks are invisible to every row
        scores = _chunk_scores(qh, kh, q0, c0, c1, s_q, s_k, causal, softmax_scale)
        m_old = row_max[:, :, q0:]
        m_new = torch.maximum(m_old, scores.amax(dim=-1))
        # Rows that have seen no key yet keep m = -inf; subtract 0 there so exp() gives 0, not NaN.
        m_safe = torch.where(torch.isneginf(m_new), torch.zeros_like(m_new), m_new)
        alpha = torch.exp(m_old - m_safe)
        p = torch.exp(scores - m_safe.unsqueeze(-1))
        row_sum[:, :, q0:] = row_sum[:, :, q0:] * alpha + p.sum(dim=-1)
        acc[:, :, q0:] = acc[:, :, q0:] * alpha.unsqueeze(-1) + torch.matmul(p, vh[:, :, c0:c1])
        row_max[:, :, q0:] = m_new
    empty = row_sum == 0
    out = acc / torch.where(empty, torch.ones_like(row_sum), row_sum).unsqueeze(-1)
    lse = torch.where(empty, torch.full_like(row_max, float("-inf")), row_max + torch.log(row_sum))
    if row_max.numel() == 0:  # b == 0 or s_q == 0: no logit at all
        max_logits = torch.full((h,), float("-inf"), dtype=cdt, device=q.device)
    else:
        max_logits = row_max.amax(dim=(0, 2))
    return out.permute(0, 2, 1, 3), lse, max_logits.to(torch.float32)


def _dense_backward(grad_out, q, k, v, out, lse, causal, softmax_scale, chunk_size):
    """Core of the backward on [b, s, h, d] views: (dq, dk, dv) in the compute dtype, [b, h, s, d] layout."""
    cdt = _compute_dtype(q.dtype)
    s_q, s_k = q.shape[1], k.shape[1]
    qh, kh, vh, doh = (_bhsd(t, cdt) for t in (q, k, v, grad_out))
    delta = (doh * out.to(cdt).permute(0, 2, 1, 3)).sum(dim=-1)  # D_i = dO_i . O_i, [b, h, s_q]
    lse = lse.to(cdt)
    # exp(S - lse) with lse = -inf (row with no visible key) must be 0: use +inf there.
    lse_safe = torch.where(torch.isneginf(lse), torch.full_like(lse, float("inf")), lse)
    dq = torch.zeros_like(qh)
    dk = torch.zeros_like(kh)
    dv = torch.zeros_like(vh)
    for c0 in range(0, s_k, chunk_size):
        c1 = min(c0 + chunk_size, s_k)
        q0 = _first_visible_row(c0, s_q, s_k, causal)
        if q0 >= s_q:
            break
        scores = _chunk_scores(qh, kh, q0, c0, c1, s_q, s_k, causal, softmax_scale)
        p = torch.exp(scores - lse_safe[:, :, q0:].unsqueeze(-1))
        dv[:, :, c0:c1] = torch.matmul(p.transpose(-1, -2), doh[:, :, q0:])
        dp = torch.matmul(doh[:, :, q0:], vh[:, :, c0:c1].transpose(-1, -2))
        ds = p * (dp - delta[:, :, q0:].unsqueeze(-1))
        dq[:, :, q0:] += torch.matmul(ds, kh[:, :, c0:c1]) * softmax_scale
        dk[:, :, c0:c1] = torch.matmul(ds.transpose(-1, -2), qh[:, :, q0:]) * softmax_scale
    return dq, dk, dv


def _to_bshd(x_bhsd: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x_bhsd.permute(0, 2, 1, 3).to(dtype).contiguous()


def mla_attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, softmax_scale: float,
                      chunk_size: int = DEFAULT_CHUNK_SIZE):
    """Dense forward: q, k [b, s_q|s_k, h, d_qk], v [b, s_k, h, d_v] -> (out, lse, max_logits).

    out [b, s_q, h, d_v] contiguous in q's dtype; lse [b, h, s_q] in the compute dtype (float32, or float64
    for float64 inputs); max_logits float32 [h].
    """
    out, lse, max_logits = _dense_forward(q, k, v, causal, softmax_scale, chunk_size)
    return out.to(q.dtype).contiguous(), lse.contiguous(), max_logits


def mla_attention_bwd(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      out: torch.Tensor, lse: torch.Tensor, causal: bool, softmax_scale: float,
                      chunk_size: int = DEFAULT_CHUNK_SIZE):
    """Dense backward from the forward's saved out and lse: (dq, dk, dv), contiguous, in the inputs' dtype."""
    dq, dk, dv = _dense_backward(grad_out, q, k, v, out, lse, causal, softmax_scale, chunk_size)
    return _to_bshd(dq, q.dtype), _to_bshd(dk, k.dtype), _to_bshd(dv, v.dtype)


def check_cu_seqlens(op: str, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, total_q: int,
                     total_k: int, max_seqlen_q: int, max_seqlen_k: int) -> tuple[list[int], list[int]]:
    """Value checks of the offsets (this reads them on the host); returns them as lists."""
    offsets = []
    for name, cu, total, max_seqlen in (("cu_seqlens_q", cu_seqlens_q, total_q, max_seqlen_q),
                                        ("cu_seqlens_k", cu_seqlens_k, total_k, max_seqlen_k)):
        values = cu.tolist()
        if values[0] != 0:
            raise ValueError(f"{op}: {name} must start at 0, got {values[0]}")
        lengths = [b - a for a, b in zip(values[:-1], values[1:])]
        if any(n < 0 for n in lengths):
            raise ValueError(f"{op}: {name} must be non-decreasing, got {values}")
        if values[-1] != total:
            raise ValueError(f"{op}: {name} must end at the number of packed tokens {total} "
                             f"(dimension 0 of {'q' if name.endswith('q') else 'k and v'}), got {values[-1]}")
        if lengths and max(lengths) > max_seqlen:
            raise ValueError(f"{op}: max_seqlen_{name[-1]} = {max_seqlen} is smaller than the longest sequence "
                             f"of {name} ({max(lengths)})")
        offsets.append(values)
    return offsets[0], offsets[1]


def mla_attention_varlen_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                             cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, causal: bool,
                             softmax_scale: float, chunk_size: int = DEFAULT_CHUNK_SIZE):
    """Packed forward: q [total_q, h, d_qk], k [total_k, h, d_qk], v [total_k, h, d_v], sequence i being
    rows cu_seqlens[i]:cu_seqlens[i+1] -> (out [total_q, h, d_v], lse [h, total_q], max_logits float32 [h]).
    Each sequence attends to itself only; max_logits is the max over all sequences."""
    cq, ck = check_cu_seqlens("mla_attention_varlen", cu_seqlens_q, cu_seqlens_k, q.shape[0], k.shape[0],
                              max_seqlen_q, max_seqlen_k)
    h = q.shape[1]
    cdt = _compute_dtype(q.dtype)
    out = torch.zeros((q.shape[0], h, v.shape[2]), dtype=q.dtype, device=q.device)
    lse = torch.full((h, q.shape[0]), float("-inf"), dtype=cdt, device=q.device)
    max_logits = torch.full((h,), float("-inf"), dtype=torch.float32, device=q.device)
    for qs, qe, ks, ke in zip(cq[:-1], cq[1:], ck[:-1], ck[1:]):
        if qe == qs:
            continue
        o, l, m = _dense_forward(q[qs:qe].unsqueeze(0), k[ks:ke].unsqueeze(0), v[ks:ke].unsqueeze(0), causal,
                                 softmax_scale, chunk_size)
        out[qs:qe] = o[0]
        lse[:, qs:qe] = l[0]
        max_logits = torch.maximum(max_logits, m)
    return out, lse, max_logits


def mla_attention_varlen_bwd(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             out: torch.Tensor, lse: torch.Tensor, cu_seqlens_q: torch.Tensor,
                             cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, causal: bool,
                             softmax_scale: float, chunk_size: int = DEFAULT_CHUNK_SIZE):
    """Packed backward: (dq, dk, dv) shaped like q, k, v (contiguous, their dtype). Keys of an empty query
    sequence get zero gradients."""
    cq, ck = check_cu_seqlens("mla_attention_varlen", cu_seqlens_q, cu_seqlens_k, q.shape[0], k.shape[0],
                              max_seqlen_q, max_seqlen_k)
    dq = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.zeros(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.zeros(v.shape, dtype=v.dtype, device=v.device)
    for qs, qe, ks, ke in zip(cq[:-1], cq[1:], ck[:-1], ck[1:]):
        if qe == qs or ke == ks:
            continue
        g, o, l = grad_out[qs:qe].unsqueeze(0), out[qs:qe].unsqueeze(0), lse[:, qs:qe].unsqueeze(0)
        dqi, dki, dvi = _dense_backward(g, q[qs:qe].unsqueeze(0), k[ks:ke].unsqueeze(0), v[ks:ke].unsqueeze(0),
                                        o, l, causal, softmax_scale, chunk_size)
        dq[qs:qe] = dqi[0].transpose(0, 1)
        dk[ks:ke] = dki[0].transpose(0, 1)
        dv[ks:ke] = dvi[0].transpose(0, 1)
    return dq, dk, dv
