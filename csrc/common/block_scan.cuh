// Prefix sums and sums over n values in one thread block, for per-expert offsets (E up to a few hundred).
#pragma once

#include <cstdint>

namespace k2 {

// Each thread of the block (THREADS threads, a multiple of 32) owns the contiguous run [begin, end) of the
// n values; value(i) reads value i. Returns the sum of the values before `begin`. Every thread of the block
// must call it (it synchronises the block).
template <int THREADS, typename Value>
__device__ __forceinline__ int64_t block_run_exclusive_sum(int n, Value value, int& begin, int& end) {
  static_assert(THREADS % 32 == 0, "whole warps");
  __shared__ int64_t warp_totals[THREADS / 32];
  const int per_thread = (n + THREADS - 1) / THREADS;
  begin = min(n, static_cast<int>(threadIdx.x) * per_thread);
  end = min(n, begin + per_thread);
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  int64_t local = 0;
  for (int i = begin; i < end; ++i) local += value(i);
  int64_t inclusive = local;
#pragma unroll
  for (int offset = 1; offset < 32; offset *= 2) {
    const int64_t v = __shfl_up_sync(0xffffffffu, inclusive, offset);
    if (lane >= offset) inclusive += v;
  }
  if (lane == 31) warp_totals[warp] = inclusive;
  __syncthreads();
  int64_t start = inclusive - local;
  for (int w = 0; w < warp; ++w) start += warp_totals[w];
  return start;
}

// The sum of value(0), ..., value(n - 1), returned to every thread of the block (THREADS threads, a multiple of
// 32). Every thread of the block must call it (it synchronises the block).
template <int THREADS, typename Value>
__device__ __forceinline__ int64_t block_sum(int n, Value value) {
  static_assert(THREADS % 32 == 0, "whole warps");
  __shared__ int64_t warp_sums[THREADS / 32];
  int64_t sum = 0;
  for (int i = threadIdx.x; i < n; i += THREADS) sum += value(i);
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
  if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = sum;
  __syncthreads();
  int64_t total = 0;
#pragma unroll
  for (int w = 0; w < THREADS / 32; ++w) total += warp_sums[w];
  return total;
}

}  // namespace k2
