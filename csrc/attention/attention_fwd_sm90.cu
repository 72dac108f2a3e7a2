// Interval-mask attention forward for sm_90a, structured like FlashAttention-3: a producer warp
// that only issues TMA, two MMA ("consumer") warpgroups in ping-pong, wgmma with the softmax of
// one key step overlapped with the GEMMs of the next. Same algorithm and tables as
// attention_fwd.cu (online softmax over the query tile's [kv_lo, kv_hi), FULL steps without
// mask arithmetic).
//
// Block: 384 threads, one query tile of 128 rows x one query head (tile order from q_order).
//   * Warpgroup 0, the producer, gives its registers back (setmaxnreg.dec to 24). One lane of
//     its warp 0 issues the TMA loads (128-byte swizzle) of Q once and of K and V per key step
//     into a ring of stages; each stage has "full" mbarriers (TMA transaction bytes) and "empty"
//     ones (every consumer thread arrives after its own wgmma_wait: PTX retires a wgmma per
//     thread). No CTA-wide barrier after the prologue.
//   * Warpgroups 1 and 2 (setmaxnreg.inc to 240) own query rows 0-63 and 64-127. Per step n:
//       S_n = Q K_n^T (wgmma, both operands in shared memory);  O *= alpha_{n-1};
//       O += P_{n-1} V_{n-1} (wgmma, P from registers);  wait for S_n only (wgmma_wait<1>),
//       release K_n;  softmax of S_n under the P V GEMM;  wait for P V, release V_{n-1}.
//     Named barriers 1 and 2 pass the right to issue GEMMs back and forth between the two
//     warpgroups (ping-pong), so one's softmax runs while the other's GEMMs occupy the tensor
//     cores.
//   * Steps come from attn::make_steps: masked steps, a run of FULL steps (every query of the
//     tile sees every key: compiled without any mask code), masked steps. In a masked step a
//     row's visible columns (of this thread's 32) are one contiguous run, so a 32-bit mask built
//     from two 32-bit interval bounds per row selects them. Maxima stay in raw score units:
//     p = exp2(s * scale_log2 - m * scale_log2) is one FFMA and one EX2.
//   * V rows outside [kv_lo, kv_hi) may hold anything (NaN): P is 0 there, but 0 * NaN is not.
//     Only the first and the last step hold such rows (TMA zero-fills rows past the tensor).
//     Producer warp 1 zeroes them once the stage has landed (generic stores, fence.proxy.async)
//     and arrives on a separate mbarrier that the consumers wait on instead of "full" in those
//     two steps. Warp 0 clamping boxes is not possible (a box has a fixed size per tensor map),
//     and zeroing by the consumers would need a barrier between the ping-ponging warpgroups;
//     this way the consumers never wait for each other and FULL steps never see the path.
//     Warp 1 waits on "full" only after warp 0 has issued that step's load (a v_issued mbarrier
//     per such step): then the stage's earlier use has completed, so the parity names this one.
//   * K intervals per query: the tile's K runs (one table row each) follow one another through
//     the same ring and ping-pong (the online softmax runs on across them); a masked step of run
//     k tests slot k. Each run has its own first and last step to zero. Softcap: tanh of every
//     score (tanh.approx) before the mask, the maxima then in base-2 logits.
//   * Epilogue: O / l in T into the warpgroup's own rows of the Q buffer (only this
//     warpgroup's wgmma read them), then one TMA store of those 64 rows (rows past nq are
//     clipped by the tensor map); lse as the natural log.
//
// Sizes. Key step kBN = 128 at both head dims: S is 64 fp32 registers per thread, O is D / 2,
// P 32 (packed), so D = 128 holds S + O + P + the next S's operands in ~200 of the 240
// registers a consumer thread gets (24 x 128 + 240 x 256 = 64,512 <= 65,536); a wider step at
// D = 64 would also widen the masked first and last steps of short documents. Shared memory:
// Q 128 x D x 2 B plus stages of K and V (2 x 128 x D x 2 B each): D = 128: 32 KiB + 3 x 64 KiB =
// 224 KiB (+ 1 KiB to align to the swizzle atom) of the 227 KiB; D = 64: 16 KiB + 4 x 32 KiB.
// One CTA per SM either way (384 threads at up to 240 registers), so the stages are free and
// hide two steps of load latency beyond the ping-pong's half step.
//
// Tensor maps are built on the host with the driver's cuTensorMapEncodeTiled, looked up at run
// time through the runtime (cudaGetDriverEntryPointByVersion): no libcuda link at build time.
#include "attention/attention.h"

#include <cuda.h>
#include <math.h>

#include <type_traits>

#include "attention/dispatch.cuh"
#include "attention/layouts.cuh"
#include "attention/sm80.cuh"
#include "attention/sm90.cuh"
#include "common/mma.cuh"

// The device code exists for sm_90a only; other device passes (sm_80, plain sm_90) see an
// empty kernel, and their image's tk_attention_sm90a_image is 0 (attention_sm90_supported).
#if !defined(__CUDA_ARCH__) || defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define TK_SM90_DEVICE_CODE 1
#endif

namespace tk {

// 1 in an image whose forward kernel has its sm_90a body, 0 in any other; read at run time
// (a plain sm_90 image also reports binaryVersion 90).
#if defined(TK_SM90_DEVICE_CODE)
__device__ int tk_attention_sm90a_image = 1;
#else
__device__ int tk_attention_sm90a_image = 0;
#endif

namespace {

constexpr int kConsumers = 2;  // MMA warpgroups
constexpr int kThreads = 128 * (kConsumers + 1);
constexpr int kConsumerThreads = 128 * kConsumers;
constexpr int kBM = kAttentionSm90BlockM;
constexpr int kBN = 128;  // keys per step
constexpr int kProducerRegs = 24, kConsumerRegs = 240;
static_assert(kBM == 64 * kConsumers, "one m64 row block per consumer warpgroup");
// setmaxnreg moves registers within the CTA's pool: what the launch allocated, kThreads x the
// kernel's register count. With __launch_bounds__(kThreads, 1) ptxas gives a kernel that uses
// setmaxnreg the most the 64K file allows at kThreads (whole units of 8 per thread), so the
// producer's .dec must free what the consumers' .inc takes, or the .inc waits forever.
constexpr int kLaunchRegs = 65536 / kThreads / 8 * 8;  // 168 at 384 threads
static_assert(kLaunchRegs * kThreads <= 65536, "the launch's registers fit the register file");
static_assert(kProducerRegs % 8 == 0 && kConsumerRegs % 8 == 0 && kProducerRegs >= 24 && kConsumerRegs <= 256,
              "setmaxnreg counts: multiples of 8 in [24, 256]");
static_assert(kProducerRegs <= kLaunchRegs && kLaunchRegs <= kConsumerRegs, "the producer gives, the consumers take");
static_assert(kProducerRegs * (kThreads - kConsumerThreads) + kConsumerRegs * kConsumerThreads <= kLaunchRegs * kThreads,
              "setmaxnreg: the warpgroups' new counts exceed the registers the launch allocated");
// Named barriers (0 is __syncthreads): consumer g may issue its GEMMs once it passes
// kTurnBar + g; its epilogue staging uses kGroupBar + g.
enum NamedBarrier : int { kTurnBar = 1, kGroupBar = 3 };

template <int D>
struct Smem {
  static constexpr int kStages = D == 64 ? 4 : 3;
  static constexpr uint32_t kQBytes = kBM * D * 2;
  static constexpr uint32_t kKVBytes = kBN * D * 2;  // one K or V tile
  // Q, then K stages, then V stages; + 1 KiB to align the base to a 1024-byte swizzle atom.
  static constexpr size_t kBytes = kQBytes + 2 * kStages * kKVBytes + 1024;
  static_assert(kBytes <= 227 * 1024 - 256, "shared memory (the mbarriers are static)");
};

// A tensor map over [rows, heads, D] with its dimensions ordered by stride: (D, heads, rows)
// normally, (D, rows, heads) when the head stride is the larger one; load() orders a
// (column, head, row) triple accordingly.
struct TileMap {
  CUtensorMap map;
  int rows_in_dim1;
#if defined(TK_SM90_DEVICE_CODE)
  __device__ __forceinline__ void load(uint32_t dst, int col, int head, int row, uint64_t* bar) const {
    sm90::tma_load_3d(dst, &map, col, rows_in_dim1 ? row : head, rows_in_dim1 ? head : row, bar);
  }
  __device__ __forceinline__ void store(uint32_t src, int col, int head, int row) const {
    sm90::tma_store_3d(&map, col, rows_in_dim1 ? row : head, rows_in_dim1 ? head : row, src);
  }
#endif
};

struct Sm90Params {
  TileMap q, k, v, o;  // o: boxes of one consumer warpgroup's 64 rows
  AttentionFwdArgs a;
};

#if defined(TK_SM90_DEVICE_CODE)
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kMinScaleLog2 = 1.17549435e-38f;  // FLT_MIN

// The pipeline's shared state: smem addresses and mbarriers.
template <int D>
struct Pipe {
  using S = Smem<D>;
  uint32_t q, k, v;       // shared addresses of Q, K stage 0, V stage 0
  unsigned char* q_ptr;   // generic pointers to Q (the epilogue's staging) and V stage 0
  unsigned char* v_ptr;
  uint64_t* bar_q;
  uint64_t* k_full;
  uint64_t* v_full;
  uint64_t* k_empty;
  uint64_t* v_empty;
  uint64_t* v_zeroed;  // [2 K]: run r's first (2 r) and last (2 r + 1) step's V after the producer zeroed rows
  uint64_t* v_issued;  // [2 K]: the same steps' V loads issued

  __device__ __forceinline__ uint32_t k_at(int stage) const { return k + stage * S::kKVBytes; }
  __device__ __forceinline__ uint32_t v_at(int stage) const { return v + stage * S::kKVBytes; }
};

// Position in the ring of stages: stage index and the parity of its use.
template <int kStages>
struct Ring {
  int stage = 0;
  uint32_t phase = 0;
  __device__ __forceinline__ Ring next() const {
    return stage + 1 == kStages ? Ring{0, phase ^ 1u} : Ring{stage + 1, phase};
  }
};

// Per consumer thread: its two query rows' online-softmax state.
struct RowState {
  float m[2];      // running max of the raw scores
  float l[2];      // running sum of exp2 (this thread's columns only)
  float alpha[2];  // factor for O from the last softmax
};

// Online softmax of one step's scores s (m64 x kBN fragment) in place: s becomes P (fp32).
// kMasked: keys outside a row's interval are -inf; lo / hi are the row's interval minus the
// step start minus this thread's column 2 tig, so the columns are compile-time constants.
// kCap: s becomes tanh(s cap_in) first (scale_log2 is then cap log2(e)).
template <bool kMasked, bool kCap>
__device__ __forceinline__ void softmax_step(float (&s)[kBN / 2], RowState& st, float scale_log2, float cap_in,
                                             const int (&lo)[2], const int (&hi)[2]) {
  if constexpr (kCap) {
#pragma unroll
    for (int i = 0; i < kBN / 2; ++i) s[i] = attn::fast_tanh(s[i] * cap_in);
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    if constexpr (kMasked) {
      // This thread's columns of the row are 8 nt + c (c = 0, 1), in order as j = 2 nt + c: the
      // visible ones are bits [below(lo), below(hi)) of a 32-bit mask.
      auto below = [](int x) {  // how many of the columns are < x
        x = x < 0 ? 0 : x > kBN ? kBN : x;
        return 2 * (x >> 3) + ((x & 7) < 2 ? (x & 7) : 2);
      };
      const uint32_t visible =
          static_cast<uint32_t>(((uint64_t{1} << below(hi[r])) - 1) & ~((uint64_t{1} << below(lo[r])) - 1));
#pragma unroll
      for (int nt = 0; nt < kBN / 8; ++nt) {
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          float& x = s[4 * nt + 2 * r + c];
          x = (visible >> (2 * nt + c)) & 1u ? x : -INFINITY;
        }
      }
    }
    float mx = st.m[r];
#pragma unroll
    for (int nt = 0; nt < kBN / 8; ++nt) mx = fmaxf(mx, fmaxf(s[4 * nt + 2 * r], s[4 * nt + 2 * r + 1]));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
    // A row that has seen nothing yet (only in masked steps) keeps max -inf: subtract 0 then.
    float neg_ms = -mx * scale_log2;
    if constexpr (kMasked) neg_ms = mx == -INFINITY ? 0.0f : neg_ms;
    st.alpha[r] = fast_exp2(fmaf(st.m[r], scale_log2, neg_ms));
    st.m[r] = mx;
    float sum = 0.0f;
#pragma unroll
    for (int nt = 0; nt < kBN / 8; ++nt) {
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        float& x = s[4 * nt + 2 * r + c];
        x = fast_exp2(fmaf(x, scale_log2, neg_ms));
        sum += x;
      }
    }
    st.l[r] = fmaf(st.l[r], st.alpha[r], sum);
  }
}

template <int D>
__device__ __forceinline__ void rescale(float (&o)[D / 2], const RowState& st) {
#pragma unroll
  for (int dt = 0; dt < D / 8; ++dt) {
    o[4 * dt + 0] *= st.alpha[0];
    o[4 * dt + 1] *= st.alpha[0];
    o[4 * dt + 2] *= st.alpha[1];
    o[4 * dt + 3] *= st.alpha[1];
  }
}

// P as wgmma A fragments: the k16 slice kk is n8 blocks 2 kk and 2 kk + 1.
template <typename T>
__device__ __forceinline__ void pack_p(uint32_t (&pf)[kBN / 16][4], const float (&s)[kBN / 2]) {
#pragma unroll
  for (int kk = 0; kk < kBN / 16; ++kk) {
#pragma unroll
    for (int j = 0; j < 4; ++j) pf[kk][j] = pack2<T>(s[8 * kk + 2 * j], s[8 * kk + 2 * j + 1]);
  }
}

// Whether step `it` holds keys outside [kv_lo, kv_hi) (only the first and the last step can).
__device__ __forceinline__ bool step_has_outside_rows(const attn::Steps& steps, int it, int kv_lo, int kv_hi) {
  const int n0 = steps.first + it * kBN;
  return n0 < kv_lo || n0 + kBN > kv_hi;
}

// Run r of a query tile (K = 1: the tile's one table row), split into steps.
struct Run {
  attn::Steps steps;
  int kv_lo, kv_hi;
};

template <int K>
__device__ __forceinline__ Run run_at(const AttentionFwdArgs& a, int tile, int r) {
  const int32_t* tt = a.q_tiles + 4 * (K * tile + r);
  Run u;
  u.kv_lo = __ldg(tt), u.kv_hi = __ldg(tt + 1);
  u.steps = attn::make_steps(u.kv_lo, u.kv_hi, __ldg(tt + 2), __ldg(tt + 3), kBN);
  return u;
}

// The first run at or after r that has steps (K: none).
template <int K>
__device__ __forceinline__ int next_run(const AttentionFwdArgs& a, int tile, int r) {
  for (; r < K; ++r) {
    const int32_t* tt = a.q_tiles + 4 * (K * tile + r);
    if (__ldg(tt) < __ldg(tt + 1)) break;
  }
  return r;
}

// Step j of run r (first or last) if it holds keys outside the run: its v_zeroed / v_issued
// index (2 r for the first step, 2 r + 1 for a last one after it), else -1.
__device__ __forceinline__ int zero_index(const Run& u, int r, int j) {
  if (j != 0 && j + 1 != u.steps.count) return -1;
  return step_has_outside_rows(u.steps, j, u.kv_lo, u.kv_hi) ? 2 * r + (j != 0) : -1;
}

// Producer warp 0, one lane: Q once, then K and V of every step of every run into the ring.
template <int D, int K>
__device__ __forceinline__ void issue_loads(const Sm90Params& p, const Pipe<D>& pp, int tile, int first_run, int h,
                                            int hk, int q0) {
  using S = Smem<D>;
  constexpr int kStages = S::kStages;
  constexpr int kPanels = D / 64;  // 64-column panels of a 128-byte-swizzled tile
  sm90::mbar_expect_tx(pp.bar_q, S::kQBytes);
#pragma unroll
  for (int pn = 0; pn < kPanels; ++pn) p.q.load(pp.q + pn * kBM * 128, pn * 64, h, q0, pp.bar_q);
  int it = 0;  // position in the ring, over all runs
  for (int r = first_run; r < K; r = next_run<K>(p.a, tile, r + 1)) {
    const Run u = run_at<K>(p.a, tile, r);
    const int z_first = zero_index(u, r, 0), z_last = zero_index(u, r, u.steps.count - 1);
    for (int j = 0; j < u.steps.count; ++j, ++it) {
      const int stage = it % kStages;
      const uint32_t parity = (it / kStages) & 1;
      const int n0 = u.steps.first + j * kBN;
      if (it >= kStages) sm90::mbar_wait(&pp.k_empty[stage], parity ^ 1);
      sm90::mbar_expect_tx(&pp.k_full[stage], S::kKVBytes);
#pragma unroll
      for (int pn = 0; pn < kPanels; ++pn) {
        p.k.load(pp.k_at(stage) + pn * kBN * 128, pn * 64, hk, n0, &pp.k_full[stage]);
      }
      if (it >= kStages) sm90::mbar_wait(&pp.v_empty[stage], parity ^ 1);
      sm90::mbar_expect_tx(&pp.v_full[stage], S::kKVBytes);
#pragma unroll
      for (int pn = 0; pn < kPanels; ++pn) {
        p.v.load(pp.v_at(stage) + pn * kBN * 128, pn * 64, hk, n0, &pp.v_full[stage]);
      }
      const int z = j == 0 ? z_first : j + 1 == u.steps.count ? z_last : -1;
      if (z >= 0) sm90::mbar_arrive(&pp.v_issued[z]);
    }
  }
}

// Producer warp 1: zeroes the V rows outside [kv_lo, kv_hi) of ring step `it` (a run's first
// or last, starting at key n0) once TMA has written them, then signals v_zeroed[which] (the
// consumers wait there instead).
template <int D>
__device__ __forceinline__ void zero_outside_v(const Pipe<D>& pp, int it, int n0, int which, int kv_lo, int kv_hi,
                                               int lane) {
  using S = Smem<D>;
  constexpr int kChunks = D / 8;  // 16-byte chunks per row
  const int stage = it % S::kStages;
  // The lane's row offsets from an opaque copy, rebuilt per call: hoisted out of the caller's
  // loop they would outlive the producer's 24 registers.
  asm volatile("" : "+r"(lane));
  sm90::mbar_wait(&pp.v_issued[which], 0);  // the stage's use before this one has completed
  sm90::mbar_wait(&pp.v_full[stage], (it / S::kStages) & 1);
  unsigned char* vt = pp.v_ptr + stage * S::kKVBytes;
  for (int i = lane; i < kBN * kChunks; i += 32) {
    const int row = i / kChunks, chunk = i % kChunks;
    if (n0 + row < kv_lo || n0 + row >= kv_hi) {
      *reinterpret_cast<uint4*>(vt + (chunk / 8) * kBN * 128 + row * 128 + (chunk % 8) * 16) = make_uint4(0, 0, 0, 0);
    }
  }
  sm90::fence_proxy_async();  // the consumers' wgmma reads V through the async proxy
  sm90::mbar_arrive(&pp.v_zeroed[which]);  // every lane: its own stores are then ordered
}

// A consumer warpgroup (cg = 0 or 1): query rows 64 cg .. 64 cg + 63 of the tile.
template <typename T, int D, int K, bool kCap>
__device__ __forceinline__ void consume(const Sm90Params& p, const Pipe<D>& pp, int tile, int h, int first_run, int cg,
                                        int warp, int lane) {
  using S = Smem<D>;
  constexpr int kStages = S::kStages;
  const AttentionFwdArgs& a = p.a;
  const int grp = lane / 4, tig = lane % 4;
  const int tile_row0 = 64 * cg + 16 * warp + grp;  // and tile_row0 + 8
  int kv_s[2], kv_e[2];  // the rows' intervals of the current run's slot; rows past the end see nothing
  auto load_rows = [&](int r) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int64_t row = static_cast<int64_t>(tile) * kBM + tile_row0 + 8 * i;
      kv_s[i] = row < a.nq ? __ldg(a.kv_start + row * K + r) : 0;
      kv_e[i] = row < a.nq ? __ldg(a.kv_end + row * K + r) : 0;
    }
  };
  // scale log2(e), at least FLT_MIN so that a zero scale keeps masked scores at -inf (all
  // weights exp2(~0) = 1: uniform). The scale is >= 0 here: for a negative one the caller passes
  // -q and -scale (masked scores are -inf before scaling, so the sign cannot go into the scale).
  // Softcap: the scores become t = tanh(s scale / cap) (maxima in those units), the factor
  // cap log2(e): one FMUL and one tanh per score beyond the plain step.
  const float scale_log2 = kCap ? a.softcap * kLog2e : fmaxf(a.scale * kLog2e, kMinScaleLog2);
  const float cap_in = kCap ? a.scale / a.softcap : 0.0f;

  RowState st{{-INFINITY, -INFINITY}, {0.0f, 0.0f}, {1.0f, 1.0f}};
  float o[D / 2];
#pragma unroll
  for (int i = 0; i < D / 2; ++i) o[i] = 0.0f;
  float s[kBN / 2];         // S of the current step, then its P in fp32
  uint32_t pf[kBN / 16][4];  // P of the previous step: the A operand of O += P V

  if (first_run < K) {
    int r = K == 1 ? 0 : first_run;
    Run u = run_at<K>(a, tile, r);
    load_rows(r);
    bool more = K > 1 && next_run<K>(a, tile, r + 1) < K;  // runs with steps after run r
    const int other = kTurnBar + 1 - cg;
    bool zero_first = step_has_outside_rows(u.steps, 0, u.kv_lo, u.kv_hi);
    // Descriptors of the k16 slices: the start address (>> 4) is the low word, so a slice is
    // the tile's descriptor plus a constant.
    const uint64_t q_desc = attn::desc_kmajor(pp.q, kBM, 64 * cg, 0);
    const uint64_t k_desc = attn::desc_kmajor(pp.k, kBN, 0, 0);
    const uint64_t v_desc = attn::desc_mnmajor(pp.v, kBN, 0);
    constexpr uint32_t kStageDesc = S::kKVBytes >> 4;
    // Waits for K of the step at ring position `at`, takes this warpgroup's turn on the tensor
    // cores, issues S = Q K^T.
    auto issue_qk = [&](Ring<kStages> at) {
      sm90::mbar_wait(&pp.k_full[at.stage], at.phase);
      sm90::named_bar_sync(kTurnBar + cg, kConsumerThreads);
      sm90::wgmma_fence();
      const uint64_t k_stage = k_desc + at.stage * kStageDesc;
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        const uint32_t q_off = ((kk / 4) * kBM * 128 + (kk % 4) * 32) >> 4;
        const uint32_t k_off = ((kk / 4) * kBN * 128 + (kk % 4) * 32) >> 4;
        sm90::wgmma_ss<T, kBN>(s, q_desc + q_off, k_stage + k_off, kk > 0);
      }
      sm90::wgmma_commit();
    };
    // O += P V of the step at `at`; `zeroed`: a run's first or last step, whose V the producer
    // fixes (v_zeroed[which]).
    auto issue_pv = [&](Ring<kStages> at, bool zeroed, int which) {
      sm90::mbar_wait(zeroed ? &pp.v_zeroed[which] : &pp.v_full[at.stage], zeroed ? 0 : at.phase);
      sm90::wgmma_fence();
      const uint64_t v_stage = v_desc + at.stage * kStageDesc;
#pragma unroll
      for (int kk = 0; kk < kBN / 16; ++kk) sm90::wgmma_rs_tb<T, D>(o, pf[kk], v_stage + ((kk * 16 * 128) >> 4));
      sm90::wgmma_commit();
    };
    // The row intervals relative to the step start and this thread's first column.
    auto softmax = [&](auto masked, int it) {
      const int n0 = u.steps.first + it * kBN;
      const int lo[2] = {kv_s[0] - n0 - 2 * tig, kv_s[1] - n0 - 2 * tig};
      const int hi[2] = {kv_e[0] - n0 - 2 * tig, kv_e[1] - n0 - 2 * tig};
      softmax_step<decltype(masked)::value, kCap>(s, st, scale_log2, cap_in, lo, hi);
    };
    // Step `it` of run r (ring position `cur`) with the P V of the step before (`prev`, of this
    // run or the last one) in flight together; `zeroed`, `which`: that step's V, as issue_pv.
    auto step = [&](auto masked, int it, Ring<kStages> prev, Ring<kStages> cur, bool zeroed, int which) {
      issue_qk(cur);
      rescale<D>(o, st);
      issue_pv(prev, zeroed, which);
      // The second warpgroup's last turn is not passed on: nobody takes it.
      if (cg == 0 || it + 1 < u.steps.count || more) sm90::named_bar_arrive(other, kConsumerThreads);
      sm90::wgmma_wait<1>();
      sm90::fence_operands(s);
      sm90::mbar_arrive(&pp.k_empty[cur.stage]);
      softmax(masked, it);
      sm90::wgmma_wait<0>();
      sm90::fence_operands(o);
      sm90::fence_operands(pf);
      sm90::mbar_arrive(&pp.v_empty[prev.stage]);
      pack_p<T>(pf, s);
    };
    using Masked = std::true_type;
    using Full = std::false_type;

    Ring<kStages> at;  // ring position of step 0
    if (cg == 0) sm90::named_bar_arrive(kTurnBar, kConsumerThreads);  // the first warpgroup goes first
    sm90::mbar_wait(pp.bar_q, 0);
    issue_qk(at);
    if (cg == 0 || u.steps.count > 1 || more) sm90::named_bar_arrive(other, kConsumerThreads);
    sm90::wgmma_wait<0>();
    sm90::fence_operands(s);
    sm90::mbar_arrive(&pp.k_empty[0]);
    if (attn::step_is_full(u.steps, u.steps.first)) {
      softmax(Full{}, 0);
    } else {
      softmax(Masked{}, 0);
    }
    pack_p<T>(pf, s);

    bool zero_prev;  // the last step's V is one the producer zeroes (v_zeroed[prev_which])
    int prev_which;
    for (;;) {
      // Masked steps, the FULL run, masked steps (an empty FULL run may split anywhere).
      const int count = u.steps.count;
      const int full_begin = (u.steps.full_begin - u.steps.first) / kBN;
      const int full_end = (u.steps.full_end - u.steps.first) / kBN;
      int it = 1;
      for (; it < full_begin; ++it, at = at.next()) step(Masked{}, it, at, at.next(), it == 1 && zero_first, 2 * r);
      for (; it < full_end; ++it, at = at.next()) step(Full{}, it, at, at.next(), it == 1 && zero_first, 2 * r);
      for (; it < count; ++it, at = at.next()) step(Masked{}, it, at, at.next(), it == 1 && zero_first, 2 * r);
      zero_prev = (count == 1 && zero_first) || (count > 1 && step_has_outside_rows(u.steps, count - 1, u.kv_lo, u.kv_hi));
      prev_which = 2 * r + (count == 1 ? 0 : 1);
      if (!more) break;
      // The next run's first step, with the P V of this run's last.
      r = next_run<K>(a, tile, r + 1);
      u = run_at<K>(a, tile, r);
      load_rows(r);
      more = next_run<K>(a, tile, r + 1) < K;
      zero_first = step_has_outside_rows(u.steps, 0, u.kv_lo, u.kv_hi);
      if (attn::step_is_full(u.steps, u.steps.first)) {
        step(Full{}, 0, at, at.next(), zero_prev, prev_which);
      } else {
        step(Masked{}, 0, at, at.next(), zero_prev, prev_which);
      }
      at = at.next();
    }

    rescale<D>(o, st);
    issue_pv(at, zero_prev, prev_which);
    sm90::wgmma_wait<0>();
    sm90::fence_operands(o);
  }

  // Normalise; stage this warpgroup's rows (T) in its own rows of the Q buffer, then 16-byte
  // stores. lse in natural log (-inf for a row that sees nothing).
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float l = st.l[r];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    const float inv = l > 0.0f ? 1.0f / l : 0.0f;
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) {
      *reinterpret_cast<uint32_t*>(pp.q_ptr + attn::sw128_offset(kBM, tile_row0 + 8 * r, dt * 8 + 2 * tig)) =
          pack2<T>(o[4 * dt + 2 * r] * inv, o[4 * dt + 2 * r + 1] * inv);
    }
    const int64_t row = static_cast<int64_t>(tile) * kBM + tile_row0 + 8 * r;
    if (tig == 0 && row < a.nq) {
      a.lse[static_cast<int64_t>(h) * a.nq + row] = l > 0.0f ? (st.m[r] * scale_log2 + log2f(l)) * kLn2 : -INFINITY;
    }
  }
  sm90::fence_proxy_async();  // the TMA store reads the staged rows through the async proxy
  sm90::named_bar_sync(kGroupBar + cg, 128);
  if (threadIdx.x % 128 == 0) {
    // The warpgroup's rows of each 64-column panel: 64 x 128 bytes from a 1024-byte aligned
    // start, so the 128-byte swizzle of the staging is the tensor map's.
#pragma unroll
    for (int pn = 0; pn < D / 64; ++pn) {
      p.o.store(pp.q + pn * kBM * 128 + 64 * cg * 128, pn * 64, h, tile * kBM + 64 * cg);
    }
    sm90::tma_store_commit();
    sm90::tma_store_wait<0>();  // the staging must outlive the read (the CTA's smem goes at exit)
  }
}

template <typename T, int D, int K, bool kCap>
__device__ __forceinline__ void fwd_sm90(const Sm90Params& p) {
  using S = Smem<D>;
  constexpr int kStages = S::kStages;
  extern __shared__ unsigned char smem_raw[];
  __shared__ uint64_t bar_q;
  __shared__ uint64_t k_full[kStages];
  __shared__ uint64_t v_full[kStages];
  __shared__ uint64_t k_empty[kStages];
  __shared__ uint64_t v_empty[kStages];
  __shared__ uint64_t v_zeroed[2 * K];
  __shared__ uint64_t v_issued[2 * K];
  // The steps whose V rows producer warp 1 zeroes, by v_zeroed index: (ring step, first key,
  // kv_lo, kv_hi) of the run, ring step -1 for none. Thread 0 writes them before the barrier.
  __shared__ int4 zero_steps[2 * K];
  const AttentionFwdArgs& a = p.a;

  const uint32_t raw = smem_u32(smem_raw);
  const uint32_t base = (raw + 1023u) & ~1023u;
  Pipe<D> pp;
  pp.q = base;
  pp.k = base + S::kQBytes;
  pp.v = base + S::kQBytes + kStages * S::kKVBytes;
  pp.q_ptr = smem_raw + (pp.q - raw);
  pp.v_ptr = smem_raw + (pp.v - raw);
  pp.bar_q = &bar_q;
  pp.k_full = k_full, pp.v_full = v_full, pp.k_empty = k_empty, pp.v_empty = v_empty;
  pp.v_zeroed = v_zeroed, pp.v_issued = v_issued;

  // Blocks run (tile rank, head) with the head fastest: with q_order the launch sequence is
  // heaviest first over every block, not per head, and the query heads of one K/V head run side
  // by side (their K/V tiles shared in L2).
  const int rank = static_cast<int>(blockIdx.x / a.hq), h = static_cast<int>(blockIdx.x % a.hq);
  const int tile = a.q_order ? __ldg(a.q_order + rank) : rank;
  const int hk = h / (a.hq / a.hkv);
  const int tid = threadIdx.x, wg = tid / 128, warp = (tid % 128) / 32, lane = tid % 32;
  const int q0 = tile * kBM;
  const int first_run = next_run<K>(a, tile, 0);

  if (tid == 0) {
    sm90::mbar_init(&bar_q, 1);
    for (int s = 0; s < kStages; ++s) {
      sm90::mbar_init(&k_full[s], 1);
      sm90::mbar_init(&v_full[s], 1);
      sm90::mbar_init(&k_empty[s], kConsumerThreads);
      sm90::mbar_init(&v_empty[s], kConsumerThreads);
    }
    for (int z = 0; z < 2 * K; ++z) {
      sm90::mbar_init(&v_zeroed[z], 32);
      sm90::mbar_init(&v_issued[z], 1);
      zero_steps[z] = make_int4(-1, 0, 0, 0);
    }
    sm90::mbar_fence_init();
    int it = 0;  // ring position of the run's first step
    for (int r = first_run; r < K; r = next_run<K>(a, tile, r + 1)) {
      const Run u = run_at<K>(a, tile, r);
      const int last = u.steps.count - 1;
      for (int j = 0; j <= last; j = j < last ? last : last + 1) {  // the first step, then the last
        const int z = zero_index(u, r, j);
        if (z >= 0) zero_steps[z] = make_int4(it + j, u.steps.first + j * kBN, u.kv_lo, u.kv_hi);
      }
      it += u.steps.count;
    }
  }
  __syncthreads();

  if (wg == 0) {
    sm90::setmaxnreg_dec<kProducerRegs>();
    if (first_run == K) return;
    if (warp == 0) {
      if (lane == 0) issue_loads<D, K>(p, pp, tile, first_run, h, hk, q0);
    } else if (warp == 1) {
      for (int z = 0; z < 2 * K; ++z) {  // in ring order: runs in order, first step before last
        const int4 zs = zero_steps[z];
        if (zs.x >= 0) zero_outside_v<D>(pp, zs.x, zs.y, z, zs.z, zs.w, lane);
      }
    }
    return;
  }
  sm90::setmaxnreg_inc<kConsumerRegs>();
  consume<T, D, K, kCap>(p, pp, tile, h, first_run, wg - 1, warp, lane);
}

#endif  // TK_SM90_DEVICE_CODE

template <typename T, int K, bool kCap, int D>  // D last: the head dim ends the kernel's name
__global__ void __launch_bounds__(kThreads, 1) attention_fwd_sm90_kernel(const __grid_constant__ Sm90Params p) {
#if defined(TK_SM90_DEVICE_CODE)
  fwd_sm90<T, D, K, kCap>(p);
#else
  (void)p;
#endif
}

// ---------------------------------------------------------------------------------------------
// host: tensor maps
// ---------------------------------------------------------------------------------------------
using EncodeTiled = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                                 const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                                 CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

// cuTensorMapEncodeTiled from the driver the runtime loaded (nullptr when it has none).
EncodeTiled encode_tiled() {
  static const EncodeTiled fn = [] {
    void* ptr = nullptr;
    cudaDriverEntryPointQueryResult found{};
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &ptr, 12000, cudaEnableDefault, &found) !=
            cudaSuccess ||
        found != cudaDriverEntryPointSuccess) {
      cudaGetLastError();
      return static_cast<EncodeTiled>(nullptr);
    }
    return reinterpret_cast<EncodeTiled>(ptr);
  }();
  return fn;
}

// Map over a [rows, heads, D] tensor (strides in elements), boxes of 64 columns x box_rows rows
// of one head, 128-byte swizzle, zero fill out of range.
cudaError_t make_map(TileMap& out, DType dtype, const void* ptr, int64_t rows, int heads, int D, int64_t row_stride,
                     int64_t head_stride, int box_rows) {
  const EncodeTiled encode = encode_tiled();
  if (encode == nullptr) return cudaErrorNotSupported;
  cuuint64_t rs = static_cast<cuuint64_t>(row_stride) * 2, hs = static_cast<cuuint64_t>(head_stride) * 2;
  if (heads == 1) hs = static_cast<cuuint64_t>(D) * 2;  // any valid stride: the head coordinate is 0
  if (rows == 1) rs = hs * static_cast<cuuint64_t>(heads);
  out.rows_in_dim1 = hs > rs;
  const cuuint64_t dims[3] = {static_cast<cuuint64_t>(D), out.rows_in_dim1 ? static_cast<cuuint64_t>(rows) : heads,
                              out.rows_in_dim1 ? static_cast<cuuint64_t>(heads) : rows};
  const cuuint64_t strides[2] = {out.rows_in_dim1 ? rs : hs, out.rows_in_dim1 ? hs : rs};
  const cuuint32_t box[3] = {64, out.rows_in_dim1 ? static_cast<cuuint32_t>(box_rows) : 1u,
                             out.rows_in_dim1 ? 1u : static_cast<cuuint32_t>(box_rows)};
  const cuuint32_t elem_strides[3] = {1, 1, 1};
  const CUtensorMapDataType type =
      dtype == DType::kFloat16 ? CU_TENSOR_MAP_DATA_TYPE_FLOAT16 : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16;
  const CUresult r =
      encode(&out.map, type, 3, const_cast<void*>(ptr), dims, strides, box, elem_strides, CU_TENSOR_MAP_INTERLEAVE_NONE,
             CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_128B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return r == CUDA_SUCCESS ? cudaSuccess : cudaErrorInvalidValue;
}

template <typename T, int D, int K, bool kCap>
cudaError_t launch(const AttentionFwdArgs& a, DType dtype, cudaStream_t stream) {
  Sm90Params p{};
  p.a = a;
  cudaError_t err;
  err = make_map(p.q, dtype, a.q, a.nq, a.hq, D, a.q_row_stride, a.q_head_stride, kBM);
  if (err == cudaSuccess) err = make_map(p.o, dtype, a.out, a.nq, a.hq, D, int64_t{a.hq} * D, D, 64);
  if (err != cudaSuccess) return err;
  if (a.nk == 0) {
    p.k = p.v = p.q;  // every interval is empty: no K/V tile is ever loaded
  } else {
    err = make_map(p.k, dtype, a.k, a.nk, a.hkv, D, a.k_row_stride, a.k_head_stride, kBN);
    if (err == cudaSuccess) err = make_map(p.v, dtype, a.v, a.nk, a.hkv, D, a.v_row_stride, a.v_head_stride, kBN);
    if (err != cudaSuccess) return err;
  }
  constexpr size_t smem = Smem<D>::kBytes;
  if ((err = cudaFuncSetAttribute(attention_fwd_sm90_kernel<T, K, kCap, D>,
                                  cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem))) != cudaSuccess) {
    return err;
  }
  const int64_t blocks = (a.nq + kBM - 1) / kBM * a.hq;
  if (blocks > 0x7fffffff) return cudaErrorInvalidValue;  // gridDim.x
  attention_fwd_sm90_kernel<T, K, kCap, D><<<static_cast<unsigned>(blocks), kThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

bool attention_sm90_supported(int device) {
  int major = 0, minor = 0;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess ||
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  if (major != 9 || minor != 0 || encode_tiled() == nullptr) return false;
  int current = 0;
  if (cudaGetDevice(&current) != cudaSuccess || current != device) {
    cudaGetLastError();
    return false;  // the kernel image is looked up on the current device
  }
  // The image the runtime loads for this device: sm_90a code, or a plain sm_90 / PTX image whose
  // kernel is empty (binaryVersion is 90 for both).
  static const bool sm90a_image = [] {
    int flag = 0;
    if (cudaMemcpyFromSymbol(&flag, tk_attention_sm90a_image, sizeof(flag)) != cudaSuccess) {
      cudaGetLastError();
      return false;  // no image for this device in this build
    }
    return flag == 1;
  }();
  return sm90a_image;
}

cudaError_t attention_fwd_sm90(const AttentionFwdArgs& a, DType dtype, int head_dim, cudaStream_t stream) {
  if (a.nq == 0 || a.hq == 0) return cudaSuccess;
  if (a.hkv <= 0 || a.hq % a.hkv != 0) return cudaErrorInvalidValue;
  if (!(a.scale >= 0.0f)) return cudaErrorInvalidValue;  // negative: pass -q and -scale (see above)
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || !attention_sm90_supported(device)) return cudaErrorInvalidDeviceFunction;
  if (a.nq >= (int64_t{1} << 31) || a.nk >= (int64_t{1} << 31)) return cudaErrorInvalidValue;  // int32 TMA coordinates
  return attn::dispatch_dtype_head_dim(dtype, head_dim, [&](auto t, auto d) {
    return attn::dispatch_mask(a.num_intervals, a.softcap, [&](auto k, auto cap) {
      return launch<decltype(t), d(), k(), cap()>(a, dtype, stream);
    });
  });
}

}  // namespace tk
