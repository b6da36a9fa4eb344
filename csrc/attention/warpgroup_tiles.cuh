// The forward's tile operations on Hopper warpgroup MMA (wgmma, sm_90a), with the interface of Sm80Tiles
// (warp_tiles.cuh): the block's 128 threads are one warpgroup, and every thread ends up with the same
// fragment as on the mma.sync path (wgmma's m64nN accumulators are, per warp, mma.m16n8 C fragments), so
// the kernel's softmax, masking and epilogue are shared.
//
// Shared tiles use wgmma's 128-byte swizzle: a [ROWS x D] tile is D / 64 slabs of [ROWS x 64] (128-byte
// rows), the 16-byte chunk c of row r stored at chunk c ^ (r % 8); slabs start on 1024-byte boundaries (the
// hardware swizzles on address bits, so the block's shared memory must be 1024-byte aligned).
// Descriptors (PTX ISA, "matrix descriptor"): start address, leading and stride byte offsets (>> 4),
// swizzle mode 1 = 128B in bits 62-63. K-major (Q, K): 8-row groups 1024 bytes apart (stride offset), a k16
// step is a 32-byte advance inside the 128-byte row. MN-major (V as B of P V): 8-key groups 1024 bytes apart
// (stride offset), 64-column atoms a slab apart (leading offset; one atom per wgmma here).
#pragma once

#include <cstdint>

#include "attention/warp_tiles.cuh"

namespace k2 {
namespace attention {

struct Sm90Tiles {
  static constexpr int kSlab = 64;  // elements per 128-byte row

  template <int ROWS>
  __device__ __forceinline__ static int offset(int row, int col) {
    return (col / kSlab) * ROWS * kSlab + row * kSlab + ((((col % kSlab) >> 3) ^ (row & 7)) << 3) + (col & 7);
  }

  template <int ROWS, int D, int THREADS, typename T>
  __device__ __forceinline__ static void load(T* smem, const T* gmem, int64_t row_stride, int valid_rows) {
    static_assert(D % kSlab == 0 && ROWS % 8 == 0, "whole 64-wide slabs of 8-row groups");
    load_tile_async<ROWS, D, THREADS>(smem, gmem, row_stride, valid_rows,
                                      [](int row, int col) { return offset<ROWS>(row, col); });
  }

  // cp.async writes through the generic proxy, wgmma reads through the async proxy.
  __device__ __forceinline__ static void publish() { fence_proxy_async(); }

  __device__ __forceinline__ static uint64_t descriptor(uint32_t address, uint32_t leading_bytes,
                                                        uint32_t stride_bytes) {
    return static_cast<uint64_t>((address >> 4) & 0x3fff) |
           (static_cast<uint64_t>((leading_bytes >> 4) & 0x3fff) << 16) |
           (static_cast<uint64_t>((stride_bytes >> 4) & 0x3fff) << 32) | (uint64_t{1} << 62);
  }

  // acc[64 x 64] += Q K^T (this thread's fragment), both K-major tiles of 64 rows.
  template <int DQK, typename T>
  __device__ __forceinline__ static void scores(float (&acc)[8][4], const T* s_q, const T* s_k, int, int) {
    constexpr uint32_t kSlabBytes = 64 * kSlab * sizeof(T);
    const uint32_t q = shared_address(s_q), k = shared_address(s_k);
    wgmma_fence();
#pragma unroll
    for (int ks = 0; ks < DQK / 16; ++ks) {
      const uint32_t step = (ks / 4) * kSlabBytes + (ks % 4) * 32;
      wgmma_m64n64k16_ss<T>(acc, descriptor(q + step, 16, 1024), descriptor(k + step, 16, 1024));
    }
    wgmma_commit();
    wgmma_wait_all();
  }

  // o[64 x DV] += P V, P from registers (rounded to T), V an MN-major tile of 64 keys, 64 columns per wgmma.
  template <int DV, typename T>
  __device__ __forceinline__ static void accumulate(float (&o)[DV / 8][4], const float (&p)[8][4], const T* s_v, int) {
    constexpr uint32_t kSlabBytes = 64 * kSlab * sizeof(T);
    const uint32_t v = shared_address(s_v);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      const uint32_t a[4] = {pack2<T>(p[2 * kk][0], p[2 * kk][1]), pack2<T>(p[2 * kk][2], p[2 * kk][3]),
                             pack2<T>(p[2 * kk + 1][0], p[2 * kk + 1][1]),
                             pack2<T>(p[2 * kk + 1][2], p[2 * kk + 1][3])};
#pragma unroll
      for (int slab = 0; slab < DV / kSlab; ++slab) {
        float(&o_slab)[8][4] = *reinterpret_cast<float(*)[8][4]>(&o[slab * 8]);
        wgmma_m64n64k16_rs<T>(o_slab, a, descriptor(v + slab * kSlabBytes + kk * 16 * 128, kSlabBytes, 1024));
      }
    }
    wgmma_commit();
    wgmma_wait_all();
  }
};

}  // namespace attention
}  // namespace k2
