// CUDA kernels of k2_megatron::fp8_tile_quantize / fp8_tile_dequantize (see fp8_tiles.h).
// One warp per 1x128 tile: each lane owns elements lane, lane + 32, lane + 64, lane + 96 of the tile
// (coalesced), the tile's amax is a warp shuffle reduction. Plain CUDA cores: no tensor cores involved.
#include "fp8/fp8_tiles.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include "common/float_convert.cuh"

namespace k2 {
namespace {

constexpr int kWarpsPerBlock = 8;
constexpr int kPerLane = kFp8Tile / 32;
constexpr float kE4M3Max = 448.0f;
constexpr float kFp32Tiny = 1.17549435e-38f;  // 2^-126, smallest normal float

// max that propagates NaN (fmaxf would drop it): a tile holding NaN must get a NaN scale.
__device__ __forceinline__ float nan_max(float a, float b) { return (a != a || a > b) ? a : b; }

template <typename T>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
fp8_tile_quantize_kernel(const T* __restrict__ x, uint8_t* __restrict__ q, float* __restrict__ scales,
                         int64_t total_tiles, int64_t tiles_per_row, int64_t n) {
  const int lane = threadIdx.x & 31;
  const int64_t tile = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  if (tile >= total_tiles) return;  // whole warps exit together: the shuffles below see full warps
  const int64_t row = tile / tiles_per_row;
  const int64_t col0 = (tile - row * tiles_per_row) * kFp8Tile;
  const int64_t len = n - col0 < kFp8Tile ? n - col0 : kFp8Tile;
  const int64_t base = row * n + col0;

  float v[kPerLane];
  float amax = 0.0f;
#pragma unroll
  for (int j = 0; j < kPerLane; ++j) {
    const int c = lane + 32 * j;
    v[j] = c < len ? to_float(x[base + c]) : 0.0f;
    amax = nan_max(amax, fabsf(v[j]));
  }
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    amax = nan_max(amax, __shfl_xor_sync(0xffffffffu, amax, offset));
  }
  float scale = amax / kE4M3Max;             // IEEE division (no fast math): the reference's value
  scale = scale < kFp32Tiny ? kFp32Tiny : scale;  // NaN compares false and stays NaN
  scale = amax == 0.0f ? 1.0f : scale;
#pragma unroll
  for (int j = 0; j < kPerLane; ++j) {
    const int c = lane + 32 * j;
    if (c < len) {
      // Saturating round-to-nearest-even; NaN stays NaN (the reference clamps to +-448 first: same result).
      q[base + c] = static_cast<uint8_t>(__nv_cvt_float_to_fp8(v[j] / scale, __NV_SATFINITE, __NV_E4M3));
    }
  }
  if (lane == 0) scales[tile] = scale;
}

template <typename T>
__global__ void fp8_tile_dequantize_kernel(const uint8_t* __restrict__ q, const float* __restrict__ scales,
                                           T* __restrict__ out, int64_t numel, int64_t tiles_per_row, int64_t n) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel; i += stride) {
    const int64_t row = i / n;
    const int64_t col = i - row * n;
    const float s = scales[row * tiles_per_row + col / kFp8Tile];
    const __half_raw h = __nv_cvt_fp8_to_halfraw(static_cast<__nv_fp8_storage_t>(q[i]), __NV_E4M3);
    out[i] = from_float<T>(__half2float(__half(h)) * s);
  }
}

template <typename T>
cudaError_t quantize_typed(const void* x, uint8_t* q, float* scales, int64_t rows, int64_t n, cudaStream_t stream) {
  const int64_t tiles_per_row = (n + kFp8Tile - 1) / kFp8Tile;
  const int64_t total = rows * tiles_per_row;
  if (total == 0) return cudaSuccess;
  const int64_t blocks = (total + kWarpsPerBlock - 1) / kWarpsPerBlock;
  if (blocks > 2147483647LL) return cudaErrorInvalidConfiguration;
  fp8_tile_quantize_kernel<T><<<static_cast<unsigned>(blocks), kWarpsPerBlock * 32, 0, stream>>>(
      static_cast<const T*>(x), q, scales, total, tiles_per_row, n);
  return cudaGetLastError();
}

template <typename T>
cudaError_t dequantize_typed(const uint8_t* q, const float* scales, void* out, int64_t rows, int64_t n,
                             cudaStream_t stream) {
  const int64_t numel = rows * n;
  if (numel == 0) return cudaSuccess;
  const int threads = 256;
  int64_t blocks = (numel + threads - 1) / threads;
  blocks = blocks > 65536 ? 65536 : blocks;  // grid-stride loop covers the rest
  fp8_tile_dequantize_kernel<T><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(
      q, scales, static_cast<T*>(out), numel, (n + kFp8Tile - 1) / kFp8Tile, n);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_fp8_tile_quantize(const void* x, Fp8TileDtype dtype, uint8_t* q, float* scales, int64_t rows,
                                     int64_t n, cudaStream_t stream) {
  switch (dtype) {
    case Fp8TileDtype::kFloat32: return quantize_typed<float>(x, q, scales, rows, n, stream);
    case Fp8TileDtype::kFloat16: return quantize_typed<__half>(x, q, scales, rows, n, stream);
    case Fp8TileDtype::kBFloat16: return quantize_typed<__nv_bfloat16>(x, q, scales, rows, n, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_fp8_tile_dequantize(const uint8_t* q, const float* scales, void* out, Fp8TileDtype dtype,
                                       int64_t rows, int64_t n, cudaStream_t stream) {
  switch (dtype) {
    case Fp8TileDtype::kFloat32: return dequantize_typed<float>(q, scales, out, rows, n, stream);
    case Fp8TileDtype::kFloat16: return dequantize_typed<__half>(q, scales, out, rows, n, stream);
    case Fp8TileDtype::kBFloat16: return dequantize_typed<__nv_bfloat16>(q, scales, out, rows, n, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace k2
