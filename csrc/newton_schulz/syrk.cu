// Batched bf16 SYRK (C = alpha * X X^T + beta * D) on tensor cores, for Newton-Schulz.
//
// Newton-Schulz spends two of its three products per iteration on symmetric results: A = X X^T and
// A A = A A^T (A is symmetric). Computing only the lower-triangle output tiles and mirroring each one
// saves close to half of those FLOPs. One launch covers the whole batch: blockIdx.y is the matrix,
// blockIdx.x a lower-triangle tile.
//
// Tiling: a 64x64 output tile per block of 4 warps (2x2, each 32x32 = 2x2 WMMA 16x16x16 fragments),
// k sliced by 32 through shared memory. Out-of-range rows and columns are zero-filled, so any n and k
// work; 16-byte vector loads are used when rows are 16-byte aligned.
#include "newton_schulz/syrk.h"

#include <cuda_bf16.h>
#include <mma.h>

#include <algorithm>

namespace k2 {
namespace {

using bf16 = __nv_bfloat16;

constexpr int kTile = 64;                // output tile edge
constexpr int kTileK = 32;               // reduction slice held in shared memory
constexpr int kWarpTile = 32;            // each warp owns a 32x32 quarter of the tile
constexpr int kFrag = 16;                // WMMA m = n = k
constexpr int kThreads = 128;            // 4 warps
constexpr int kLdX = kTileK + 8;         // bf16 row pitch in smem: 80 bytes, a multiple of 16 as WMMA needs
constexpr int kLdC = kTile + 4;          // fp32 row pitch of the accumulator staging tile
constexpr int kMaxGridY = 65535;

// Maps a linear lower-triangle index t to (ti, tj), t = ti * (ti + 1) / 2 + tj, 0 <= tj <= ti.
__device__ __forceinline__ void triangle_tile(int t, int& ti, int& tj) {
  int i = static_cast<int>((sqrtf(8.0f * static_cast<float>(t) + 1.0f) - 1.0f) * 0.5f);
  while (i > 0 && i * (i + 1) / 2 > t) --i;             // float rounding guards
  while ((i + 1) * (i + 2) / 2 <= t) ++i;
  ti = i;
  tj = t - i * (i + 1) / 2;
}

// Copies rows [row0, row0 + kTile) x columns [k0, k0 + kTileK) of one matrix into smem, zero-filling
// what lies outside n x k.
template <bool kVector>
__device__ __forceinline__ void load_tile(bf16* smem, const bf16* x, int64_t row_stride, int n, int k,
                                          int row0, int k0) {
  if constexpr (kVector) {
    // 8 bf16 = 16 bytes per chunk; k % 8 == 0 so a chunk is either wholly inside or wholly outside.
    constexpr int kChunksPerRow = kTileK / 8;
    for (int c = threadIdx.x; c < kTile * kChunksPerRow; c += kThreads) {
      const int r = c / kChunksPerRow;
      const int col = (c % kChunksPerRow) * 8;
      uint4 v = make_uint4(0u, 0u, 0u, 0u);
      if (row0 + r < n && k0 + col < k) {
        v = *reinterpret_cast<const uint4*>(x + static_cast<int64_t>(row0 + r) * row_stride + k0 + col);
      }
      *reinterpret_cast<uint4*>(smem + r * kLdX + col) = v;
    }
  } else {
    for (int e = threadIdx.x; e < kTile * kTileK; e += kThreads) {
      const int r = e / kTileK;
      const int col = e % kTileK;
      bf16 v = __float2bfloat16(0.0f);
      if (row0 + r < n && k0 + col < k) {
        v = x[static_cast<int64_t>(row0 + r) * row_stride + k0 + col];
      }
      smem[r * kLdX + col] = v;
    }
  }
}

template <bool kVector>
__global__ void __launch_bounds__(kThreads) syrk_bf16_kernel(SyrkProblem p, int batch_offset) {
  using namespace nvcuda;
  __shared__ __align__(128) bf16 smem_rows[kTile * kLdX];  // X rows of the output tile's row block
  __shared__ __align__(128) bf16 smem_cols[kTile * kLdX];  // X rows of its column block
  __shared__ __align__(128) float smem_acc[kTile * kLdC];

  const int b = blockIdx.y + batch_offset;
  int ti, tj;
  triangle_tile(blockIdx.x, ti, tj);
  const int row0 = ti * kTile;
  const int col0 = tj * kTile;

  const bf16* x = static_cast<const bf16*>(p.x) + static_cast<int64_t>(b) * p.x_batch_stride;
  const int warp = threadIdx.x / 32;
  const int warp_row = (warp / 2) * kWarpTile;
  const int warp_col = (warp % 2) * kWarpTile;

  wmma::fragment<wmma::accumulator, kFrag, kFrag, kFrag, float> acc[2][2];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.0f);

  for (int k0 = 0; k0 < p.k; k0 += kTileK) {
    load_tile<kVector>(smem_rows, x, p.x_row_stride, p.n, p.k, row0, k0);
    load_tile<kVector>(smem_cols, x, p.x_row_stride, p.n, p.k, col0, k0);
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kTileK; kk += kFrag) {
      wmma::fragment<wmma::matrix_a, kFrag, kFrag, kFrag, bf16, wmma::row_major> a[2];
      // The right operand is X^T: element (kk, c) of X^T is smem_cols[c][kk], i.e. column-major.
      wmma::fragment<wmma::matrix_b, kFrag, kFrag, kFrag, bf16, wmma::col_major> bt[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        wmma::load_matrix_sync(a[i], smem_rows + (warp_row + i * kFrag) * kLdX + kk, kLdX);
        wmma::load_matrix_sync(bt[i], smem_cols + (warp_col + i * kFrag) * kLdX + kk, kLdX);
      }
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], a[i], bt[j], acc[i][j]);
    }
    __syncthreads();
  }

#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j)
      wmma::store_matrix_sync(smem_acc + (warp_row + i * kFrag) * kLdC + warp_col + j * kFrag, acc[i][j], kLdC,
                              wmma::mem_row_major);
  __syncthreads();

  bf16* c = static_cast<bf16*>(p.c) + static_cast<int64_t>(b) * p.c_batch_stride;
  const bf16* d = p.d == nullptr ? nullptr : static_cast<const bf16*>(p.d) + static_cast<int64_t>(b) * p.d_batch_stride;
  const bool diagonal = ti == tj;

  // Lower triangle: C[r][c] for the tile's (r, c); on a diagonal tile only r >= c. Column index fastest.
  for (int e = threadIdx.x; e < kTile * kTile; e += kThreads) {
    const int r = e / kTile;
    const int cc = e % kTile;
    const int gr = row0 + r;
    const int gc = col0 + cc;
    if (gr >= p.n || gc >= p.n || (diagonal && cc > r)) continue;
    float v = p.alpha * smem_acc[r * kLdC + cc];
    if (d != nullptr) v += p.beta * __bfloat162float(d[static_cast<int64_t>(gr) * p.d_row_stride + gc]);
    c[static_cast<int64_t>(gr) * p.c_row_stride + gc] = __float2bfloat16(v);
  }
  // Mirror: C[c][r] = the same value; row index fastest so the stores stay contiguous. D is symmetric,
  // so D[c][r] is read in the same contiguous order.
  for (int e = threadIdx.x; e < kTile * kTile; e += kThreads) {
    const int cc = e / kTile;
    const int r = e % kTile;
    const int gr = row0 + r;
    const int gc = col0 + cc;
    if (gr >= p.n || gc >= p.n || (diagonal && cc >= r)) continue;
    float v = p.alpha * smem_acc[r * kLdC + cc];
    if (d != nullptr) v += p.beta * __bfloat162float(d[static_cast<int64_t>(gc) * p.d_row_stride + gr]);
    c[static_cast<int64_t>(gc) * p.c_row_stride + gr] = __float2bfloat16(v);
  }
}

}  // namespace

cudaError_t launch_syrk_bf16(const SyrkProblem& p, cudaStream_t stream) {
  if (p.batch <= 0 || p.n <= 0) return cudaSuccess;
  const int64_t tiles = (p.n + kTile - 1) / kTile;
  const int64_t triangle = tiles * (tiles + 1) / 2;
  const bool vector = p.k % 8 == 0 && p.x_row_stride % 8 == 0 && p.x_batch_stride % 8 == 0 &&
                      reinterpret_cast<uintptr_t>(p.x) % 16 == 0;
  for (int offset = 0; offset < p.batch; offset += kMaxGridY) {
    const dim3 grid(static_cast<unsigned>(triangle), static_cast<unsigned>(std::min(p.batch - offset, kMaxGridY)));
    if (vector) {
      syrk_bf16_kernel<true><<<grid, kThreads, 0, stream>>>(p, offset);
    } else {
      syrk_bf16_kernel<false><<<grid, kThreads, 0, stream>>>(p, offset);
    }
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

}  // namespace k2
