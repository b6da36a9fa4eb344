// k2_megatron._C: the one place where every operator schema of the extension is declared.
//
// Kernels live in csrc/<op family>/ and register their CUDA implementations with TORCH_LIBRARY_IMPL
// next to their host code. The CPU implementations are the pure-PyTorch references, registered from
// Python (k2_megatron/ops/), together with the fake (meta) implementations used by torch.compile.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/csrc/utils/pybind.h>
#include <torch/library.h>

#include <string>
#include <utility>

#include "attention/attention.h"
#include "attention/host.h"
#include "common/arch.h"

#define K2_STRINGIFY_IMPL(x) #x
#define K2_STRINGIFY(x) K2_STRINGIFY_IMPL(x)

TORCH_LIBRARY(k2_megatron, m) {
  // Newton-Schulz orthogonalisation of a batch of matrices [..., m, n] (Muon).
  // coefficients: flat (a, b, c) per iteration, so its length is 3 * steps.
  m.def("newton_schulz(Tensor x, float[] coefficients, float eps) -> Tensor");
  // MoE grouped GEMM; conventions in k2_megatron/ops/reference/grouped_gemm.py. x [T, K] grouped by expert,
  // w [E, K, N] ([E, N, K] if trans_b), batch_sizes int64 [E] (host or device) -> out [T, N];
  // wgrad: dw[e] = x_e^T dy_e -> [E, K, N] ([E, N, K] if trans_b). Token permutation: tokens [T, H],
  // topk_indices [T, k] -> (permuted [T*k, H] sorted by expert, row_map int64 [T, k], tokens_per_expert int64 [E]);
  // unpermute: (permuted, row_map, topk_probs [T, k] or None) -> [T, H].
  m.def("grouped_gemm(Tensor x, Tensor w, Tensor batch_sizes, bool trans_b) -> Tensor");
  m.def("grouped_gemm_wgrad(Tensor x, Tensor dy, Tensor batch_sizes, bool trans_b) -> Tensor");
  m.def("moe_permute(Tensor tokens, Tensor topk_indices, int num_experts) -> "
        "(Tensor permuted, Tensor row_map, Tensor tokens_per_expert)");
  m.def("moe_unpermute(Tensor permuted, Tensor row_map, Tensor? topk_probs) -> Tensor");
  // MLA attention with per-head max logits (QK-Clip); conventions in k2_megatron/ops/reference/attention.py.
  // Dense: q, k [b, s, h, d_qk], v [b, s_k, h, d_v] -> out [b, s, h, d_v], lse [b, h, s], max_logits f32 [h].
  // Varlen: q [total_q, h, d_qk], k, v [total_k, h, d], cu_seqlens int32 [n + 1] -> lse [h, total_q].
  m.def("mla_attention_fwd(Tensor q, Tensor k, Tensor v, bool causal, float softmax_scale) -> "
        "(Tensor out, Tensor lse, Tensor max_logits)");
  m.def("mla_attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, bool causal, "
        "float softmax_scale) -> (Tensor grad_q, Tensor grad_k, Tensor grad_v)");
  m.def("mla_attention_varlen_fwd(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, "
        "int max_seqlen_q, int max_seqlen_k, bool causal, float softmax_scale) -> "
        "(Tensor out, Tensor lse, Tensor max_logits)");
  m.def("mla_attention_varlen_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
        "Tensor cu_seqlens_q, Tensor cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, bool causal, "
        "float softmax_scale) -> (Tensor grad_q, Tensor grad_k, Tensor grad_v)");
  // FP8 activation storage; conventions in k2_megatron/ops/reference/fp8.py. x [..., n] bf16/fp16/fp32 ->
  // (q float8_e4m3fn [..., n], scales f32 [..., ceil(n / 128)]), one scale per 1x128 tile; dequantize -> dtype.
  m.def("fp8_tile_quantize(Tensor x) -> (Tensor q, Tensor scales)");
  m.def("fp8_tile_dequantize(Tensor q, Tensor scales, ScalarType dtype) -> Tensor");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "k2_megatron CUDA kernels; the operators are under torch.ops.k2_megatron";
  // SM architectures this library was compiled for, as "80_90a" (K2_CUDA_ARCHS at build time).
  m.def("cuda_archs", []() { return std::string(K2_STRINGIFY(K2_CUDA_ARCHS)); });
  // The virtual architecture whose PTX is embedded for GPUs without matching SASS, e.g. "80"; "" for none.
  m.def("cuda_ptx_arch", []() { return std::string(K2_STRINGIFY(K2_CUDA_PTX_ARCH)); });
  // (d_qk, d_v) pairs the CUDA attention kernels are compiled for; other head dims run the reference.
  m.def("attention_head_dims", &k2::attention::supported_head_dims);
  // Whether a family's sm_90a kernels run on CUDA device `device` (csrc/common/arch.h); `force_sm80_env` is the
  // family's override variable, e.g. "K2_ATTENTION_KERNEL".
  m.def("use_sm90a_kernels", [](int device, const std::string& force_sm80_env) {
    return k2::use_sm90a_kernels("k2_megatron._C.use_sm90a_kernels", device, force_sm80_env.c_str());
  });
  // The same choice for a GPU of compute capability major.minor, with its reason: (sm90a, why).
  m.def("choose_kernels", [](int major, int minor, const std::string& force_sm80_env) {
    const k2::KernelChoice choice = k2::choose_kernels(major, minor, force_sm80_env.c_str());
    return std::make_pair(choice.sm90a, choice.why);
  });
  // benchmarks/attention.py: the dense attention forward with the max-logit tracking off (CUDA only).
  m.def("_attention_forward_without_max_logits", &k2::attention::forward_without_max_logits);
}
