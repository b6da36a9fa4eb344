// MLA attention kernels (sm_80 mma.sync; the same code runs on sm_90): shared between the host code
// (attention.cpp) and the kernels (fwd_*.cu, bwd_*.cu). Conventions: k2_megatron/ops/reference/attention.py.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <utility>
#include <vector>

namespace k2 {
namespace attention {

// One attention problem, dense or packed. Every tensor is addressed as
//   base + (sequence offset) + row * row_stride + head * head_stride + column
// where the sequence offset is batch * batch_stride (dense) or cu_seqlens[batch] * row_stride (packed).
// lse and delta (float32) are addressed as
//   (dense) batch * stat_batch_stride + head * stat_head_stride + row
//   (packed) head * stat_head_stride + cu_seqlens_q[batch] + row.
struct TensorRef {
  void* ptr = nullptr;
  int64_t batch_stride = 0;
  int64_t row_stride = 0;
  int64_t head_stride = 0;
};

struct Params {
  TensorRef q, k, v;     // inputs
  TensorRef out;         // forward: written; backward: read (delta = rowsum(dO * O))
  TensorRef grad_out;    // backward only
  TensorRef grad_q, grad_k, grad_v;  // backward only (written)
  float* lse = nullptr;  // forward: written; backward: read
  float* delta = nullptr;  // backward scratch
  float* max_logits = nullptr;  // forward: [heads], atomically max-reduced (initialised to -inf by the host)
  int64_t stat_batch_stride = 0;
  int64_t stat_head_stride = 0;
  const int* cu_seqlens_q = nullptr;  // packed: [batch + 1]; nullptr: dense
  const int* cu_seqlens_k = nullptr;
  int batch = 0;  // dense: b; packed: number of sequences
  int heads = 0;
  int seqlen_q = 0;  // dense: s_q; packed: max_seqlen_q (grid size)
  int seqlen_k = 0;  // dense: s_k; packed: max_seqlen_k
  int head_dim_qk = 0;
  int head_dim_v = 0;
  bool causal = false;
  bool wgmma = false;  // the sm_90a wgmma kernels (set by attention.cpp on sm_90 devices of a 90a build)
  float softmax_scale = 1.f;
};

// Head-dim pairs (d_qk, d_v) with compiled kernels: K2's MLA (q.k 192 = 128 nope + 64 rope, v 128) and
// the square 64 / 128 heads. The one list: the kernel dispatch, the host checks and the Python op layer
// (k2_megatron._C.attention_head_dims()) all read it.
#define K2_ATTENTION_HEAD_DIMS(X) X(192, 128) X(128, 128) X(64, 64)

bool head_dims_supported(int head_dim_qk, int head_dim_v);
std::vector<std::pair<int, int>> supported_head_dims();

// One launcher per dtype (fwd_<dtype>.cu, bwd_<dtype>.cu); cudaErrorInvalidValue for unsupported head dims.
// The backward writes p.delta (float32, laid out like lse) before the dK/dV and dQ kernels read it.
template <typename T>
cudaError_t launch_forward(const Params& p, cudaStream_t stream);
template <typename T>
cudaError_t launch_backward(const Params& p, cudaStream_t stream);

}  // namespace attention
}  // namespace k2
