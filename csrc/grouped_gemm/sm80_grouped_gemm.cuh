// Ampere (sm_80, and any later GPU where the sm90 kernel does not run) grouped GEMM: a CUTLASS 2 grouped kernel
// (bf16 mma.sync 16x8x16, cp.async multistage mainloop), bf16 in, fp32 accumulation, bf16 out. The
// problem visitor runs in GroupScheduleMode::kDeviceOnly: every persistent block reads the problem sizes
// from device memory (built by build_group_problems_kernel), so no host copy of them is needed.
//
// Included by one generated .cu file per operand layout (instantiations/sm80_*.cu, written by
// generate_instantiations.py), so that ninja compiles them in parallel.
#pragma once

// CUTLASS is built as in its release builds, without its host and device assert()s.
#ifndef NDEBUG
#define NDEBUG
#endif

#include <cutlass/cutlass.h>
#include <cutlass/epilogue/thread/linear_combination.h>
#include <cutlass/gemm/kernel/default_gemm_grouped.h>
#include <cutlass/gemm/kernel/gemm_grouped.h>

#include "grouped_gemm/group_setup.cuh"
#include "grouped_gemm/grouped_gemm.h"

namespace k2 {
namespace sm80 {

using Element = cutlass::bfloat16_t;
constexpr int kAlignment = 8;  // bf16 elements per 128-bit cp.async
constexpr int kStages = 4;     // 4 x 16 KiB of operand tiles in shared memory (fits sm_86/sm_89 too)

// LayoutA / LayoutB in CUTLASS's (M, K) x (K, N) terms; D is row-major.
template <class LayoutA, class LayoutB>
struct GroupedGemm {
  using Kernel = typename cutlass::gemm::kernel::DefaultGemmGrouped<
      Element, LayoutA, cutlass::ComplexTransform::kNone, kAlignment,
      Element, LayoutB, cutlass::ComplexTransform::kNone, kAlignment,
      Element, cutlass::layout::RowMajor, float,
      cutlass::arch::OpClassTensorOp, cutlass::arch::Sm80,
      cutlass::gemm::GemmShape<128, 128, 32>, cutlass::gemm::GemmShape<64, 64, 32>,
      cutlass::gemm::GemmShape<16, 8, 16>,
      cutlass::epilogue::thread::LinearCombination<Element, kAlignment, float, float>,
      cutlass::gemm::threadblock::GemmBatchedIdentityThreadblockSwizzle, kStages,
      cutlass::gemm::kernel::GroupScheduleMode::kDeviceOnly>::GemmKernel;

  using Arguments = typename Kernel::Arguments;
  using LongIndex = int64_t;
  static_assert(std::is_same_v<typename cutlass::layout::RowMajor::Stride::LongIndex, LongIndex>);

  // The per-expert arrays the kernel reads, carved from the workspace.
  struct Arrays {
    cutlass::gemm::GemmCoord* sizes;
    Element** a;
    Element** b;
    Element** d;
    LongIndex* lda;
    LongIndex* ldb;
    LongIndex* ldd;
  };

  static size_t arrays_bytes(int groups) {
    const size_t g = static_cast<size_t>(groups);
    return align_up(g * sizeof(cutlass::gemm::GemmCoord)) + 3 * align_up(g * sizeof(void*)) +
           3 * align_up(g * sizeof(LongIndex));
  }

  static Arrays carve(void* workspace, int groups) {
    const size_t g = static_cast<size_t>(groups);
    char* p = static_cast<char*>(workspace);
    Arrays arr;
    arr.sizes = reinterpret_cast<cutlass::gemm::GemmCoord*>(p);
    p += align_up(g * sizeof(cutlass::gemm::GemmCoord));
    arr.a = reinterpret_cast<Element**>(p);
    p += align_up(g * sizeof(void*));
    arr.b = reinterpret_cast<Element**>(p);
    p += align_up(g * sizeof(void*));
    arr.d = reinterpret_cast<Element**>(p);
    p += align_up(g * sizeof(void*));
    arr.lda = reinterpret_cast<LongIndex*>(p);
    p += align_up(g * sizeof(LongIndex));
    arr.ldb = reinterpret_cast<LongIndex*>(p);
    p += align_up(g * sizeof(LongIndex));
    arr.ldd = reinterpret_cast<LongIndex*>(p);
    return arr;
  }
};

template <class Gemm>
struct ArrayWriter {
  typename Gemm::Arrays arr;
  __device__ void operator()(int e, const GroupProblem& p) const {
    arr.sizes[e] = cutlass::gemm::GemmCoord(p.m, p.n, p.k);
    // CUTLASS 2 takes non-const operand pointers; A and B are only read.
    arr.a[e] = reinterpret_cast<Element*>(const_cast<__nv_bfloat16*>(p.a));
    arr.b[e] = reinterpret_cast<Element*>(const_cast<__nv_bfloat16*>(p.b));
    arr.d[e] = reinterpret_cast<Element*>(p.d);
    arr.lda[e] = p.lda;
    arr.ldb[e] = p.ldb;
    arr.ldd[e] = p.ldd;
  }
};

// The kernel entry, compiled for every architecture from sm_80 on (mma.sync runs on all of them). On an
// sm_90 device the sm90 kernel is the default; K2_GROUPED_GEMM_KERNEL=sm80 selects this one there too,
// so that one GPU can test both.
template <class Kernel>
__global__ void __launch_bounds__(Kernel::kThreadCount) grouped_gemm_sm80_kernel(typename Kernel::Params params) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  extern __shared__ int4 smem[];
  Kernel op;
  op(params, *reinterpret_cast<typename Kernel::SharedStorage*>(smem));
#endif
}

template <class Gemm>
size_t workspace_size(int groups, int /*sm_count*/) {
  // kDeviceOnly needs no CUTLASS workspace: only the per-expert arrays.
  return Gemm::arrays_bytes(groups);
}

template <class Gemm>
cudaError_t launch(const GroupedGemmArgs& args, void* workspace, cudaStream_t stream) {
  using Kernel = typename Gemm::Kernel;
  const typename Gemm::Arrays arr = Gemm::carve(workspace, args.num_groups);
  build_group_problems_kernel<<<1, kGroupSetupThreads, 0, stream>>>(args, ArrayWriter<Gemm>{arr});
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;

  auto* kernel = &grouped_gemm_sm80_kernel<Kernel>;
  constexpr int smem = static_cast<int>(sizeof(typename Kernel::SharedStorage));
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return err;
  // Persistent blocks: as many as can be resident at once; each walks the tiles of all experts.
  int blocks_per_sm = 0;
  err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks_per_sm, kernel, Kernel::kThreadCount, smem);
  if (err != cudaSuccess) return err;
  const int blocks = args.sm_count * (blocks_per_sm > 0 ? blocks_per_sm : 1);

  typename Kernel::Arguments arguments(
      arr.sizes, args.num_groups, blocks,
      typename Kernel::EpilogueOutputOp::Params(1.0f, 0.0f),  // D = acc; C is never read (beta = 0)
      arr.a, arr.b, /*ptr_C=*/arr.d, arr.d, arr.lda, arr.ldb, /*ldc=*/arr.ldd, arr.ldd);
  const typename Kernel::Params params(arguments);
  kernel<<<blocks, Kernel::kThreadCount, smem, stream>>>(params);
  return cudaGetLastError();
}

}  // namespace sm80
}  // namespace k2
