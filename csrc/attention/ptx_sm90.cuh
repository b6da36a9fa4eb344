// The Hopper primitives of the sm_90a attention forward: warpgroup MMA (wgmma.mma_async m64n64k16, operands
// from shared-memory descriptors or, for A, registers), its fences, and the proxy fence that makes
// cp.async-written shared memory visible to wgmma. tests/emulation/ re-implements the same functions.
//
// The instructions exist only on sm_90a: in any other compile pass the functions trap (the kernels that
// call them are never launched there; attention.cpp picks them on sm_90 devices of a 90a build only).
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

// The 32 fp32 accumulators of an m64n64 tile, per thread: acc[j] are columns 8j..8j+7 in the layout of an
// mma.m16n8 C fragment of this thread's warp (rows 16 (warp % 4) + g, + 8).
#define K2_WGMMA_ACC_OPERANDS(acc)                                                                            \
  "+f"(acc[0][0]), "+f"(acc[0][1]), "+f"(acc[0][2]), "+f"(acc[0][3]), "+f"(acc[1][0]), "+f"(acc[1][1]),       \
      "+f"(acc[1][2]), "+f"(acc[1][3]), "+f"(acc[2][0]), "+f"(acc[2][1]), "+f"(acc[2][2]), "+f"(acc[2][3]),   \
      "+f"(acc[3][0]), "+f"(acc[3][1]), "+f"(acc[3][2]), "+f"(acc[3][3]), "+f"(acc[4][0]), "+f"(acc[4][1]),   \
      "+f"(acc[4][2]), "+f"(acc[4][3]), "+f"(acc[5][0]), "+f"(acc[5][1]), "+f"(acc[5][2]), "+f"(acc[5][3]),   \
      "+f"(acc[6][0]), "+f"(acc[6][1]), "+f"(acc[6][2]), "+f"(acc[6][3]), "+f"(acc[7][0]), "+f"(acc[7][1]),   \
      "+f"(acc[7][2]), "+f"(acc[7][3])
#define K2_WGMMA_ACC_LIST                                                                                     \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, " \
  "%23, %24, %25, %26, %27, %28, %29, %30, %31}"

// acc[64 x 64] += A[64 x 16] * B[16 x 64], both from shared memory, both K-major (no transpose).
template <typename T>
__device__ __forceinline__ void wgmma_m64n64k16_ss(float (&acc)[8][4], uint64_t desc_a, uint64_t desc_b) {
#ifdef K2_SM90A_DEVICE
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 " K2_WGMMA_ACC_LIST
                 ", %32, %33, p, 1, 1, 0, 0;\n}\n"
                 : K2_WGMMA_ACC_OPERANDS(acc)
                 : "l"(desc_a), "l"(desc_b), "r"(1));
  } else {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 " K2_WGMMA_ACC_LIST
                 ", %32, %33, p, 1, 1, 0, 0;\n}\n"
                 : K2_WGMMA_ACC_OPERANDS(acc)
                 : "l"(desc_a), "l"(desc_b), "r"(1));
  }
#else
  __trap();
#endif
}

// acc[64 x 64] += A[64 x 16] * B[16 x 64], A from registers (this thread's mma.m16n8k16 A fragment of its
// warp's 16 rows), B from shared memory MN-major (N contiguous: transposed).
template <typename T>
__device__ __forceinline__ void wgmma_m64n64k16_rs(float (&acc)[8][4], const uint32_t (&a)[4], uint64_t desc_b) {
#ifdef K2_SM90A_DEVICE
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 " K2_WGMMA_ACC_LIST
                 ", {%32, %33, %34, %35}, %36, p, 1, 1, 1;\n}\n"
                 : K2_WGMMA_ACC_OPERANDS(acc)
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(1));
  } else {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 " K2_WGMMA_ACC_LIST
                 ", {%32, %33, %34, %35}, %36, p, 1, 1, 1;\n}\n"
                 : K2_WGMMA_ACC_OPERANDS(acc)
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(1));
  }
#else
  __trap();
#endif
}

}  // namespace attention
}  // namespace k2
