// Interval-mask attention forward on mma.sync (sm_80+); the interface and tile tables are in attention.h.
//
// FlashAttention-2's shape: a block of 4 warps owns 128 query rows, 32 per warp as two m16 row
// blocks, so every K / V fragment a warp loads with ldmatrix feeds 4 mma (two row blocks x two
// n8 halves) instead of 2: half the shared-memory traffic per mma of 16 rows per warp. K/V
// steps of 64 keys go through a ring of cp.async stages; each step is masked (interval test
// per element) or FULL (every query of the tile sees every key: no mask arithmetic), after
// attn::make_steps. A mask of K intervals per query walks the tile's K runs one after the other
// (the ring runs on across them); a masked step of run k tests slot k only. Softcap: tanh of
// every score before the mask.
#include "attention/attention.h"

#include <math.h>

#include <type_traits>

#include "attention/dispatch.cuh"
#include "attention/layouts.cuh"
#include "attention/sm80.cuh"
#include "attention/tile_io.cuh"
#include "common/mma.cuh"

namespace tk {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kBM = kAttentionBlockM;
constexpr int kRowBlocks = kBM / (16 * kWarps);  // m16 row blocks per warp
static_assert(kRowBlocks == 2, "32 query rows per warp");
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kMinScaleLog2 = 1.17549435e-38f;  // FLT_MIN

// A step's `masked` flag: a runtime bool, or a compile-time one (std::bool_constant) for a copy
// of the step of its own.
__device__ __forceinline__ bool is_masked(bool masked) { return masked; }
template <bool B>
__device__ __forceinline__ constexpr bool is_masked(std::bool_constant<B>) {
  return B;
}

template <int D, int K, bool kCap>
struct FwdShape {
  // Unions and softcap hold more live values (run bounds, the cap factors): their kernels trade
  // registers for shared-memory reads so that none spills.
  static constexpr bool kLean = K > 1 || kCap;
  // Keys per step; D = 128 takes 32 (S in 32 registers next to O's 128: no spills at 64), 16
  // when lean.
  static constexpr int kBN = D <= 64 ? kAttentionBlockN : kLean ? kAttentionBlockN / 4 : kAttentionBlockN / 2;
  static constexpr int kStages = 2;            // K/V ring: step i + 1 loads while step i computes (one ahead)
  static constexpr bool kQInRegs = D <= 64 && !kLean;     // D = 128: 64 more live registers would spill O and S
  static constexpr bool kRowsInRegs = D <= 64 && !kLean;  // row intervals in registers; else re-read
  // D = 64: a FULL and a masked copy of the step; D = 128 (and lean): one copy, the mask behind a
  // uniform branch (two copies spill on sm_90a).
  static constexpr bool kTwoCopies = D <= 64 && !kLean;
  static constexpr int kQElems = kBM * D, kStageElems = 2 * kBN * D;  // a stage: K then V
  // Q, the K/V ring, then the tile's row intervals (kv_start, kv_end) as int2, slot-major
  static constexpr size_t kSmem = (kQElems + kStages * kStageElems) * 2 + K * kBM * 8;
};

template <typename T, int K, bool kCap, int D>  // D last: the head dim ends the kernel's name
__global__ void __launch_bounds__(kThreads, 1) attention_fwd_kernel(const AttentionFwdArgs a) {
  using S = FwdShape<D, K, kCap>;
  static_assert(S::kStages == 2, "the step loop issues one step ahead");
  constexpr int kBN = S::kBN;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* q_s = reinterpret_cast<T*>(smem_raw);
  T* kv_s = q_s + S::kQElems;  // [kStages][K kBN * D, V kBN * D]
  int2* iv_s = reinterpret_cast<int2*>(kv_s + S::kStages * S::kStageElems);  // [K][kBM]

  // Blocks run (tile rank, head) with the head fastest: with q_order the launch sequence is
  // longest first over every block, not per head.
  const int rank = blockIdx.x / a.hq, h = blockIdx.x % a.hq;
  const int tile = a.q_order != nullptr ? __ldg(a.q_order + rank) : rank;
  const int hk = h / (a.hq / a.hkv);
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, group = lane / 4, tig = lane % 4;
  const int64_t q0 = static_cast<int64_t>(tile) * kBM;

  // Run r of the tile (K = 1: the tile's one row): its steps, and the keys it may load. Keys
  // outside its [kv_lo, kv_hi) are seen by no query of the tile through slot r: zero-filled, never
  // read (their V rows may hold NaN, and 0 * NaN is NaN).
  struct Run {
    attn::Steps steps;
    int64_t key_lo, key_hi;
  };
  auto run_of = [&](int r) {
    const int32_t* tt = a.q_tiles + 4 * (K * tile + r);
    Run u;
    u.steps = attn::make_steps(__ldg(tt), __ldg(tt + 1), __ldg(tt + 2), __ldg(tt + 3), kBN);
    u.key_lo = __ldg(tt) > 0 ? __ldg(tt) : 0;
    u.key_hi = __ldg(tt + 1) < a.nk ? __ldg(tt + 1) : a.nk;
    return u;
  };
  // The first run at or after r that has steps (K: none).
  auto next_run = [&](int r) {
    for (; r < K; ++r) {
      const int32_t* tt = a.q_tiles + 4 * (K * tile + r);
      if (__ldg(tt) < __ldg(tt + 1)) break;
    }
    return r;
  };
  const int first_run = K == 1 ? 0 : next_run(0);  // K = 1: run 0, maybe empty
  Run run = run_of(first_run < K ? first_run : 0);
  const bool any_step = K == 1 ? run.steps.count > 0 : first_run < K;
  const T* kg = static_cast<const T*>(a.k) + hk * a.k_head_stride;
  const T* vg = static_cast<const T*>(a.v) + hk * a.v_head_stride;
  auto issue_step = [&](const Run& u, int j, int stage) {
    const int n0 = u.steps.first + j * kBN;
    T* dst = kv_s + stage * S::kStageElems;
    attn::load_rows<T, D, kBN, kThreads>(dst, kg, a.k_row_stride, n0, u.key_lo, u.key_hi, tid);
    attn::load_rows<T, D, kBN, kThreads>(dst + kBN * D, vg, a.v_row_stride, n0, u.key_lo, u.key_hi, tid);
  };

  // Commit groups: Q, then one per K/V step (empty past the last one, so the counts stay fixed).
  attn::load_rows<T, D, kBM, kThreads>(q_s, static_cast<const T*>(a.q) + h * a.q_head_stride, a.q_row_stride, q0, 0,
                                       a.nq, tid);
  // Row intervals for the masked steps, slot by slot; rows past the end get (0, 0): they see
  // nothing.
  for (int i = tid; i < 2 * K * kBM; i += kThreads) {
    const int r = K == 1 ? 0 : i / (2 * kBM), j = K == 1 ? i : i % (2 * kBM);
    const int64_t row = q0 + j / 2;
    const bool valid = row < a.nq;
    const int32_t* src = (j % 2 == 0 ? a.kv_start : a.kv_end) + (valid ? row * K + r : 0);
    attn::cp_async_4(reinterpret_cast<int32_t*>(iv_s) + i, src, valid);
  }
  cp_async_commit();
  if (any_step) issue_step(run, 0, 0);
  cp_async_commit();

  // This thread's 4 query rows: group and group + 8 of each of its warp's two row blocks.
  const int row_in_tile = warp * 32 + group;
  const int64_t row_base = q0 + row_in_tile;
  // Probabilities are exp2(s * c - m * c) with c = |scale| log2(e): one FFMA per score. A
  // negative scale negates Q instead (exact); c > 0 keeps -inf (masked) scores at -inf when
  // the scale is 0 (all weights then exp2(~0) = 1: uniform, as the math says).
  // Softcap: the scores become t = tanh(s |scale| / cap) in place (maxima in those units), and
  // c = cap log2(e): one FMUL and one tanh per score beyond the plain step.
  const float c = kCap ? a.softcap * kLog2e : fmaxf(fabsf(a.scale) * kLog2e, kMinScaleLog2);
  const float cap_in = kCap ? fabsf(a.scale) / a.softcap : 0.0f;

  float o[kRowBlocks][D / 8][4];
#pragma unroll
  for (int rb = 0; rb < kRowBlocks; ++rb) {
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) o[rb][dt][0] = o[rb][dt][1] = o[rb][dt][2] = o[rb][dt][3] = 0.0f;
  }
  float m[2 * kRowBlocks], l[2 * kRowBlocks];  // running row max (raw scores), this thread's row sums
#pragma unroll
  for (int r = 0; r < 2 * kRowBlocks; ++r) m[r] = -INFINITY, l[r] = 0.0f;

  cp_async_wait<S::kStages - 1>();  // Q
  if (a.scale < 0.0f) attn::negate_own_rows<D, kBM, kThreads>(q_s, tid);
  __syncthreads();
  const attn::FragLane fl = attn::make_frag_lane<D>(lane);
  int2 iv_r[S::kRowsInRegs ? 2 * kRowBlocks : 1];  // only without unions (K = 1)
  if constexpr (S::kRowsInRegs) {
#pragma unroll
    for (int r = 0; r < 2 * kRowBlocks; ++r) iv_r[r] = iv_s[row_in_tile + 8 * r];
  }
  int iv_run = 0;  // the current run's slot in iv_s
  uint32_t qf[kRowBlocks][S::kQInRegs ? D / 16 : 1][4];
  if constexpr (S::kQInRegs) {
#pragma unroll
    for (int rb = 0; rb < kRowBlocks; ++rb) {
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) ldmatrix_x4(qf[rb][kk], q_s + attn::frag_a<D>(fl, warp * 32 + rb * 16, kk));
    }
  }

  // One step on the K/V tile at k_s, v_s covering keys [n0, n0 + kBN).
  auto step = [&](auto masked, const T* k_s, const T* v_s, int n0) {
    // S = Q K^T: each K fragment serves both row blocks.
    float s[kRowBlocks][kBN / 8][4];
#pragma unroll
    for (int rb = 0; rb < kRowBlocks; ++rb) {
#pragma unroll
      for (int nt = 0; nt < kBN / 8; ++nt) s[rb][nt][0] = s[rb][nt][1] = s[rb][nt][2] = s[rb][nt][3] = 0.0f;
    }
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t qa[kRowBlocks][4];
      if constexpr (!S::kQInRegs) {
#pragma unroll
        for (int rb = 0; rb < kRowBlocks; ++rb) ldmatrix_x4(qa[rb], q_s + attn::frag_a<D>(fl, warp * 32 + rb * 16, kk));
      }
#pragma unroll
      for (int np = 0; np < kBN / 16; ++np) {
        uint32_t b[4];
        ldmatrix_x4(b, k_s + attn::frag_b<D>(fl, np * 16, kk));
#pragma unroll
        for (int rb = 0; rb < kRowBlocks; ++rb) {
          const uint32_t(&af)[4] = S::kQInRegs ? qf[rb][S::kQInRegs ? kk : 0] : qa[rb];
          mma_16816<T>(s[rb][2 * np], af, b[0], b[1]);
          mma_16816<T>(s[rb][2 * np + 1], af, b[2], b[3]);
        }
      }
    }
    if constexpr (kCap) {
#pragma unroll
      for (int rb = 0; rb < kRowBlocks; ++rb) {
#pragma unroll
        for (int nt = 0; nt < kBN / 8; ++nt) {
#pragma unroll
          for (int e = 0; e < 4; ++e) s[rb][nt][e] = attn::fast_tanh(s[rb][nt][e] * cap_in);
        }
      }
    }
    if (is_masked(masked)) {  // 32-bit interval test; invisible scores become -inf
#pragma unroll
      for (int r = 0; r < 2 * kRowBlocks; ++r) {
        const int2 iv = S::kRowsInRegs ? iv_r[S::kRowsInRegs ? r : 0] : iv_s[iv_run + row_in_tile + 8 * r];
#pragma unroll
        for (int nt = 0; nt < kBN / 8; ++nt) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int key = n0 + nt * 8 + tig * 2 + e;
            float& x = s[r / 2][nt][2 * (r % 2) + e];
            x = iv.x <= key && key < iv.y ? x : -INFINITY;
          }
        }
      }
    }
    // Online softmax: a row's kBN scores live in the 4 threads of a quad.
#pragma unroll
    for (int rb = 0; rb < kRowBlocks; ++rb) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int r = 2 * rb + half;
        float mx = m[r];
#pragma unroll
        for (int nt = 0; nt < kBN / 8; ++nt) mx = fmaxf(mx, fmaxf(s[rb][nt][2 * half], s[rb][nt][2 * half + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float mc = mx == -INFINITY ? 0.0f : mx * c;  // a row that has seen nothing yet
        const float alpha = fast_exp2(fmaf(m[r], c, -mc));
        m[r] = mx;
        float sum = 0.0f;
#pragma unroll
        for (int nt = 0; nt < kBN / 8; ++nt) {
          const float p0 = fast_exp2(fmaf(s[rb][nt][2 * half], c, -mc));
          const float p1 = fast_exp2(fmaf(s[rb][nt][2 * half + 1], c, -mc));
          s[rb][nt][2 * half] = p0;
          s[rb][nt][2 * half + 1] = p1;
          sum += p0 + p1;
        }
        l[r] = l[r] * alpha + sum;
#pragma unroll
        for (int dt = 0; dt < D / 8; ++dt) {
          o[rb][dt][2 * half] *= alpha;
          o[rb][dt][2 * half + 1] *= alpha;
        }
      }
    }
    // O += P V: P from the S registers, each V fragment serves both row blocks.
#pragma unroll
    for (int kk = 0; kk < kBN / 16; ++kk) {
      uint32_t pa[kRowBlocks][4];
#pragma unroll
      for (int rb = 0; rb < kRowBlocks; ++rb) {
        pa[rb][0] = pack2<T>(s[rb][2 * kk][0], s[rb][2 * kk][1]);
        pa[rb][1] = pack2<T>(s[rb][2 * kk][2], s[rb][2 * kk][3]);
        pa[rb][2] = pack2<T>(s[rb][2 * kk + 1][0], s[rb][2 * kk + 1][1]);
        pa[rb][3] = pack2<T>(s[rb][2 * kk + 1][2], s[rb][2 * kk + 1][3]);
      }
#pragma unroll
      for (int dp = 0; dp < D / 16; ++dp) {
        uint32_t b[4];
        ldmatrix_x4_trans(b, v_s + attn::frag_bt<D>(fl, kk * 16, dp));
#pragma unroll
        for (int rb = 0; rb < kRowBlocks; ++rb) {
          mma_16816<T>(o[rb][2 * dp], pa[rb], b[0], b[1]);
          mma_16816<T>(o[rb][2 * dp + 1], pa[rb], b[2], b[3]);
        }
      }
    }
  };

  int stage = 0;
  // K = 1: one pass over the tile's row (run 0, maybe empty), as without unions.
  for (int r = first_run; r < K; r = next_run(r + 1)) {
    if (K > 1 && r != first_run) run = run_of(r);
    iv_run = K == 1 ? 0 : r * kBM;
    const attn::Steps steps = run.steps;
    for (int j = 0; j < steps.count; ++j) {
      // Step j's K/V landed, and every warp is done with the step before: its stage takes the
      // step after (this run's next, else the first of the next run with steps).
      cp_async_wait<S::kStages - 2>();
      __syncthreads();
      // (K = 1: the stage ahead by the step index, which keeps the loop's registers as without unions)
      const int next_stage = K == 1 ? (j + 1) % S::kStages : stage + 1 == S::kStages ? 0 : stage + 1;
      if (j + 1 < steps.count) {
        issue_step(run, j + 1, next_stage);
      } else if constexpr (K > 1) {
        const int nr = next_run(r + 1);
        if (nr < K) issue_step(run_of(nr), 0, next_stage);
      }
      cp_async_commit();
      const T* k_s = kv_s + stage * S::kStageElems;
      const int n0 = steps.first + j * kBN;
      const bool masked = !attn::step_is_full(steps, n0);
      if constexpr (S::kTwoCopies) {
        if (masked) {
          step(std::true_type{}, k_s, k_s + kBN * D, n0);
        } else {
          step(std::false_type{}, k_s, k_s + kBN * D, n0);
        }
      } else {
        step(masked, k_s, k_s + kBN * D, n0);
      }
      stage = stage + 1 == S::kStages ? 0 : stage + 1;
    }
  }
  cp_async_wait<0>();  // retires the trailing (empty) groups

  // Normalise and store: out in T, lse in natural log (-inf for a row that sees nothing).
#pragma unroll
  for (int rb = 0; rb < kRowBlocks; ++rb) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int r = 2 * rb + half;
      float sum = l[r];
      sum += __shfl_xor_sync(0xffffffffu, sum, 1);
      sum += __shfl_xor_sync(0xffffffffu, sum, 2);
      const int64_t row = row_base + 8 * r;
      if (row >= a.nq) continue;
      const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
      T* out_row = static_cast<T*>(a.out) + (row * a.hq + h) * D;
#pragma unroll
      for (int dt = 0; dt < D / 8; ++dt) {
        *reinterpret_cast<uint32_t*>(out_row + dt * 8 + tig * 2) =
            pack2<T>(o[rb][dt][2 * half] * inv, o[rb][dt][2 * half + 1] * inv);
      }
      if (tig == 0) {
        a.lse[static_cast<int64_t>(h) * a.nq + row] = sum > 0.0f ? (m[r] * c + log2f(sum)) * kLn2 : -INFINITY;
      }
    }
  }
}

template <typename T, int D, int K, bool kCap>
cudaError_t launch(const AttentionFwdArgs& a, cudaStream_t stream) {
  constexpr size_t smem = FwdShape<D, K, kCap>::kSmem;
  cudaError_t err = cudaFuncSetAttribute(attention_fwd_kernel<T, K, kCap, D>,
                                         cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  if (err != cudaSuccess) return err;
  const unsigned blocks = static_cast<unsigned>((a.nq + kBM - 1) / kBM * a.hq);
  attention_fwd_kernel<T, K, kCap, D><<<blocks, kThreads, smem, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace

cudaError_t attention_fwd(const AttentionFwdArgs& a, DType dtype, int head_dim, cudaStream_t stream) {
  if (a.nq == 0 || a.hq == 0) return cudaSuccess;
  if (a.hkv <= 0 || a.hq % a.hkv != 0) return cudaErrorInvalidValue;
  return attn::dispatch_dtype_head_dim(dtype, head_dim, [&](auto t, auto d) {
    return attn::dispatch_mask(a.num_intervals, a.softcap, [&](auto k, auto cap) {
      return launch<decltype(t), d(), k(), cap()>(a, stream);
    });
  });
}

}  // namespace tk
