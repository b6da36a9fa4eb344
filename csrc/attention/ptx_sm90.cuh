// The Hopper primitives of the sm_90a attention kernels: warpgroup MMA (wgmma.mma_async m64nNk16, operands
// from shared-memory descriptors or, for A, registers), its fences, and the proxy fence that makes
// cp.async-written shared memory visible to wgmma. tests/emulation/ re-implements the same functions.
//
// The instructions exist only on sm_90a: in any other compile pass the functions trap (the kernels that
// call them are never launched there; attention.cpp picks them on sm_90 devices of a 90a build only).
//
// Register discipline (PTX ISA, wgmma.fence): a wgmma.fence must separate any register access from a
// wgmma.mma_async that uses the register (accumulators, A fragments); between the fence and the wgmma no
// instruction may write them. Sm90Tiles therefore writes its operands, pins them with fence_operands(),
// then fences, and reads the accumulators only after wgmma.wait_group and another fence_operands();
// tools/inspect_sass.py checks the resulting PTX of every kernel.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define K2_SM90A_DEVICE 1
#endif

namespace k2 {
namespace attention {

// Shared-memory byte address (the space wgmma descriptors and the swizzle work in).
__device__ __forceinline__ uint32_t shared_address(const void* smem) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(smem));
}

__device__ __forceinline__ void fence_proxy_async() {
#ifdef K2_SM90A_DEVICE
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#else
  __trap();
#endif
}

__device__ __forceinline__ void wgmma_fence() {
#ifdef K2_SM90A_DEVICE
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#else
  __trap();
#endif
}

__device__ __forceinline__ void wgmma_commit() {
#ifdef K2_SM90A_DEVICE
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#else
  __trap();
#endif
}

// Waits for all committed wgmma groups of this warpgroup.
__device__ __forceinline__ void wgmma_wait_all() {
#ifdef K2_SM90A_DEVICE
  asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
#else
  __trap();
#endif
}

// Pins register x here: the compiler moves no write of it below this point and no read of it above it
// (CUTLASS's warpgroup_fence_operand; volatile asm statements keep their order).
__device__ __forceinline__ void pin_register(float& x) { asm volatile("" : "+f"(x)::"memory"); }
__device__ __forceinline__ void pin_register(uint32_t& x) { asm volatile("" : "+r"(x)::"memory"); }

// pin_register() for every register of a fragment array (accumulators, A operands).
template <typename E, int N>
__device__ __forceinline__ void fence_operands(E (&x)[N][4]) {
#pragma unroll
  for (int i = 0; i < N; ++i) {
#pragma unroll
    for (int j = 0; j < 4; ++j) pin_register(x[i][j]);
  }
}

// The fp32 accumulators of an m64nN tile (N = 32 or 64), per thread: acc[j] are columns 8j..8j+7 in the
// layout of an mma.m16n8 C fragment of this thread's warp (rows 16 (warp % 4) + g, + 8). As asm operands with
// constraint C: "+f" to accumulate (scale-d = 1), "=f" to overwrite (scale-d = 0: the old values are not
// read, so nothing has to zero them first).
#define K2_WGMMA_ACC16(C, acc)                                                                                 \
  C(acc[0][0]), C(acc[0][1]), C(acc[0][2]), C(acc[0][3]), C(acc[1][0]), C(acc[1][1]), C(acc[1][2]),           \
      C(acc[1][3]), C(acc[2][0]), C(acc[2][1]), C(acc[2][2]), C(acc[2][3]), C(acc[3][0]), C(acc[3][1]),        \
      C(acc[3][2]), C(acc[3][3])
#define K2_WGMMA_ACC32(C, acc)                                                                                 \
  K2_WGMMA_ACC16(C, acc), C(acc[4][0]), C(acc[4][1]), C(acc[4][2]), C(acc[4][3]), C(acc[5][0]), C(acc[5][1]),  \
      C(acc[5][2]), C(acc[5][3]), C(acc[6][0]), C(acc[6][1]), C(acc[6][2]), C(acc[6][3]), C(acc[7][0]),        \
      C(acc[7][1]), C(acc[7][2]), C(acc[7][3])
#define K2_WGMMA_READ_WRITE(x) "+f"(x)
#define K2_WGMMA_WRITE(x) "=f"(x)
#define K2_WGMMA_LIST16 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}"
#define K2_WGMMA_LIST32                                                                                        \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, "  \
  "%23, %24, %25, %26, %27, %28, %29, %30, %31}"
// Operand numbers after 16 / 32 accumulators: descriptors a, b and scale-d (ss), or A registers, b, scale-d (rs).
#define K2_WGMMA_SS_ARGS16 ", %16, %17, p, 1, 1, 0, 0;\n}\n"
#define K2_WGMMA_SS_ARGS32 ", %32, %33, p, 1, 1, 0, 0;\n}\n"
#define K2_WGMMA_SCALE_D16 "{\n.reg .pred p;\nsetp.ne.b32 p, %18, 0;\n"
#define K2_WGMMA_SCALE_D32 "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"

// acc[64 x N] (+)= A[64 x 16] B[N x 16]^T, both from shared memory, both K-major (no transpose); N = 32 or 64.
#define K2_WGMMA_SS(N, REGS, TYPE, MODE, SCALE_D)                                                              \
  asm volatile(K2_WGMMA_SCALE_D##REGS "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." TYPE "." TYPE " "       \
               K2_WGMMA_LIST##REGS K2_WGMMA_SS_ARGS##REGS                                                      \
               : K2_WGMMA_ACC##REGS(MODE, acc)                                                                 \
               : "l"(desc_a), "l"(desc_b), "r"(SCALE_D))

template <int N, bool kAccumulate, typename T>
__device__ __forceinline__ void wgmma_ss(float (&acc)[N / 8][4], uint64_t desc_a, uint64_t desc_b) {
  static_assert(N == 32 || N == 64, "m64n32 and m64n64 tiles");
#ifdef K2_SM90A_DEVICE
  constexpr bool bf16 = std::is_same_v<T, __nv_bfloat16>;
  if constexpr (N == 64 && kAccumulate && bf16) {
    K2_WGMMA_SS(64, 32, "bf16", K2_WGMMA_READ_WRITE, 1);
  } else if constexpr (N == 64 && kAccumulate) {
    K2_WGMMA_SS(64, 32, "f16", K2_WGMMA_READ_WRITE, 1);
  } else if constexpr (N == 64 && bf16) {
    K2_WGMMA_SS(64, 32, "bf16", K2_WGMMA_WRITE, 0);
  } else if constexpr (N == 64) {
    K2_WGMMA_SS(64, 32, "f16", K2_WGMMA_WRITE, 0);
  } else if constexpr (kAccumulate && bf16) {
    K2_WGMMA_SS(32, 16, "bf16", K2_WGMMA_READ_WRITE, 1);
  } else if constexpr (kAccumulate) {
    K2_WGMMA_SS(32, 16, "f16", K2_WGMMA_READ_WRITE, 1);
  } else if constexpr (bf16) {
    K2_WGMMA_SS(32, 16, "bf16", K2_WGMMA_WRITE, 0);
  } else {
    K2_WGMMA_SS(32, 16, "f16", K2_WGMMA_WRITE, 0);
  }
#else
  __trap();
#endif
}

// acc[64 x 64] += A[64 x 16] * B[16 x 64], A from registers (this thread's mma.m16n8k16 A fragment of its
// warp's 16 rows), B from shared memory MN-major (N contiguous: transposed).
#define K2_WGMMA_RS(TYPE)                                                                                      \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"                                                   \
               "wgmma.mma_async.sync.aligned.m64n64k16.f32." TYPE "." TYPE " " K2_WGMMA_LIST32                 \
               ", {%32, %33, %34, %35}, %36, p, 1, 1, 1;\n}\n"                                                 \
               : K2_WGMMA_ACC32(K2_WGMMA_READ_WRITE, acc)                                                      \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(1))

template <typename T>
__device__ __forceinline__ void wgmma_rs(float (&acc)[8][4], const uint32_t (&a)[4], uint64_t desc_b) {
#ifdef K2_SM90A_DEVICE
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    K2_WGMMA_RS("bf16");
  } else {
    K2_WGMMA_RS("f16");
  }
#else
  __trap();
#endif
}

}  // namespace attention
}  // namespace k2
