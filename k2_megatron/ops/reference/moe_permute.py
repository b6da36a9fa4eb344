"""Reference token permutation for the MoE experts (K2 report section 1), for a router that sends token ``t``
to experts ``topk_indices[t, 0..k-1]``:

* ``permute`` copies every (token, choice) pair into one row of ``permuted`` [T*k, H], sorted by expert
  (a stable sort on the expert index, so rows of one expert keep the order t*k + j: deterministic);
* ``row_map`` [T, k] int64 says where each copy went: ``permuted[row_map[t, j]] == tokens[t]``;
* ``unpermute`` gathers the k copies of each token back and sums them weighted by ``topk_probs``.

Because ``row_map`` is a bijection onto the rows of ``permuted``, every direction (forward and backward of
both functions) is a gather or a collision-free write: no atomics, bitwise deterministic on every device.
Sums over the k copies accumulate in at least fp32, in the fixed order j = 0..k-1.
"""

import torch


def _acc_dtype(*dtypes: torch.dtype) -> torch.dtype:
    out = torch.float32
    for d in dtypes:
        out = torch.promote_types(out, d)
    return out


def invert_row_map(row_map: torch.Tensor) -> torch.Tensor:
    """source [T*k]: source[row_map[t, j]] = t*k + j, i.e. which (token, choice) each permuted row holds."""
    flat = row_map.reshape(-1)
    source = torch.empty_like(flat)
    source.scatter_(0, flat, torch.arange(flat.numel(), device=flat.device, dtype=flat.dtype))
    return source


def permute(tokens: torch.Tensor, topk_indices: torch.Tensor,
            num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sort the k copies of every token by expert.

    tokens [T, H]; topk_indices [T, k] integers in [0, num_experts). Returns
    permuted [T*k, H] (rows of expert 0 first; within an expert, by t*k + j),
    row_map [T, k] int64 (permuted[row_map[t, j]] == tokens[t]) and
    tokens_per_expert [num_experts] int64 (the batch_sizes of grouped_gemm on ``permuted``).
    """
    k = topk_indices.shape[1]
    flat = topk_indices.reshape(-1).to(torch.int64)
    source = torch.argsort(flat, stable=True)  # permuted row p holds pair source[p] = t*k + j
    row_map = torch.empty_like(source)
    row_map.scatter_(0, source, torch.arange(source.numel(), device=source.device, dtype=source.dtype))
    permuted = tokens.index_select(0, torch.div(source, k, rounding_mode="floor"))
    tokens_per_expert = torch.bincount(flat, minlength=num_experts)
    return permuted, row_map.view(topk_indices.shape), tokens_per_expert


def unpermute(permuted: torch.Tensor, row_map: torch.Tensor, topk_probs: torch.Tensor | None) -> torch.Tensor:
    """out[t] = sum_j topk_probs[t, j] * permuted[row_map[t, j]]  (plain sum when ``topk_probs`` is None).

    permuted [T*k, H]; row_map [T, k]; returns [T, H] in permuted's dtype, accumulated in at least fp32
    over j = 0..k-1 in order (the loop is over the k choices only, never over tokens).
    """
    acc = _acc_dtype(permuted.dtype, *(() if topk_probs is None else (topk_probs.dtype,)))
    out = permuted.new_zeros((row_map.shape[0], permuted.shape[1]), dtype=acc)
    for j in range(row_map.shape[1]):
        rows = permuted.index_select(0, row_map[:, j]).to(acc)
        if topk_probs is not None:
            rows = rows * topk_probs[:, j, None].to(acc)
        out += rows
    return out.to(permuted.dtype)


def unpermute_grad_permuted(grad_out: torch.Tensor, row_map: torch.Tensor,
                            topk_probs: torch.Tensor | None) -> torch.Tensor:
    """d_permuted[row_map[t, j]] = topk_probs[t, j] * grad_out[t]: a gather through the inverse map, in
    grad_out's dtype (which is permuted's: unpermute returns permuted's dtype)."""
    k = row_map.shape[1]
    source = invert_row_map(row_map)
    rows = grad_out.index_select(0, torch.div(source, k, rounding_mode="floor"))
    if topk_probs is None:
        return rows
    acc = _acc_dtype(grad_out.dtype, topk_probs.dtype)
    return (rows.to(acc) * topk_probs.reshape(-1).index_select(0, source)[:, None].to(acc)).to(grad_out.dtype)


def unpermute_grad_probs(grad_out: torch.Tensor, permuted: torch.Tensor, row_map: torch.Tensor,
                         probs_dtype: torch.dtype) -> torch.Tensor:
    """d_probs[t, j] = <grad_out[t], permuted[row_map[t, j]]>, accumulated in at least fp32 and returned in
    ``probs_dtype`` (the loop runs over the k choices only)."""
    acc = _acc_dtype(grad_out.dtype, permuted.dtype, probs_dtype)
    g = grad_out.to(acc)
    cols = [(permuted.index_select(0, row_map[:, j]).to(acc) * g).sum(-1) for j in range(row_map.shape[1])]
    return torch.stack(cols, dim=1).to(probs_dtype)
