// Device-side construction of the per-expert GEMM problems of a grouped GEMM (see grouped_gemm.h):
// one block scans batch_sizes into row offsets and hands every expert's problem to an arch-specific
// writer, which stores it in the layout its CUTLASS kernel reads. Nothing is copied to the host.
#pragma once

#include <cuda_bf16.h>

#include <cstdint>

#include "common/block_scan.cuh"
#include "grouped_gemm/grouped_gemm.h"

namespace k2 {

// One expert's GEMM D[m, n] = A[m, k] B[k, n] with leading dimensions (row pitch in elements of the
// stored matrix: A is row-major except in kWgrad, where it is column-major).
struct GroupProblem {
  int m, n, k;
  const __nv_bfloat16* a;
  const __nv_bfloat16* b;
  __nv_bfloat16* d;
  int64_t lda, ldb, ldd;
};

__device__ __forceinline__ GroupProblem make_group_problem(const GroupedGemmArgs& args, int e, int64_t start,
                                                           int64_t size) {
  const auto* a = static_cast<const __nv_bfloat16*>(args.a);
  const auto* b = static_cast<const __nv_bfloat16*>(args.b);
  auto* d = static_cast<__nv_bfloat16*>(args.d);
  GroupProblem p;
  if (args.layout == GroupedGemmLayout::kWgrad) {
    // d[e] [k, n] = a_e^T b_e: A = a_e^T is the column-major view of a's rows (pitch k), B = b_e row-major.
    // An expert without rows is an empty problem (no tiles), not a K = 0 one: d[e] is zeroed separately.
    const bool empty = size == 0;
    p.m = empty ? 0 : static_cast<int>(args.k);
    p.n = empty ? 0 : static_cast<int>(args.n);
    p.k = static_cast<int>(size);
    p.a = a + start * args.k;
    p.b = b + start * args.n;
    p.d = d + static_cast<int64_t>(e) * args.k * args.n;
    p.lda = args.k;
    p.ldb = args.n;
    p.ldd = args.n;
  } else {
    // out rows of e = x_e @ w[e] (w[e] [k, n] row-major) or x_e @ w[e]^T (w[e] [n, k]: B column-major).
    p.m = static_cast<int>(size);
    p.n = static_cast<int>(args.n);
    p.k = static_cast<int>(args.k);
    p.a = a + start * args.k;
    p.b = b + static_cast<int64_t>(e) * args.k * args.n;
    p.d = d + start * args.n;
    p.lda = args.k;
    p.ldb = args.layout == GroupedGemmLayout::kForwardKN ? args.n : args.k;
    p.ldd = args.n;
  }
  return p;
}

// The rows [first, first + size) of a that an expert's problem covers, given the sum `start` of the (negative
// counting as 0) sizes before it: rows past T are dropped, so that sizes summing past T never reach memory
// outside the tensors. The one definition for the GEMM problems and for the zeroing of empty wgrad experts.
struct GroupRows {
  int64_t first, size;
};

// Rows an entry of batch_sizes counts for: negative sizes count as 0.
__host__ __device__ __forceinline__ int64_t counted_rows(int64_t batch_size) { return batch_size > 0 ? batch_size : 0; }

__host__ __device__ __forceinline__ GroupRows clamp_group_rows(int64_t start, int64_t batch_size, int64_t rows) {
  const int64_t first = start < rows ? start : rows;
  const int64_t size = counted_rows(batch_size);
  return {first, size < rows - first ? size : rows - first};
}

constexpr int kGroupSetupThreads = 256;

// Exclusive prefix sum of the (clamped) batch sizes in one block; write(e, problem) for every expert.
// Each thread owns a contiguous run of experts, so any number of experts works.
template <class Writer>
__global__ void __launch_bounds__(kGroupSetupThreads) build_group_problems_kernel(GroupedGemmArgs args,
                                                                                  Writer write) {
  const int64_t* sizes = args.batch_sizes;
  int begin, end;
  int64_t start = block_run_exclusive_sum<kGroupSetupThreads>(
      args.num_groups, [sizes](int e) { return counted_rows(sizes[e]); }, begin, end);

  for (int e = begin; e < end; ++e) {
    const GroupRows group = clamp_group_rows(start, sizes[e], args.rows);
    write(e, make_group_problem(args, e, group.first, group.size));
    start += counted_rows(sizes[e]);
  }
}

constexpr size_t kWorkspaceAlign = 256;

__host__ __device__ constexpr size_t align_up(size_t bytes) {
  return (bytes + kWorkspaceAlign - 1) / kWorkspaceAlign * kWorkspaceAlign;
}

}  // namespace k2
