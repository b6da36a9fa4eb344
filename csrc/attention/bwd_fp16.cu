// The backward attention kernels for __half (one file per dtype and direction so that ninja compiles them in parallel).
#include "attention/launch.cuh"

namespace k2 {
namespace attention {
template cudaError_t launch_backward<__half>(const Params& p, cudaStream_t stream);
}  // namespace attention
}  // namespace k2
