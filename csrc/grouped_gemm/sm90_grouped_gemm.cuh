// Hopper (sm_90a) grouped GEMM: a CUTLASS 3 ptr-array kernel (TMA loads, warp-specialised cooperative
// wgmma, persistent group tile scheduler), bf16 in, fp32 accumulation, bf16 out via a TMA-store epilogue.
// Problem shapes, operand pointers and strides live only on the device (no host problem shapes), built by
// build_group_problems_kernel; the scheduler then launches one CTA per SM and walks every expert's tiles.
//
// Included by one generated .cu file per operand layout (instantiations/sm90_*.cu, written by
// generate_instantiations.py), so that ninja compiles them in parallel.
#pragma once

// CUTLASS is built as in its release builds, without its host and device assert()s.
#ifndef NDEBUG
#define NDEBUG
#endif

// CUTLASS's sm100 collectives, parsed here though unused, capture `this` implicitly in lambdas, which C++20
// (torch's standard) deprecates: warning 2908, silenced for the CUTLASS headers only.
#pragma nv_diag_suppress 2908
#include <cute/tensor.hpp>
#include <cutlass/cutlass.h>
#include <cutlass/epilogue/collective/collective_builder.hpp>
#include <cutlass/epilogue/fusion/operations.hpp>
#include <cutlass/gemm/collective/collective_builder.hpp>
#include <cutlass/gemm/dispatch_policy.hpp>
#include <cutlass/gemm/group_array_problem_shape.hpp>
#include <cutlass/gemm/kernel/gemm_universal.hpp>
#include <cutlass/kernel_hardware_info.hpp>
#pragma nv_diag_default 2908

#include "grouped_gemm/group_setup.cuh"
#include "grouped_gemm/grouped_gemm.h"

namespace k2 {
namespace sm90 {

using namespace cute;

using Element = cutlass::bfloat16_t;
using Accumulator = float;
using LayoutD = cutlass::layout::RowMajor;
constexpr int kAlignment = 8;  // bf16 elements per 16 bytes (TMA)
// 128 x 256 output tiles, two consumer warpgroups of 64 x 256; no clusters (a 1x1x1 cluster needs no
// cluster-aware grid sizing and keeps every expert's tiles independent).
using TileShape = Shape<_128, _256, _64>;
using ClusterShape = Shape<_1, _1, _1>;
using ProblemShape = cutlass::gemm::GroupProblemShape<Shape<int, int, int>>;

// The epilogue does not depend on the operand layouts.
using Epilogue = cutlass::epilogue::collective::CollectiveBuilder<
    cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
    cutlass::epilogue::collective::EpilogueTileAuto, Accumulator, Accumulator,
    void, LayoutD*, kAlignment,  // no source C: D = acc
    Element, LayoutD*, kAlignment,
    cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative>::CollectiveOp;  // default fusion: alpha * acc
// Shared memory the mainloop leaves to the epilogue. Evaluated here, outside the template below: nvcc's
// host pass fails to instantiate the epilogue inside a dependent context.
constexpr int kEpilogueSmemBytes = static_cast<int>(sizeof(typename Epilogue::SharedStorage));

// LayoutA / LayoutB in CUTLASS's (M, K) x (K, N) terms; D is row-major.
template <class LayoutA, class LayoutB>
struct GroupedGemm {
  using Element = sm90::Element;
  using ClusterShape = sm90::ClusterShape;

  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Element, LayoutA*, kAlignment, Element, LayoutB*,
      kAlignment, Accumulator, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<kEpilogueSmemBytes>,
      cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperative>::CollectiveOp;

  using Kernel = cutlass::gemm::kernel::GemmUniversal<ProblemShape, Mainloop, Epilogue>;

  using Shape3 = typename ProblemShape::UnderlyingProblemShape;
  using StrideA = typename Kernel::InternalStrideA;
  using StrideB = typename Kernel::InternalStrideB;
  using StrideD = typename Kernel::InternalStrideD;

  // The per-expert arrays CUTLASS reads, carved from the front of the workspace.
  struct Arrays {
    Shape3* shapes;
    const Element** a;
    const Element** b;
    Element** d;
    StrideA* stride_a;
    StrideB* stride_b;
    StrideD* stride_d;
  };

  static size_t arrays_bytes(int groups) {
    const size_t g = static_cast<size_t>(groups);
    return align_up(g * sizeof(Shape3)) + 3 * align_up(g * sizeof(void*)) + align_up(g * sizeof(StrideA)) +
           align_up(g * sizeof(StrideB)) + align_up(g * sizeof(StrideD));
  }

  static Arrays carve(void* workspace, int groups) {
    const size_t g = static_cast<size_t>(groups);
    char* p = static_cast<char*>(workspace);
    Arrays arr;
    arr.shapes = reinterpret_cast<Shape3*>(p);
    p += align_up(g * sizeof(Shape3));
    arr.a = reinterpret_cast<const Element**>(p);
    p += align_up(g * sizeof(void*));
    arr.b = reinterpret_cast<const Element**>(p);
    p += align_up(g * sizeof(void*));
    arr.d = reinterpret_cast<Element**>(p);
    p += align_up(g * sizeof(void*));
    arr.stride_a = reinterpret_cast<StrideA*>(p);
    p += align_up(g * sizeof(StrideA));
    arr.stride_b = reinterpret_cast<StrideB*>(p);
    p += align_up(g * sizeof(StrideB));
    arr.stride_d = reinterpret_cast<StrideD*>(p);
    return arr;
  }

  static typename Kernel::Arguments arguments(const Arrays& arr, const GroupedGemmArgs& args) {
    cutlass::KernelHardwareInfo hw_info;
    hw_info.device_id = args.device;
    hw_info.sm_count = args.sm_count;
    typename Kernel::Arguments out{
        cutlass::gemm::GemmUniversalMode::kGrouped,
        {args.num_groups, arr.shapes, nullptr},  // device-only problem shapes
        {arr.a, arr.stride_a, arr.b, arr.stride_b},
        {{}, nullptr, nullptr, arr.d, arr.stride_d},
        hw_info};
    out.epilogue.thread.alpha = 1.0f;
    out.epilogue.thread.beta = 0.0f;
    return out;
  }
};

// The dynamic entry of a CuTe stride with one runtime leading dimension (the others are static 1 and 0).
template <class Stride>
__device__ __forceinline__ Stride leading_dim_stride(int64_t ld) {
  Stride s{};
  if constexpr (cute::is_static<cute::remove_cvref_t<decltype(cute::get<0>(s))>>::value) {
    cute::get<1>(s) = ld;
  } else {
    cute::get<0>(s) = ld;
  }
  return s;
}

template <class Gemm>
struct ArrayWriter {
  typename Gemm::Arrays arr;
  __device__ void operator()(int e, const GroupProblem& p) const {
    using Element = typename Gemm::Element;
    arr.shapes[e] = typename Gemm::Shape3{p.m, p.n, p.k};
    arr.a[e] = reinterpret_cast<const Element*>(p.a);
    arr.b[e] = reinterpret_cast<const Element*>(p.b);
    arr.d[e] = reinterpret_cast<Element*>(p.d);
    arr.stride_a[e] = leading_dim_stride<typename Gemm::StrideA>(p.lda);
    arr.stride_b[e] = leading_dim_stride<typename Gemm::StrideB>(p.ldb);
    arr.stride_d[e] = leading_dim_stride<typename Gemm::StrideD>(p.ldd);
  }
};

// The kernel entry: compiled only in the sm_90a pass (wgmma and TMA need it); an empty stub elsewhere.
// Params hold TMA descriptors, which must stay in parameter space: __grid_constant__.
template <class Kernel>
__global__ void __launch_bounds__(Kernel::MaxThreadsPerBlock, Kernel::MinBlocksPerMultiprocessor)
    grouped_gemm_sm90_kernel(CUTLASS_GRID_CONSTANT typename Kernel::Params const params) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  extern __shared__ char smem[];
  Kernel op;
  op(params, smem);
#endif
}

template <class Gemm>
size_t workspace_size(int groups, int sm_count) {
  GroupedGemmArgs args{};
  args.num_groups = groups;
  args.sm_count = sm_count;
  typename Gemm::Arrays none{};
  return Gemm::arrays_bytes(groups) + align_up(Gemm::Kernel::get_workspace_size(Gemm::arguments(none, args)));
}

template <class Gemm>
cudaError_t launch(const GroupedGemmArgs& args, void* workspace, cudaStream_t stream) {
  using Kernel = typename Gemm::Kernel;
  const typename Gemm::Arrays arr = Gemm::carve(workspace, args.num_groups);
  void* cutlass_workspace = static_cast<char*>(workspace) + Gemm::arrays_bytes(args.num_groups);

  build_group_problems_kernel<<<1, kGroupSetupThreads, 0, stream>>>(args, ArrayWriter<Gemm>{arr});
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;

  const typename Kernel::Arguments arguments = Gemm::arguments(arr, args);
  if (Kernel::initialize_workspace(arguments, cutlass_workspace, stream) != cutlass::Status::kSuccess) {
    return cudaErrorUnknown;
  }
  const typename Kernel::Params params = Kernel::to_underlying_arguments(arguments, cutlass_workspace);

  auto* kernel = &grouped_gemm_sm90_kernel<Kernel>;
  constexpr int smem = Kernel::SharedStorageSize;
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return err;
  cudaLaunchConfig_t config{};
  config.gridDim = Kernel::get_grid_shape(params);
  config.blockDim = Kernel::get_block_shape();
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  cudaLaunchAttribute cluster{};
  cluster.id = cudaLaunchAttributeClusterDimension;
  cluster.val.clusterDim.x = size<0>(typename Gemm::ClusterShape{});
  cluster.val.clusterDim.y = size<1>(typename Gemm::ClusterShape{});
  cluster.val.clusterDim.z = 1;
  config.attrs = &cluster;
  config.numAttrs = 1;
  return cudaLaunchKernelEx(&config, kernel, params);
}

}  // namespace sm90
}  // namespace k2
