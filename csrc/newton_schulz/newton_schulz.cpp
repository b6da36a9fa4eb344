// CUDA implementation of k2_megatron::newton_schulz (schema in csrc/ops.cpp).
//
// Per iteration (K2 report section 2, Muon):  A = X X^T;  B = b A + c A A;  X = a X + B X.
// bf16: both symmetric products go through the batched SYRK kernel (one triangle computed, mirrored;
// B's epilogue fuses b A + c A A in fp32), the last product through one cuBLAS batched GEMM
// (baddbmm, fp32 accumulation). fp32: cuBLAS batched GEMMs throughout. Every step is one launch for
// the whole batch; there is no loop over matrices.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/check.h"
#include "newton_schulz/syrk.h"

namespace k2 {
namespace {

constexpr const char* kOp = "k2_megatron::newton_schulz";

// c = alpha * x x^T + beta * d for x [B, n, k], c and d [B, n, n], all contiguous bf16.
void syrk_bf16(const at::Tensor& x, const at::Tensor* d, at::Tensor& c, double alpha, double beta) {
  SyrkProblem p;
  p.x = x.data_ptr();
  p.x_batch_stride = x.stride(0);
  p.x_row_stride = x.stride(1);
  p.d = d == nullptr ? nullptr : d->data_ptr();
  p.d_batch_stride = d == nullptr ? 0 : d->stride(0);
  p.d_row_stride = d == nullptr ? 0 : d->stride(1);
  p.c = c.data_ptr();
  p.c_batch_stride = c.stride(0);
  p.c_row_stride = c.stride(1);
  p.batch = static_cast<int>(x.size(0));
  p.n = static_cast<int>(x.size(1));
  p.k = static_cast<int>(x.size(2));
  p.alpha = static_cast<float>(alpha);
  p.beta = static_cast<float>(beta);
  K2_CHECK_CUDA_LAUNCH(kOp, launch_syrk_bf16(p, c10::cuda::getCurrentCUDAStream()));
}

}  // namespace

at::Tensor newton_schulz_cuda(const at::Tensor& x, at::ArrayRef<double> coefficients, double eps) {
  K2_CHECK_CUDA(kOp, x);
  K2_CHECK_MIN_DIM(kOp, x, 2);
  K2_CHECK_DTYPE(kOp, x, x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat, "bfloat16 or float32");
  TORCH_CHECK(coefficients.size() % 3 == 0, kOp, ": coefficients must hold 3 values (a, b, c) per step, got ",
              coefficients.size());
  TORCH_CHECK(eps > 0, kOp, ": eps must be positive, got ", eps);
  TORCH_CHECK(x.size(-2) <= INT32_MAX && x.size(-1) <= INT32_MAX, kOp, ": matrix too large: ", x.sizes());
  c10::cuda::CUDAGuard guard(x.device());
  if (x.numel() == 0) return at::empty_like(x, at::MemoryFormat::Contiguous);

  const int64_t m = x.size(-2);
  const int64_t n = x.size(-1);
  const bool transposed = m > n;  // iterate on the wide orientation: A is min(m, n) square
  at::Tensor X = x.reshape({-1, m, n});
  if (transposed) X = X.transpose(1, 2);
  const int64_t rows = X.size(1);

  // X_0 = M / (||M||_F + eps), the norm in fp32 per matrix.
  const at::Tensor x32 = X.to(at::kFloat);
  const at::Tensor norm = at::linalg_vector_norm(x32, 2, at::IntArrayRef{1, 2}, /*keepdim=*/true, std::nullopt);
  X = (x32 / (norm + eps)).to(x.scalar_type()).contiguous();

  const bool bf16 = x.scalar_type() == at::kBFloat16;
  at::Tensor A = at::empty({X.size(0), rows, rows}, X.options());
  at::Tensor B = at::empty_like(A);
  for (size_t s = 0; s < coefficients.size(); s += 3) {
    const double a = coefficients[s], b = coefficients[s + 1], c = coefficients[s + 2];
    if (bf16) {
      syrk_bf16(X, nullptr, A, 1.0, 0.0);  // A = X X^T
      syrk_bf16(A, &A, B, c, b);           // B = c A A^T + b A   (A A^T = A A, A symmetric)
    } else {
      at::bmm_out(A, X, X.transpose(1, 2));
      at::baddbmm_out(B, A, A, A, /*beta=*/b, /*alpha=*/c);
    }
    X = at::baddbmm(X, B, X, /*beta=*/a, /*alpha=*/1.0);  // X = a X + B X
  }
  if (transposed) X = X.transpose(1, 2);
  return X.reshape(x.sizes()).contiguous();
}

TORCH_LIBRARY_IMPL(k2_megatron, CUDA, m) { m.impl("newton_schulz", &newton_schulz_cuda); }

}  // namespace k2
