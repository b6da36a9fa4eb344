"""Reference MoE grouped GEMM: forward, dgrad, wgrad (K2 report section 1).

Grouped GEMM: the rows of ``x`` [T, K] are grouped by expert, ``batch_sizes[e]`` consecutive rows for
expert ``e``; expert ``e`` multiplies its rows by ``w[e]``. The reference is the per-expert matmul loop.
It needs the group sizes as Python ints to slice ``x``, so:

* ``batch_sizes`` on the host (CPU): no host/device synchronisation at all;
* ``batch_sizes`` on a device: exactly one synchronisation per call (one copy of the E sizes to the host).
  The CUDA kernels build their problem sizes on the device and do not synchronise.
"""

import torch


def _sizes_on_host(batch_sizes: torch.Tensor) -> list[int]:
    """The group sizes as Python ints: free for a host tensor, one synchronisation for a device tensor."""
    return batch_sizes.tolist()


def grouped_gemm(x: torch.Tensor, w: torch.Tensor, batch_sizes: torch.Tensor, trans_b: bool = False) -> torch.Tensor:
    """out[rows of e] = x[rows of e] @ w[e]  (w [E, K, N]), or @ w[e]^T with ``trans_b`` (w [E, N, K]).

    x [T, K]; batch_sizes [E] with sum T (zeros allowed); returns out [T, N] in x's dtype. Matmuls run in
    the inputs' dtype (bf16/fp16 matmuls accumulate in fp32 and round the result once).
    """
    n = w.shape[1] if trans_b else w.shape[2]
    out = x.new_empty((x.shape[0], n))
    start = 0
    for e, size in enumerate(_sizes_on_host(batch_sizes)):
        if size == 0:
            continue
        w_e = w[e].mT if trans_b else w[e]
        torch.matmul(x[start:start + size], w_e, out=out[start:start + size])
        start += size
    return out


def grouped_gemm_wgrad(x: torch.Tensor, dy: torch.Tensor, batch_sizes: torch.Tensor,
                       trans_b: bool = False) -> torch.Tensor:
    """Weight gradient of ``grouped_gemm``: dw[e] = x_e^T dy_e [K, N], or dy_e^T x_e [N, K] with ``trans_b``.

    x [T, K] and dy [T, N] grouped by ``batch_sizes`` [E]; returns dw [E, K, N] (or [E, N, K]) in x's
    dtype. Experts with no tokens get zero gradients.
    """
    k, n = x.shape[1], dy.shape[1]
    sizes = _sizes_on_host(batch_sizes)
    dw = x.new_zeros((len(sizes), n, k) if trans_b else (len(sizes), k, n))
    start = 0
    for e, size in enumerate(sizes):
        if size == 0:
            continue
        x_e, dy_e = x[start:start + size], dy[start:start + size]
        if trans_b:
            torch.matmul(dy_e.mT, x_e, out=dw[e])
        else:
            torch.matmul(x_e.mT, dy_e, out=dw[e])
        start += size
    return dw
