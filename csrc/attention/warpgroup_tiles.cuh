// The block-level products of the attention kernels on Hopper warpgroup MMA (wgmma, sm_90a), with the
// interface of Sm80Tiles (warp_tiles.cuh): the block's 128 threads are one warpgroup, and every thread ends
// up with the same fragment as on the mma.sync path (wgmma's m64nN accumulators are, per warp, mma.m16n8 C
// fragments), so the kernels' softmax, masking and epilogues are shared.
//
// Shared tiles use wgmma's 128-byte swizzle: a [ROWS x D] tile is D / 64 slabs of [ROWS x 64] (128-byte
// rows), the 16-byte chunk c of row r stored at chunk c ^ (r % 8); slabs start on 1024-byte boundaries (the
// hardware swizzles on address bits: the kernels align their shared memory with aligned()).
// Descriptors (PTX ISA, "matrix descriptor"): start address, leading and stride byte offsets (>> 4),
// swizzle mode 1 = 128B in bits 62-63. K-major (the A B^T products): 8-row groups 1024 bytes apart (stride
// offset), a k16 step is a 32-byte advance inside the 128-byte row. MN-major (B of P B): 8-row groups 1024 bytes apart
// (stride offset), 64-column atoms a slab apart (leading offset; one atom per wgmma here).
#pragma once

#include <cstdint>

#include "attention/warp_tiles.cuh"

namespace k2 {
namespace attention {

struct Sm90Tiles {
  static constexpr int kSlab = 64;  // elements per 128-byte row
  // Extra dynamic shared memory the sm_90a kernels ask for, to start their tiles on a 1024-byte boundary
  // whatever the alignment of the dynamic shared memory window.
  static constexpr int kSmemAlignment = 1024;

  __device__ __forceinline__ static unsigned char* aligned(unsigned char* smem) {
    return smem + (kSmemAlignment - shared_address(smem) % kSmemAlignment) % kSmemAlignment;
  }

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

  // acc[64 x N] = A B^T (this thread's fragment): A a K-major [64 x KD] tile, B rows [b_row0, b_row0 + N) of a
  // K-major [64 x KD] tile (b_row0 a multiple of 8). The first k-step overwrites (scale-d = 0), so acc needs no
  // zeroing: nothing writes it between the fence and the wgmmas.
  template <int KD, int N, typename T>
  __device__ __forceinline__ static void nt(float (&acc)[N / 8][4], const T* a_tile, const T* b_tile, int b_row0,
                                            int, int) {
    constexpr uint32_t kSlabBytes = 64 * kSlab * sizeof(T);
    const uint32_t a = shared_address(a_tile);
    const uint32_t b = shared_address(b_tile) + b_row0 * kSlab * sizeof(T);
    wgmma_fence();
    wgmma_ss<N, false, T>(acc, descriptor(a, 16, 1024), descriptor(b, 16, 1024));
#pragma unroll
    for (int ks = 1; ks < KD / 16; ++ks) {
      const uint32_t step = (ks / 4) * kSlabBytes + (ks % 4) * 32;
      wgmma_ss<N, true, T>(acc, descriptor(a + step, 16, 1024), descriptor(b + step, 16, 1024));
    }
    wgmma_commit();
    wgmma_wait_all();
    fence_operands(acc);
  }

  // acc[64 x ND] += P B: P [64 x K] from registers (rounded to T), B rows [b_row0, b_row0 + K) of an MN-major
  // [64 x ND] tile (b_row0 a multiple of 16), 64 output columns per wgmma. P is converted into the A fragments
  // before the fence (PTX forbids writing them between the fence and the wgmmas that read them; ptxas would
  // otherwise serialise the wgmmas, warning C7519).
  template <int ND, int K, typename T>
  __device__ __forceinline__ static void rs(float (&acc)[ND / 8][4], const float (&p)[K / 8][4], const T* b_tile,
                                            int b_row0, int) {
    constexpr uint32_t kSlabBytes = 64 * kSlab * sizeof(T);
    const uint32_t b = shared_address(b_tile) + b_row0 * kSlab * sizeof(T);
    uint32_t a[K / 16][4];
#pragma unroll
    for (int kk = 0; kk < K / 16; ++kk) {
      a[kk][0] = pack2<T>(p[2 * kk][0], p[2 * kk][1]);
      a[kk][1] = pack2<T>(p[2 * kk][2], p[2 * kk][3]);
      a[kk][2] = pack2<T>(p[2 * kk + 1][0], p[2 * kk + 1][1]);
      a[kk][3] = pack2<T>(p[2 * kk + 1][2], p[2 * kk + 1][3]);
    }
    fence_operands(a);
    fence_operands(acc);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < K / 16; ++kk) {
#pragma unroll
      for (int slab = 0; slab < ND / kSlab; ++slab) {
        float(&acc_slab)[8][4] = *reinterpret_cast<float(*)[8][4]>(&acc[slab * 8]);
        wgmma_rs<T>(acc_slab, a[kk], descriptor(b + slab * kSlabBytes + kk * 16 * 128, kSlabBytes, 1024));
      }
    }
    wgmma_commit();
    wgmma_wait_all();
    fence_operands(acc);
  }
};

}  // namespace attention
}  // namespace k2
