// See host.h. Conventions: k2_megatron/ops/reference/attention.py.
#include "attention/host.h"

#include <limits>
#include <sstream>
#include <utility>
#include <vector>

namespace k2 {
namespace attention {

#define K2_ATTENTION_SUPPORTED_CASE(DQK, DV) \
  if (head_dim_qk == DQK && head_dim_v == DV) return true;
#define K2_ATTENTION_LIST_CASE(DQK, DV) dims.emplace_back(DQK, DV);

bool head_dims_supported(int head_dim_qk, int head_dim_v) {
  K2_ATTENTION_HEAD_DIMS(K2_ATTENTION_SUPPORTED_CASE)
  return false;
}

std::vector<std::pair<int, int>> supported_head_dims() {
  std::vector<std::pair<int, int>> dims;
  K2_ATTENTION_HEAD_DIMS(K2_ATTENTION_LIST_CASE)
  return dims;
}

namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr int64_t kMaxGrid = 65535;  // grid.y (heads) and grid.z (batch or sequences)

// The kernels load 16-byte row chunks: unit stride in the head dim, every other stride a multiple of 8
// elements and a 16-byte aligned base. Strided views that satisfy this (megatron-core's [s, b, h, d]
// transposed to [b, s, h, d]) go in as they are; anything else is copied once.
at::Tensor kernel_layout(const at::Tensor& x) {
  bool ok = x.stride(-1) == 1 && reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0;
  for (int64_t i = 0; i + 1 < x.dim(); ++i) ok = ok && x.stride(i) % 8 == 0;
  return ok ? x : x.contiguous();
}

void check_qkv(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t dim) {
  for (const at::Tensor* t : {&q, &k, &v}) {
    const char* name = t == &q ? "q" : (t == &k ? "k" : "v");
    TORCH_CHECK(t->dim() == dim, op, ": ", name, " must be ", dim, "-D, got shape ", t->sizes());
    TORCH_CHECK(t->scalar_type() == q.scalar_type(), op, ": ", name, " must have q's dtype ", q.scalar_type(),
                ", got ", t->scalar_type());
    TORCH_CHECK(t->device() == q.device(), op, ": ", name, " must be on q's device ", q.device(), ", got ",
                t->device());
    TORCH_CHECK(t->size(-2) == q.size(-2), op, ": ", name, " must have q's number of heads ", q.size(-2),
                ", got shape ", t->sizes());
  }
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kHalf, op,
              ": q must be bfloat16 or float16, got ", q.scalar_type());
  TORCH_CHECK(k.size(-1) == q.size(-1), op, ": k must have q's head dim ", q.size(-1), ", got shape ", k.sizes());
  TORCH_CHECK(v.size(-3) == k.size(-3), op, ": v must have as many keys as k, got v ", v.sizes(), " vs k ", k.sizes());
  if (!head_dims_supported(static_cast<int>(q.size(-1)), static_cast<int>(v.size(-1)))) {
    std::ostringstream supported;
    for (const auto& [dqk, dv] : supported_head_dims()) supported << " (" << dqk << ", " << dv << ")";
    TORCH_CHECK(false, op, ": no CUDA kernel for head dims (q.k ", q.size(-1), ", v ", v.size(-1), "); supported:",
                supported.str());
  }
  TORCH_CHECK(q.size(-2) <= kMaxGrid, op, ": at most ", kMaxGrid, " heads, got ", q.size(-2));
  TORCH_CHECK(q.size(-3) <= std::numeric_limits<int>::max() && k.size(-3) <= std::numeric_limits<int>::max(), op,
              ": sequence too long: q ", q.sizes(), ", k ", k.sizes());
  if (dim == 4) {
    TORCH_CHECK(k.size(0) == q.size(0) && v.size(0) == q.size(0), op, ": q, k and v must have the same batch size, got ",
                q.sizes(), ", ", k.sizes(), ", ", v.sizes());
    TORCH_CHECK(q.size(0) <= kMaxGrid, op, ": batch size at most ", kMaxGrid, ", got ", q.size(0));
  }
}

void check_softmax_scale(const char* op, double softmax_scale) {
  TORCH_CHECK(softmax_scale > 0 && softmax_scale < kInf, op, ": softmax_scale must be positive and finite, got ",
              softmax_scale);
}

void check_varlen(const char* op, const at::Tensor& q, const at::Tensor& cu_q, const at::Tensor& cu_k,
                  int64_t max_seqlen_q, int64_t max_seqlen_k) {
  for (const at::Tensor* t : {&cu_q, &cu_k}) {
    const char* name = t == &cu_q ? "cu_seqlens_q" : "cu_seqlens_k";
    TORCH_CHECK(t->device() == q.device(), op, ": ", name, " must be on q's device ", q.device(), ", got ",
                t->device());
    TORCH_CHECK(t->scalar_type() == at::kInt && t->dim() == 1 && t->numel() >= 1, op, ": ", name,
                " must be int32 [n + 1], got ", t->scalar_type(), " ", t->sizes());
  }
  TORCH_CHECK(cu_q.numel() == cu_k.numel(), op, ": cu_seqlens_q and cu_seqlens_k must have the same length, got ",
              cu_q.numel(), " and ", cu_k.numel());
  TORCH_CHECK(cu_q.numel() - 1 <= kMaxGrid, op, ": at most ", kMaxGrid, " sequences, got ", cu_q.numel() - 1);
  TORCH_CHECK(max_seqlen_q >= 0 && max_seqlen_k >= 0 && max_seqlen_q <= std::numeric_limits<int>::max() &&
                  max_seqlen_k <= std::numeric_limits<int>::max(),
              op, ": max_seqlen_q and max_seqlen_k must be in [0, 2^31), got ", max_seqlen_q, " and ", max_seqlen_k);
}

void check_backward_tensors(const char* op, const at::Tensor& grad_out, const at::Tensor& out, const at::Tensor& lse,
                            at::IntArrayRef out_shape, at::IntArrayRef lse_shape, const at::Tensor& q) {
  TORCH_CHECK(grad_out.sizes() == out_shape && out.sizes() == out_shape, op, ": grad_out and out must have shape ",
              out_shape, ", got ", grad_out.sizes(), " and ", out.sizes());
  TORCH_CHECK(grad_out.scalar_type() == q.scalar_type() && out.scalar_type() == q.scalar_type(), op,
              ": grad_out and out must have q's dtype ", q.scalar_type(), ", got ", grad_out.scalar_type(), " and ",
              out.scalar_type());
  TORCH_CHECK(grad_out.device() == q.device() && out.device() == q.device() && lse.device() == q.device(), op,
              ": grad_out, out and lse must be on q's device ", q.device());
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.sizes() == lse_shape, op, ": lse must be float32 ", lse_shape,
              " (the forward's), got ", lse.scalar_type(), " ", lse.sizes());
}

TensorRef dense_ref(const at::Tensor& x) { return {x.data_ptr(), x.stride(0), x.stride(1), x.stride(2)}; }  // [b, s, h, d]
TensorRef packed_ref(const at::Tensor& x) { return {x.data_ptr(), 0, x.stride(0), x.stride(1)}; }          // [total, h, d]

// The inputs in kernel layout and the parts of Params every op shares.
Call common_call(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool causal, double softmax_scale,
                 bool packed) {
  Call c;
  c.q = kernel_layout(q);
  c.k = kernel_layout(k);
  c.v = kernel_layout(v);
  Params& p = c.params;
  TensorRef (*ref)(const at::Tensor&) = packed ? packed_ref : dense_ref;
  p.q = ref(c.q);
  p.k = ref(c.k);
  p.v = ref(c.v);
  p.heads = static_cast<int>(q.size(-2));
  p.head_dim_qk = static_cast<int>(q.size(-1));
  p.head_dim_v = static_cast<int>(v.size(-1));
  p.causal = causal;
  p.softmax_scale = static_cast<float>(softmax_scale);
  return c;
}

void set_dense_shape(Call& c) {
  const int64_t b = c.q.size(0), s_q = c.q.size(1), h = c.q.size(2);
  c.params.batch = static_cast<int>(b);
  c.params.seqlen_q = static_cast<int>(s_q);
  c.params.seqlen_k = static_cast<int>(c.k.size(1));
  c.params.stat_batch_stride = h * s_q;  // lse, delta: [b, h, s_q]
  c.params.stat_head_stride = s_q;
}

void set_packed_shape(Call& c, const at::Tensor& cu_q, const at::Tensor& cu_k, int64_t max_seqlen_q,
                      int64_t max_seqlen_k) {
  c.cu_seqlens_q = cu_q.contiguous();
  c.cu_seqlens_k = cu_k.contiguous();
  c.params.cu_seqlens_q = c.cu_seqlens_q.data_ptr<int>();
  c.params.cu_seqlens_k = c.cu_seqlens_k.data_ptr<int>();
  c.params.batch = static_cast<int>(cu_q.numel() - 1);
  c.params.seqlen_q = static_cast<int>(max_seqlen_q);
  c.params.seqlen_k = static_cast<int>(max_seqlen_k);
  c.params.stat_head_stride = c.q.size(0);  // lse, delta: [h, total_q]
}

void set_backward_tensors(Call& c, const at::Tensor& grad_out, const at::Tensor& out, const at::Tensor& lse,
                          bool packed) {
  TensorRef (*ref)(const at::Tensor&) = packed ? packed_ref : dense_ref;
  c.grad_out = kernel_layout(grad_out);
  c.out = kernel_layout(out);
  c.lse = lse.contiguous();
  c.delta = at::empty_like(c.lse);
  Params& p = c.params;
  p.grad_out = ref(c.grad_out);
  p.out = ref(c.out);
  p.grad_q = ref(c.grad_q);
  p.grad_k = ref(c.grad_k);
  p.grad_v = ref(c.grad_v);
  p.lse = c.lse.data_ptr<float>();
  p.delta = c.delta.data_ptr<float>();
}

}  // namespace

Call prepare_forward(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool causal,
                     double softmax_scale) {
  check_qkv(op, q, k, v, 4);
  check_softmax_scale(op, softmax_scale);
  Call c = common_call(q, k, v, causal, softmax_scale, /*packed=*/false);
  const int64_t b = q.size(0), s_q = q.size(1), h = q.size(2);
  c.out = at::empty({b, s_q, h, v.size(3)}, q.options());
  c.lse = at::empty({b, h, s_q}, q.options().dtype(at::kFloat));
  c.max_logits = at::full({h}, -kInf, q.options().dtype(at::kFloat));
  c.launch = c.out.numel() > 0;
  set_dense_shape(c);
  c.params.out = dense_ref(c.out);
  c.params.lse = c.lse.data_ptr<float>();
  c.params.max_logits = c.max_logits.data_ptr<float>();
  return c;
}

Call prepare_backward(const char* op, const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                      const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, bool causal,
                      double softmax_scale) {
  check_qkv(op, q, k, v, 4);
  check_softmax_scale(op, softmax_scale);
  const int64_t b = q.size(0), s_q = q.size(1), h = q.size(2);
  check_backward_tensors(op, grad_out, out, lse, {b, s_q, h, v.size(3)}, {b, h, s_q}, q);
  Call c = common_call(q, k, v, causal, softmax_scale, /*packed=*/false);
  // Every row of dq, dk, dv is written by the kernels (zeros where no (query, key) pair is visible).
  c.grad_q = at::empty(q.sizes(), q.options());
  c.grad_k = at::empty(k.sizes(), k.options());
  c.grad_v = at::empty(v.sizes(), v.options());
  c.launch = c.grad_q.numel() + c.grad_k.numel() > 0;
  set_dense_shape(c);
  set_backward_tensors(c, grad_out, out, lse, /*packed=*/false);
  return c;
}

Call prepare_varlen_forward(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
                            int64_t max_seqlen_k, bool causal, double softmax_scale) {
  check_qkv(op, q, k, v, 3);
  check_softmax_scale(op, softmax_scale);
  check_varlen(op, q, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k);
  Call c = common_call(q, k, v, causal, softmax_scale, /*packed=*/true);
  const int64_t total_q = q.size(0), h = q.size(1);
  // Rows outside every sequence (only with inconsistent cu_seqlens, which are not checked here so as not
  // to synchronise with the device) read as zero output and -inf lse rather than uninitialised memory.
  c.out = at::zeros({total_q, h, v.size(2)}, q.options());
  c.lse = at::full({h, total_q}, -kInf, q.options().dtype(at::kFloat));
  c.max_logits = at::full({h}, -kInf, q.options().dtype(at::kFloat));
  c.launch = c.out.numel() > 0;
  set_packed_shape(c, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k);
  c.params.out = packed_ref(c.out);
  c.params.lse = c.lse.data_ptr<float>();
  c.params.max_logits = c.max_logits.data_ptr<float>();
  return c;
}

Call prepare_varlen_backward(const char* op, const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                             const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                             const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
                             int64_t max_seqlen_k, bool causal, double softmax_scale) {
  check_qkv(op, q, k, v, 3);
  check_softmax_scale(op, softmax_scale);
  check_varlen(op, q, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k);
  const int64_t total_q = q.size(0), h = q.size(1);
  check_backward_tensors(op, grad_out, out, lse, {total_q, h, v.size(2)}, {h, total_q}, q);
  Call c = common_call(q, k, v, causal, softmax_scale, /*packed=*/true);
  // zeros: rows outside every sequence (see the forward) get zero gradients.
  c.grad_q = at::zeros(q.sizes(), q.options());
  c.grad_k = at::zeros(k.sizes(), k.options());
  c.grad_v = at::zeros(v.sizes(), v.options());
  c.launch = c.grad_q.numel() + c.grad_k.numel() > 0;
  set_packed_shape(c, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k);
  set_backward_tensors(c, grad_out, out, lse, /*packed=*/true);
  return c;
}

}  // namespace attention
}  // namespace k2
