// sm_80 grouped GEMM, layout kWgrad (see grouped_gemm.h): A ColumnMajor, B RowMajor
// in CUTLASS's (M, K) x (K, N) terms.
#include "grouped_gemm/sm80_grouped_gemm.cuh"

namespace k2 {

using Sm80GemmWgrad = sm80::GroupedGemm<cutlass::layout::ColumnMajor, cutlass::layout::RowMajor>;

template <>
size_t grouped_gemm_sm80_workspace_size<GroupedGemmLayout::kWgrad>(int num_groups, int sm_count) {
  return sm80::workspace_size<Sm80GemmWgrad>(num_groups, sm_count);
}

template <>
cudaError_t launch_grouped_gemm_sm80<GroupedGemmLayout::kWgrad>(const GroupedGemmArgs& args, void* workspace,
                                                              cudaStream_t stream) {
  return sm80::launch<Sm80GemmWgrad>(args, workspace, stream);
}

}  // namespace k2
