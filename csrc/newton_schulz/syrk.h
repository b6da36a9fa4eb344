// Batched symmetric rank-k update in bf16 with fp32 accumulation:
//   C[b] = alpha * X[b] X[b]^T + beta * D[b]
// X [batch, n, k] row-major (unit column stride), C and D [batch, n, n]. Only the lower-triangle tiles
// are computed; each is written to both triangles, so C is exactly symmetric. D (may be null) must be
// symmetric: the mirrored tile reads D^T, which is the same tensor only then.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace k2 {

struct SyrkProblem {
  const void* x;  // __nv_bfloat16
  int64_t x_batch_stride;
  int64_t x_row_stride;
  const void* d;  // __nv_bfloat16 or nullptr
  int64_t d_batch_stride;
  int64_t d_row_stride;
  void* c;  // __nv_bfloat16
  int64_t c_batch_stride;
  int64_t c_row_stride;
  int batch;
  int n;
  int k;
  float alpha;
  float beta;
};

// Returns the launch error (cudaSuccess when launched). Any batch size; n, k >= 0, any values.
cudaError_t launch_syrk_bf16(const SyrkProblem& p, cudaStream_t stream);

}  // namespace k2
