// The forward attention kernels for __nv_bfloat16 (one file per dtype and direction so that ninja compiles them in parallel).
#include "attention/launch.cuh"

namespace k2 {
namespace attention {
template cudaError_t launch_forward<__nv_bfloat16>(const Params& p, cudaStream_t stream);
}  // namespace attention
}  // namespace k2
