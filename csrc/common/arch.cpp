#include "common/arch.h"

#include <c10/util/Exception.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdlib>
#include <string>
#include <string_view>

#define K2_ARCH_STRINGIFY_IMPL(x) #x
#define K2_ARCH_STRINGIFY(x) K2_ARCH_STRINGIFY_IMPL(x)

namespace k2 {
namespace {

bool built_for_sm90a() {
  const std::string_view archs = K2_ARCH_STRINGIFY(K2_CUDA_ARCHS);  // e.g. "80_90a"
  size_t begin = 0;
  while (begin <= archs.size()) {
    const size_t end = std::min(archs.find('_', begin), archs.size());
    if (archs.substr(begin, end - begin) == "90a") return true;
    begin = end + 1;
  }
  return false;
}

int device_attribute(const char* op, cudaDeviceAttr attr, int device) {
  int value = 0;
  const cudaError_t err = cudaDeviceGetAttribute(&value, attr, device);
  TORCH_CHECK(err == cudaSuccess, op, ": cannot query CUDA device ", device, ": ", cudaGetErrorString(err));
  return value;
}

}  // namespace

KernelChoice choose_kernels(int major, int minor, const char* force_sm80_env) {
  const char* forced = std::getenv(force_sm80_env);
  if (forced != nullptr && std::string_view(forced) == "sm80") {
    return {false, std::string(force_sm80_env) + "=sm80 selects the sm_80 kernels"};
  }
  if (major != 9 || minor != 0) return {false, "wgmma exists on sm_90a (compute capability 9.0) only"};
  if (!built_for_sm90a()) return {false, "the library has no sm_90a code (K2_CUDA_ARCHS)"};
  return {true, "compute capability 9.0 and a library built for sm_90a"};
}

bool use_sm90a_kernels(const char* op, int device, const char* force_sm80_env) {
  const int major = device_attribute(op, cudaDevAttrComputeCapabilityMajor, device);
  const int minor = device_attribute(op, cudaDevAttrComputeCapabilityMinor, device);
  TORCH_CHECK(major >= 8, op, ": the CUDA kernels need compute capability 8.0 or newer, device ", device, " is ",
              major, ".", minor);
  return choose_kernels(major, minor, force_sm80_env).sm90a;
}

int sm_count(const char* op, int device) { return device_attribute(op, cudaDevAttrMultiProcessorCount, device); }

}  // namespace k2
