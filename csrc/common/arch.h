// Run-time choice between a family's sm_90a kernels (wgmma, TMA) and its sm_80 ones.
#pragma once

namespace k2 {

// Whether the sm_90a kernels run on CUDA device `device`: compute capability 9.0 and a library built for 90a
// (K2_CUDA_ARCHS), unless the environment variable `force_sm80_env` is "sm80" (to run the sm_80 kernels on a
// Hopper GPU, e.g. to test them). `op` names the caller in errors.
bool use_sm90a_kernels(const char* op, int device, const char* force_sm80_env);

// The number of SMs of `device`.
int sm_count(const char* op, int device);

}  // namespace k2
