// Run-time choice between a family's sm_90a kernels (wgmma, TMA) and its sm_80 ones (mma.sync).
#pragma once

#include <string>

namespace k2 {

// Which kernels a family with an sm_90a variant runs on a GPU of compute capability major.minor, and why:
// the sm_90a ones on compute capability 9.0 with a library built for 90a (K2_CUDA_ARCHS), unless the
// environment variable `force_sm80_env` is "sm80" (to run the sm_80 kernels on a Hopper GPU, e.g. to test
// them); the sm_80 ones everywhere else (wgmma and TMA exist on sm_90a only: later GPUs run the mma.sync
// kernels, from SASS or from the embedded PTX).
struct KernelChoice {
  bool sm90a;
  std::string why;
};
KernelChoice choose_kernels(int major, int minor, const char* force_sm80_env);

// choose_kernels(...).sm90a for CUDA device `device`; fails for compute capability below 8.0. `op` names the
// caller in errors.
bool use_sm90a_kernels(const char* op, int device, const char* force_sm80_env);

// The number of SMs of `device`.
int sm_count(const char* op, int device);

}  // namespace k2
