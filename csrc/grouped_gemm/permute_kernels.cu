// MoE token permute / unpermute kernels (see permute.h for the algorithm and its guarantees).
#include "grouped_gemm/permute.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common/block_scan.cuh"
#include "common/float_convert.cuh"

namespace k2 {
namespace {

constexpr int kThreads = 256;
constexpr int kScanThreads = 1024;
constexpr int kUnpermuteThreads = 128;

template <class Index>
__device__ __forceinline__ int expert_of(const Index* indices, int64_t i, int num_experts) {
  const Index e = indices[i];
  return (e >= 0 && e < num_experts) ? static_cast<int>(e) : -1;
}

// 1. counts[chunk, e] = number of pairs of this chunk routed to expert e.
template <class Index>
__global__ void __launch_bounds__(kThreads) chunk_histogram_kernel(const Index* __restrict__ indices, int64_t pairs,
                                                                   int num_experts, int32_t* __restrict__ counts) {
  extern __shared__ int32_t hist[];
  for (int e = threadIdx.x; e < num_experts; e += kThreads) hist[e] = 0;
  __syncthreads();
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * kPermuteChunk;
  const int64_t end = min(begin + kPermuteChunk, pairs);
  for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) {
    const int e = expert_of(indices, i, num_experts);
    if (e >= 0) atomicAdd(&hist[e], 1);  // integer counts: the order of the additions does not matter
  }
  __syncthreads();
  int32_t* row = counts + static_cast<int64_t>(blockIdx.x) * num_experts;
  for (int e = threadIdx.x; e < num_experts; e += kThreads) row[e] = hist[e];
}

// 2. One block: counts[c, e] <- sum of counts[c' < c, e]; tokens_per_expert[e] = the total;
//    expert_start[e] = sum of tokens_per_expert[e' < e].
__global__ void __launch_bounds__(kScanThreads) expert_offsets_kernel(int32_t* __restrict__ counts, int64_t chunks,
                                                                      int num_experts,
                                                                      int64_t* __restrict__ tokens_per_expert,
                                                                      int64_t* __restrict__ expert_start) {
  for (int e = threadIdx.x; e < num_experts; e += kScanThreads) {
    int64_t running = 0;
    for (int64_t c = 0; c < chunks; ++c) {
      int32_t* cell = counts + c * num_experts + e;
      const int32_t v = *cell;
      *cell = static_cast<int32_t>(running);  // < T*k per chunk-prefix of one expert: checked on the host
      running += v;
    }
    tokens_per_expert[e] = running;
  }
  __syncthreads();  // makes this block's global writes visible to all of its threads

  // Exclusive scan over experts; each thread owns a contiguous run of them.
  int begin, end;
  int64_t start = block_run_exclusive_sum<kScanThreads>(
      num_experts, [tokens_per_expert](int e) { return tokens_per_expert[e]; }, begin, end);
  for (int e = begin; e < end; ++e) {
    expert_start[e] = start;
    start += tokens_per_expert[e];
  }
}

// 3. Stable ranks within the chunk, row_map, and the row copies. Vec is the copy unit (16, 8, 4, 2 or 1
//    bytes: the largest that divides the row size and both base addresses).
template <class Index, class Vec>
__global__ void __launch_bounds__(kThreads) permute_scatter_kernel(PermuteArgs args) {
  extern __shared__ int64_t smem[];
  int64_t* next = smem;                        // [E]: the next free row of each expert for this chunk
  int64_t* dest = smem + args.num_experts;     // [kPermuteChunk]: destination row of each pair
  const auto* indices = static_cast<const Index*>(args.indices);
  const int64_t pairs = args.num_tokens * args.k;
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * kPermuteChunk;
  const int count = static_cast<int>(min(static_cast<int64_t>(kPermuteChunk), pairs - begin));
  const int32_t* chunk_prefix = args.chunk_counts + static_cast<int64_t>(blockIdx.x) * args.num_experts;
  for (int e = threadIdx.x; e < args.num_experts; e += kThreads) next[e] = args.expert_start[e] + chunk_prefix[e];
  __syncthreads();

  if (threadIdx.x < 32) {
    // One warp walks the chunk in order, 32 pairs at a time: a pair's rank among the pairs of its expert
    // is the count of earlier lanes with the same expert, on top of the expert's running offset.
    const int lane = threadIdx.x;
    const unsigned lanes_before = (1u << lane) - 1u;
    for (int base = 0; base < count; base += 32) {
      const int local = base + lane;
      const int e = local < count ? expert_of(indices, begin + local, args.num_experts) : -1;
      const unsigned peers = __match_any_sync(0xffffffffu, e);
      int64_t row = -1;
      if (e >= 0) row = next[e] + __popc(peers & lanes_before);
      __syncwarp();
      if (e >= 0 && (peers & lanes_before) == 0) next[e] += __popc(peers);  // the first peer advances it
      __syncwarp();
      if (local < count) {
        dest[local] = row;
        args.row_map[begin + local] = row;
      }
    }
  }
  __syncthreads();

  // Copies: each warp moves whole rows, its lanes striding over the row's vectors.
  const int64_t vecs = args.row_bytes / static_cast<int64_t>(sizeof(Vec));
  const auto* tokens = static_cast<const Vec*>(args.tokens);
  auto* permuted = static_cast<Vec*>(args.permuted);
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  for (int local = warp; local < count; local += kThreads / 32) {
    const int64_t row = dest[local];
    if (row < 0) continue;
    const Vec* src = tokens + ((begin + local) / args.k) * vecs;
    Vec* dst = permuted + row * vecs;
    for (int64_t v = lane; v < vecs; v += 32) dst[v] = src[v];
  }
}

// One block per token; each thread owns V consecutive columns (V * sizeof(T) = 16 bytes when the rows
// allow, else 1). The explicit _rn operations keep nvcc from fusing them into an FMA, so the result is
// the reference's (fp32 products, then fp32 sums in the order j = 0..k-1).
template <class T, class P, int V>
__global__ void __launch_bounds__(kUnpermuteThreads) unpermute_kernel(UnpermuteArgs args) {
  struct alignas(sizeof(T) * V) Pack {
    T v[V];
  };
  const int64_t t = blockIdx.x;
  const auto* permuted = static_cast<const Pack*>(args.permuted);
  const auto* probs = static_cast<const P*>(args.probs);
  auto* out = static_cast<Pack*>(args.out);
  const int64_t packs = args.hidden / V;
  for (int64_t h = threadIdx.x; h < packs; h += kUnpermuteThreads) {
    float acc[V];
#pragma unroll
    for (int i = 0; i < V; ++i) acc[i] = 0.0f;
    for (int64_t j = 0; j < args.k; ++j) {
      const int64_t row = args.row_map[t * args.k + j];
      if (row < 0 || row >= args.rows) continue;
      const Pack x = permuted[row * packs + h];
      if (probs == nullptr) {
#pragma unroll
        for (int i = 0; i < V; ++i) acc[i] = __fadd_rn(acc[i], to_float(x.v[i]));
      } else {
        const float p = to_float(probs[t * args.k + j]);
#pragma unroll
        for (int i = 0; i < V; ++i) acc[i] = __fadd_rn(acc[i], __fmul_rn(to_float(x.v[i]), p));
      }
    }
    Pack y;
#pragma unroll
    for (int i = 0; i < V; ++i) y.v[i] = from_float<T>(acc[i]);
    out[t * packs + h] = y;
  }
}

template <class T, class P>
void launch_unpermute_typed(const UnpermuteArgs& args, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const bool vector = args.hidden % kVec == 0 && reinterpret_cast<uintptr_t>(args.permuted) % 16 == 0 &&
                      reinterpret_cast<uintptr_t>(args.out) % 16 == 0;
  const dim3 grid(static_cast<unsigned>(args.num_tokens));
  if (vector) {
    unpermute_kernel<T, P, kVec><<<grid, kUnpermuteThreads, 0, stream>>>(args);
  } else {
    unpermute_kernel<T, P, 1><<<grid, kUnpermuteThreads, 0, stream>>>(args);
  }
}

template <class T>
void launch_unpermute_probs(const UnpermuteArgs& args, cudaStream_t stream) {
  switch (args.probs_dtype) {
    case MoeDtype::kFloat32: return launch_unpermute_typed<T, float>(args, stream);
    case MoeDtype::kFloat16: return launch_unpermute_typed<T, __half>(args, stream);
    case MoeDtype::kBFloat16: return launch_unpermute_typed<T, __nv_bfloat16>(args, stream);
  }
}

template <class Index, class Vec>
cudaError_t launch_scatter(const PermuteArgs& args, int64_t chunks, cudaStream_t stream) {
  const size_t smem = (static_cast<size_t>(args.num_experts) + kPermuteChunk) * sizeof(int64_t);
  auto* kernel = &permute_scatter_kernel<Index, Vec>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  if (err != cudaSuccess) return err;
  kernel<<<static_cast<unsigned>(chunks), kThreads, smem, stream>>>(args);
  return cudaGetLastError();
}

template <class Index>
cudaError_t launch_permute_typed(const PermuteArgs& args, cudaStream_t stream) {
  const int64_t pairs = args.num_tokens * args.k;
  const int64_t chunks = (pairs + kPermuteChunk - 1) / kPermuteChunk;
  const auto* indices = static_cast<const Index*>(args.indices);
  const size_t hist_smem = static_cast<size_t>(args.num_experts) * sizeof(int32_t);
  cudaError_t err = cudaFuncSetAttribute(&chunk_histogram_kernel<Index>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(hist_smem));
  if (err != cudaSuccess) return err;
  chunk_histogram_kernel<Index><<<static_cast<unsigned>(chunks), kThreads, hist_smem, stream>>>(
      indices, pairs, args.num_experts, args.chunk_counts);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  expert_offsets_kernel<<<1, kScanThreads, 0, stream>>>(args.chunk_counts, chunks, args.num_experts,
                                                         args.tokens_per_expert, args.expert_start);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;

  // The widest copy unit that divides the row and both base addresses.
  const uintptr_t align = reinterpret_cast<uintptr_t>(args.tokens) | reinterpret_cast<uintptr_t>(args.permuted) |
                          static_cast<uintptr_t>(args.row_bytes);
  if (align % 16 == 0) return launch_scatter<Index, uint4>(args, chunks, stream);
  if (align % 8 == 0) return launch_scatter<Index, uint2>(args, chunks, stream);
  if (align % 4 == 0) return launch_scatter<Index, uint32_t>(args, chunks, stream);
  if (align % 2 == 0) return launch_scatter<Index, uint16_t>(args, chunks, stream);
  return launch_scatter<Index, uint8_t>(args, chunks, stream);
}

}  // namespace

int64_t permute_chunk_count_elements(int64_t pairs, int num_experts) {
  return (pairs + kPermuteChunk - 1) / kPermuteChunk * num_experts;
}

cudaError_t launch_moe_permute(const PermuteArgs& args, cudaStream_t stream) {
  return args.indices_int64 ? launch_permute_typed<int64_t>(args, stream) : launch_permute_typed<int32_t>(args, stream);
}

cudaError_t launch_moe_unpermute(const UnpermuteArgs& args, cudaStream_t stream) {
  switch (args.dtype) {
    case MoeDtype::kFloat32: launch_unpermute_probs<float>(args, stream); break;
    case MoeDtype::kFloat16: launch_unpermute_probs<__half>(args, stream); break;
    case MoeDtype::kBFloat16: launch_unpermute_probs<__nv_bfloat16>(args, stream); break;
  }
  return cudaGetLastError();
}

}  // namespace k2
