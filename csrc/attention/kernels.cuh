// FlashAttention-2-style MLA attention on tensor cores, with the per-head max logit of QK-Clip fused into
// the forward. Every kernel body is written once against a Tiles policy: Sm80Tiles (mma.sync, any GPU of
// compute capability 8.0+) or Sm90Tiles (wgmma, sm_90a). Instantiated per dtype in fwd_<dtype>.cu /
// bwd_<dtype>.cu.
//
// Blocks of 64 queries x 64 keys, 4 warps, each warp owning 16 rows of the block's left operand.
//
// Forward (grid: query blocks x heads x sequences): S = Q K^T in registers, online softmax (running row
// max m of the raw q.k, running sum l), O += P V with P straight from the registers. The running row max
// is the max logit of the row once all keys are seen, so the per-head max costs a warp reduction and one
// atomic per warp at the end: no extra pass over memory.
//
// Backward (deterministic: no atomics on gradients): delta_i = dO_i . O_i; then one kernel per key block
// computes dK, dV over the query blocks (S^T = K Q^T, P^T = exp(S^T - lse), dV += P^T dO,
// dP^T = V dO^T, dS^T = P^T (dP^T - delta), dK += dS^T Q), and one kernel per query block computes dQ
// (recomputing P and dP, dQ += dS K). dK and dQ are scaled by softmax_scale at the end.
#pragma once

#include <math.h>

#include "attention/attention.h"
// The hardware primitives; tests/emulation/ defines K2_ATTENTION_EMULATED_PRIMITIVES and brings CPU ones.
#ifndef K2_ATTENTION_EMULATED_PRIMITIVES
#include "attention/ptx_sm80.cuh"
#include "attention/ptx_sm90.cuh"
#endif
#include "attention/warp_tiles.cuh"
#include "attention/warpgroup_tiles.cuh"

namespace k2 {
namespace attention {

constexpr int kBlockM = 64;   // queries per block
constexpr int kBlockN = 64;   // keys per block
constexpr int kThreads = 128;  // 4 warps x 16 rows
// The backward goes through a block's 64 x 64 (key, query) pairs in chunks of 32 columns (queries in the dK/dV
// kernel, keys in the dQ kernel): S, P, dP and dS of one chunk sit in registers next to the dK and dV (or dQ)
// accumulators, which keeps the largest case (d_qk 192, d_v 128: 160 accumulators per thread) below 255
// registers without spilling. Every accumulator sums the same products in the same order as unchunked.
constexpr int kChunk = 32;
constexpr float kLog2e = 1.4426950408889634f;

// Where sequence `batch` lives: its lengths and the starts of its rows.
struct Sequence {
  int len_q, len_k;
  int start_q, start_k;  // packed: first row in the packed tensors; dense: 0
  bool packed;
};

__device__ __forceinline__ Sequence sequence(const Params& p, int batch) {
  if (p.cu_seqlens_q != nullptr) {
    const int sq = p.cu_seqlens_q[batch], sk = p.cu_seqlens_k[batch];
    return {p.cu_seqlens_q[batch + 1] - sq, p.cu_seqlens_k[batch + 1] - sk, sq, sk, true};
  }
  return {p.seqlen_q, p.seqlen_k, 0, 0, false};
}

// Row 0 of sequence `batch`, head `head` of a tensor.
template <typename T>
__device__ __forceinline__ T* head_rows(const TensorRef& t, const Sequence& s, int batch, int head, bool query_side) {
  const int64_t seq = s.packed ? static_cast<int64_t>(query_side ? s.start_q : s.start_k) * t.row_stride
                               : static_cast<int64_t>(batch) * t.batch_stride;
  return static_cast<T*>(t.ptr) + seq + static_cast<int64_t>(head) * t.head_stride;
}

// Index of row 0 of (sequence, head) in lse / delta.
__device__ __forceinline__ int64_t stat_rows(const Params& p, const Sequence& s, int batch, int head) {
  return s.packed ? static_cast<int64_t>(head) * p.stat_head_stride + s.start_q
                  : static_cast<int64_t>(batch) * p.stat_batch_stride + static_cast<int64_t>(head) * p.stat_head_stride;
}

// Causal: query i sees key j iff j <= i + (len_k - len_q) (bottom-right aligned). Returns the end (exclusive)
// of the keys any of the queries [m0, m0 + kBlockM) sees.
__device__ __forceinline__ int key_end(const Params& p, const Sequence& s, int m0) {
  return p.causal ? min(s.len_k, m0 + kBlockM + s.len_k - s.len_q) : s.len_k;
}

__device__ __forceinline__ bool visible(const Params& p, const Sequence& s, int query, int key) {
  return key < s.len_k && query < s.len_q && (!p.causal || key <= query + s.len_k - s.len_q);
}

// ---------------------------------------------------------------------------------------------- forward

template <int DQK, int DV, typename T>
constexpr int forward_smem_bytes() {
  return (kBlockM * DQK + kBlockN * DQK + kBlockN * DV) * static_cast<int>(sizeof(T));
}

// The forward of one block of queries; Tiles is Sm80Tiles (mma.sync) or Sm90Tiles (wgmma), which lay out
// the shared tiles and compute S = Q K^T and O += P V with the same per-thread fragments.
template <typename T, int DQK, int DV, typename Tiles>
__device__ __forceinline__ void attention_forward(const Params& p, unsigned char* smem) {
  static_assert(kBlockM * (DV + 8) <= kBlockM * DQK + kBlockN * DQK + kBlockN * DV, "output staging fits");
  T* s_q = reinterpret_cast<T*>(smem);
  T* s_k = s_q + kBlockM * DQK;
  T* s_v = s_k + kBlockN * DQK;

  const int batch = blockIdx.z, head = blockIdx.y;
  const Sequence s = sequence(p, batch);
  const int m0 = blockIdx.x * kBlockM;
  if (m0 >= s.len_q) return;  // packed: this sequence is shorter than max_seqlen_q
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int g = lane / 4, t = lane % 4;

  const T* q = head_rows<T>(p.q, s, batch, head, true) + static_cast<int64_t>(m0) * p.q.row_stride;
  const T* k = head_rows<T>(p.k, s, batch, head, false);
  const T* v = head_rows<T>(p.v, s, batch, head, false);
  const int n_end = key_end(p, s, m0);
  const int n_blocks = n_end > 0 ? (n_end + kBlockN - 1) / kBlockN : 0;

  Tiles::template load<kBlockM, DQK, kThreads>(s_q, q, p.q.row_stride, s.len_q - m0);
  if (n_blocks > 0) Tiles::template load<kBlockN, DQK, kThreads>(s_k, k, p.k.row_stride, s.len_k);
  cp_async_commit();

  const float scale_log2 = p.softmax_scale * kLog2e;
  const int row_lo = m0 + warp * 16 + g;  // query of accumulator elements 0, 1; row_lo + 8 for 2, 3
  float o[DV / 8][4];
  zero(o);
  float row_max[2] = {-INFINITY, -INFINITY};  // of the raw q.k, over the keys seen so far
  float row_sum[2] = {0.f, 0.f};                       // this lane's part of sum exp(scale * (q.k - max))

  for (int nb = 0; nb < n_blocks; ++nb) {
    const int n0 = nb * kBlockN;
    cp_async_wait<0>();
    Tiles::publish();
    block_sync();  // K (and Q) landed; every warp is done with the previous V
    Tiles::template load<kBlockN, DV, kThreads>(s_v, v + static_cast<int64_t>(n0) * p.v.row_stride, p.v.row_stride,
                                           s.len_k - n0);
    cp_async_commit();

    float acc[kBlockN / 8][4];
    Tiles::template nt<DQK, kBlockN>(acc, s_q, s_k, 0, warp, lane);
    const bool needs_mask = n0 + kBlockN > s.len_k || (p.causal && n0 + kBlockN - 1 > m0 + s.len_k - s.len_q);
    if (needs_mask) {
#pragma unroll
      for (int nt = 0; nt < kBlockN / 8; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          if (!visible(p, s, row_lo + (e / 2) * 8, n0 + nt * 8 + 2 * t + (e % 2))) acc[nt][e] = -INFINITY;
        }
      }
    }
#pragma unroll
    for (int half = 0; half < 2; ++half) {  // rows g and g + 8
      float block_max = row_max[half];
#pragma unroll
      for (int nt = 0; nt < kBlockN / 8; ++nt) {
        block_max = fmaxf(block_max, fmaxf(acc[nt][2 * half], acc[nt][2 * half + 1]));
      }
      block_max = quad_max(block_max);
      // A row that has seen no visible key keeps max -inf: subtract 0 so that exp2 gives 0, not NaN.
      const float max_scaled = block_max == -INFINITY ? 0.f : block_max * scale_log2;
      const float rescale = exp2f(row_max[half] * scale_log2 - max_scaled);
      row_max[half] = block_max;
      float sum = 0.f;
#pragma unroll
      for (int nt = 0; nt < kBlockN / 8; ++nt) {
#pragma unroll
        for (int e = 2 * half; e < 2 * half + 2; ++e) {
          acc[nt][e] = exp2f(acc[nt][e] * scale_log2 - max_scaled);
          sum += acc[nt][e];
        }
      }
      row_sum[half] = row_sum[half] * rescale + sum;
#pragma unroll
      for (int dt = 0; dt < DV / 8; ++dt) {
        o[dt][2 * half] *= rescale;
        o[dt][2 * half + 1] *= rescale;
      }
    }

    cp_async_wait<0>();
    Tiles::publish();
    block_sync();  // V landed; every warp is done with K
    if (nb + 1 < n_blocks) {
      Tiles::template load<kBlockN, DQK, kThreads>(s_k, k + static_cast<int64_t>(n0 + kBlockN) * p.k.row_stride,
                                              p.k.row_stride, s.len_k - n0 - kBlockN);
      cp_async_commit();
    }
    Tiles::template rs<DV, kBlockN>(o, acc, s_v, 0, lane);
  }

  // Epilogue: out = O / l, lse = scale * max + log(l), per-head max logit.
  float inv_sum[2];
  float head_max = -INFINITY;
  float* lse = p.lse + stat_rows(p, s, batch, head);
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int row = row_lo + 8 * half;
    const float l = quad_sum(row_sum[half]);
    inv_sum[half] = l > 0.f ? 1.f / l : 0.f;
    if (row < s.len_q) {
      const float max_logit = row_max[half] * p.softmax_scale;
      head_max = fmaxf(head_max, max_logit);
      if (t == 0) lse[row] = l > 0.f ? max_logit + logf(l) : -INFINITY;
    }
  }
  if (p.max_logits != nullptr) {  // nullptr only for the overhead measurement of benchmarks/attention.py
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) head_max = fmaxf(head_max, shfl_xor(head_max, offset));
    if (lane == 0 && head_max != -INFINITY) atomic_max_float(p.max_logits + head, head_max);
  }

  cp_async_wait<0>();
  block_sync();  // all shared tiles are free: stage the output there
  T* out = head_rows<T>(p.out, s, batch, head, true) + static_cast<int64_t>(m0) * p.out.row_stride;
  store_block_rows<DV, kThreads>(out, p.out.row_stride, s.len_q - m0, reinterpret_cast<T*>(smem), o, inv_sum[0],
                                 inv_sum[1], warp, lane);
}

template <typename T, int DQK, int DV>
__global__ void __launch_bounds__(kThreads) attention_forward_kernel(const Params p) {
  K2_DYNAMIC_SMEM(smem);
  attention_forward<T, DQK, DV, Sm80Tiles>(p, smem);
}

// wgmma exists on sm_90a only: elsewhere (the sm_80 pass) an empty kernel, never launched.
template <typename T, int DQK, int DV>
__global__ void __launch_bounds__(kThreads) attention_forward_sm90_kernel(const Params p) {
#if defined(K2_ATTENTION_EMULATED_PRIMITIVES) || defined(__CUDA_ARCH_FEAT_SM90_ALL)
  K2_DYNAMIC_SMEM(smem);
  attention_forward<T, DQK, DV, Sm90Tiles>(p, Sm90Tiles::aligned(smem));
#endif
}

// --------------------------------------------------------------------------------------------- backward

// delta = rowsum(dO * O) in float32, one warp per (row, head); rows are the b * s_q rows of a dense problem
// or the total_q rows of a packed one.
template <typename T>
__global__ void __launch_bounds__(kThreads) attention_delta_kernel(const Params p, int64_t rows) {
  const int64_t item = static_cast<int64_t>(blockIdx.x) * (kThreads / kWarpSize) + threadIdx.x / kWarpSize;
  if (item >= rows * p.heads) return;
  const int lane = threadIdx.x % kWarpSize;
  const int64_t row = item / p.heads;
  const int head = static_cast<int>(item % p.heads);
  int64_t stat;
  const T* o;
  const T* dout;
  if (p.cu_seqlens_q != nullptr) {
    o = static_cast<const T*>(p.out.ptr) + row * p.out.row_stride;
    dout = static_cast<const T*>(p.grad_out.ptr) + row * p.grad_out.row_stride;
    stat = head * p.stat_head_stride + row;
  } else {
    const int64_t batch = row / p.seqlen_q, i = row % p.seqlen_q;
    o = static_cast<const T*>(p.out.ptr) + batch * p.out.batch_stride + i * p.out.row_stride;
    dout = static_cast<const T*>(p.grad_out.ptr) + batch * p.grad_out.batch_stride + i * p.grad_out.row_stride;
    stat = batch * p.stat_batch_stride + head * p.stat_head_stride + i;
  }
  o += static_cast<int64_t>(head) * p.out.head_stride;
  dout += static_cast<int64_t>(head) * p.grad_out.head_stride;
  float sum = 0.f;
  for (int c = lane; c < p.head_dim_v; c += kWarpSize) sum += to_float(o[c]) * to_float(dout[c]);
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) sum += shfl_xor(sum, offset);
  if (lane == 0) p.delta[stat] = sum;
}

template <int DQK, int DV, typename T>
constexpr int backward_smem_bytes() {
  return (kBlockM * DQK + kBlockM * DV + kBlockN * DQK + kBlockN * DV) * static_cast<int>(sizeof(T)) +
         2 * kBlockM * static_cast<int>(sizeof(float));
}

// lse in log2 units for exp2, +inf where no key is visible (or the row does not exist) so that P = 0.
__device__ __forceinline__ float lse_log2(const float* lse, int row, int len) {
  const float x = row < len ? lse[row] : -INFINITY;
  return x == -INFINITY ? INFINITY : x * kLog2e;
}

template <typename T, int DQK, int DV, typename Tiles>
__device__ __forceinline__ void attention_backward_dkdv(const Params& p, unsigned char* smem) {
  T* s_k = reinterpret_cast<T*>(smem);
  T* s_v = s_k + kBlockN * DQK;
  T* s_q = s_v + kBlockN * DV;
  T* s_do = s_q + kBlockM * DQK;
  float* s_lse = reinterpret_cast<float*>(s_do + kBlockM * DV);
  float* s_delta = s_lse + kBlockM;

  const int batch = blockIdx.z, head = blockIdx.y;
  const Sequence s = sequence(p, batch);
  const int n0 = blockIdx.x * kBlockN;
  if (n0 >= s.len_k) return;
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int g = lane / 4, t = lane % 4;

  const T* k = head_rows<T>(p.k, s, batch, head, false) + static_cast<int64_t>(n0) * p.k.row_stride;
  const T* v = head_rows<T>(p.v, s, batch, head, false) + static_cast<int64_t>(n0) * p.v.row_stride;
  const T* q = head_rows<T>(p.q, s, batch, head, true);
  const T* dout = head_rows<T>(p.grad_out, s, batch, head, true);
  const float* lse = p.lse + stat_rows(p, s, batch, head);
  const float* delta = p.delta + stat_rows(p, s, batch, head);

  Tiles::template load<kBlockN, DQK, kThreads>(s_k, k, p.k.row_stride, s.len_k - n0);
  Tiles::template load<kBlockN, DV, kThreads>(s_v, v, p.v.row_stride, s.len_k - n0);
  cp_async_commit();

  // Causal: the first query that sees key n0.
  const int first_query = p.causal ? max(0, n0 - (s.len_k - s.len_q)) : 0;
  const int m_begin = first_query / kBlockM;
  const int m_end = (s.len_q + kBlockM - 1) / kBlockM;
  const float scale_log2 = p.softmax_scale * kLog2e;
  const int key_lo = n0 + warp * 16 + g;  // key of accumulator elements 0, 1; key_lo + 8 for 2, 3

  float dk[DQK / 8][4];
  float dv[DV / 8][4];
  zero(dk);
  zero(dv);
  for (int mb = m_begin; mb < m_end; ++mb) {
    const int m0 = mb * kBlockM;
    block_sync();  // every warp is done with the previous query block
    Tiles::template load<kBlockM, DQK, kThreads>(s_q, q + static_cast<int64_t>(m0) * p.q.row_stride, p.q.row_stride,
                                            s.len_q - m0);
    cp_async_commit();
    Tiles::template load<kBlockM, DV, kThreads>(s_do, dout + static_cast<int64_t>(m0) * p.grad_out.row_stride,
                                           p.grad_out.row_stride, s.len_q - m0);
    cp_async_commit();
    if (threadIdx.x < kBlockM) {
      const int row = m0 + threadIdx.x;
      s_lse[threadIdx.x] = lse_log2(lse, row, s.len_q);
      s_delta[threadIdx.x] = row < s.len_q ? delta[row] : 0.f;
    }
    cp_async_wait<1>();
    Tiles::publish();
    block_sync();  // K, V, Q and the row statistics are in; dO may still be in flight

#pragma unroll 1
    for (int c0 = 0; c0 < kBlockM; c0 += kChunk) {  // the block's queries [c0, c0 + kChunk)
      float pt[kChunk / 8][4];  // S^T, then P^T: rows = this warp's keys, columns = the chunk's queries
      Tiles::template nt<DQK, kChunk>(pt, s_k, s_q, c0, warp, lane);
#pragma unroll
      for (int nt = 0; nt < kChunk / 8; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int col = c0 + nt * 8 + 2 * t + (e % 2);
          const int key = key_lo + (e / 2) * 8;
          pt[nt][e] = visible(p, s, m0 + col, key) ? exp2f(pt[nt][e] * scale_log2 - s_lse[col]) : 0.f;
        }
      }
      if (c0 == 0) {
        cp_async_wait<0>();
        Tiles::publish();
        block_sync();  // dO landed
      }
      Tiles::template rs<DV, kChunk>(dv, pt, s_do, c0, lane);

      float dst[kChunk / 8][4];  // dP^T, then dS^T
      Tiles::template nt<DV, kChunk>(dst, s_v, s_do, c0, warp, lane);
#pragma unroll
      for (int nt = 0; nt < kChunk / 8; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) dst[nt][e] = pt[nt][e] * (dst[nt][e] - s_delta[c0 + nt * 8 + 2 * t + (e % 2)]);
      }
      Tiles::template rs<DQK, kChunk>(dk, dst, s_q, c0, lane);
    }
  }

  cp_async_wait<0>();

  Tiles::publish();
  block_sync();  // the shared tiles are free: stage the outputs there
  T* stage = reinterpret_cast<T*>(smem);
  const int valid = s.len_k - n0;
  T* grad_k = head_rows<T>(p.grad_k, s, batch, head, false) + static_cast<int64_t>(n0) * p.grad_k.row_stride;
  store_block_rows<DQK, kThreads>(grad_k, p.grad_k.row_stride, valid, stage, dk, p.softmax_scale, p.softmax_scale,
                                  warp, lane);
  block_sync();  // the stage is read by the dK stores above
  T* grad_v = head_rows<T>(p.grad_v, s, batch, head, false) + static_cast<int64_t>(n0) * p.grad_v.row_stride;
  store_block_rows<DV, kThreads>(grad_v, p.grad_v.row_stride, valid, stage, dv, 1.f, 1.f, warp, lane);
}

template <typename T, int DQK, int DV, typename Tiles>
__device__ __forceinline__ void attention_backward_dq(const Params& p, unsigned char* smem) {
  T* s_q = reinterpret_cast<T*>(smem);
  T* s_do = s_q + kBlockM * DQK;
  T* s_k = s_do + kBlockM * DV;
  T* s_v = s_k + kBlockN * DQK;

  const int batch = blockIdx.z, head = blockIdx.y;
  const Sequence s = sequence(p, batch);
  const int m0 = blockIdx.x * kBlockM;
  if (m0 >= s.len_q) return;
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int g = lane / 4, t = lane % 4;

  const T* q = head_rows<T>(p.q, s, batch, head, true) + static_cast<int64_t>(m0) * p.q.row_stride;
  const T* dout = head_rows<T>(p.grad_out, s, batch, head, true) + static_cast<int64_t>(m0) * p.grad_out.row_stride;
  const T* k = head_rows<T>(p.k, s, batch, head, false);
  const T* v = head_rows<T>(p.v, s, batch, head, false);
  Tiles::template load<kBlockM, DQK, kThreads>(s_q, q, p.q.row_stride, s.len_q - m0);
  Tiles::template load<kBlockM, DV, kThreads>(s_do, dout, p.grad_out.row_stride, s.len_q - m0);
  cp_async_commit();

  const int row_lo = m0 + warp * 16 + g;
  const float* lse = p.lse + stat_rows(p, s, batch, head);
  const float* delta = p.delta + stat_rows(p, s, batch, head);
  const float row_lse[2] = {lse_log2(lse, row_lo, s.len_q), lse_log2(lse, row_lo + 8, s.len_q)};
  const float row_delta[2] = {row_lo < s.len_q ? delta[row_lo] : 0.f, row_lo + 8 < s.len_q ? delta[row_lo + 8] : 0.f};
  const float scale_log2 = p.softmax_scale * kLog2e;
  const int n_end = key_end(p, s, m0);
  const int n_blocks = n_end > 0 ? (n_end + kBlockN - 1) / kBlockN : 0;

  float dq[DQK / 8][4];
  zero(dq);
  for (int nb = 0; nb < n_blocks; ++nb) {
    const int n0 = nb * kBlockN;
    block_sync();  // every warp is done with the previous K, V
    Tiles::template load<kBlockN, DQK, kThreads>(s_k, k + static_cast<int64_t>(n0) * p.k.row_stride, p.k.row_stride,
                                            s.len_k - n0);
    cp_async_commit();
    Tiles::template load<kBlockN, DV, kThreads>(s_v, v + static_cast<int64_t>(n0) * p.v.row_stride, p.v.row_stride,
                                           s.len_k - n0);
    cp_async_commit();
    cp_async_wait<1>();
    Tiles::publish();
    block_sync();  // Q, dO and K landed; V may still be in flight

#pragma unroll 1
    for (int c0 = 0; c0 < kBlockN; c0 += kChunk) {  // the block's keys [c0, c0 + kChunk)
      float ps[kChunk / 8][4];  // S, then P, then dS
      Tiles::template nt<DQK, kChunk>(ps, s_q, s_k, c0, warp, lane);
#pragma unroll
      for (int nt = 0; nt < kChunk / 8; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int half = e / 2;
          const int key = n0 + c0 + nt * 8 + 2 * t + (e % 2);
          ps[nt][e] = visible(p, s, row_lo + 8 * half, key) ? exp2f(ps[nt][e] * scale_log2 - row_lse[half]) : 0.f;
        }
      }
      if (c0 == 0) {
        cp_async_wait<0>();
        Tiles::publish();
        block_sync();  // V landed
      }
      float dp[kChunk / 8][4];
      Tiles::template nt<DV, kChunk>(dp, s_do, s_v, c0, warp, lane);
#pragma unroll
      for (int nt = 0; nt < kChunk / 8; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) ps[nt][e] *= dp[nt][e] - row_delta[e / 2];
      }
      Tiles::template rs<DQK, kChunk>(dq, ps, s_k, c0, lane);
    }
  }

  cp_async_wait<0>();

  Tiles::publish();
  block_sync();
  T* grad_q = head_rows<T>(p.grad_q, s, batch, head, true) + static_cast<int64_t>(m0) * p.grad_q.row_stride;
  store_block_rows<DQK, kThreads>(grad_q, p.grad_q.row_stride, s.len_q - m0, reinterpret_cast<T*>(smem), dq,
                                  p.softmax_scale, p.softmax_scale, warp, lane);
}

template <typename T, int DQK, int DV>
__global__ void __launch_bounds__(kThreads, 1) attention_backward_dkdv_kernel(const Params p) {
  K2_DYNAMIC_SMEM(smem);
  attention_backward_dkdv<T, DQK, DV, Sm80Tiles>(p, smem);
}

template <typename T, int DQK, int DV>
__global__ void __launch_bounds__(kThreads, 1) attention_backward_dq_kernel(const Params p) {
  K2_DYNAMIC_SMEM(smem);
  attention_backward_dq<T, DQK, DV, Sm80Tiles>(p, smem);
}

// The wgmma backward (sm_90a only; empty elsewhere, never launched there).
template <typename T, int DQK, int DV>
__global__ void __launch_bounds__(kThreads, 1) attention_backward_dkdv_sm90_kernel(const Params p) {
#if defined(K2_ATTENTION_EMULATED_PRIMITIVES) || defined(__CUDA_ARCH_FEAT_SM90_ALL)
  K2_DYNAMIC_SMEM(smem);
  attention_backward_dkdv<T, DQK, DV, Sm90Tiles>(p, Sm90Tiles::aligned(smem));
#endif
}

template <typename T, int DQK, int DV>
__global__ void __launch_bounds__(kThreads, 1) attention_backward_dq_sm90_kernel(const Params p) {
#if defined(K2_ATTENTION_EMULATED_PRIMITIVES) || defined(__CUDA_ARCH_FEAT_SM90_ALL)
  K2_DYNAMIC_SMEM(smem);
  attention_backward_dq<T, DQK, DV, Sm90Tiles>(p, Sm90Tiles::aligned(smem));
#endif
}

// ---------------------------------------------------------------------------------- launch sequences
//
// What each direction launches, for a `launcher(kernel, grid, smem_bytes, kernel args...)`: CUDA
// (launch.cuh) or the CPU emulation (tests/emulation/). cudaErrorInvalidValue: head dims not compiled.

template <typename T, int DQK, int DV, typename Launcher>
cudaError_t forward_launches(const Params& p, Launcher& launcher) {
  const dim3 grid((p.seqlen_q + kBlockM - 1) / kBlockM, p.heads, p.batch);
  if (p.wgmma) {
    return launcher(attention_forward_sm90_kernel<T, DQK, DV>, grid,
                    forward_smem_bytes<DQK, DV, T>() + Sm90Tiles::kSmemAlignment, p);
  }
  return launcher(attention_forward_kernel<T, DQK, DV>, grid, forward_smem_bytes<DQK, DV, T>(), p);
}

template <typename T, int DQK, int DV, typename Launcher>
cudaError_t backward_launches(const Params& p, Launcher& launcher) {
  // Packed: lse and delta are [heads, total_q], so their head stride is the number of rows.
  const int64_t rows = p.cu_seqlens_q != nullptr ? p.stat_head_stride : static_cast<int64_t>(p.batch) * p.seqlen_q;
  const int64_t warps_per_block = kThreads / kWarpSize;
  const dim3 delta_grid(static_cast<unsigned>((rows * p.heads + warps_per_block - 1) / warps_per_block));
  cudaError_t err = launcher(attention_delta_kernel<T>, delta_grid, 0, p, rows);
  if (err != cudaSuccess) return err;
  const int smem = backward_smem_bytes<DQK, DV, T>();
  const dim3 dkdv_grid((p.seqlen_k + kBlockN - 1) / kBlockN, p.heads, p.batch);
  const dim3 dq_grid((p.seqlen_q + kBlockM - 1) / kBlockM, p.heads, p.batch);
  if (p.wgmma) {
    const int smem_sm90 = smem + Sm90Tiles::kSmemAlignment;
    err = launcher(attention_backward_dkdv_sm90_kernel<T, DQK, DV>, dkdv_grid, smem_sm90, p);
    return err != cudaSuccess ? err : launcher(attention_backward_dq_sm90_kernel<T, DQK, DV>, dq_grid, smem_sm90, p);
  }
  err = launcher(attention_backward_dkdv_kernel<T, DQK, DV>, dkdv_grid, smem, p);
  return err != cudaSuccess ? err : launcher(attention_backward_dq_kernel<T, DQK, DV>, dq_grid, smem, p);
}

#define K2_ATTENTION_FORWARD_CASE(DQK, DV) \
  if (p.head_dim_qk == DQK && p.head_dim_v == DV) return forward_launches<T, DQK, DV>(p, launcher);
#define K2_ATTENTION_BACKWARD_CASE(DQK, DV) \
  if (p.head_dim_qk == DQK && p.head_dim_v == DV) return backward_launches<T, DQK, DV>(p, launcher);

template <typename T, typename Launcher>
cudaError_t dispatch_forward(const Params& p, Launcher& launcher) {
  K2_ATTENTION_HEAD_DIMS(K2_ATTENTION_FORWARD_CASE)
  return cudaErrorInvalidValue;
}

template <typename T, typename Launcher>
cudaError_t dispatch_backward(const Params& p, Launcher& launcher) {
  K2_ATTENTION_HEAD_DIMS(K2_ATTENTION_BACKWARD_CASE)
  return cudaErrorInvalidValue;
}

}  // namespace attention
}  // namespace k2
