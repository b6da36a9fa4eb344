// CUDA launches of the attention kernels (mma.sync and wgmma), instantiated per dtype in fwd_<dtype>.cu / bwd_<dtype>.cu.
#pragma once

#include "attention/kernels.cuh"

namespace k2 {
namespace attention {

struct CudaLauncher {
  cudaStream_t stream;

  template <typename... KernelArgs, typename... Args>
  cudaError_t operator()(void (*kernel)(KernelArgs...), dim3 grid, int smem_bytes, Args... args) const {
    if (grid.x == 0 || grid.y == 0 || grid.z == 0) return cudaSuccess;
    if (smem_bytes > 48 * 1024) {  // above the default limit: opt in (sm_80 allows 163 KB, sm_90 227 KB)
      const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes);
      if (err != cudaSuccess) return err;
    }
    kernel<<<grid, kThreads, smem_bytes, stream>>>(args...);
    return cudaGetLastError();
  }
};

template <typename T>
cudaError_t launch_forward(const Params& p, cudaStream_t stream) {
  CudaLauncher launcher{stream};
  return dispatch_forward<T>(p, launcher);
}

template <typename T>
cudaError_t launch_backward(const Params& p, cudaStream_t stream) {
  CudaLauncher launcher{stream};
  return dispatch_backward<T>(p, launcher);
}

}  // namespace attention
}  // namespace k2
