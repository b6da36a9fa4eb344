// sm_80 grouped GEMM, layout kForwardNK (see grouped_gemm.h): A RowMajor, B ColumnMajor
// in CUTLASS's (M, K) x (K, N) terms.
#include "grouped_gemm/sm80_grouped_gemm.cuh"

namespace k2 {

using Sm80GemmForwardNK = sm80::GroupedGemm<cutlass::layout::RowMajor, cutlass::layout::ColumnMajor>;

template <>
size_t grouped_gemm_sm80_workspace_size<GroupedGemmLayout::kForwardNK>(int num_groups, int sm_count) {
  return sm80::workspace_size<Sm80GemmForwardNK>(num_groups, sm_count);
}

template <>
cudaError_t launch_grouped_gemm_sm80<GroupedGemmLayout::kForwardNK>(const GroupedGemmArgs& args, void* workspace,
                                                              cudaStream_t stream) {
  return sm80::launch<Sm80GemmForwardNK>(args, workspace, stream);
}

}  // namespace k2
