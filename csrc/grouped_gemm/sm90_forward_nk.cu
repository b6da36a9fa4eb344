// sm_90a grouped GEMM, layout kForwardNK (see grouped_gemm.h): A RowMajor, B ColumnMajor
// in CUTLASS's (M, K) x (K, N) terms.
#include "grouped_gemm/sm90_grouped_gemm.cuh"

namespace k2 {

using Sm90GemmForwardNK = sm90::GroupedGemm<cutlass::layout::RowMajor, cutlass::layout::ColumnMajor>;

template <>
size_t grouped_gemm_sm90_workspace_size<GroupedGemmLayout::kForwardNK>(int num_groups, int sm_count) {
  return sm90::workspace_size<Sm90GemmForwardNK>(num_groups, sm_count);
}

template <>
cudaError_t launch_grouped_gemm_sm90<GroupedGemmLayout::kForwardNK>(const GroupedGemmArgs& args, void* workspace,
                                                              cudaStream_t stream) {
  return sm90::launch<Sm90GemmForwardNK>(args, workspace, stream);
}

}  // namespace k2
