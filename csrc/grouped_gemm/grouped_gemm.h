// MoE grouped GEMM on tensor cores (bf16 in, fp32 accumulation, bf16 out); conventions in
// k2_megatron/ops/reference/grouped_gemm.py. The rows of the row operand(s) are grouped by expert,
// batch_sizes[e] consecutive rows for expert e, and one launch covers every expert:
//
//   kForwardKN:  d[rows of e] = a[rows of e] @ b[e]      a = x [T, K], b = w [E, K, N], d = out [T, N]
//   kForwardNK:  d[rows of e] = a[rows of e] @ b[e]^T    a = x [T, K], b = w [E, N, K], d = out [T, N]
//   kWgrad:      d[e] = a[rows of e]^T @ b[rows of e]    a [T, K], b [T, N], d [E, K, N]
//
// (here K is the width of a, N the width of d). The backward passes map onto these: dgrad is a forward
// with the other w layout; wgrad is kWgrad with (a, b) = (x, dy), or (dy, x) for the trans_b layout.
//
// The problem sizes and operand pointers of every expert are built on the device from batch_sizes by a
// one-block kernel, so no host synchronisation happens. Sizes are clamped so that nothing outside a's
// rows is ever touched: negative sizes count as 0 and rows past T are dropped (such input is a caller
// error; the op layer checks host sizes). In kWgrad, experts without rows (after clamping) get exactly zero d[e].
//
// Requirements (checked by the host code, csrc/grouped_gemm/grouped_gemm.cpp): all tensors contiguous
// bf16 with 16-byte aligned base pointers, K and N positive multiples of 8 (16-byte rows, as TMA and the
// 128-bit cp.async need), T < 2^31.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace k2 {

enum class GroupedGemmLayout : int { kForwardKN = 0, kForwardNK = 1, kWgrad = 2 };

struct GroupedGemmArgs {
  GroupedGemmLayout layout;
  const int64_t* batch_sizes;  // device, [num_groups]
  int num_groups;
  int64_t rows;  // T
  int64_t k;     // width of a
  int64_t n;     // width of d
  const void* a;
  const void* b;
  void* d;
  int device;
  int sm_count;
};

// One specialisation per (architecture, layout), each defined in its own .cu file (instantiations/, generated
// from one arch x layout table by generate_instantiations.py) so that ninja compiles them in parallel.
//   *_workspace_size: device bytes a launch needs (per-expert arrays and the CUTLASS workspace).
//   launch_*: enqueues on `stream`; workspace holds those bytes, 256-byte aligned. Returns the first launch
//   error (cudaSuccess when every kernel launched).
template <GroupedGemmLayout L>
size_t grouped_gemm_sm90_workspace_size(int num_groups, int sm_count);
template <GroupedGemmLayout L>
cudaError_t launch_grouped_gemm_sm90(const GroupedGemmArgs& args, void* workspace, cudaStream_t stream);
template <GroupedGemmLayout L>
size_t grouped_gemm_sm80_workspace_size(int num_groups, int sm_count);
template <GroupedGemmLayout L>
cudaError_t launch_grouped_gemm_sm80(const GroupedGemmArgs& args, void* workspace, cudaStream_t stream);

// kWgrad helper: d[e] = 0 for every expert e without rows after clamping (batch_sizes[e] <= 0, or the rows
// before it already reach T; d is [num_groups, k, n] bf16): the GEMM kernels skip those experts (a CUTLASS
// mainloop with no k-tiles leaves its tile unwritten).
cudaError_t launch_zero_empty_groups(const GroupedGemmArgs& args, cudaStream_t stream);

}  // namespace k2
