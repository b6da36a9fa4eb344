// CUDA implementations of k2_megatron::mla_attention_{fwd,bwd} and mla_attention_varlen_{fwd,bwd} (schemas
// in csrc/ops.cpp): the device-independent preparation of host.cpp, then the kernels of kernels.cuh
// on the current stream (their wgmma variants on sm_90 devices of a 90a build). No host synchronisation:
// cu_seqlens are read by the kernels only.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <tuple>

#include "attention/host.h"
#include "common/arch.h"
#include "common/check.h"

namespace k2 {
namespace attention {
namespace {

using Outputs = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

void check_cuda(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  K2_CHECK_CUDA(op, q);
  K2_CHECK_CUDA(op, k);
  K2_CHECK_CUDA(op, v);
}

Outputs run_forward(const char* op, Call c) {
  if (c.launch) {
    // K2_ATTENTION_KERNEL=sm80 runs the mma.sync kernels on Hopper too (to test them there).
    c.params.wgmma = use_sm90a_kernels(op, c.q.get_device(), "K2_ATTENTION_KERNEL");
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    K2_CHECK_CUDA_LAUNCH(op, c.q.scalar_type() == at::kBFloat16 ? launch_forward<__nv_bfloat16>(c.params, stream)
                                                                : launch_forward<__half>(c.params, stream));
  }
  return {c.out, c.lse, c.max_logits};
}

Outputs run_backward(const char* op, Call c) {
  if (c.launch) {
    c.params.wgmma = use_sm90a_kernels(op, c.q.get_device(), "K2_ATTENTION_KERNEL");
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    K2_CHECK_CUDA_LAUNCH(op, c.q.scalar_type() == at::kBFloat16 ? launch_backward<__nv_bfloat16>(c.params, stream)
                                                                : launch_backward<__half>(c.params, stream));
  }
  return {c.grad_q, c.grad_k, c.grad_v};
}

}  // namespace

Outputs mla_attention_fwd_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool causal,
                               double softmax_scale) {
  constexpr const char* op = "k2_megatron::mla_attention_fwd";
  check_cuda(op, q, k, v);
  c10::cuda::CUDAGuard guard(q.device());
  return run_forward(op, prepare_forward(op, q, k, v, causal, softmax_scale));
}

Outputs mla_attention_bwd_cuda(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                               const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, bool causal,
                               double softmax_scale) {
  constexpr const char* op = "k2_megatron::mla_attention_bwd";
  check_cuda(op, q, k, v);
  c10::cuda::CUDAGuard guard(q.device());
  return run_backward(op, prepare_backward(op, grad_out, q, k, v, out, lse, causal, softmax_scale));
}

Outputs mla_attention_varlen_fwd_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                      const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
                                      int64_t max_seqlen_q, int64_t max_seqlen_k, bool causal, double softmax_scale) {
  constexpr const char* op = "k2_megatron::mla_attention_varlen_fwd";
  check_cuda(op, q, k, v);
  c10::cuda::CUDAGuard guard(q.device());
  return run_forward(op, prepare_varlen_forward(op, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                                causal, softmax_scale));
}

Outputs mla_attention_varlen_bwd_cuda(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                                      const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                                      const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
                                      int64_t max_seqlen_q, int64_t max_seqlen_k, bool causal, double softmax_scale) {
  constexpr const char* op = "k2_megatron::mla_attention_varlen_bwd";
  check_cuda(op, q, k, v);
  c10::cuda::CUDAGuard guard(q.device());
  return run_backward(op, prepare_varlen_backward(op, grad_out, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k,
                                                  max_seqlen_q, max_seqlen_k, causal, softmax_scale));
}

std::tuple<at::Tensor, at::Tensor> forward_without_max_logits(const at::Tensor& q, const at::Tensor& k,
                                                              const at::Tensor& v, bool causal, double softmax_scale) {
  constexpr const char* op = "forward_without_max_logits";
  check_cuda(op, q, k, v);
  c10::cuda::CUDAGuard guard(q.device());
  Call c = prepare_forward(op, q, k, v, causal, softmax_scale);
  c.params.max_logits = nullptr;
  run_forward(op, c);
  return {c.out, c.lse};
}

TORCH_LIBRARY_IMPL(k2_megatron, CUDA, m) {
  m.impl("mla_attention_fwd", &mla_attention_fwd_cuda);
  m.impl("mla_attention_bwd", &mla_attention_bwd_cuda);
  m.impl("mla_attention_varlen_fwd", &mla_attention_varlen_fwd_cuda);
  m.impl("mla_attention_varlen_bwd", &mla_attention_varlen_bwd_cuda);
}

}  // namespace attention
}  // namespace k2
