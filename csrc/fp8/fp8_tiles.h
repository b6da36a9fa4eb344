// FP8-E4M3 tile quantisation for activation storage (K2 report section 4); conventions in
// k2_megatron/ops/reference/fp8.py. Rows of n elements, 1x128 tiles along a row, one fp32 scale per tile:
//   scale = amax / 448 (at least 2^-126; 1 for an all-zero tile; NaN/inf for a non-finite tile),
//   q = e4m3_satfinite_rne(x / scale),   x ~= float(q) * scale.
// The arithmetic is the reference's fp32 arithmetic step for step, so both give the same bits.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace k2 {

enum class Fp8TileDtype : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

constexpr int kFp8Tile = 128;

// x [rows, n] contiguous (dtype), q [rows, n] uint8 (e4m3 bits), scales [rows, ceil(n / 128)] fp32.
cudaError_t launch_fp8_tile_quantize(const void* x, Fp8TileDtype dtype, uint8_t* q, float* scales, int64_t rows,
                                     int64_t n, cudaStream_t stream);

// out [rows, n] contiguous (dtype) = float(q) * scale of the element's tile, rounded to dtype.
cudaError_t launch_fp8_tile_dequantize(const uint8_t* q, const float* scales, void* out, Fp8TileDtype dtype,
                                       int64_t rows, int64_t n, cudaStream_t stream);

}  // namespace k2
