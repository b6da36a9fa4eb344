// Warp-level tiles of the sm_80 attention kernels, written in terms of the primitives of ptx_sm80.cuh
// (or their CPU emulation in tests/emulation/).
//
// Fragment layouts of mma.m16n8k16 (g = lane / 4, t = lane % 4), which the kernels rely on:
//   A (16 x 16, row-major):  a0 = (g, 2t..2t+1)  a1 = (g+8, 2t..)  a2 = (g, 2t+8..)  a3 = (g+8, 2t+8..)
//   B (16 x 8, "col"):       b0 = (k 2t..2t+1, n g)                b1 = (k 2t+8.., n g)
//   C (16 x 8, fp32):        c0, c1 = (g, 2t), (g, 2t+1)           c2, c3 = (g+8, 2t), (g+8, 2t+1)
// Two adjacent C tiles (keys 16j..16j+15) therefore are, element for element, the A fragment of the next
// product over those keys: P never leaves the registers (FlashAttention-2's trick).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "common/float_convert.cuh"

namespace k2 {
namespace attention {

constexpr int kWarpSize = 32;

// Two floats rounded into the 2 x 16-bit register of an MMA operand (low half = first).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);

template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  const __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

// Element offset of (row, col) in a [rows x D] tile whose 16-byte chunks are XOR-swizzled by row: the 8
// rows an ldmatrix phase reads then fall into 8 different bank groups (D * 2 bytes is a multiple of 128,
// so an unswizzled tile would be an 8-way conflict). col must be a multiple of 8 when used by ldmatrix.
template <int D>
__device__ __forceinline__ int swizzle(int row, int col) {
  static_assert(D % 64 == 0, "head dims are multiples of 64 (8 chunks of 8 elements)");
  const int chunk = col >> 3;
  return row * D + ((chunk & ~7) | ((chunk ^ row) & 7)) * 8 + (col & 7);
}

// Starts the copy of rows [0, ROWS) of a global [rows x D] tile (row stride in elements, 16-byte aligned
// rows) into a shared tile at element offsets offset(row, col) (16-byte chunks: col is a multiple of 8);
// rows >= valid_rows are zero-filled. `gmem` must be a valid address even when valid_rows <= 0 (it is then
// never read).
template <int ROWS, int D, int THREADS, typename T, typename Offset>
__device__ __forceinline__ void load_tile_async(T* smem, const T* gmem, int64_t row_stride, int valid_rows,
                                                Offset offset) {
  constexpr int kChunks = D / 8;
  for (int idx = threadIdx.x; idx < ROWS * kChunks; idx += THREADS) {
    const int row = idx / kChunks;
    const int col = (idx % kChunks) * 8;
    const bool valid = row < valid_rows;
    cp_async_16(smem + offset(row, col), valid ? gmem + row * row_stride + col : gmem, valid);
  }
}

// The same into the swizzled layout of swizzle<D> (the tiles of the mma.sync path and of the backward).
template <int ROWS, int D, int THREADS, typename T>
__device__ __forceinline__ void load_tile_async(T* smem, const T* gmem, int64_t row_stride, int valid_rows) {
  load_tile_async<ROWS, D, THREADS>(smem, gmem, row_stride, valid_rows,
                                    [](int row, int col) { return swizzle<D>(row, col); });
}

// x, as the result of an (empty) volatile asm statement: what is computed from it is computed after this
// point of the program. Passed through at the start of the warp GEMMs, it keeps the compiler from hoisting the
// per-lane shared-memory offsets of all their ldmatrix out of the backward's loops, where they stayed live
// (some 40 registers) next to 160 accumulators and spilled.
__device__ __forceinline__ int computed_here(int x) {
  asm volatile("" : "+r"(x));
  return x;
}

template <int N>
__device__ __forceinline__ void zero(float (&acc)[N][4]) {
#pragma unroll
  for (int i = 0; i < N; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
}

// Each warp owns 16 rows of the left operand; the shared tiles are swizzled [rows x D] row-major.
//
// acc[16 x 8*NT] += A[a_row0:a_row0+16, 0:KD] * B[b_row0:b_row0+8*NT, 0:KD]^T, both operands read from shared
// memory with their reduction dimension contiguous (S = Q K^T, S^T = K Q^T, dP = dO V^T, dP^T = V dO^T).
template <int KD, int NT, typename T>
__device__ __forceinline__ void warp_gemm_nt(float (&acc)[NT][4], const T* a_tile, int a_row0, const T* b_tile,
                                             int b_row0, int lane) {
  static_assert(NT % 2 == 0, "B is read 16 rows at a time");
  lane = computed_here(lane);
#pragma unroll 1  // a loop, not 12 unrolled steps whose fragments the compiler would load ahead
  for (int ks = 0; ks < KD / 16; ++ks) {
    uint32_t a[4];
    ldmatrix_x4(a, a_tile + swizzle<KD>(a_row0 + (lane % 16), ks * 16 + (lane / 16) * 8));
#pragma unroll
    for (int np = 0; np < NT / 2; ++np) {
      uint32_t b[4];
      ldmatrix_x4(b, b_tile + swizzle<KD>(b_row0 + np * 16 + (lane % 8) + (lane / 16) * 8,
                                          ks * 16 + ((lane / 8) % 2) * 8));
      mma_16816<T>(acc[2 * np], a, b[0], b[1]);
      mma_16816<T>(acc[2 * np + 1], a, b[2], b[3]);
    }
  }
}

// acc[16 x ND] += P[16 x 8*KT] * B[b_row0:b_row0+8*KT, 0:ND] with P in registers in the C layout of
// warp_gemm_nt (fp32, rounded to T here) and B read from shared memory with its output dimension contiguous
// (O += P V, dV += P^T dO, dK += dS^T Q, dQ += dS K).
template <int ND, int KT, typename T>
__device__ __forceinline__ void warp_gemm_rs(float (&acc)[ND / 8][4], const float (&p)[KT][4], const T* b_tile,
                                             int b_row0, int lane) {
  static_assert(KT % 2 == 0 && ND % 16 == 0, "16-wide k and n steps");
  lane = computed_here(lane);
#pragma unroll
  for (int kk = 0; kk < KT / 2; ++kk) {
    const uint32_t a[4] = {pack2<T>(p[2 * kk][0], p[2 * kk][1]), pack2<T>(p[2 * kk][2], p[2 * kk][3]),
                           pack2<T>(p[2 * kk + 1][0], p[2 * kk + 1][1]), pack2<T>(p[2 * kk + 1][2], p[2 * kk + 1][3])};
#pragma unroll
    for (int dp = 0; dp < ND / 16; ++dp) {
      uint32_t b[4];
      ldmatrix_x4_trans(b, b_tile + swizzle<ND>(b_row0 + kk * 16 + (lane % 8) + ((lane / 8) % 2) * 8,
                                                dp * 16 + (lane / 16) * 8));
      mma_16816<T>(acc[2 * dp], a, b[0], b[1]);
      mma_16816<T>(acc[2 * dp + 1], a, b[2], b[3]);
    }
  }
}

// Stores a block's [64 x D] fp32 accumulators (warp w holds rows 16w..16w+15; row g is scaled by scale_lo,
// row g+8 by scale_hi) as T to global rows [0, valid_rows), staged through `stage` (>= 64 * (D + 8)
// elements of shared memory that no thread still reads) so that the global stores are 16-byte vectors.
template <int D, int THREADS, typename T>
__device__ __forceinline__ void store_block_rows(T* gmem, int64_t row_stride, int valid_rows, T* stage,
                                                 const float (&acc)[D / 8][4], float scale_lo, float scale_hi,
                                                 int warp, int lane) {
  constexpr int kStride = D + 8;  // padding: the fragment writes of a warp spread over the banks
  const int g = lane / 4, t = lane % 4;
  T* row_lo = stage + (warp * 16 + g) * kStride + 2 * t;
  T* row_hi = row_lo + 8 * kStride;
#pragma unroll
  for (int nt = 0; nt < D / 8; ++nt) {
    *reinterpret_cast<uint32_t*>(row_lo + nt * 8) = pack2<T>(acc[nt][0] * scale_lo, acc[nt][1] * scale_lo);
    *reinterpret_cast<uint32_t*>(row_hi + nt * 8) = pack2<T>(acc[nt][2] * scale_hi, acc[nt][3] * scale_hi);
  }
  block_sync();
  constexpr int kChunks = D / 8;
  for (int idx = threadIdx.x; idx < 64 * kChunks; idx += THREADS) {
    const int row = idx / kChunks;
    const int col = (idx % kChunks) * 8;
    if (row < valid_rows) {
      *reinterpret_cast<uint4*>(gmem + row * row_stride + col) = *reinterpret_cast<const uint4*>(stage + row * kStride + col);
    }
  }
}

// Max and sum over the four lanes that share a row of a C fragment.
__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, shfl_xor(x, 1));
  return fmaxf(x, shfl_xor(x, 2));
}

__device__ __forceinline__ float quad_sum(float x) {
  x += shfl_xor(x, 1);
  return x + shfl_xor(x, 2);
}

// The block-level products of the attention kernels on sm_80-class tensor cores (mma.sync; also valid on
// sm_90 and later): each warp computes its own 16 rows. Sm90Tiles (warpgroup_tiles.cuh) has the same
// interface with wgmma. All tiles are 64 rows.
struct Sm80Tiles {
  template <int ROWS, int D, int THREADS, typename T>
  __device__ __forceinline__ static void load(T* smem, const T* gmem, int64_t row_stride, int valid_rows) {
    load_tile_async<ROWS, D, THREADS>(smem, gmem, row_stride, valid_rows);
  }
  // After this thread's cp.async wait, before the barrier that publishes the tiles: nothing to do here.
  __device__ __forceinline__ static void publish() {}
  // acc[rows of this thread, N] = A B^T: A a [64 x KD] tile, B rows [b_row0, b_row0 + N) of a [64 x KD] tile
  // (S = Q K^T, S^T = K Q^T, dP = dO V^T, ...).
  template <int KD, int N, typename T>
  __device__ __forceinline__ static void nt(float (&acc)[N / 8][4], const T* a_tile, const T* b_tile, int b_row0,
                                            int warp, int lane) {
    zero(acc);
    warp_gemm_nt<KD, N / 8>(acc, a_tile, warp * 16, b_tile, b_row0, lane);
  }
  // acc[rows of this thread, ND] += P B: P [64 x K] in registers, B rows [b_row0, b_row0 + K) of a [64 x ND]
  // tile (O += P V, dQ += dS K, ...).
  template <int ND, int K, typename T>
  __device__ __forceinline__ static void rs(float (&acc)[ND / 8][4], const float (&p)[K / 8][4], const T* b_tile,
                                            int b_row0, int lane) {
    warp_gemm_rs<ND, K / 8>(acc, p, b_tile, b_row0, lane);
  }
};

}  // namespace attention
}  // namespace k2
