// A CPU emulator of the CUDA execution model, just enough to run the sm_80 attention kernels
// (csrc/attention/kernels.cuh) unchanged: every CUDA thread of a block is a fiber (ucontext) and the
// hardware primitives of csrc/attention/ptx_sm80.cuh are re-implemented here with their documented
// semantics (PTX ISA: ldmatrix, mma.m16n8k16 fragment layouts, cp.async groups).
//
// It exists to test the kernels' indexing, masking, pipelining and synchronisation on a machine without a
// GPU, and it is strict where the hardware is silent:
// - cp.async copies land only when the issuing thread waits for their group, so a read before the wait
//   (or before the barrier after it) sees stale shared memory;
// - shared memory starts filled with 0x7f bytes (bf16/fp16: huge values), so reading a location nobody
//   wrote shows up in the results;
// - ldmatrix row addresses must be 16-byte aligned and inside the block's shared memory, whose dynamic part
//   is only 16-byte aligned.
// It says nothing about speed, occupancy or register spills: those need a GPU.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <stdexcept>
#include <string>
#include <vector>

#define K2_ATTENTION_EMULATED_PRIMITIVES
#define __launch_bounds__(...)
#define K2_DYNAMIC_SMEM(name) unsigned char* name = ::k2emu::block().dynamic_smem()

namespace k2emu {

struct Index {
  unsigned x = 0, y = 0, z = 0;
};

struct Block;
Block& block();
void yield();

// Threads arriving here yield until `count` of them have arrived (a barrier among fibers).
class Barrier {
 public:
  explicit Barrier(int count) : count_(count) {}
  void wait() {
    const unsigned generation = generation_;
    if (++arrived_ == count_) {
      arrived_ = 0;
      ++generation_;
      return;
    }
    while (generation_ == generation) yield();
  }

 private:
  int count_;
  int arrived_ = 0;
  unsigned generation_ = 0;
};

// What the lanes of a warp exchange in a collective operation.
struct Warp {
  Barrier barrier{32};
  const void* address[32];
  uint32_t a[32][4];
  uint32_t b[32][2];
  float value[32];
};

struct Copy {
  void* dst;
  const void* src;  // nullptr: zero-fill
};

struct Thread {
  ucontext_t context;
  Index index;
  bool done = false;
  std::vector<Copy> open_group;             // cp.async issued since the last commit
  std::vector<std::vector<Copy>> committed;  // oldest first
};

struct Block {
  Index index;
  std::vector<Thread> threads;
  std::vector<Warp> warps;
  Barrier barrier;
  std::vector<unsigned char> smem;  // see smem_base() and dynamic_smem()
  size_t smem_bytes = 0;
  ucontext_t scheduler;
  int current = 0;
  std::function<void()> body;
  std::string error;

  explicit Block(int n) : threads(n), warps(n / 32), barrier(n) {}
  // Shared address 0 (1024-byte aligned in host memory, so that emulated address bits are real ones).
  unsigned char* smem_base() {
    const uintptr_t p = reinterpret_cast<uintptr_t>(smem.data());
    return smem.data() + ((1024 - p % 1024) % 1024);
  }
  // The dynamic shared memory the kernel sees: deliberately only 16-byte aligned (shared address 528), so a
  // kernel that assumes more alignment than the hardware guarantees fails here.
  static constexpr size_t kDynamicOffset = 528;
  unsigned char* dynamic_smem() { return smem_base() + kDynamicOffset; }
};

inline Block*& current_block() {
  static Block* b = nullptr;
  return b;
}

inline Block& block() { return *current_block(); }
inline Thread& self() { return block().threads[block().current]; }
inline int lane_id() { return static_cast<int>(self().index.x % 32); }
inline Warp& warp() { return block().warps[self().index.x / 32]; }

inline void yield() {
  Block& b = block();
  swapcontext(&b.threads[b.current].context, &b.scheduler);
}

// An error in one thread (a failed check of this emulator) ends the whole launch: launch() rethrows it.
inline void thread_entry(int i) {
  try {
    block().body();
  } catch (const std::exception& e) {
    block().error = e.what();
  }
  block().threads[i].done = true;
}

// Runs body() as every thread of every block of the grid (blocks one after the other, threads interleaved
// at their synchronisation points).
inline void launch(dim3 grid, int threads, int smem_bytes, const std::function<void()>& body) {
  constexpr size_t kStack = 256 * 1024;
  std::vector<char> stacks(kStack * threads);
  for (unsigned z = 0; z < grid.z; ++z) {
    for (unsigned y = 0; y < grid.y; ++y) {
      for (unsigned x = 0; x < grid.x; ++x) {
        Block b(threads);
        b.index = {x, y, z};
        b.smem.assign(static_cast<size_t>(smem_bytes) + 1024 + Block::kDynamicOffset, 0x7f);
        b.smem_bytes = static_cast<size_t>(smem_bytes);
        b.body = body;
        current_block() = &b;
        for (int i = 0; i < threads; ++i) {
          Thread& t = b.threads[i];
          t.index = {static_cast<unsigned>(i), 0, 0};
          getcontext(&t.context);
          t.context.uc_stack.ss_sp = stacks.data() + kStack * i;
          t.context.uc_stack.ss_size = kStack;
          t.context.uc_link = &b.scheduler;
          makecontext(&t.context, reinterpret_cast<void (*)()>(thread_entry), 1, i);
        }
        int remaining = threads;
        while (remaining > 0 && b.error.empty()) {
          for (int i = 0; i < threads && b.error.empty(); ++i) {
            if (b.threads[i].done) continue;
            b.current = i;
            swapcontext(&b.scheduler, &b.threads[i].context);
            if (b.threads[i].done) --remaining;
          }
        }
        current_block() = nullptr;
        if (!b.error.empty()) {
          throw std::runtime_error("emulated block (" + std::to_string(x) + ", " + std::to_string(y) + ", " +
                                   std::to_string(z) + "): " + b.error);
        }
      }
    }
  }
}

inline void check_shared(const void* p, size_t bytes, const char* what) {
  const auto* c = static_cast<const unsigned char*>(p);
  Block& b = block();
  if (c < b.dynamic_smem() || c + bytes > b.dynamic_smem() + b.smem_bytes) {
    throw std::runtime_error(std::string(what) + ": address outside the block's shared memory");
  }
  if (reinterpret_cast<uintptr_t>(p) % 16 != 0) throw std::runtime_error(std::string(what) + ": misaligned address");
}

template <typename T>
float to_float(uint16_t bits);

template <>
inline float to_float<__nv_bfloat16>(uint16_t bits) {
  const uint32_t word = static_cast<uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &word, 4);
  return f;
}

template <>
inline float to_float<__half>(uint16_t bits) {
  __half_raw raw;
  raw.x = bits;
  return __half2float(__half(raw));
}

inline uint16_t element(const void* row, int col) { return static_cast<const uint16_t*>(row)[col]; }

}  // namespace k2emu

// The CUDA built-ins the kernels read.
#define threadIdx (::k2emu::self().index)
#define blockIdx (::k2emu::block().index)

namespace k2 {
namespace attention {

using std::max;
using std::min;

inline void block_sync() { k2emu::block().barrier.wait(); }

inline float shfl_xor(float x, int lane_mask) {
  k2emu::Warp& w = k2emu::warp();
  const int lane = k2emu::lane_id();
  w.value[lane] = x;
  w.barrier.wait();
  const float y = w.value[lane ^ lane_mask];
  w.barrier.wait();
  return y;
}

inline void cp_async_16(void* smem, const void* gmem, bool valid) {
  k2emu::check_shared(smem, 16, "cp.async");
  k2emu::self().open_group.push_back({smem, valid ? gmem : nullptr});
}

inline void cp_async_commit() {
  k2emu::Thread& t = k2emu::self();
  t.committed.push_back(std::move(t.open_group));
  t.open_group.clear();
}

template <int N>
inline void cp_async_wait() {
  k2emu::Thread& t = k2emu::self();
  while (t.committed.size() > static_cast<size_t>(N)) {
    for (const k2emu::Copy& c : t.committed.front()) {
      if (c.src != nullptr) {
        std::memcpy(c.dst, c.src, 16);
      } else {
        std::memset(c.dst, 0, 16);
      }
    }
    t.committed.erase(t.committed.begin());
  }
}

inline void ldmatrix_common(uint32_t (&r)[4], const void* smem, bool trans) {
  k2emu::check_shared(smem, 16, "ldmatrix");
  k2emu::Warp& w = k2emu::warp();
  const int lane = k2emu::lane_id();
  w.address[lane] = smem;
  w.barrier.wait();
  const int g = lane / 4, t = lane % 4;
  for (int j = 0; j < 4; ++j) {
    uint16_t lo, hi;
    if (trans) {  // transposed: (row 2t, col g), (row 2t + 1, col g)
      lo = k2emu::element(w.address[8 * j + 2 * t], g);
      hi = k2emu::element(w.address[8 * j + 2 * t + 1], g);
    } else {  // (row g, cols 2t, 2t + 1)
      lo = k2emu::element(w.address[8 * j + g], 2 * t);
      hi = k2emu::element(w.address[8 * j + g], 2 * t + 1);
    }
    r[j] = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
  }
  w.barrier.wait();
}

inline void ldmatrix_x4(uint32_t (&r)[4], const void* smem) { ldmatrix_common(r, smem, false); }
inline void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem) { ldmatrix_common(r, smem, true); }

// The 16 x 16 A operand of a warp from its lanes' m16n8k16 A fragments (each lane passes its own; warp-collective).
template <typename T>
inline void gather_a(float (&A)[16][16], const uint32_t (&a)[4]) {
  k2emu::Warp& w = k2emu::warp();
  std::copy(a, a + 4, w.a[k2emu::lane_id()]);
  w.barrier.wait();
  for (int l = 0; l < 32; ++l) {
    const int g = l / 4, t = l % 4;
    const int rows[4] = {g, g + 8, g, g + 8}, cols[4] = {2 * t, 2 * t, 2 * t + 8, 2 * t + 8};
    for (int i = 0; i < 4; ++i) {
      A[rows[i]][cols[i]] = k2emu::to_float<T>(w.a[l][i] & 0xffff);
      A[rows[i]][cols[i] + 1] = k2emu::to_float<T>(w.a[l][i] >> 16);
    }
  }
  w.barrier.wait();
}

template <typename T>
inline void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  float A[16][16], B[16][8];
  gather_a<T>(A, a);
  k2emu::Warp& w = k2emu::warp();
  const int lane = k2emu::lane_id();
  w.b[lane][0] = b0;
  w.b[lane][1] = b1;
  w.barrier.wait();
  for (int l = 0; l < 32; ++l) {
    const int g = l / 4, t = l % 4;
    for (int i = 0; i < 2; ++i) {
      B[2 * t + 8 * i][g] = k2emu::to_float<T>(w.b[l][i] & 0xffff);
      B[2 * t + 8 * i + 1][g] = k2emu::to_float<T>(w.b[l][i] >> 16);
    }
  }
  w.barrier.wait();
  const int g = lane / 4, t = lane % 4;
  for (int i = 0; i < 4; ++i) {
    const int row = g + 8 * (i / 2), col = 2 * t + (i % 2);
    float sum = 0.f;
    for (int k = 0; k < 16; ++k) sum += A[row][k] * B[k][col];
    c[i] += sum;
  }
}

inline void atomic_max_float(float* addr, float value) { *addr = std::fmax(*addr, value); }

// ---------------------------------------------------------------------------- Hopper (ptx_sm90.cuh)

inline uint32_t shared_address(const void* smem) {
  return static_cast<uint32_t>(static_cast<const unsigned char*>(smem) - k2emu::block().smem_base());
}

inline void fence_proxy_async() {}
inline void wgmma_fence() {}
inline void wgmma_commit() {}
inline void wgmma_wait_all() {}
template <typename Array>
inline void fence_operands(Array&) {}  // a compiler-ordering device: nothing to emulate

namespace wgmma_emulation {

struct Descriptor {
  uint32_t start, leading, stride;
};

// PTX matrix descriptor: start address, leading and stride byte offsets (>> 4), swizzle mode in bits 62-63.
inline Descriptor decode(uint64_t desc) {
  if ((desc >> 62) != 1) throw std::runtime_error("wgmma emulation: only the 128-byte swizzle is emulated");
  return {static_cast<uint32_t>(desc & 0x3fff) << 4, static_cast<uint32_t>((desc >> 16) & 0x3fff) << 4,
          static_cast<uint32_t>((desc >> 32) & 0x3fff) << 4};
}

// The 16-bit element at a (pre-swizzle) shared address: the 128-byte swizzle XORs address bits 4-6 with 7-9.
template <typename T>
inline float element(uint32_t address) {
  const uint32_t swizzled = address ^ (((address >> 7) & 7) << 4);
  const unsigned char* p = k2emu::block().smem_base() + swizzled;
  k2emu::check_shared(p - (swizzled % 16), 16, "wgmma operand");
  uint16_t bits;
  std::memcpy(&bits, p, 2);
  return k2emu::to_float<T>(bits);
}

// K-major canonical layout (128B swizzle): element (mn, k) of a 64-row operand.
template <typename T>
inline float k_major(const Descriptor& d, int mn, int k) {
  return element<T>(d.start + (mn / 8) * d.stride + (mn % 8) * 128 + k * 2);
}

// MN-major canonical layout (128B swizzle): element (k, n).
template <typename T>
inline float mn_major(const Descriptor& d, int k, int n) {
  return element<T>(d.start + (n / 64) * d.leading + (k / 8) * d.stride + (k % 8) * 128 + (n % 64) * 2);
}

}  // namespace wgmma_emulation

// Every thread computes its own m64nN accumulator fragment: rows 16 (warp % 4) + g (+ 8), columns 8j + 2t (+1).
// kAccumulate false: scale-d = 0, the old accumulator values are ignored.
template <int N, bool kAccumulate, typename T>
inline void wgmma_ss(float (&acc)[N / 8][4], uint64_t desc_a, uint64_t desc_b) {
  namespace we = wgmma_emulation;
  const we::Descriptor a = we::decode(desc_a), b = we::decode(desc_b);
  const int lane = k2emu::lane_id(), warp = static_cast<int>(k2emu::self().index.x / 32) % 4;
  const int g = lane / 4, t = lane % 4;
  for (int j = 0; j < N / 8; ++j) {
    for (int e = 0; e < 4; ++e) {
      const int row = 16 * warp + g + 8 * (e / 2), col = 8 * j + 2 * t + e % 2;
      float sum = 0.f;
      for (int k = 0; k < 16; ++k) sum += we::k_major<T>(a, row, k) * we::k_major<T>(b, col, k);
      acc[j][e] = kAccumulate ? acc[j][e] + sum : sum;
    }
  }
}

// A from registers: the warp's lanes exchange their m16n8k16 A fragments (rows of this warp only).
template <typename T>
inline void wgmma_rs(float (&acc)[8][4], const uint32_t (&a)[4], uint64_t desc_b) {
  namespace we = wgmma_emulation;
  const we::Descriptor b = we::decode(desc_b);
  float A[16][16];
  gather_a<T>(A, a);
  const int lane = k2emu::lane_id();
  const int g = lane / 4, t = lane % 4;
  for (int j = 0; j < 8; ++j) {
    for (int e = 0; e < 4; ++e) {
      const int row = g + 8 * (e / 2), col = 8 * j + 2 * t + e % 2;
      float sum = 0.f;
      for (int k = 0; k < 16; ++k) sum += A[row][k] * we::mn_major<T>(b, k, col);
      acc[j][e] += sum;
    }
  }
}

}  // namespace attention
}  // namespace k2
