// MoE token permutation on the GPU; conventions in k2_megatron/ops/reference/grouped_gemm.py.
//
// permute: the T*k (token, choice) pairs, in the order i = t*k + j, are sorted by expert with a stable
// counting sort, so an expert's rows keep the order of i (exactly the reference's stable argsort):
//   1. per chunk of kPermuteChunk pairs, a histogram of the experts      -> counts [chunks, E]
//   2. one block: per expert, an exclusive scan over chunks (in place) and the total (tokens_per_expert);
//      then an exclusive scan over experts                               -> expert_start [E]
//   3. per chunk, one warp ranks the pairs in order (warp match + a running offset per expert), writes
//      row_map, and the block copies the token rows to their places in permuted.
// Everything is integer counting: the result is the same on every run. Indices outside [0, E) are
// skipped (row_map = -1, their rows of permuted are left unwritten): memory-safe, but a caller error.
//
// unpermute: out[t] = sum_j probs[t, j] * permuted[row_map[t, j]] in fp32, j = 0..k-1 in order, each
// product and sum rounded as the reference's fp32 tensor ops round them; row_map entries outside
// [0, rows of permuted) are skipped.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace k2 {

constexpr int kPermuteChunk = 1024;

enum class MoeDtype : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

struct PermuteArgs {
  const void* indices;  // [T * k], int32 or int64
  bool indices_int64;
  const void* tokens;   // [T, H], contiguous, element_size bytes per element
  int64_t num_tokens;   // T
  int64_t k;
  int64_t row_bytes;    // H * element size
  int num_experts;      // E
  int32_t* chunk_counts;       // scratch [ceil(T*k / kPermuteChunk), E]
  int64_t* expert_start;       // scratch [E]
  int64_t* tokens_per_expert;  // out [E]
  int64_t* row_map;            // out [T * k]
  void* permuted;              // out [T * k, H]
};

struct UnpermuteArgs {
  const void* permuted;  // [rows, H] contiguous
  MoeDtype dtype;        // of permuted and out
  int64_t rows;
  int64_t hidden;        // H
  const int64_t* row_map;  // [T, k]
  const void* probs;       // [T, k] or nullptr
  MoeDtype probs_dtype;
  int64_t num_tokens;  // T
  int64_t k;
  void* out;  // [T, H]
};

// Number of int32 entries of the chunk_counts scratch for `pairs` (token, choice) pairs.
int64_t permute_chunk_count_elements(int64_t pairs, int num_experts);

cudaError_t launch_moe_permute(const PermuteArgs& args, cudaStream_t stream);
cudaError_t launch_moe_unpermute(const UnpermuteArgs& args, cudaStream_t stream);

}  // namespace k2
