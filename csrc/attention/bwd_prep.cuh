// The first kernel of both attention backwards (mma.sync and wgmma): per (query row, head)
// delta = sum_d dO * O and lse2 = lse * log2(e) (+inf for rows that see nothing, so that their
// probabilities exp2(s - lse2) are exactly 0). With kZeroWorkspace it also zeroes the wgmma
// backward's fp32 dQ accumulator ([nq, hq, D]) and its semaphores (hq per query tile).
// D / 8 threads per (row, head), 16-byte loads; pair = row * hq + head.
#pragma once

#include <math.h>

#include "attention/attention.h"
#include "common/dtype.cuh"

namespace tk {
namespace attn {

constexpr int kBwdPrepThreads = 256;

template <int D>
constexpr int64_t bwd_prep_blocks(int64_t nq, int hq) {
  return (nq * hq + kBwdPrepThreads / (D / 8) - 1) / (kBwdPrepThreads / (D / 8));
}

template <typename T, int D, bool kZeroWorkspace>
__global__ void __launch_bounds__(kBwdPrepThreads) attention_bwd_prep_kernel(const AttentionBwdArgs a) {
  constexpr int kLanes = D / 8;  // threads per (row, head)
  constexpr float kLog2e = 1.4426950408889634f;
  const int64_t pair = static_cast<int64_t>(blockIdx.x) * (kBwdPrepThreads / kLanes) + threadIdx.x / kLanes;
  const int part = threadIdx.x % kLanes;
  const bool valid = pair < static_cast<int64_t>(a.hq) * a.nq;
  const int64_t i = valid ? pair / a.hq : 0, h = valid ? pair % a.hq : 0;
  float acc = 0.0f;
  if (valid) {
    float o[8], d[8];
    load_vec<T>(static_cast<const T*>(a.out) + i * a.o_row_stride + h * a.o_head_stride + part * 8, o);
    load_vec<T>(static_cast<const T*>(a.dout) + i * a.do_row_stride + h * a.do_head_stride + part * 8, d);
#pragma unroll
    for (int e = 0; e < 8; ++e) acc += o[e] * d[e];
    if constexpr (kZeroWorkspace) {
      float* dq = a.dq_accum + pair * D + part * 8;
#pragma unroll
      for (int e = 0; e < 8; ++e) dq[e] = 0.0f;
    }
  }
#pragma unroll
  for (int off = kLanes / 2; off > 0; off /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, off);
  if (valid && part == 0) {
    const int64_t at = h * a.nq + i;
    const float lse = a.lse[at];
    a.delta[at] = acc;
    a.lse2[at] = lse == -INFINITY ? INFINITY : lse * kLog2e;
    if constexpr (kZeroWorkspace) {
      const int64_t tiles = (a.nq + kAttentionBwdBlockM - 1) / kAttentionBwdBlockM;
      if (pair < static_cast<int64_t>(a.hq) * tiles) a.dq_semaphore[pair] = 0;
    }
  }
}

}  // namespace attn
}  // namespace tk
