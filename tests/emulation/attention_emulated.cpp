// The four attention ops of csrc/attention/attention.cpp with the CUDA launches replaced by the CPU
// emulator (warp_emulator.h): the same host preparation (host.cpp) and kernel source, on CPU tensors.
// Built by tests/ops/test_attention_emulated.py with torch.utils.cpp_extension.load.
#include <torch/extension.h>

#include <tuple>

#include "emulation/warp_emulator.h"
// After the emulator: the kernels see its primitives and built-ins.
#include "attention/host.h"
#include "attention/kernels.cuh"

namespace {

using k2::attention::Call;
using Outputs = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

struct EmulatedLauncher {
  template <typename... KernelArgs, typename... Args>
  cudaError_t operator()(void (*kernel)(KernelArgs...), dim3 grid, int smem_bytes, Args... args) const {
    k2emu::launch(grid, k2::attention::kThreads, smem_bytes, [&]() { kernel(args...); });
    return cudaSuccess;
  }
};

void check(cudaError_t err) { TORCH_CHECK(err == cudaSuccess, "emulated launch failed: ", cudaGetErrorName(err)); }

Outputs forward(Call c, bool wgmma) {
  EmulatedLauncher launcher;
  c.params.wgmma = wgmma;
  if (c.launch) {
    check(c.q.scalar_type() == at::kBFloat16 ? k2::attention::dispatch_forward<__nv_bfloat16>(c.params, launcher)
                                             : k2::attention::dispatch_forward<__half>(c.params, launcher));
  }
  return {c.out, c.lse, c.max_logits};
}

Outputs backward(Call c, bool wgmma) {
  EmulatedLauncher launcher;
  c.params.wgmma = wgmma;
  if (c.launch) {
    check(c.q.scalar_type() == at::kBFloat16 ? k2::attention::dispatch_backward<__nv_bfloat16>(c.params, launcher)
                                             : k2::attention::dispatch_backward<__half>(c.params, launcher));
  }
  return {c.grad_q, c.grad_k, c.grad_v};
}

Outputs fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool causal, double scale, bool wgmma) {
  return forward(k2::attention::prepare_forward("emulated mla_attention_fwd", q, k, v, causal, scale), wgmma);
}

Outputs bwd(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
            const at::Tensor& out, const at::Tensor& lse, bool causal, double scale, bool wgmma) {
  return backward(k2::attention::prepare_backward("emulated mla_attention_bwd", grad_out, q, k, v, out, lse, causal,
                                                  scale),
                  wgmma);
}

Outputs varlen_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_q,
                   const at::Tensor& cu_k, int64_t max_q, int64_t max_k, bool causal, double scale, bool wgmma) {
  return forward(k2::attention::prepare_varlen_forward("emulated mla_attention_varlen_fwd", q, k, v, cu_q, cu_k, max_q,
                                                       max_k, causal, scale),
                 wgmma);
}

Outputs varlen_bwd(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   const at::Tensor& out, const at::Tensor& lse, const at::Tensor& cu_q, const at::Tensor& cu_k,
                   int64_t max_q, int64_t max_k, bool causal, double scale, bool wgmma) {
  return backward(k2::attention::prepare_varlen_backward("emulated mla_attention_varlen_bwd", grad_out, q, k, v, out,
                                                         lse, cu_q, cu_k, max_q, max_k, causal, scale),
                  wgmma);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // wgmma: the sm_90a kernels (Sm90Tiles) instead of the mma.sync ones.
  m.def("mla_attention_fwd", &fwd, pybind11::arg("q"), pybind11::arg("k"), pybind11::arg("v"), pybind11::arg("causal"),
        pybind11::arg("scale"), pybind11::arg("wgmma") = false);
  m.def("mla_attention_bwd", &bwd, pybind11::arg("grad_out"), pybind11::arg("q"), pybind11::arg("k"),
        pybind11::arg("v"), pybind11::arg("out"), pybind11::arg("lse"), pybind11::arg("causal"), pybind11::arg("scale"),
        pybind11::arg("wgmma") = false);
  m.def("mla_attention_varlen_fwd", &varlen_fwd, pybind11::arg("q"), pybind11::arg("k"), pybind11::arg("v"),
        pybind11::arg("cu_q"), pybind11::arg("cu_k"), pybind11::arg("max_q"), pybind11::arg("max_k"),
        pybind11::arg("causal"), pybind11::arg("scale"), pybind11::arg("wgmma") = false);
  m.def("mla_attention_varlen_bwd", &varlen_bwd, pybind11::arg("grad_out"), pybind11::arg("q"), pybind11::arg("k"),
        pybind11::arg("v"), pybind11::arg("out"), pybind11::arg("lse"), pybind11::arg("cu_q"), pybind11::arg("cu_k"),
        pybind11::arg("max_q"), pybind11::arg("max_k"), pybind11::arg("causal"), pybind11::arg("scale"),
        pybind11::arg("wgmma") = false);
}
