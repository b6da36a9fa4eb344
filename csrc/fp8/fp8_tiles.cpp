// CUDA implementation of k2_megatron::fp8_tile_quantize / fp8_tile_dequantize (schemas in csrc/ops.cpp).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "common/check.h"
#include "fp8/fp8_tiles.h"

namespace k2 {
namespace {

constexpr const char* kQuantize = "k2_megatron::fp8_tile_quantize";
constexpr const char* kDequantize = "k2_megatron::fp8_tile_dequantize";

Fp8TileDtype tile_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return Fp8TileDtype::kFloat32;
    case at::kHalf: return Fp8TileDtype::kFloat16;
    case at::kBFloat16: return Fp8TileDtype::kBFloat16;
    default: break;
  }
  TORCH_CHECK(false, "fp8_tile: dtype must be float32, float16 or bfloat16, got ", t);
}

std::vector<int64_t> scales_shape(at::IntArrayRef shape) {
  std::vector<int64_t> out(shape.begin(), shape.end());
  out.back() = (out.back() + kFp8Tile - 1) / kFp8Tile;
  return out;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> fp8_tile_quantize_cuda(const at::Tensor& x) {
  K2_CHECK_CUDA(kQuantize, x);
  K2_CHECK_MIN_DIM(kQuantize, x, 1);
  K2_CHECK_DTYPE(kQuantize, x, x.scalar_type() == at::kFloat || x.scalar_type() == at::kHalf ||
                 x.scalar_type() == at::kBFloat16, "float32, float16 or bfloat16");
  c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous();
  at::Tensor q = at::empty(xc.sizes(), xc.options().dtype(at::kFloat8_e4m3fn));
  at::Tensor scales = at::empty(scales_shape(xc.sizes()), xc.options().dtype(at::kFloat));
  const int64_t n = xc.size(-1);
  if (xc.numel() == 0) return {q, scales};
  K2_CHECK_CUDA_LAUNCH(kQuantize, launch_fp8_tile_quantize(
      xc.data_ptr(), tile_dtype(xc.scalar_type()), static_cast<uint8_t*>(q.data_ptr()), scales.data_ptr<float>(),
      xc.numel() / n, n, c10::cuda::getCurrentCUDAStream()));
  return {q, scales};
}

at::Tensor fp8_tile_dequantize_cuda(const at::Tensor& q, const at::Tensor& scales, at::ScalarType dtype) {
  K2_CHECK_CUDA(kDequantize, q);
  K2_CHECK_CUDA(kDequantize, scales);
  K2_CHECK_MIN_DIM(kDequantize, q, 1);
  K2_CHECK_DTYPE(kDequantize, q, q.scalar_type() == at::kFloat8_e4m3fn, "float8_e4m3fn");
  K2_CHECK_DTYPE(kDequantize, scales, scales.scalar_type() == at::kFloat, "float32");
  TORCH_CHECK(scales.sizes() == at::IntArrayRef(scales_shape(q.sizes())), kDequantize,
              ": scales must have one entry per 1x128 tile of q ", q.sizes(), ", got shape ", scales.sizes());
  const Fp8TileDtype out_dtype = tile_dtype(dtype);
  c10::cuda::CUDAGuard guard(q.device());
  const at::Tensor qc = q.contiguous();
  const at::Tensor sc = scales.contiguous();
  at::Tensor out = at::empty(qc.sizes(), qc.options().dtype(dtype));
  const int64_t n = qc.size(-1);
  if (qc.numel() == 0) return out;
  K2_CHECK_CUDA_LAUNCH(kDequantize, launch_fp8_tile_dequantize(
      static_cast<const uint8_t*>(qc.data_ptr()), sc.data_ptr<float>(), out.data_ptr(), out_dtype,
      qc.numel() / n, n, c10::cuda::getCurrentCUDAStream()));
  return out;
}

TORCH_LIBRARY_IMPL(k2_megatron, CUDA, m) {
  m.impl("fp8_tile_quantize", &fp8_tile_quantize_cuda);
  m.impl("fp8_tile_dequantize", &fp8_tile_dequantize_cuda);
}

}  // namespace k2
