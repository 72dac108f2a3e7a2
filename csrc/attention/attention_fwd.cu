// Interval-mask attention forward on mma.sync (sm_80+); the interface and tile tables are in attention.h.
#include "attention/attention.h"

#include <math.h>

#include "attention/layouts.cuh"
#include "attention/tile_io.cuh"
#include "common/interval_mask.cuh"
#include "common/mma.cuh"

namespace tk {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kBM = kAttentionBlockM;
constexpr int kBN = kAttentionBlockN;
static_assert(kBM == 16 * kWarps, "one 16-row mma block per warp");
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// K/V rows outside the query tile's [kv_lo, kv_hi) are zero-filled (attn::load_rows): keys no
// query of the tile sees contribute exact zeros to P V.
template <typename T, int D, int ROWS>
__device__ __forceinline__ void load_tile(T* smem, const T* g, int64_t row_stride, int64_t r0, int64_t lo,
                                          int64_t hi, int tid) {
  attn::load_rows<T, D, ROWS, kThreads>(smem, g, row_stride, r0, lo, hi, tid);
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads, 1) attention_fwd_kernel(const AttentionFwdArgs a) {
  __shared__ alignas(16) T q_s[kBM * D];
  __shared__ alignas(16) T k_s[kBN * D];
  __shared__ alignas(16) T v_s[kBN * D];

  const int tile = gridDim.x - 1 - blockIdx.x;  // the longest (last, for causal masks) tiles first
  const int h = blockIdx.y;
  const int hk = h / (a.hq / a.hkv);
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, group = lane / 4, tig = lane % 4;
  const int64_t q0 = static_cast<int64_t>(tile) * kBM;

  const int32_t* tt = a.q_tiles + 4 * tile;
  const int kv_lo = __ldg(tt), kv_hi = __ldg(tt + 1), full_lo = __ldg(tt + 2), full_hi = __ldg(tt + 3);
  const int n_begin = kv_lo < kv_hi ? (kv_lo / kBN) * kBN : 0;
  const int n_end = kv_lo < kv_hi ? kv_hi : 0;

  const T* qg = static_cast<const T*>(a.q) + h * a.q_head_stride;
  const T* kg = static_cast<const T*>(a.k) + hk * a.k_head_stride;
  const T* vg = static_cast<const T*>(a.v) + hk * a.v_head_stride;

  const int64_t key_hi = n_end < a.nk ? n_end : a.nk;
  load_tile<T, D, kBM>(q_s, qg, a.q_row_stride, q0, 0, a.nq, tid);
  if (n_begin < n_end) load_tile<T, D, kBN>(k_s, kg, a.k_row_stride, n_begin, kv_lo, key_hi, tid);
  cp_async_commit();

  // This thread's two query rows (group and group + 8 of its warp's 16) and their intervals;
  // rows past the end see nothing.
  const int64_t row0 = q0 + warp * 16 + group, row1 = row0 + 8;
  const int s0 = row0 < a.nq ? __ldg(a.kv_start + row0) : 0, e0 = row0 < a.nq ? __ldg(a.kv_end + row0) : 0;
  const int s1 = row1 < a.nq ? __ldg(a.kv_start + row1) : 0, e1 = row1 < a.nq ? __ldg(a.kv_end + row1) : 0;
  const float scale_log2 = a.scale * kLog2e;

  float o[D / 8][4];
#pragma unroll
  for (int dt = 0; dt < D / 8; ++dt) o[dt][0] = o[dt][1] = o[dt][2] = o[dt][3] = 0.0f;
  float m[2] = {-INFINITY, -INFINITY};  // running row max of the log2-scaled scores
  float l[2] = {0.0f, 0.0f};            // running row sum (this thread's columns only)

  cp_async_wait<0>();
  __syncthreads();
  // Q's A fragments: held in registers for D = 64; re-read from shared memory per step for
  // D = 128, where 32 more live registers would push the O, S and Q state into spills.
  constexpr bool kQInRegs = D <= 64;
  const attn::FragLane fl = attn::make_frag_lane<D>(lane);
  uint32_t qf[kQInRegs ? D / 16 : 1][4];
  if constexpr (kQInRegs) {
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) ldmatrix_x4(qf[kk], q_s + attn::frag_a<D>(fl, warp * 16, kk));
  }

  for (int n0 = n_begin; n0 < n_end; n0 += kBN) {
    // K(n0) is in k_s; fetch V(n0) while computing S = Q K^T.
    load_tile<T, D, kBN>(v_s, vg, a.v_row_stride, n0, kv_lo, key_hi, tid);
    cp_async_commit();

    float s[kBN / 8][4];
#pragma unroll
    for (int nt = 0; nt < kBN / 8; ++nt) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t qk[4];
      if constexpr (!kQInRegs) ldmatrix_x4(qk, q_s + attn::frag_a<D>(fl, warp * 16, kk));
      const uint32_t(&a_frag)[4] = kQInRegs ? qf[kk] : qk;
#pragma unroll
      for (int np = 0; np < kBN / 16; ++np) {
        uint32_t b[4];
        ldmatrix_x4(b, k_s + attn::frag_b<D>(fl, np * 16, kk));
        mma_16816<T>(s[2 * np], a_frag, b[0], b[1]);
        mma_16816<T>(s[2 * np + 1], a_frag, b[2], b[3]);
      }
    }

    // Scale to log2 units; mask unless every query of the tile sees every key of this step.
    const bool full = classify_tile(n0, kBN, kv_lo, kv_hi, full_lo, full_hi) == kTileFull;
#pragma unroll
    for (int nt = 0; nt < kBN / 8; ++nt) {
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        float x = s[nt][c] * scale_log2;
        if (!full) {
          const int key = n0 + nt * 8 + tig * 2 + (c & 1);
          const bool seen = c < 2 ? interval_visible(s0, e0, key) : interval_visible(s1, e1, key);
          x = seen ? x : -INFINITY;
        }
        s[nt][c] = x;
      }
    }

    // Online softmax: a row's 64 scores live in the 4 threads of a quad.
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx = -INFINITY;
#pragma unroll
      for (int nt = 0; nt < kBN / 8; ++nt) mx = fmaxf(mx, fmaxf(s[nt][2 * r], s[nt][2 * r + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float m_new = fmaxf(m[r], mx);
      const float base = m_new == -INFINITY ? 0.0f : m_new;  // a row that has seen nothing yet
      const float alpha = fast_exp2(m[r] - base);
      m[r] = m_new;
      l[r] *= alpha;
#pragma unroll
      for (int dt = 0; dt < D / 8; ++dt) {
        o[dt][2 * r] *= alpha;
        o[dt][2 * r + 1] *= alpha;
      }
#pragma unroll
      for (int nt = 0; nt < kBN / 8; ++nt) {
        const float p0 = fast_exp2(s[nt][2 * r] - base), p1 = fast_exp2(s[nt][2 * r + 1] - base);
        s[nt][2 * r] = p0;
        s[nt][2 * r + 1] = p1;
        l[r] += p0 + p1;
      }
    }

    // V(n0) arrived and every warp is done with k_s: prefetch K(n0 + kBN) during O += P V.
    cp_async_wait<0>();
    __syncthreads();
    if (n0 + kBN < n_end) load_tile<T, D, kBN>(k_s, kg, a.k_row_stride, n0 + kBN, kv_lo, key_hi, tid);
    cp_async_commit();

#pragma unroll
    for (int kk = 0; kk < kBN / 16; ++kk) {
      const uint32_t pa[4] = {pack2<T>(s[2 * kk][0], s[2 * kk][1]), pack2<T>(s[2 * kk][2], s[2 * kk][3]),
                              pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                              pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
      for (int dp = 0; dp < D / 16; ++dp) {
        uint32_t b[4];
        ldmatrix_x4_trans(b, v_s + attn::frag_bt<D>(fl, kk * 16, dp));
        mma_16816<T>(o[2 * dp], pa, b[0], b[1]);
        mma_16816<T>(o[2 * dp + 1], pa, b[2], b[3]);
      }
    }
    // K(n0 + kBN) arrived and every warp is done with v_s.
    cp_async_wait<0>();
    __syncthreads();
  }

  // Normalise and store: out in T, lse in natural log (-inf for a row that sees nothing).
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
    const int64_t row = r == 0 ? row0 : row1;
    if (row >= a.nq) continue;
    const float inv = l[r] > 0.0f ? 1.0f / l[r] : 0.0f;
    T* out_row = static_cast<T*>(a.out) + (row * a.hq + h) * D;
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) {
      *reinterpret_cast<uint32_t*>(out_row + dt * 8 + tig * 2) = pack2<T>(o[dt][2 * r] * inv, o[dt][2 * r + 1] * inv);
    }
    if (tig == 0) a.lse[static_cast<int64_t>(h) * a.nq + row] = l[r] > 0.0f ? (m[r] + log2f(l[r])) * kLn2 : -INFINITY;
  }
}

template <typename T, int D>
cudaError_t launch(const AttentionFwdArgs& a, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((a.nq + kBM - 1) / kBM), static_cast<unsigned>(a.hq));
  attention_fwd_kernel<T, D><<<grid, kThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace

cudaError_t attention_fwd(const AttentionFwdArgs& a, DType dtype, int head_dim, cudaStream_t stream) {
  if (a.nq == 0 || a.hq == 0) return cudaSuccess;
  if (a.hkv <= 0 || a.hq % a.hkv != 0) return cudaErrorInvalidValue;
  if (dtype == DType::kFloat16) {
    if (head_dim == 64) return launch<__half, 64>(a, stream);
    if (head_dim == 128) return launch<__half, 128>(a, stream);
  } else if (dtype == DType::kBFloat16) {
    if (head_dim == 64) return launch<__nv_bfloat16, 64>(a, stream);
    if (head_dim == 128) return launch<__nv_bfloat16, 128>(a, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace tk
