// A stand-in CUDA runtime for the rehearsal (k2_megatron/rehearsal/fake_cuda.py): lets torch's autograd engine run a
// backward over fake CUDA tensors (torch FakeTensorMode) on a machine without a GPU or a CUDA driver.
//
// Why it is needed (torch 2.13, CUDA build, no driver): FakeTensorMode swaps CUDA's device guard for c10's
// NoOpDeviceGuardImpl, whose streams carry device index -1 and which reports one device. The autograd engine then
// stashes the current stream of every device that has a primary context (GraphTask::stash_current_streams asks the
// CUDA hooks' hasPrimaryContext(0), which fails without a driver), and after the backward indexes those stashed
// streams with each leaf stream's device index (-1 here). This file installs
//   1. a CUDA device guard that only remembers the current device (default streams on the node's devices), and
//   2. an answer "yes" to hasPrimaryContext(i) for the node's devices on the CUDA hooks object, by giving that live object a copy of its own
//      vtable with that one slot replaced (the slot is found from the member pointer, Itanium C++ ABI).
// Nothing runs on a device: every tensor is fake, every guard call is a no-op. Built on first use against the
// installed torch (torch.utils.cpp_extension.load) and loaded with ctypes; installing is irreversible for the process.

#include <ATen/detail/CUDAHooksInterface.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>

#include <cstddef>
#include <cstring>

namespace {

using c10::Device;
using c10::DeviceIndex;
using c10::Stream;
constexpr auto kCUDA = c10::DeviceType::CUDA;

DeviceIndex g_devices = 1;  // devices of the rehearsed node
DeviceIndex g_current = 0;  // the current device (what torch.cuda.set_device chose)

Device device_or_current(Device d) { return Device(kCUDA, d.index() >= 0 ? d.index() : g_current); }

struct RehearsedCudaGuard final : c10::impl::DeviceGuardImplInterface {
  c10::DeviceType type() const override { return kCUDA; }
  Device exchangeDevice(Device d) const override {
    Device old(kCUDA, g_current);
    if (d.index() >= 0) g_current = d.index();
    return old;
  }
  Device getDevice() const override { return Device(kCUDA, g_current); }
  void setDevice(Device d) const override {
    if (d.index() >= 0) g_current = d.index();
  }
  void uncheckedSetDevice(Device d) const noexcept override {
    if (d.index() >= 0) g_current = d.index();
  }
  Stream getStream(Device d) const noexcept override { return Stream(Stream::DEFAULT, device_or_current(d)); }
  Stream getNewStream(Device d, int /*priority*/) const override {
    return Stream(Stream::DEFAULT, device_or_current(d));
  }
  Stream exchangeStream(Stream s) const noexcept override { return Stream(Stream::DEFAULT, s.device()); }
  DeviceIndex deviceCount() const noexcept override { return g_devices; }
};

bool has_primary_context(const at::CUDAHooksInterface* /*self*/, DeviceIndex index) {
  return index >= 0 && index < g_devices;
}

// A generous copy of the hooks' vtable (its two header words, then the slots): slots past its end are never called.
constexpr std::size_t kVtableSlots = 256;
void* hooks_vtable[2 + kVtableSlots];

}  // namespace

// Sets the rehearsed node's device count and the current device (torch.cuda.set_device).
extern "C" void k2_rehearsal_set_devices(int devices, int current) {
  g_devices = static_cast<DeviceIndex>(devices);
  g_current = static_cast<DeviceIndex>(current);
}

// 0: installed; 1: already installed (the device guard is registered again); negative: the vtable slot could not be
// located (nothing was changed).
extern "C" int k2_rehearsal_install_fake_cuda_runtime() {
  static RehearsedCudaGuard guard;
  auto& hooks = const_cast<at::CUDAHooksInterface&>(at::detail::getCUDAHooks());
  void*** object = reinterpret_cast<void***>(&hooks);
  if (*object == hooks_vtable + 2) {
    c10::impl::registerDeviceGuard(kCUDA, &guard);
    return 1;
  }
  auto member = &at::CUDAHooksInterface::hasPrimaryContext;
  std::ptrdiff_t offset = 0;
  static_assert(sizeof(member) >= sizeof(offset), "unexpected member-pointer size");
  std::memcpy(&offset, &member, sizeof offset);
  if ((offset & 1) == 0) {
    return -1;  // not a virtual member (Itanium ABI: 1 + byte offset into the vtable)
  }
  const std::size_t slot = static_cast<std::size_t>(offset - 1) / sizeof(void*);
  if (slot >= kVtableSlots) {
    return -2;
  }
  c10::impl::registerDeviceGuard(kCUDA, &guard);
  std::memcpy(hooks_vtable, *object - 2, sizeof hooks_vtable);
  hooks_vtable[2 + slot] = reinterpret_cast<void*>(&has_primary_context);
  *object = hooks_vtable + 2;
  return 0;
}
