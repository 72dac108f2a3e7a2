// Global -> shared tile copies of the mma.sync attention kernels (cp.async, 16 bytes a thread).
#pragma once

#include <stdint.h>

#include "attention/layouts.cuh"
#include "attention/sm80.cuh"
#include "common/mma.cuh"

namespace tk {
namespace attn {

// ROWS x D tile of global rows [r0, r0 + ROWS) (row r at g + r * row_stride) into a swizzled
// tile. Rows outside [lo, hi) are zero-filled and never read from global memory: padding past
// the ends, and rows nobody at the other side of the product sees (0 * garbage could be NaN).
template <typename T, int D, int ROWS, int THREADS>
__device__ __forceinline__ void load_rows(T* smem, const T* g, int64_t row_stride, int64_t r0, int64_t lo, int64_t hi,
                                          int tid) {
  constexpr int kChunks = D / 8;
  constexpr int kRowsPerRound = THREADS / kChunks;
  // Rounds advance by a multiple of 8 rows: the swizzle (row % 8) is the same in every round,
  // so each round is the first one's addresses plus constants.
  static_assert(THREADS % kChunks == 0 && kRowsPerRound % 8 == 0 && ROWS % kRowsPerRound == 0, "whole copy rounds");
  const int r = tid / kChunks, c = tid % kChunks;
  T* dst = smem + swizzle<D>(r, c);
  const T* src = g + (r0 + r) * row_stride + c * 8;
#pragma unroll
  for (int it = 0; it < ROWS / kRowsPerRound; ++it) {
    const int64_t row = r0 + r + it * kRowsPerRound;
    const bool valid = lo <= row && row < hi;
    cp_async_16(dst + it * kRowsPerRound * D, valid ? src + it * kRowsPerRound * row_stride : g, valid);
  }
}

// Negates (flips the sign bit of) the 16-bit elements this thread copied with the same
// load_rows call, once its copies have landed: no other thread's data, so no barrier of its own.
template <int D, int ROWS, int THREADS, typename T>
__device__ __forceinline__ void negate_own_rows(T* smem, int tid) {
  constexpr int kChunks = D / 8;
  constexpr int kRowsPerRound = THREADS / kChunks;
  uint4* dst = reinterpret_cast<uint4*>(smem + swizzle<D>(tid / kChunks, tid % kChunks));
#pragma unroll
  for (int it = 0; it < ROWS / kRowsPerRound; ++it) {
    uint4& x = dst[it * kRowsPerRound * D / 8];
    x.x ^= 0x80008000u, x.y ^= 0x80008000u, x.z ^= 0x80008000u, x.w ^= 0x80008000u;
  }
}

}  // namespace attn
}  // namespace tk
