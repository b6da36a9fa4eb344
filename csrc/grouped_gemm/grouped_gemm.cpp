// CUDA implementation of k2_megatron::grouped_gemm / grouped_gemm_wgrad (schemas in csrc/ops.cpp).
//
// Supported: x, w, dy contiguous bf16 on one device, 16-byte aligned, K and N positive multiples of 8,
// T < 2^31; batch_sizes int64 [E] on the host (copied to the device asynchronously through pinned memory)
// or on x's device (read there: no host synchronisation). The op layer (k2_megatron/ops/grouped_gemm.py)
// sends every other case to the reference; a direct call with one fails here with the argument named.
//
// Kernel choice at run time: on an sm_90 device with the sm_90a build, the CUTLASS 3 TMA/wgmma kernel;
// otherwise (sm_8x, or later GPUs) the CUTLASS 2 mma.sync kernel. The environment variable
// K2_GROUPED_GEMM_KERNEL=sm80 forces the latter on sm_90 too (to test it on a Hopper GPU).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>

#include "common/arch.h"
#include "common/check.h"
#include "grouped_gemm/grouped_gemm.h"

namespace k2 {
namespace {

constexpr const char* kForward = "k2_megatron::grouped_gemm";
constexpr const char* kWgrad = "k2_megatron::grouped_gemm_wgrad";
constexpr int64_t kAlignElements = 8;  // 16 bytes of bf16

struct DeviceInfo {
  bool sm90;
  int sm_count;
};

DeviceInfo device_info(const char* op, int device) {
  return {use_sm90a_kernels(op, device, "K2_GROUPED_GEMM_KERNEL"), sm_count(op, device)};
}

// A row-major bf16 operand the kernels can read with 16-byte accesses.
void check_operand(const char* op, const char* name, const at::Tensor& t, int64_t ndim, const at::Tensor& x) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got ", t.device());
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " must be on x's device (", x.device(), "), got ",
              t.device());
  TORCH_CHECK(t.dim() == ndim, op, ": ", name, " must be ", ndim, "-D, got shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kBFloat16, op, ": ", name, " must be bfloat16 (other dtypes run the ",
              "reference through k2_megatron.ops.grouped_gemm), got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous, got strides ", t.strides());
  TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, op, ": ", name,
              " must start at a 16-byte aligned address");
  for (int64_t d = 1; d < ndim; ++d) {
    TORCH_CHECK(t.size(d) > 0 && t.size(d) % kAlignElements == 0 && t.size(d) <= INT32_MAX, op, ": ", name,
                " must have dimensions after the first that are positive multiples of ", kAlignElements,
                " (16-byte rows), got shape ", t.sizes());
  }
}

// batch_sizes as an int64 tensor on x's device: a host tensor goes through pinned memory, asynchronously.
at::Tensor device_batch_sizes(const char* op, const at::Tensor& batch_sizes, const at::Tensor& x, int64_t experts) {
  TORCH_CHECK(batch_sizes.scalar_type() == at::kLong, op, ": batch_sizes must be int64, got ",
              batch_sizes.scalar_type());
  TORCH_CHECK(batch_sizes.dim() == 1 && batch_sizes.size(0) == experts, op,
              ": batch_sizes must have shape [", experts, "] (one entry per expert), got ", batch_sizes.sizes());
  TORCH_CHECK(batch_sizes.is_cpu() || batch_sizes.device() == x.device(), op,
              ": batch_sizes must be on the host or on x's device (", x.device(), "), got ", batch_sizes.device());
  TORCH_CHECK(experts >= 1 && experts <= INT32_MAX / 64, op, ": the number of experts must be in [1, ",
              INT32_MAX / 64, "], got ", experts);
  if (!batch_sizes.is_cpu()) return batch_sizes.contiguous();
  return batch_sizes.contiguous().pin_memory().to(x.device(), /*non_blocking=*/true);
}

// One layout on the kernel of `info`: workspace from the caching allocator (on the current stream, so it
// is reused only by later work on it), then the launches.
template <GroupedGemmLayout L>
void run_layout(const char* op, const GroupedGemmArgs& args, bool sm90, const at::Tensor& like) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(args.device);
  const size_t bytes = sm90 ? grouped_gemm_sm90_workspace_size<L>(args.num_groups, args.sm_count)
                            : grouped_gemm_sm80_workspace_size<L>(args.num_groups, args.sm_count);
  const at::Tensor workspace = at::empty({static_cast<int64_t>(bytes)}, like.options().dtype(at::kByte));
  cudaError_t err = cudaSuccess;
  if constexpr (L == GroupedGemmLayout::kWgrad) err = launch_zero_empty_groups(args, stream);
  if (err == cudaSuccess) {
    err = sm90 ? launch_grouped_gemm_sm90<L>(args, workspace.data_ptr(), stream)
               : launch_grouped_gemm_sm80<L>(args, workspace.data_ptr(), stream);
  }
  K2_CHECK_CUDA_LAUNCH(op, err);
}

void run(const char* op, GroupedGemmArgs& args, const at::Tensor& like) {
  const DeviceInfo info = device_info(op, args.device);
  args.sm_count = info.sm_count;
  switch (args.layout) {
    case GroupedGemmLayout::kForwardKN: return run_layout<GroupedGemmLayout::kForwardKN>(op, args, info.sm90, like);
    case GroupedGemmLayout::kForwardNK: return run_layout<GroupedGemmLayout::kForwardNK>(op, args, info.sm90, like);
    case GroupedGemmLayout::kWgrad: return run_layout<GroupedGemmLayout::kWgrad>(op, args, info.sm90, like);
  }
}

}  // namespace

at::Tensor grouped_gemm_cuda(const at::Tensor& x, const at::Tensor& w, const at::Tensor& batch_sizes, bool trans_b) {
  K2_CHECK_CUDA(kForward, x);
  check_operand(kForward, "x", x, 2, x);
  check_operand(kForward, "w", w, 3, x);
  const int64_t k = x.size(1);
  const int64_t k_w = trans_b ? w.size(2) : w.size(1);
  const int64_t n = trans_b ? w.size(1) : w.size(2);
  TORCH_CHECK(k_w == k, kForward, ": w ", w.sizes(), " is ", trans_b ? "[E, N, K] (trans_b)" : "[E, K, N]",
              ", so its K (", k_w, ") must equal x.size(1) (", k, ")");
  TORCH_CHECK(x.size(0) <= INT32_MAX, kForward, ": x has too many rows for the kernel (", x.size(0), ")");
  c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor sizes = device_batch_sizes(kForward, batch_sizes, x, w.size(0));
  at::Tensor out = at::empty({x.size(0), n}, x.options());
  if (x.size(0) == 0) return out;

  GroupedGemmArgs args{};
  args.layout = trans_b ? GroupedGemmLayout::kForwardNK : GroupedGemmLayout::kForwardKN;
  args.batch_sizes = sizes.data_ptr<int64_t>();
  args.num_groups = static_cast<int>(w.size(0));
  args.rows = x.size(0);
  args.k = k;
  args.n = n;
  args.a = x.data_ptr();
  args.b = w.data_ptr();
  args.d = out.data_ptr();
  args.device = x.get_device();
  run(kForward, args, x);
  return out;
}

at::Tensor grouped_gemm_wgrad_cuda(const at::Tensor& x, const at::Tensor& dy, const at::Tensor& batch_sizes,
                                   bool trans_b) {
  K2_CHECK_CUDA(kWgrad, x);
  check_operand(kWgrad, "x", x, 2, x);
  check_operand(kWgrad, "dy", dy, 2, x);
  TORCH_CHECK(dy.size(0) == x.size(0), kWgrad, ": dy must have x's rows (", x.size(0), "), got shape ",
              dy.sizes());
  TORCH_CHECK(x.size(0) <= INT32_MAX, kWgrad, ": x has too many rows for the kernel (", x.size(0), ")");
  c10::cuda::CUDAGuard guard(x.device());
  TORCH_CHECK(batch_sizes.dim() == 1, kWgrad, ": batch_sizes must be 1-D (one entry per expert), got shape ",
              batch_sizes.sizes());
  const int64_t experts = batch_sizes.size(0);
  const at::Tensor sizes = device_batch_sizes(kWgrad, batch_sizes, x, experts);
  // dw[e] = x_e^T dy_e [K, N]; with trans_b, dy_e^T x_e [N, K]: the same kernel with the operands swapped.
  const at::Tensor& a = trans_b ? dy : x;
  const at::Tensor& b = trans_b ? x : dy;
  at::Tensor dw = at::empty({experts, a.size(1), b.size(1)}, x.options());
  if (x.size(0) == 0) return dw.zero_();

  GroupedGemmArgs args{};
  args.layout = GroupedGemmLayout::kWgrad;
  args.batch_sizes = sizes.data_ptr<int64_t>();
  args.num_groups = static_cast<int>(experts);
  args.rows = x.size(0);
  args.k = a.size(1);
  args.n = b.size(1);
  args.a = a.data_ptr();
  args.b = b.data_ptr();
  args.d = dw.data_ptr();
  args.device = x.get_device();
  run(kWgrad, args, x);
  return dw;
}

TORCH_LIBRARY_IMPL(k2_megatron, CUDA, m) {
  m.impl("grouped_gemm", &grouped_gemm_cuda);
  m.impl("grouped_gemm_wgrad", &grouped_gemm_wgrad_cuda);
}

}  // namespace k2
