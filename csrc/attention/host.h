// Host side of the attention ops, independent of the device: argument checks, kernel-compatible layouts,
// output allocation and the Params the kernels read. attention.cpp launches the result on CUDA;
// tests/emulation/ launches it on emulated CPU primitives, so both run exactly this code.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

#include "attention/attention.h"

namespace k2 {
namespace attention {

// One op call, ready to launch: `params` points into the tensors held here. `launch` is false when there
// is nothing to compute (the outputs are complete as allocated).
struct Call {
  Params params;
  bool launch = true;
  at::Tensor q, k, v, out, grad_out, lse, cu_seqlens_q, cu_seqlens_k;  // inputs (possibly copied) and out / lse
  at::Tensor max_logits;                                                 // forward outputs (with out, lse)
  at::Tensor grad_q, grad_k, grad_v, delta;                              // backward outputs and scratch
};

Call prepare_forward(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool causal,
                     double softmax_scale);
Call prepare_backward(const char* op, const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                      const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, bool causal,
                      double softmax_scale);
Call prepare_varlen_forward(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
                            int64_t max_seqlen_k, bool causal, double softmax_scale);
Call prepare_varlen_backward(const char* op, const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                             const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                             const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
                             int64_t max_seqlen_k, bool causal, double softmax_scale);

// CUDA (attention.cpp): the dense forward without the per-head max logits (Params::max_logits = nullptr),
// only for measuring the cost of the fused max in benchmarks/attention.py. Returns (out, lse).
std::tuple<at::Tensor, at::Tensor> forward_without_max_logits(const at::Tensor& q, const at::Tensor& k,
                                                              const at::Tensor& v, bool causal, double softmax_scale);

}  // namespace attention
}  // namespace k2
