// sm_90a grouped GEMM, layout kWgrad (see grouped_gemm.h): A ColumnMajor, B RowMajor
// in CUTLASS's (M, K) x (K, N) terms.
#include "grouped_gemm/sm90_grouped_gemm.cuh"

namespace k2 {

using Sm90GemmWgrad = sm90::GroupedGemm<cutlass::layout::ColumnMajor, cutlass::layout::RowMajor>;

template <>
size_t grouped_gemm_sm90_workspace_size<GroupedGemmLayout::kWgrad>(int num_groups, int sm_count) {
  return sm90::workspace_size<Sm90GemmWgrad>(num_groups, sm_count);
}

template <>
cudaError_t launch_grouped_gemm_sm90<GroupedGemmLayout::kWgrad>(const GroupedGemmArgs& args, void* workspace,
                                                              cudaStream_t stream) {
  return sm90::launch<Sm90GemmWgrad>(args, workspace, stream);
}

}  // namespace k2
