// d[e] = 0 for the experts without rows in a grouped wgrad (see grouped_gemm.h): the GEMM kernels give
// those experts no tiles, since a mainloop with zero k-tiles would leave its accumulators unwritten. "Without
// rows" is decided as the GEMM decides it (clamp_group_rows): batch sizes summing past T leave the trailing
// experts without rows, and they too get d[e] = 0.
#include <cuda_bf16.h>

#include "common/block_scan.cuh"
#include "grouped_gemm/group_setup.cuh"
#include "grouped_gemm/grouped_gemm.h"

namespace k2 {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxBlocksPerGroup = 64;

// One 1-D grid of num_groups * blocks_per_group blocks; blocks of experts with rows return at once.
// d[e] holds vectors_per_group 16-byte vectors (k * n bf16, k and n multiples of 8).
__global__ void __launch_bounds__(kThreads) zero_empty_groups_kernel(const int64_t* __restrict__ batch_sizes,
                                                                     int64_t rows, uint4* __restrict__ d,
                                                                     int64_t vectors_per_group,
                                                                     int blocks_per_group) {
  const int e = blockIdx.x / blocks_per_group;
  const int64_t start = block_sum<kThreads>(e, [batch_sizes](int i) { return counted_rows(batch_sizes[i]); });
  if (clamp_group_rows(start, batch_sizes[e], rows).size > 0) return;
  uint4* group = d + e * vectors_per_group;
  const uint4 zero = make_uint4(0u, 0u, 0u, 0u);
  const int64_t stride = static_cast<int64_t>(blocks_per_group) * kThreads;
  for (int64_t i = static_cast<int64_t>(blockIdx.x % blocks_per_group) * kThreads + threadIdx.x;
       i < vectors_per_group; i += stride) {
    group[i] = zero;
  }
}

}  // namespace

cudaError_t launch_zero_empty_groups(const GroupedGemmArgs& args, cudaStream_t stream) {
  const int64_t vectors = args.k * args.n / 8;
  const int64_t wanted = (vectors + kThreads - 1) / kThreads;
  const int blocks_per_group = static_cast<int>(wanted < kMaxBlocksPerGroup ? (wanted > 0 ? wanted : 1)
                                                                            : kMaxBlocksPerGroup);
  zero_empty_groups_kernel<<<static_cast<unsigned>(args.num_groups) * blocks_per_group, kThreads, 0, stream>>>(
      args.batch_sizes, args.rows, static_cast<uint4*>(args.d), vectors, blocks_per_group);
  return cudaGetLastError();
}

}  // namespace k2
