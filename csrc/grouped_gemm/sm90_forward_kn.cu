// sm_90a grouped GEMM, layout kForwardKN (see grouped_gemm.h): A RowMajor, B RowMajor
// in CUTLASS's (M, K) x (K, N) terms.
#include "grouped_gemm/sm90_grouped_gemm.cuh"

namespace k2 {

using Sm90GemmForwardKN = sm90::GroupedGemm<cutlass::layout::RowMajor, cutlass::layout::RowMajor>;

template <>
size_t grouped_gemm_sm90_workspace_size<GroupedGemmLayout::kForwardKN>(int num_groups, int sm_count) {
  return sm90::workspace_size<Sm90GemmForwardKN>(num_groups, sm_count);
}

template <>
cudaError_t launch_grouped_gemm_sm90<GroupedGemmLayout::kForwardKN>(const GroupedGemmArgs& args, void* workspace,
                                                              cudaStream_t stream) {
  return sm90::launch<Sm90GemmForwardKN>(args, workspace, stream);
}

}  // namespace k2
