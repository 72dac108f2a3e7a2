// Interval-mask attention backward on mma.sync m16n8k16 tensor cores (sm_80+), FlashAttention-2
// style, three kernels on one stream:
//
//   prep:  delta[h, i] = sum_d dO[i, h, d] * O[i, h, d] and lse2 = lse * log2(e) (+inf for rows
//          that see nothing, so that their probabilities exp2(s - lse2) are exactly 0).
//   dk/dv: one block of 4 warps per (key tile of 64, kv head). Each warp owns 16 keys and works
//          in the transposed orientation (S^T = K Q^T: keys are the mma rows), so dK and dV
//          stay in its registers. The block walks the query steps of the key table's range
//          [q_lo, q_hi) (FULL steps without mask arithmetic) for every query head of the GQA
//          group: dK, dV are summed over the group in registers, no atomics, K/V never copied.
//   dq:    one block of 4 warps per (query tile of 64, query head), over the key steps of the
//          query table's range [kv_lo, kv_hi): deterministic, no atomics.
//   Blocks run (tile rank, head) with the head fastest, tile = k_order / q_order[rank] when
//   given: the launch sequence is then longest first over all blocks, not per head.
//
// Per step, with P recomputed from lse: dV += P^T dO, dP = dO V^T, dS = P * (dP - delta),
// dK += dS^T Q, dQ += dS K (dS in the scaled scores' units; dK, dQ scaled once at the end).
// Q/dO (dk/dv) and K/V (dq) steps are double-buffered with cp.async.
// K intervals per query: dk/dv's masked steps test the union of a query's slots; dq walks its
// tile's K runs, testing slot k in run k (as the forward). Softcap: with t = tanh(s scale / cap),
// P = exp2(t cap log2(e) - lse2) and dS = P (dP - delta) (1 - t^2).
#include "attention/attention.h"

#include <math.h>

#include "attention/bwd_prep.cuh"
#include "attention/dispatch.cuh"
#include "attention/layouts.cuh"
#include "attention/sm80.cuh"
#include "attention/tile_io.cuh"
#include "common/interval_mask.cuh"
#include "common/mma.cuh"

namespace tk {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr float kLog2e = 1.4426950408889634f;

// Stores rows row and row + 8 of a warp's 16 x D accumulator (mma C layout) into a contiguous
// [rows, heads, D] tensor, times `mult`; rows >= n are padding.
template <typename T, int D>
__device__ __forceinline__ void store_rows(T* base, int heads, int head, int64_t row, int64_t n,
                                           const float (&acc)[D / 8][4], float mult, int tig) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t rr = row + 8 * r;
    if (rr >= n) continue;
    T* dst = base + (rr * heads + head) * D + tig * 2;
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) {
      *reinterpret_cast<uint32_t*>(dst + dt * 8) = pack2<T>(acc[dt][2 * r] * mult, acc[dt][2 * r + 1] * mult);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// dk/dv
// ---------------------------------------------------------------------------------------------
// Softcap factors: scores s become base-2 logits t cap log2(e), t = tanh(s cap_in), cap_in =
// scale / cap; dS gets the derivative's 1 - t^2 (the scale is applied to dK, dQ at the end).
struct Cap {
  float in, out;
};

template <int D, int K, bool kCap>
struct DkdvShape {
  static constexpr int kBN = kAttentionBwdBlockN;  // keys per block (16 per warp)
  static constexpr int kBM = D <= 64 ? 64 : 32;     // queries per step (D = 128: fewer live registers)
  // K/V A fragments held in registers, else re-read (also for unions with softcap: the union test
  // and the cap's factors would spill them)
  static constexpr bool kKVInRegs = D <= 64 && !(K > 1 && kCap);
  // k_s, v_s; two stages of q_s, do_s; two stages each of lse2, delta, then kv_start and kv_end
  // of every slot (4 bytes each)
  static constexpr int kTileElems = kBN * D, kStepElems = kBM * D;
  static constexpr int kScalarRows = 2 + 2 * K;
  static constexpr size_t kSmem = (2 * kTileElems + 4 * kStepElems) * 2 + 2 * kScalarRows * kBM * 4;
};
static_assert(kAttentionBwdBlockN == 16 * kWarps, "one 16-key mma block per warp");

template <typename T, int K, bool kCap, int D>  // D last: the head dim ends the kernel's name
__global__ void __launch_bounds__(kThreads, 1) attention_bwd_dkdv_kernel(const AttentionBwdArgs a) {
  using S = DkdvShape<D, K, kCap>;
  constexpr int kBN = S::kBN, kBM = S::kBM;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* k_s = reinterpret_cast<T*>(smem_raw);
  T* v_s = k_s + S::kTileElems;
  T* q_s = v_s + S::kTileElems;              // [2][kBM * D]
  T* do_s = q_s + 2 * S::kStepElems;         // [2][kBM * D]
  float* lse2_s = reinterpret_cast<float*>(do_s + 2 * S::kStepElems);  // [2][kBM]
  float* delta_s = lse2_s + 2 * kBM;                                   // [2][kBM]
  int32_t* kvs_s = reinterpret_cast<int32_t*>(delta_s + 2 * kBM);      // [K][2][kBM]
  int32_t* kve_s = kvs_s + 2 * K * kBM;                                // [K][2][kBM]

  const int rank = blockIdx.x / a.hkv, hk = blockIdx.x % a.hkv;  // head fastest (see the header)
  const int tile = a.k_order != nullptr ? __ldg(a.k_order + rank) : rank;
  const int group = a.hq / a.hkv;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, grp = lane / 4, tig = lane % 4;
  const int64_t n0 = static_cast<int64_t>(tile) * kBN;

  const int32_t* tt = a.k_tiles + 4 * tile;
  const int q_lo = __ldg(tt), q_hi = __ldg(tt + 1), qf_lo = __ldg(tt + 2), qf_hi = __ldg(tt + 3);
  const attn::Steps steps = attn::make_steps(q_lo, q_hi, qf_lo, qf_hi, kBM);
  const int total = steps.count * group;  // (query head, query step) pairs, head-major
  // Query rows outside [q_lo, q_hi) see no key of this tile: never read.
  const int64_t row_lo = q_lo > 0 ? q_lo : 0, row_hi = q_hi < a.nq ? q_hi : a.nq;

  attn::load_rows<T, D, kBN, kThreads>(k_s, static_cast<const T*>(a.k) + hk * a.k_head_stride, a.k_row_stride, n0, 0,
                                       a.nk, tid);
  attn::load_rows<T, D, kBN, kThreads>(v_s, static_cast<const T*>(a.v) + hk * a.v_head_stride, a.v_row_stride, n0, 0,
                                       a.nk, tid);

  // Step `it` = (head g, query step j) into stage buffer `buf`: Q, dO rows and their lse2,
  // delta, intervals (zero-filled outside the rows: such columns contribute exactly 0 since
  // their Q and dO rows are 0, and masked steps drop them by their empty interval).
  auto issue_step = [&](int g, int j, int buf) {
    const int h = hk * group + g;
    const int m0 = steps.first + j * kBM;
    attn::load_rows<T, D, kBM, kThreads>(q_s + buf * S::kStepElems, static_cast<const T*>(a.q) + h * a.q_head_stride,
                                         a.q_row_stride, m0, row_lo, row_hi, tid);
    attn::load_rows<T, D, kBM, kThreads>(do_s + buf * S::kStepElems,
                                         static_cast<const T*>(a.dout) + h * a.do_head_stride, a.do_row_stride, m0,
                                         row_lo, row_hi, tid);
    for (int i = tid; i < S::kScalarRows * kBM; i += kThreads) {
      const int which = i / kBM, r = i % kBM;  // lse2, delta, K starts, K ends
      const int64_t row = m0 + r;
      const bool valid = row_lo <= row && row < row_hi;
      const int64_t at = valid ? static_cast<int64_t>(h) * a.nq + row : 0;
      const int slot = (which - 2) % K;
      const int64_t iv = valid ? row * K + slot : 0;
      const void* src = which == 0       ? static_cast<const void*>(a.lse2 + at)
                        : which == 1     ? static_cast<const void*>(a.delta + at)
                        : which < 2 + K  ? static_cast<const void*>(a.kv_start + iv)
                                         : static_cast<const void*>(a.kv_end + iv);
      attn::cp_async_4(lse2_s + which * 2 * kBM + buf * kBM + r, src, valid);
    }
  };

  int g_next = 0, j_next = 0;
  if (total > 0) issue_step(0, 0, 0);
  cp_async_commit();  // K, V (and step 0)

  const attn::FragLane fl = attn::make_frag_lane<D>(lane);
  const int key0 = static_cast<int>(n0) + warp * 16 + grp, key1 = key0 + 8;  // this thread's two keys
  const float scale_log2 = a.scale * kLog2e;
  const Cap cap{kCap ? a.scale / a.softcap : 0.0f, kCap ? a.softcap * kLog2e : 0.0f};
  float dk[D / 8][4], dv[D / 8][4];
#pragma unroll
  for (int dt = 0; dt < D / 8; ++dt) {
#pragma unroll
    for (int c = 0; c < 4; ++c) dk[dt][c] = dv[dt][c] = 0.0f;
  }
  uint32_t kf[S::kKVInRegs ? D / 16 : 1][4], vf[S::kKVInRegs ? D / 16 : 1][4];

  for (int it = 0; it < total; ++it) {
    const int buf = it & 1;
    const int m0 = steps.first + j_next * kBM;
    if (++j_next == steps.count) j_next = 0, ++g_next;
    if (it + 1 < total) {
      issue_step(g_next, j_next, buf ^ 1);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    if constexpr (S::kKVInRegs) {
      if (it == 0) {
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
          ldmatrix_x4(kf[kk], k_s + attn::frag_a<D>(fl, warp * 16, kk));
          ldmatrix_x4(vf[kk], v_s + attn::frag_a<D>(fl, warp * 16, kk));
        }
      }
    }
    const T* qb = q_s + buf * S::kStepElems;
    const T* dob = do_s + buf * S::kStepElems;
    const float* lse2b = lse2_s + buf * kBM;
    const float* deltab = delta_s + buf * kBM;
    const int32_t* kvsb = kvs_s + buf * kBM;
    const int32_t* kveb = kve_s + buf * kBM;
    const bool full = attn::step_is_full(steps, m0);

    // S^T = K Q^T: rows = this warp's 16 keys, columns = the step's kBM queries.
    float st[kBM / 8][4];
#pragma unroll
    for (int nt = 0; nt < kBM / 8; ++nt) st[nt][0] = st[nt][1] = st[nt][2] = st[nt][3] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t ka[4];
      if constexpr (!S::kKVInRegs) ldmatrix_x4(ka, k_s + attn::frag_a<D>(fl, warp * 16, kk));
      const uint32_t(&af)[4] = S::kKVInRegs ? kf[kk] : ka;
#pragma unroll
      for (int np = 0; np < kBM / 16; ++np) {
        uint32_t b[4];
        ldmatrix_x4(b, qb + attn::frag_b<D>(fl, np * 16, kk));
        mma_16816<T>(st[2 * np], af, b[0], b[1]);
        mma_16816<T>(st[2 * np + 1], af, b[2], b[3]);
      }
    }
    // P^T = exp2(S^T * scale * log2(e) - lse2[query]); masked steps drop invisible pairs (the
    // union of the query's slots). Softcap: pc = P^T (1 - t^2), dS^T's factor.
    float pc[kCap ? kBM / 8 : 1][4];
#pragma unroll
    for (int nt = 0; nt < kBM / 8; ++nt) {
      const int col = nt * 8 + tig * 2;
      const float2 l2 = *reinterpret_cast<const float2*>(lse2b + col);
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        float p, t = 0.0f;
        if constexpr (kCap) {
          t = attn::fast_tanh(st[nt][c] * cap.in);
          p = fast_exp2(t * cap.out - ((c & 1) ? l2.y : l2.x));
        } else {
          p = fast_exp2(st[nt][c] * scale_log2 - ((c & 1) ? l2.y : l2.x));
        }
        if (!full) {
          const int q = col + (c & 1), key = c < 2 ? key0 : key1;
          bool seen = false;
#pragma unroll
          for (int k = 0; k < K; ++k) seen = seen || interval_visible(kvsb[2 * kBM * k + q], kveb[2 * kBM * k + q], key);
          p = seen ? p : 0.0f;
        }
        st[nt][c] = p;
        if constexpr (kCap) pc[nt][c] = p * (1.0f - t * t);
      }
    }
    // dV += P^T dO
#pragma unroll
    for (int kk = 0; kk < kBM / 16; ++kk) {
      const uint32_t pa[4] = {pack2<T>(st[2 * kk][0], st[2 * kk][1]), pack2<T>(st[2 * kk][2], st[2 * kk][3]),
                              pack2<T>(st[2 * kk + 1][0], st[2 * kk + 1][1]),
                              pack2<T>(st[2 * kk + 1][2], st[2 * kk + 1][3])};
#pragma unroll
      for (int dp = 0; dp < D / 16; ++dp) {
        uint32_t b[4];
        ldmatrix_x4_trans(b, dob + attn::frag_bt<D>(fl, kk * 16, dp));
        mma_16816<T>(dv[2 * dp], pa, b[0], b[1]);
        mma_16816<T>(dv[2 * dp + 1], pa, b[2], b[3]);
      }
    }
    // dP^T = V dO^T
    float dpt[kBM / 8][4];
#pragma unroll
    for (int nt = 0; nt < kBM / 8; ++nt) dpt[nt][0] = dpt[nt][1] = dpt[nt][2] = dpt[nt][3] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t va[4];
      if constexpr (!S::kKVInRegs) ldmatrix_x4(va, v_s + attn::frag_a<D>(fl, warp * 16, kk));
      const uint32_t(&af)[4] = S::kKVInRegs ? vf[kk] : va;
#pragma unroll
      for (int np = 0; np < kBM / 16; ++np) {
        uint32_t b[4];
        ldmatrix_x4(b, dob + attn::frag_b<D>(fl, np * 16, kk));
        mma_16816<T>(dpt[2 * np], af, b[0], b[1]);
        mma_16816<T>(dpt[2 * np + 1], af, b[2], b[3]);
      }
    }
    // dS^T = P^T * (dP^T - delta[query]) (softcap: times 1 - t^2)
#pragma unroll
    for (int nt = 0; nt < kBM / 8; ++nt) {
      const float2 dl = *reinterpret_cast<const float2*>(deltab + nt * 8 + tig * 2);
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const float p = kCap ? pc[kCap ? nt : 0][c] : st[nt][c];
        dpt[nt][c] = p * (dpt[nt][c] - ((c & 1) ? dl.y : dl.x));
      }
    }
    // dK += dS^T Q
#pragma unroll
    for (int kk = 0; kk < kBM / 16; ++kk) {
      const uint32_t da[4] = {pack2<T>(dpt[2 * kk][0], dpt[2 * kk][1]), pack2<T>(dpt[2 * kk][2], dpt[2 * kk][3]),
                              pack2<T>(dpt[2 * kk + 1][0], dpt[2 * kk + 1][1]),
                              pack2<T>(dpt[2 * kk + 1][2], dpt[2 * kk + 1][3])};
#pragma unroll
      for (int dp = 0; dp < D / 16; ++dp) {
        uint32_t b[4];
        ldmatrix_x4_trans(b, qb + attn::frag_bt<D>(fl, kk * 16, dp));
        mma_16816<T>(dk[2 * dp], da, b[0], b[1]);
        mma_16816<T>(dk[2 * dp + 1], da, b[2], b[3]);
      }
    }
    __syncthreads();  // every warp is done with buffer `buf` before the next step refills it
  }
  cp_async_wait<0>();

  store_rows<T, D>(static_cast<T*>(a.dk), a.hkv, hk, key0, a.nk, dk, a.scale, tig);
  store_rows<T, D>(static_cast<T*>(a.dv), a.hkv, hk, key0, a.nk, dv, 1.0f, tig);
}

// ---------------------------------------------------------------------------------------------
// dq
// ---------------------------------------------------------------------------------------------
template <int D>
struct DqShape {
  static constexpr int kBM = kAttentionBwdBlockM;  // queries per block (16 per warp)
  static constexpr int kBN = D <= 64 ? 64 : 32;    // keys per step (D = 128: fewer live registers)
  static constexpr bool kQInRegs = D <= 64;        // Q and dO A fragments in registers, else re-read
  // q_s, do_s; two stages of k_s, v_s
  static constexpr int kRowsElems = kBM * D, kStepElems = kBN * D;
  static constexpr size_t kSmem = (2 * kRowsElems + 4 * kStepElems) * 2;
};
static_assert(kAttentionBwdBlockM == 16 * kWarps, "one 16-row mma block per warp");

template <typename T, int K, bool kCap, int D>  // D last: the head dim ends the kernel's name
__global__ void __launch_bounds__(kThreads, 1) attention_bwd_dq_kernel(const AttentionBwdArgs a) {
  using S = DqShape<D>;
  constexpr int kBM = S::kBM, kBN = S::kBN;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* q_s = reinterpret_cast<T*>(smem_raw);
  T* do_s = q_s + S::kRowsElems;
  T* k_s = do_s + S::kRowsElems;        // [2][kBN * D]
  T* v_s = k_s + 2 * S::kStepElems;     // [2][kBN * D]

  const int rank = blockIdx.x / a.hq, h = blockIdx.x % a.hq;  // head fastest (see the header)
  const int tile = a.q_order != nullptr ? __ldg(a.q_order + rank) : rank;
  const int hk = h / (a.hq / a.hkv);
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, grp = lane / 4, tig = lane % 4;
  const int64_t q0 = static_cast<int64_t>(tile) * kBM;

  // Run r of the tile (as the forward's): its steps and the keys it may load; keys outside its
  // [kv_lo, kv_hi) are seen by no query of the tile through slot r: never read (zero-filled).
  struct Run {
    attn::Steps steps;
    int key_lo, key_hi;
  };
  auto run_of = [&](int r) {
    const int32_t* tt = a.q_tiles + 4 * (K * tile + r);
    const int kv_lo = __ldg(tt), kv_hi = __ldg(tt + 1);
    Run u;
    u.steps = attn::make_steps(kv_lo, kv_hi, __ldg(tt + 2), __ldg(tt + 3), kBN);
    u.key_lo = kv_lo > 0 ? kv_lo : 0;
    u.key_hi = kv_hi < a.nk ? kv_hi : static_cast<int>(a.nk);
    return u;
  };
  auto next_run = [&](int r) {  // the first run at or after r that has steps (K: none)
    for (; r < K; ++r) {
      const int32_t* tt = a.q_tiles + 4 * (K * tile + r);
      if (__ldg(tt) < __ldg(tt + 1)) break;
    }
    return r;
  };
  const int first_run = next_run(0);
  Run run = run_of(first_run < K ? first_run : 0);
  const T* kg = static_cast<const T*>(a.k) + hk * a.k_head_stride;
  const T* vg = static_cast<const T*>(a.v) + hk * a.v_head_stride;

  attn::load_rows<T, D, kBM, kThreads>(q_s, static_cast<const T*>(a.q) + h * a.q_head_stride, a.q_row_stride, q0, 0,
                                       a.nq, tid);
  attn::load_rows<T, D, kBM, kThreads>(do_s, static_cast<const T*>(a.dout) + h * a.do_head_stride, a.do_row_stride,
                                       q0, 0, a.nq, tid);
  auto issue_step = [&](const Run& u, int j, int buf) {
    const int n0 = u.steps.first + j * kBN;
    attn::load_rows<T, D, kBN, kThreads>(k_s + buf * S::kStepElems, kg, a.k_row_stride, n0, u.key_lo, u.key_hi, tid);
    attn::load_rows<T, D, kBN, kThreads>(v_s + buf * S::kStepElems, vg, a.v_row_stride, n0, u.key_lo, u.key_hi, tid);
  };
  if (first_run < K) issue_step(run, 0, 0);
  cp_async_commit();  // Q, dO (and step 0)

  // This thread's two query rows (grp and grp + 8 of its warp's 16): lse2, delta, and (per run)
  // the intervals of the run's slot; rows past the end see nothing.
  const int64_t row0 = q0 + warp * 16 + grp, row1 = row0 + 8;
  const bool ok0 = row0 < a.nq, ok1 = row1 < a.nq;
  const float l2_0 = ok0 ? a.lse2[static_cast<int64_t>(h) * a.nq + row0] : INFINITY;
  const float l2_1 = ok1 ? a.lse2[static_cast<int64_t>(h) * a.nq + row1] : INFINITY;
  const float dl_0 = ok0 ? a.delta[static_cast<int64_t>(h) * a.nq + row0] : 0.0f;
  const float dl_1 = ok1 ? a.delta[static_cast<int64_t>(h) * a.nq + row1] : 0.0f;
  const float scale_log2 = a.scale * kLog2e;
  const Cap cap{kCap ? a.scale / a.softcap : 0.0f, kCap ? a.softcap * kLog2e : 0.0f};
  const attn::FragLane fl = attn::make_frag_lane<D>(lane);

  float dq[D / 8][4];
#pragma unroll
  for (int dt = 0; dt < D / 8; ++dt) dq[dt][0] = dq[dt][1] = dq[dt][2] = dq[dt][3] = 0.0f;
  uint32_t qf[S::kQInRegs ? D / 16 : 1][4], dof[S::kQInRegs ? D / 16 : 1][4];

  int buf = 0;
  bool first_step = true;
  // K = 1: one pass over the tile's row (run 0, maybe empty), as without unions.
  for (int r = K == 1 ? 0 : first_run; r < K; r = next_run(r + 1)) {
    if (K > 1 && r != first_run) run = run_of(r);
    const attn::Steps steps = run.steps;
    const int s0 = ok0 ? __ldg(a.kv_start + row0 * K + r) : 0, e0 = ok0 ? __ldg(a.kv_end + row0 * K + r) : 0;
    const int s1 = ok1 ? __ldg(a.kv_start + row1 * K + r) : 0, e1 = ok1 ? __ldg(a.kv_end + row1 * K + r) : 0;
    for (int it = 0; it < steps.count; ++it) {
      const int n0 = steps.first + it * kBN;
      // The step after: this run's next, else the first of the next run with steps (nr < K).
      const bool more = it + 1 < steps.count;
      int nr = K;
      if constexpr (K > 1) nr = more ? r : next_run(r + 1);
      if (more || nr < K) {
        if (more) {
          issue_step(run, it + 1, buf ^ 1);
        } else {
          issue_step(run_of(nr), 0, buf ^ 1);
        }
        cp_async_commit();
        cp_async_wait<1>();
      } else {
        cp_async_wait<0>();
      }
      __syncthreads();
      if constexpr (S::kQInRegs) {
        if (first_step) {
#pragma unroll
          for (int kk = 0; kk < D / 16; ++kk) {
            ldmatrix_x4(qf[kk], q_s + attn::frag_a<D>(fl, warp * 16, kk));
            ldmatrix_x4(dof[kk], do_s + attn::frag_a<D>(fl, warp * 16, kk));
          }
        }
      }
      const T* kb = k_s + buf * S::kStepElems;
      const T* vb = v_s + buf * S::kStepElems;
      const bool full = attn::step_is_full(steps, n0);

      // S = Q K^T
      float s[kBN / 8][4];
#pragma unroll
      for (int nt = 0; nt < kBN / 8; ++nt) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.0f;
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        uint32_t qa[4];
        if constexpr (!S::kQInRegs) ldmatrix_x4(qa, q_s + attn::frag_a<D>(fl, warp * 16, kk));
        const uint32_t(&af)[4] = S::kQInRegs ? qf[kk] : qa;
#pragma unroll
        for (int np = 0; np < kBN / 16; ++np) {
          uint32_t b[4];
          ldmatrix_x4(b, kb + attn::frag_b<D>(fl, np * 16, kk));
          mma_16816<T>(s[2 * np], af, b[0], b[1]);
          mma_16816<T>(s[2 * np + 1], af, b[2], b[3]);
        }
      }
      // P = exp2(S * scale * log2(e) - lse2[row]); masked steps drop invisible pairs (the run's
      // slot). Softcap: pc = P (1 - t^2), dS's factor.
      float pc[kCap ? kBN / 8 : 1][4];
#pragma unroll
      for (int nt = 0; nt < kBN / 8; ++nt) {
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          float p, t = 0.0f;
          if constexpr (kCap) {
            t = attn::fast_tanh(s[nt][c] * cap.in);
            p = fast_exp2(t * cap.out - (c < 2 ? l2_0 : l2_1));
          } else {
            p = fast_exp2(s[nt][c] * scale_log2 - (c < 2 ? l2_0 : l2_1));
          }
          if (!full) {
            const int key = n0 + nt * 8 + tig * 2 + (c & 1);
            p = (c < 2 ? interval_visible(s0, e0, key) : interval_visible(s1, e1, key)) ? p : 0.0f;
          }
          s[nt][c] = p;
          if constexpr (kCap) pc[nt][c] = p * (1.0f - t * t);
        }
      }
      // dP = dO V^T
      float dp[kBN / 8][4];
#pragma unroll
      for (int nt = 0; nt < kBN / 8; ++nt) dp[nt][0] = dp[nt][1] = dp[nt][2] = dp[nt][3] = 0.0f;
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        uint32_t da[4];
        if constexpr (!S::kQInRegs) ldmatrix_x4(da, do_s + attn::frag_a<D>(fl, warp * 16, kk));
        const uint32_t(&af)[4] = S::kQInRegs ? dof[kk] : da;
#pragma unroll
        for (int np = 0; np < kBN / 16; ++np) {
          uint32_t b[4];
          ldmatrix_x4(b, vb + attn::frag_b<D>(fl, np * 16, kk));
          mma_16816<T>(dp[2 * np], af, b[0], b[1]);
          mma_16816<T>(dp[2 * np + 1], af, b[2], b[3]);
        }
      }
      // dS = P * (dP - delta[row]) (softcap: times 1 - t^2); dQ += dS K
#pragma unroll
      for (int nt = 0; nt < kBN / 8; ++nt) {
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          const float p = kCap ? pc[kCap ? nt : 0][c] : s[nt][c];
          dp[nt][c] = p * (dp[nt][c] - (c < 2 ? dl_0 : dl_1));
        }
      }
#pragma unroll
      for (int kk = 0; kk < kBN / 16; ++kk) {
        const uint32_t dsa[4] = {pack2<T>(dp[2 * kk][0], dp[2 * kk][1]), pack2<T>(dp[2 * kk][2], dp[2 * kk][3]),
                                 pack2<T>(dp[2 * kk + 1][0], dp[2 * kk + 1][1]),
                                 pack2<T>(dp[2 * kk + 1][2], dp[2 * kk + 1][3])};
#pragma unroll
        for (int np = 0; np < D / 16; ++np) {
          uint32_t b[4];
          ldmatrix_x4_trans(b, kb + attn::frag_bt<D>(fl, kk * 16, np));
          mma_16816<T>(dq[2 * np], dsa, b[0], b[1]);
          mma_16816<T>(dq[2 * np + 1], dsa, b[2], b[3]);
        }
      }
      __syncthreads();  // every warp is done with buffer `buf` before the next step refills it
      buf ^= 1;
      first_step = false;
    }
  }
  cp_async_wait<0>();

  store_rows<T, D>(static_cast<T*>(a.dq), a.hq, h, row0, a.nq, dq, a.scale, tig);
}

// ---------------------------------------------------------------------------------------------
// launch
// ---------------------------------------------------------------------------------------------
template <typename Kernel>
cudaError_t set_smem(Kernel kernel, size_t bytes) {
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
}

template <typename T, int D, int K, bool kCap>
cudaError_t launch(const AttentionBwdArgs& a, cudaStream_t stream) {
  cudaError_t err;
  if (a.nq > 0) {
    const auto blocks = static_cast<unsigned>(attn::bwd_prep_blocks<D>(a.nq, a.hq));
    attn::attention_bwd_prep_kernel<T, D, false><<<blocks, attn::kBwdPrepThreads, 0, stream>>>(a);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
  }
  if (a.nk > 0) {
    constexpr size_t smem = DkdvShape<D, K, kCap>::kSmem;
    if ((err = set_smem(attention_bwd_dkdv_kernel<T, K, kCap, D>, smem)) != cudaSuccess) return err;
    const unsigned blocks = static_cast<unsigned>((a.nk + kAttentionBwdBlockN - 1) / kAttentionBwdBlockN * a.hkv);
    attention_bwd_dkdv_kernel<T, K, kCap, D><<<blocks, kThreads, smem, stream>>>(a);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
  }
  if (a.nq > 0) {
    constexpr size_t smem = DqShape<D>::kSmem;
    if ((err = set_smem(attention_bwd_dq_kernel<T, K, kCap, D>, smem)) != cudaSuccess) return err;
    const unsigned blocks = static_cast<unsigned>((a.nq + kAttentionBwdBlockM - 1) / kAttentionBwdBlockM * a.hq);
    attention_bwd_dq_kernel<T, K, kCap, D><<<blocks, kThreads, smem, stream>>>(a);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
  }
  return cudaSuccess;
}

}  // namespace

cudaError_t attention_bwd(const AttentionBwdArgs& a, DType dtype, int head_dim, cudaStream_t stream) {
  if (a.hq <= 0 || a.hkv <= 0 || a.hq % a.hkv != 0) return cudaErrorInvalidValue;
  // The wgmma backward where the device runs sm_90a code and the caller gave its workspace.
  int device = 0;
  if (a.dq_accum != nullptr && a.dq_semaphore != nullptr && cudaGetDevice(&device) == cudaSuccess &&
      attention_sm90_supported(device)) {
    return attention_bwd_sm90(a, dtype, head_dim, stream);
  }
  return attn::dispatch_dtype_head_dim(dtype, head_dim, [&](auto t, auto d) {
    return attn::dispatch_mask(a.num_intervals, a.softcap, [&](auto k, auto cap) {
      return launch<decltype(t), d(), k(), cap()>(a, stream);
    });
  });
}

}  // namespace tk
