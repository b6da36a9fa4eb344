// CUDA implementation of k2_megatron::moe_permute / moe_unpermute (schemas in csrc/ops.cpp); the kernels
// and their ordering guarantees are described in permute.h.
//
// permute: tokens of any dtype (rows are copied as bytes), topk_indices int32/int64, num_experts <= 4096.
// unpermute: permuted and topk_probs float32/float16/bfloat16 (the fp32 accumulation of the reference);
// float64 runs the reference through the op layer. Non-contiguous inputs are made contiguous here.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "common/check.h"
#include "grouped_gemm/permute.h"

namespace k2 {
namespace {

constexpr const char* kPermute = "k2_megatron::moe_permute";
constexpr const char* kUnpermute = "k2_megatron::moe_unpermute";
constexpr int64_t kMaxExperts = 4096;  // the per-expert counters live in shared memory

MoeDtype moe_dtype(const char* op, const char* name, at::ScalarType t) {
  switch (t) {
    case at::kFloat: return MoeDtype::kFloat32;
    case at::kHalf: return MoeDtype::kFloat16;
    case at::kBFloat16: return MoeDtype::kBFloat16;
    default: break;
  }
  TORCH_CHECK(false, op, ": ", name, " must be float32, float16 or bfloat16 (float64 runs the reference through ",
              "k2_megatron.ops.grouped_gemm), got ", t);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> moe_permute_cuda(const at::Tensor& tokens,
                                                                const at::Tensor& topk_indices, int64_t num_experts) {
  K2_CHECK_CUDA(kPermute, tokens);
  K2_CHECK_CUDA(kPermute, topk_indices);
  TORCH_CHECK(topk_indices.device() == tokens.device(), kPermute, ": topk_indices must be on tokens' device (",
              tokens.device(), "), got ", topk_indices.device());
  TORCH_CHECK(tokens.dim() == 2, kPermute, ": tokens must be 2-D [T, H], got shape ", tokens.sizes());
  TORCH_CHECK(topk_indices.dim() == 2 && topk_indices.size(0) == tokens.size(0) && topk_indices.size(1) >= 1,
              kPermute, ": topk_indices must be [T, k] with T = ", tokens.size(0), " and k >= 1, got shape ",
              topk_indices.sizes());
  const at::ScalarType index_type = topk_indices.scalar_type();
  K2_CHECK_DTYPE(kPermute, topk_indices, index_type == at::kInt || index_type == at::kLong, "int32 or int64");
  TORCH_CHECK(num_experts >= 1 && num_experts <= kMaxExperts, kPermute, ": num_experts must be in [1, ", kMaxExperts,
              "], got ", num_experts);
  const int64_t t = tokens.size(0);
  const int64_t k = topk_indices.size(1);
  TORCH_CHECK(t * k < INT32_MAX, kPermute, ": T * k must be below 2^31, got ", t, " * ", k);
  c10::cuda::CUDAGuard guard(tokens.device());
  const at::Tensor tok = tokens.contiguous();
  const at::Tensor idx = topk_indices.contiguous();
  at::Tensor permuted = at::empty({t * k, tokens.size(1)}, tok.options());
  at::Tensor row_map = at::empty({t, k}, idx.options().dtype(at::kLong));
  at::Tensor tokens_per_expert = at::zeros({num_experts}, idx.options().dtype(at::kLong));
  if (t == 0) return {permuted, row_map, tokens_per_expert};

  const int e = static_cast<int>(num_experts);
  at::Tensor chunk_counts = at::empty({permute_chunk_count_elements(t * k, e)}, idx.options().dtype(at::kInt));
  at::Tensor expert_start = at::empty({num_experts}, idx.options().dtype(at::kLong));
  PermuteArgs args{};
  args.indices = idx.data_ptr();
  args.indices_int64 = idx.scalar_type() == at::kLong;
  args.tokens = tok.data_ptr();
  args.num_tokens = t;
  args.k = k;
  args.row_bytes = tok.size(1) * tok.element_size();
  args.num_experts = e;
  args.chunk_counts = chunk_counts.data_ptr<int32_t>();
  args.expert_start = expert_start.data_ptr<int64_t>();
  args.tokens_per_expert = tokens_per_expert.data_ptr<int64_t>();
  args.row_map = row_map.data_ptr<int64_t>();
  args.permuted = permuted.data_ptr();
  K2_CHECK_CUDA_LAUNCH(kPermute, launch_moe_permute(args, c10::cuda::getCurrentCUDAStream()));
  return {permuted, row_map, tokens_per_expert};
}

at::Tensor moe_unpermute_cuda(const at::Tensor& permuted, const at::Tensor& row_map,
                              const std::optional<at::Tensor>& topk_probs) {
  K2_CHECK_CUDA(kUnpermute, permuted);
  K2_CHECK_CUDA(kUnpermute, row_map);
  TORCH_CHECK(row_map.device() == permuted.device(), kUnpermute, ": row_map must be on permuted's device (",
              permuted.device(), "), got ", row_map.device());
  TORCH_CHECK(permuted.dim() == 2, kUnpermute, ": permuted must be 2-D [T*k, H], got shape ", permuted.sizes());
  TORCH_CHECK(row_map.dim() == 2 && row_map.size(1) >= 1, kUnpermute,
              ": row_map must be [T, k] with k >= 1, got shape ", row_map.sizes());
  K2_CHECK_DTYPE(kUnpermute, row_map, row_map.scalar_type() == at::kLong, "int64");
  const MoeDtype dtype = moe_dtype(kUnpermute, "permuted", permuted.scalar_type());
  const int64_t t = row_map.size(0);
  TORCH_CHECK(t < INT32_MAX, kUnpermute, ": too many tokens for the kernel grid (", t, ")");
  c10::cuda::CUDAGuard guard(permuted.device());
  const at::Tensor src = permuted.contiguous();
  const at::Tensor map = row_map.contiguous();
  UnpermuteArgs args{};
  at::Tensor probs;
  if (topk_probs.has_value()) {
    probs = topk_probs->contiguous();
    K2_CHECK_CUDA(kUnpermute, probs);
    TORCH_CHECK(probs.device() == permuted.device(), kUnpermute, ": topk_probs must be on permuted's device (",
                permuted.device(), "), got ", probs.device());
    TORCH_CHECK(probs.sizes() == row_map.sizes(), kUnpermute, ": topk_probs must have row_map's shape ",
                row_map.sizes(), ", got ", probs.sizes());
    args.probs_dtype = moe_dtype(kUnpermute, "topk_probs", probs.scalar_type());
    args.probs = probs.data_ptr();
  }
  at::Tensor out = at::empty({t, permuted.size(1)}, src.options());
  if (out.numel() == 0) return out;
  args.permuted = src.data_ptr();
  args.dtype = dtype;
  args.rows = src.size(0);
  args.hidden = src.size(1);
  args.row_map = map.data_ptr<int64_t>();
  args.num_tokens = t;
  args.k = map.size(1);
  args.out = out.data_ptr();
  K2_CHECK_CUDA_LAUNCH(kUnpermute, launch_moe_unpermute(args, c10::cuda::getCurrentCUDAStream()));
  return out;
}

TORCH_LIBRARY_IMPL(k2_megatron, CUDA, m) {
  m.impl("moe_permute", &moe_permute_cuda);
  m.impl("moe_unpermute", &moe_unpermute_cuda);
}

}  // namespace k2
