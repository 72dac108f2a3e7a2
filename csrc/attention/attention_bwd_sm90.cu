// Interval-mask attention backward for sm_90a on wgmma, three kernels on one stream:
//
//   prep:  delta[h, i] = rowsum(dO * O), lse2 = lse * log2(e) (+inf for rows that see nothing),
//          and zeroes the fp32 dQ accumulator and its semaphores.
//   dk/dv: one warpgroup per (key tile of 64, kv head), in the transposed orientation (the
//          keys are the wgmma rows, so dK and dV stay in registers). It walks the query tiles of
//          64 that meet the key table's [q_lo, q_hi) (FULL ones without mask arithmetic) for
//          every query head of the GQA group; per step, 5 GEMMs, each on wgmma:
//            S^T  = K Q^T       SS (K-major both)           P^T = exp2(S^T scale log2e - lse2)
//            dP^T = V dO^T      SS (K-major both)
//            dV  += P^T dO      RS (P^T from registers, dO MN-major)
//            dK  += dS^T Q      RS (dS^T = P^T (dP^T - delta) from registers, Q MN-major)
//            dQ_t = dS K        SS (dS^T stored to shared memory: A MN-major; K MN-major)
//          dQ_t is added to an fp32 accumulator [nq, hq, D] in global memory. The additions to
//          a (query tile, head) are ordered by a semaphore: the key tiles that may meet the
//          query tile (its table range [kv_lo, kv_hi)) add in launch order, each waiting for
//          its rank among them (rank = how many of them have a lower launch index), so the
//          fp32 sums are the same on every run. Blocks only wait for blocks launched before
//          them (no deadlock while blocks run concurrently, none when they run one at a time).
//          A key tile in that range whose query range misses the query tile passes its turn.
//   dq:    dq = scale * accumulator, in T.
//
// K intervals per query: masked steps test the union of a query's slots (the key table is one
// row per key tile); a query tile's key range (its semaphore's key tiles, the K/V rows loaded)
// is the hull of its K runs. Softcap: P^T from t = tanh(S^T scale / cap), dS^T times 1 - t^2.
//
// Q/dO steps are double-buffered with cp.async into the 128-byte-swizzled wgmma layout. Not yet
// here: TMA loads, warp specialisation (a producer warp and two consumer warpgroups), and a
// dQ reduction through shared memory and bulk reductions (FA3).
#include "attention/attention.h"

#include <math.h>

#include "attention/bwd_prep.cuh"
#include "attention/dispatch.cuh"
#include "attention/layouts.cuh"
#include "attention/sm80.cuh"
#include "attention/sm90.cuh"
#include "attention/sm90_bwd.cuh"
#include "common/interval_mask.cuh"
#include "common/mma.cuh"

namespace tk {
namespace {

constexpr int kThreads = 128;             // one warpgroup
constexpr int kBN = kAttentionBwdBlockN;  // keys per block: the k_tiles table's tile
constexpr int kBM = kAttentionBwdBlockM;  // queries per step: the q_tiles table's tile (and the dQ semaphore's)
static_assert(kBN == 64 && kBM == 64, "one m64 wgmma row block of keys, n64 of queries");

// The dk/dv kernel exists for sm_90a only; other device passes see an empty kernel (never
// launched there: attention_sm90_supported is false).
#if !defined(__CUDA_ARCH__) || defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define TK_SM90_DEVICE_CODE 1
#endif

// ---------------------------------------------------------------------------------------------
// dq = scale * accumulator, 8 elements a thread
// ---------------------------------------------------------------------------------------------
constexpr int kConvertThreads = 256;

template <typename T, int D>
__global__ void __launch_bounds__(kConvertThreads) attention_bwd_sm90_dq_kernel(const AttentionBwdArgs a) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kConvertThreads + threadIdx.x;
  if (i >= a.nq * a.hq * (D / 8)) return;
  const float* src = a.dq_accum + i * 8;
  uint32_t packed[4];
#pragma unroll
  for (int e = 0; e < 4; ++e) packed[e] = pack2<T>(src[2 * e] * a.scale, src[2 * e + 1] * a.scale);
  *reinterpret_cast<uint4*>(static_cast<T*>(a.dq) + i * 8) = make_uint4(packed[0], packed[1], packed[2], packed[3]);
}

// ---------------------------------------------------------------------------------------------
// dk/dv (and the dQ contributions)
// ---------------------------------------------------------------------------------------------
template <int D, int K>
struct Smem {
  static constexpr uint32_t kKVBytes = kBN * D * 2;    // K or V tile
  static constexpr uint32_t kStepBytes = kBM * D * 2;  // Q or dO step tile
  // offsets from the 1024-byte aligned base: K, V, 2 stages of Q, 2 of dO, dS^T, then 2 stages
  // of the step's lse2, delta, then kv_start and kv_end of every slot (4 bytes each)
  static constexpr uint32_t kK = 0, kV = kK + kKVBytes, kQ = kV + kKVBytes, kDO = kQ + 2 * kStepBytes;
  static constexpr uint32_t kDS = kDO + 2 * kStepBytes, kScalars = kDS + kBN * kBM * 2;
  static constexpr int kScalarRows = 2 + 2 * K;
  static constexpr uint32_t kCounts = kScalars + kScalarRows * 2 * kBM * 4;  // 4 floats: per-warp counts of dq_rank
  static constexpr size_t kBytes = kCounts + 4 * 4 + 1024;
};

#if defined(TK_SM90_DEVICE_CODE)
// ROWS x D tile of global rows [r0, r0 + ROWS) into the 128-byte-swizzled wgmma layout
// (attn::sw128_offset); rows outside [lo, hi) are zero-filled, never read. A thread copies one
// 16-byte column chunk of rows r, r + R, r + 2 R, ... (R = a multiple of 8 rows per round): the
// swizzle (row % 8) is the same in every round, so each round is the first plus constants.
template <typename T, int D, int ROWS>
__device__ __forceinline__ void load_tile_sw128(unsigned char* tile, const T* g, int64_t row_stride, int64_t r0,
                                                int64_t lo, int64_t hi, int tid) {
  constexpr int kChunks = D / 8;                  // 16-byte chunks per row
  constexpr int kRowsPerRound = kThreads / kChunks;
  static_assert(kRowsPerRound % 8 == 0 && ROWS % kRowsPerRound == 0, "whole copy rounds of 8-row groups");
  const int r = tid / kChunks, c = tid % kChunks;
  unsigned char* dst = tile + attn::sw128_offset(ROWS, r, c * 8);
  const T* src = g + (r0 + r) * row_stride + c * 8;
#pragma unroll
  for (int it = 0; it < ROWS / kRowsPerRound; ++it) {
    const int64_t row = r0 + r + it * kRowsPerRound;
    const bool valid = lo <= row && row < hi;
    cp_async_16(dst + it * kRowsPerRound * 128, valid ? src + it * kRowsPerRound * row_stride : g, valid);
  }
}

// Rank of the block at launch position `pos` (key tile `tile`) among the key tiles meeting
// [kv_lo, kv_hi): how many of them are launched before it. All threads of the block call this
// one; k_order[0, pos) is counted by all of them, the warps' counts summed through `counts`.
__device__ __forceinline__ int dq_rank_block(const AttentionBwdArgs& a, int pos, int tile, int kv_lo, int kv_hi,
                                             float* counts, int tid) {
  const int t_lo = kv_lo / kBN, t_hi = (kv_hi - 1) / kBN + 1;
  if (a.k_order == nullptr) return tile - t_lo;
  float count = 0.0f;  // exact: fewer than 2^24 key tiles
#pragma unroll 1
  for (int b = tid; b < pos; b += kThreads) {
    const int t = __ldg(a.k_order + b);
    count += t_lo <= t && t < t_hi ? 1.0f : 0.0f;
  }
#pragma unroll
  for (int off = 16; off > 0; off /= 2) count += __shfl_xor_sync(0xffffffffu, count, off);
  if (tid % 32 == 0) counts[tid / 32] = count;
  __syncthreads();
  return static_cast<int>(counts[0] + counts[1] + counts[2] + counts[3]);
}

// The same from one thread (the passes after the main loop; rare).
__device__ __forceinline__ int dq_rank(const AttentionBwdArgs& a, int pos, int tile, int kv_lo, int kv_hi) {
  const int t_lo = kv_lo / kBN, t_hi = (kv_hi - 1) / kBN + 1;
  if (a.k_order == nullptr) return tile - t_lo;
  int rank = 0;
  #pragma unroll 1
  for (int b = 0; b < pos; ++b) {
    const int t = __ldg(a.k_order + b);
    rank += t_lo <= t && t < t_hi;
  }
  return rank;
}

// The key range [lo, hi) of query tile m: the hull of its K runs (K = 1: its table row).
template <int K>
__device__ __forceinline__ void tile_hull(const AttentionBwdArgs& a, int m, int& lo, int& hi) {
  lo = __ldg(a.q_tiles + 4 * K * m), hi = __ldg(a.q_tiles + 4 * K * m + 1);
#pragma unroll
  for (int r = 1; r < K; ++r) {
    const int r_lo = __ldg(a.q_tiles + 4 * (K * m + r)), r_hi = __ldg(a.q_tiles + 4 * (K * m + r) + 1);
    if (r_lo < r_hi) {  // empty runs are (0, 0)
      const bool have = lo < hi;
      lo = have && lo < r_lo ? lo : r_lo;
      hi = have && hi > r_hi ? hi : r_hi;
    }
  }
}

// Descriptor of k16 step kk from the step-0 descriptor (attn::desc_kmajor / desc_mnmajor with
// kk = 0): only the start address field (bits 0-13, 16-byte units) moves, and shared memory
// lies below 256 KiB, so it never carries into the next field.
__device__ __forceinline__ uint64_t desc_kmajor_at(uint64_t desc0, int rows, int kk) {
  return desc0 + static_cast<uint32_t>(((kk / 4) * rows * 128 + (kk % 4) * 32) >> 4);
}
__device__ __forceinline__ uint64_t desc_mnmajor_at(uint64_t desc0, int kk) {
  return desc0 + static_cast<uint32_t>(kk * 16 * 128 >> 4);
}

template <typename T, int D, int K, bool kCap>
__device__ __forceinline__ void dkdv_sm90(const AttentionBwdArgs& a) {
  using S = Smem<D, K>;
  extern __shared__ unsigned char smem_raw[];
  const uint32_t raw = smem_u32(smem_raw);
  unsigned char* base = smem_raw + (((raw + 1023u) & ~1023u) - raw);
  const uint32_t base_addr = smem_u32(base);
  unsigned char* ds_s = base + S::kDS;
  float* lse2_s = reinterpret_cast<float*>(base + S::kScalars);  // [2][kBM]
  float* delta_s = lse2_s + 2 * kBM;                              // [2][kBM]
  int32_t* kvs_s = reinterpret_cast<int32_t*>(delta_s + 2 * kBM);  // [K][2][kBM]
  int32_t* kve_s = kvs_s + 2 * K * kBM;                            // [K][2][kBM]
  float* counts_s = reinterpret_cast<float*>(base + S::kCounts);  // [4]

  const int pos = blockIdx.x;
  const int tile = a.k_order != nullptr ? __ldg(a.k_order + pos) : pos;
  const int hk = blockIdx.y, group = a.hq / a.hkv;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, grp = lane / 4, tig = lane % 4;
  const int n0 = tile * kBN;
  const int n_qtiles = static_cast<int>((a.nq + kBM - 1) / kBM);

  const int32_t* tt = a.k_tiles + 4 * tile;
  const int q_lo = __ldg(tt), q_hi = __ldg(tt + 1), qf_lo = __ldg(tt + 2), qf_hi = __ldg(tt + 3);
  // Steps: the query tiles meeting [q_lo, q_hi); rows outside it see no key of this tile.
  const int m_first = q_lo < q_hi ? q_lo / kBM : 0;
  const int m_last = (q_hi - 1) / kBM + 1;
  const int m_end = q_lo < q_hi ? (m_last < n_qtiles ? m_last : n_qtiles) : 0;
  const int n_steps = m_end > m_first ? m_end - m_first : 0;
  const int total = n_steps * group;  // (query head, query tile) pairs, head-major
  const int64_t row_lo = q_lo > 0 ? q_lo : 0, row_hi = q_hi < a.nq ? q_hi : a.nq;

  // Keys any step's queries may see: the union of the steps' query tile ranges [kv_lo, kv_hi).
  // K/V rows outside it may hold anything (NaN): zero-filled, as 0 * NaN would reach dQ.
  {
    int32_t* lo_s = reinterpret_cast<int32_t*>(ds_s);  // scratch: dS^T is written only later
    int32_t* hi_s = lo_s + kThreads;
    int lo = 0x7fffffff, hi = 0;
    #pragma unroll 1
    for (int m = m_first + tid; m < m_end; m += kThreads) {
      int t_lo, t_hi;
      tile_hull<K>(a, m, t_lo, t_hi);
      lo = t_lo < lo ? t_lo : lo;
      hi = t_hi > hi ? t_hi : hi;
    }
    lo_s[tid] = lo;
    hi_s[tid] = hi;
    __syncthreads();
    #pragma unroll 1
    for (int t = 0; t < n_steps && t < kThreads; ++t) {
      lo = lo_s[t] < lo ? lo_s[t] : lo;
      hi = hi_s[t] > hi ? hi_s[t] : hi;
    }
    // No barrier here: dS^T overwrites the scratch only after the main loop's first barrier.
    const int64_t key_lo = lo > 0 ? lo : 0, key_hi = hi < a.nk ? hi : a.nk;
    load_tile_sw128<T, D, kBN>(base + S::kK, static_cast<const T*>(a.k) + hk * a.k_head_stride, a.k_row_stride, n0,
                               key_lo, key_hi, tid);
    load_tile_sw128<T, D, kBN>(base + S::kV, static_cast<const T*>(a.v) + hk * a.v_head_stride, a.v_row_stride, n0,
                               key_lo, key_hi, tid);
  }

  // Step (head g, query tile m) into stage `buf`: Q, dO rows and their lse2, delta, intervals
  // (zero-filled outside [row_lo, row_hi): such rows are 0 and their empty interval masks them).
  auto issue_step = [&](int g, int m, int buf) {
    const int h = hk * group + g;
    const int64_t m0 = static_cast<int64_t>(m) * kBM;
    load_tile_sw128<T, D, kBM>(base + S::kQ + buf * S::kStepBytes, static_cast<const T*>(a.q) + h * a.q_head_stride,
                               a.q_row_stride, m0, row_lo, row_hi, tid);
    load_tile_sw128<T, D, kBM>(base + S::kDO + buf * S::kStepBytes,
                               static_cast<const T*>(a.dout) + h * a.do_head_stride, a.do_row_stride, m0, row_lo,
                               row_hi, tid);
    #pragma unroll 1
    for (int i = tid; i < S::kScalarRows * kBM; i += kThreads) {
      const int which = i / kBM, r = i % kBM;  // lse2, delta, K starts, K ends
      const int64_t row = m0 + r;
      const bool valid = row_lo <= row && row < row_hi;
      const int64_t at = valid ? static_cast<int64_t>(h) * a.nq + row : 0;
      const int64_t iv = valid ? row * K + (which - 2) % K : 0;
      const void* src = which == 0      ? static_cast<const void*>(a.lse2 + at)
                        : which == 1    ? static_cast<const void*>(a.delta + at)
                        : which < 2 + K ? static_cast<const void*>(a.kv_start + iv)
                                        : static_cast<const void*>(a.kv_end + iv);
      attn::cp_async_4(lse2_s + which * 2 * kBM + buf * kBM + r, src, valid);
    }
  };
  if (total > 0) issue_step(0, m_first, 0);
  cp_async_commit();  // K, V (and step 0)

  const int key0 = n0 + 16 * warp + grp, key1 = key0 + 8;  // this thread's accumulator rows
  const float scale_log2 = a.scale * 1.4426950408889634f /* log2(e) */;
  // Softcap: base-2 logits t cap log2(e), t = tanh(S^T cap_in), cap_in = scale / cap.
  const float cap_in = kCap ? a.scale / a.softcap : 0.0f, cap_out = kCap ? a.softcap * 1.4426950408889634f : 0.0f;
  float dk[D / 2], dv[D / 2];
#pragma unroll
  for (int i = 0; i < D / 2; ++i) dk[i] = dv[i] = 0.0f;

  int g = 0, m = m_first;  // the current step
  #pragma unroll 1
  for (int it = 0; it < total; ++it) {
    const int buf = it & 1;
    const int h = hk * group + g;
    const int m0 = m * kBM;
    int g_next = g, m_next = m + 1;
    if (m_next == m_end) m_next = m_first, ++g_next;
    if (it + 1 < total) {
      issue_step(g_next, m_next, buf ^ 1);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    sm90::fence_proxy_async();  // cp.async wrote through the generic proxy; wgmma reads async
    __syncthreads();

    // Step-0 descriptors of the operand tiles, rebuilt every step from an opaque base: hoisted
    // out of the loop, the per-k16 descriptors would hold ~80 registers.
    uint32_t sbase = base_addr;
    asm volatile("" : "+r"(sbase));
    const uint32_t q_addr = sbase + S::kQ + buf * S::kStepBytes, do_addr = sbase + S::kDO + buf * S::kStepBytes;
    const uint32_t k_addr = sbase + S::kK, v_addr = sbase + S::kV, ds_addr = sbase + S::kDS;
    const uint64_t k_km = attn::desc_kmajor(k_addr, kBN, 0, 0), v_km = attn::desc_kmajor(v_addr, kBN, 0, 0);
    const uint64_t q_km = attn::desc_kmajor(q_addr, kBM, 0, 0), do_km = attn::desc_kmajor(do_addr, kBM, 0, 0);
    const uint64_t q_mn = attn::desc_mnmajor(q_addr, kBM, 0), do_mn = attn::desc_mnmajor(do_addr, kBM, 0);
    const float* lse2b = lse2_s + buf * kBM;
    const float* deltab = delta_s + buf * kBM;
    const int32_t* kvsb = kvs_s + buf * kBM;
    const int32_t* kveb = kve_s + buf * kBM;
    const bool full = qf_lo <= m0 && m0 + kBM <= qf_hi;

    // S^T = K Q^T and dP^T = V dO^T (keys x queries), two commit groups.
    float st[kBM / 2], dpt[kBM / 2];
#pragma unroll
    for (int i = 0; i < kBM / 2; ++i) st[i] = dpt[i] = 0.0f;
    sm90::wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      sm90::wgmma_ss_t<T, kBM, false, false>(st, desc_kmajor_at(k_km, kBN, kk), desc_kmajor_at(q_km, kBM, kk), kk > 0);
    }
    sm90::wgmma_commit();
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      sm90::wgmma_ss_t<T, kBM, false, false>(dpt, desc_kmajor_at(v_km, kBN, kk), desc_kmajor_at(do_km, kBM, kk),
                                             kk > 0);
    }
    sm90::wgmma_commit();
    sm90::wgmma_wait<1>();
    sm90::fence_operands(st);

    // P^T = exp2(S^T * scale * log2(e) - lse2[query]); masked steps drop invisible pairs (the
    // union of the query's slots) and remember them (bit i of `hidden`: element i) for dS.
    // Softcap: dS^T's factor 1 - t^2 kept in dcap.
    uint32_t hidden = 0;
    if (K > 1 && !full) {  // the union, one slot at a time (unrolled over the slots it spills)
      hidden = ~0u;
#pragma unroll 1
      for (int k = 0; k < K; ++k) {
        const int32_t* s_k = kvsb + 2 * kBM * k;
        const int32_t* e_k = kveb + 2 * kBM * k;
#pragma unroll
        for (int i = 0; i < kBM / 2; ++i) {  // element i: column 8 (i / 4) + 2 tig + i % 2, key row i % 4 / 2
          const int q = 8 * (i / 4) + 2 * tig + (i & 1);
          if (interval_visible(s_k[q], e_k[q], (i & 2) ? key1 : key0)) hidden &= ~(1u << i);
        }
      }
    }
    float dcap[kCap ? kBM / 2 : 1];
#pragma unroll
    for (int nt = 0; nt < kBM / 8; ++nt) {
      const int col = nt * 8 + tig * 2;
      const float2 l2 = *reinterpret_cast<const float2*>(lse2b + col);
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        float p;
        if constexpr (kCap) {
          const float t = attn::fast_tanh(st[4 * nt + c] * cap_in);
          p = fast_exp2(t * cap_out - ((c & 1) ? l2.y : l2.x));
          dcap[kCap ? 4 * nt + c : 0] = 1.0f - t * t;
        } else {
          p = fast_exp2(st[4 * nt + c] * scale_log2 - ((c & 1) ? l2.y : l2.x));
        }
        if (K == 1 && !full) {
          const int q = col + (c & 1);
          const bool seen = interval_visible(kvsb[q], kveb[q], c < 2 ? key0 : key1);
          p = seen ? p : 0.0f;
          hidden |= static_cast<uint32_t>(!seen) << (4 * nt + c);
        } else if (K > 1) {
          p = (hidden >> (4 * nt + c)) & 1u ? 0.0f : p;
        }
        st[4 * nt + c] = p;
      }
    }
    sm90::wgmma_wait<0>();
    sm90::fence_operands(dpt);

    // dS^T = P^T * (dP^T - delta[query]), 0 where hidden (0 * NaN from unseen V rows)
#pragma unroll
    for (int nt = 0; nt < kBM / 8; ++nt) {
      const float2 dl = *reinterpret_cast<const float2*>(deltab + nt * 8 + tig * 2);
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        float ds = st[4 * nt + c] * (dpt[4 * nt + c] - ((c & 1) ? dl.y : dl.x));
        if constexpr (kCap) ds *= dcap[kCap ? 4 * nt + c : 0];
        dpt[4 * nt + c] = (hidden >> (4 * nt + c)) & 1u ? 0.0f : ds;
      }
    }
    // P^T and dS^T as A fragments (the k16 slice kk is n8 blocks 2 kk and 2 kk + 1); packed only
    // now, so that the fp32 scores are dead before the packed copies live (registers).
    uint32_t pf[kBM / 16][4], dsf[kBM / 16][4];
#pragma unroll
    for (int kk = 0; kk < kBM / 16; ++kk) {
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        pf[kk][r] = pack2<T>(st[8 * kk + 2 * r], st[8 * kk + 2 * r + 1]);
        dsf[kk][r] = pack2<T>(dpt[8 * kk + 2 * r], dpt[8 * kk + 2 * r + 1]);
      }
    }
    // dQ of this step, if the key tile is one of the query tile's: dS^T to shared memory
    // ([key][query], the A operand MN-major), then dS K in 64-column slices of D, added to the
    // accumulator in this key tile's turn. dS^T is stored before the dK wgmma takes dsf as its
    // A operand: an issued wgmma's registers may not be accessed until its wait (PTX; checked in
    // the SASS by scripts/wgmma_hazards.py), and waiting first would keep the dV / dK GEMMs from
    // overlapping the dQ GEMM.
    int kv_lo, kv_hi;
    tile_hull<K>(a, m, kv_lo, kv_hi);
    const bool step_dq = kv_lo < kv_hi && kv_lo < n0 + kBN && n0 < kv_hi;
    // Addresses from an opaque copy of the thread index, rebuilt here each step: hoisted, the
    // per-register offsets would be loop invariants held across the loop (spilled).
    int t = tid;
    asm volatile("" : "+r"(t));
    const int w = t / 32, gq = (t % 32) / 4, tq = t % 4;
    auto store_ds = [&] {
#pragma unroll
      for (int kk = 0; kk < kBM / 16; ++kk) {
#pragma unroll
        for (int r = 0; r < 4; ++r) {  // register r: key row + 8 (r % 2), query columns 16 kk + 8 (r / 2) ..
          const int row = 16 * w + gq + 8 * (r % 2), col = 16 * kk + 8 * (r / 2) + 2 * tq;
          *reinterpret_cast<uint32_t*>(ds_s + attn::sw128_offset(kBN, row, col)) = dsf[kk][r];
        }
      }
    };
    store_ds();  // also in steps without dQ: one branch, and the buffer is free
    // dV += P^T dO, dK += dS^T Q
    sm90::wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kBM / 16; ++kk) {
      sm90::wgmma_rs_t<T, D, true>(dv, pf[kk], desc_mnmajor_at(do_mn, kk), 1);
    }
#pragma unroll
    for (int kk = 0; kk < kBM / 16; ++kk) {
      sm90::wgmma_rs_t<T, D, true>(dk, dsf[kk], desc_mnmajor_at(q_mn, kk), 1);
    }
    sm90::wgmma_commit();

    if (step_dq) {
      sm90::fence_proxy_async();
      __syncthreads();
      int32_t* sem = a.dq_semaphore + static_cast<int64_t>(h) * n_qtiles + m;
      const uint64_t ds_mn = attn::desc_mnmajor(ds_addr, kBN, 0);
      float dq[32];
#pragma unroll
      for (int half = 0; half < D / 64; ++half) {
        const uint64_t k_mn = attn::desc_mnmajor(k_addr + half * kBN * 128, kBN, 0);
#pragma unroll
        for (int i = 0; i < 32; ++i) dq[i] = 0.0f;
        sm90::wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < kBN / 16; ++kk) {
          sm90::wgmma_ss_t<T, 64, true, true>(dq, desc_mnmajor_at(ds_mn, kk), desc_mnmajor_at(k_mn, kk), kk > 0);
        }
        sm90::wgmma_commit();
        if (half == 0) {
          const int rank = dq_rank_block(a, pos, tile, kv_lo, kv_hi, counts_s, t);
          if (t == 0) sm90::semaphore_wait(sem, rank);
          __syncthreads();
        }
        sm90::wgmma_wait<0>();
        sm90::fence_operands(dq);
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const int64_t row = m0 + 16 * w + gq + 8 * r;
          if (row >= a.nq) continue;
          float* acc = a.dq_accum + (row * a.hq + h) * D + half * 64 + 2 * tq;
#pragma unroll
          for (int j = 0; j < 8; ++j) sm90::dq_accum_add(sem, acc + 8 * j, dq[4 * j + 2 * r], dq[4 * j + 2 * r + 1]);
        }
      }
      __syncthreads();  // every thread's additions are done: pass the turn on
      if (tid == 0) sm90::semaphore_signal(sem);
    }
    sm90::wgmma_wait<0>();
    sm90::fence_operands(dv);
    sm90::fence_operands(dk);
    sm90::fence_operands(pf);
    sm90::fence_operands(dsf);
    __syncthreads();  // stage `buf` and dS^T are free for the next step
    g = g_next;
    m = m_next;
  }
  cp_async_wait<0>();

  // Query tiles that count this key tile among theirs (their range spans it) but lie outside
  // its query range: no query there sees it; take the turn and pass it on, for every head.
  #pragma unroll 1
  for (int mm = tid; mm < n_qtiles; mm += kThreads) {
    if (m_first <= mm && mm < m_end) continue;
    int kv_lo, kv_hi;
    tile_hull<K>(a, mm, kv_lo, kv_hi);
    if (!(kv_lo < kv_hi && kv_lo < n0 + kBN && n0 < kv_hi)) continue;
    const int rank = dq_rank(a, pos, tile, kv_lo, kv_hi);
    #pragma unroll 1
    for (int gg = 0; gg < group; ++gg) {
      int32_t* sem = a.dq_semaphore + static_cast<int64_t>(hk * group + gg) * n_qtiles + mm;
      sm90::semaphore_wait(sem, rank);
      sm90::semaphore_signal(sem);
    }
  }

  // dK (times the softmax scale: dS is in the scaled scores' units) and dV, rows < nk.
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t key = (r == 0 ? key0 : key1);
    if (key >= a.nk) continue;
    T* dk_row = static_cast<T*>(a.dk) + (key * a.hkv + hk) * D + 2 * tig;
    T* dv_row = static_cast<T*>(a.dv) + (key * a.hkv + hk) * D + 2 * tig;
#pragma unroll
    for (int j = 0; j < D / 8; ++j) {
      *reinterpret_cast<uint32_t*>(dk_row + 8 * j) = pack2<T>(dk[4 * j + 2 * r] * a.scale, dk[4 * j + 2 * r + 1] * a.scale);
      *reinterpret_cast<uint32_t*>(dv_row + 8 * j) = pack2<T>(dv[4 * j + 2 * r], dv[4 * j + 2 * r + 1]);
    }
  }
}
#endif  // TK_SM90_DEVICE_CODE

template <typename T, int K, bool kCap, int D>  // D last: the head dim ends the kernel's name
__global__ void __launch_bounds__(kThreads, 1) attention_bwd_sm90_dkdv_kernel(const AttentionBwdArgs a) {
#if defined(TK_SM90_DEVICE_CODE)
  dkdv_sm90<T, D, K, kCap>(a);
#else
  (void)a;
#endif
}

template <typename T, int D, int K, bool kCap>
cudaError_t launch(const AttentionBwdArgs& a, cudaStream_t stream) {
  cudaError_t err;
  if (a.nq > 0) {
    const auto blocks = static_cast<unsigned>(attn::bwd_prep_blocks<D>(a.nq, a.hq));
    attn::attention_bwd_prep_kernel<T, D, true><<<blocks, attn::kBwdPrepThreads, 0, stream>>>(a);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
  }
  if (a.nk > 0) {
    constexpr size_t smem = Smem<D, K>::kBytes;
    if ((err = cudaFuncSetAttribute(attention_bwd_sm90_dkdv_kernel<T, K, kCap, D>,
                                    cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem))) != cudaSuccess) {
      return err;
    }
    const dim3 grid(static_cast<unsigned>((a.nk + kBN - 1) / kBN), static_cast<unsigned>(a.hkv));
    attention_bwd_sm90_dkdv_kernel<T, K, kCap, D><<<grid, kThreads, smem, stream>>>(a);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
  }
  if (a.nq > 0) {
    const int64_t blocks = (a.nq * a.hq * (D / 8) + kConvertThreads - 1) / kConvertThreads;
    attention_bwd_sm90_dq_kernel<T, D><<<static_cast<unsigned>(blocks), kConvertThreads, 0, stream>>>(a);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
  }
  return cudaSuccess;
}

}  // namespace

cudaError_t attention_bwd_sm90(const AttentionBwdArgs& a, DType dtype, int head_dim, cudaStream_t stream) {
  if (a.hq <= 0 || a.hkv <= 0 || a.hq % a.hkv != 0) return cudaErrorInvalidValue;
  if (a.nq == 0 && a.nk == 0) return cudaSuccess;
  if (a.nq > 0 && (a.dq_accum == nullptr || a.dq_semaphore == nullptr)) return cudaErrorInvalidValue;
  if (a.nq >= (int64_t{1} << 30) || a.nk >= (int64_t{1} << 30)) return cudaErrorInvalidValue;  // int32 positions
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || !attention_sm90_supported(device)) return cudaErrorInvalidDeviceFunction;
  return attn::dispatch_dtype_head_dim(dtype, head_dim, [&](auto t, auto d) {
    return attn::dispatch_mask(a.num_intervals, a.softcap, [&](auto k, auto cap) {
      return launch<decltype(t), d(), k(), cap()>(a, stream);
    });
  });
}

}  // namespace tk
