// Interval-mask attention forward for sm_90a: wgmma (warpgroup MMA) with TMA tile loads and an
// mbarrier pipeline. Same algorithm and tile classes as attention_fwd.cu (FlashAttention-2
// style online softmax over the key tiles of the query tile's [kv_lo, kv_hi), FULL tiles without
// mask arithmetic), on Hopper's asynchronous units:
//
//   * one block of 2 warpgroups per (query tile of 128, query head); warpgroup g owns rows
//     64 g .. 64 g + 63 (one m64 wgmma row block), both share the K/V tiles;
//   * thread 0 issues TMA loads (cp.async.bulk.tensor, 128-byte swizzle) of Q once and of K/V
//     tiles of 128 keys into a 2-stage ring; each stage has a K and a V barrier, so S = Q K^T
//     starts while V is still in flight and the next tiles load during the current step;
//   * S = Q K^T: wgmma with both operands in shared memory (K-major); P stays in registers as the
//     A operand of O += P V (V N-major, the transpose read by the descriptor).
//
// Tensor maps are built on the host with the driver's cuTensorMapEncodeTiled, looked up at run
// time through the runtime (cudaGetDriverEntryPointByVersion): no libcuda link at build time.
// Not yet here: warp specialisation / ping-pong scheduling between the warpgroups (FA3); the
// pipeline overlaps loads with compute, not softmax with the tensor cores.
#include "attention/attention.h"

#include <cuda.h>
#include <math.h>

#include "attention/layouts.cuh"
#include "attention/sm90.cuh"
#include "common/interval_mask.cuh"
#include "common/mma.cuh"

namespace tk {
namespace {

constexpr int kWarpgroups = 2;
constexpr int kThreads = 128 * kWarpgroups;
constexpr int kBM = kAttentionSm90BlockM;
constexpr int kBN = 128;  // keys per step
constexpr int kStages = 2;
static_assert(kBM == 64 * kWarpgroups, "one m64 row block per warpgroup");

// The device code exists for sm_90a only; other device passes see an empty kernel (it is never
// launched there: attention_sm90_supported is false).
#if !defined(__CUDA_ARCH__) || defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define TK_SM90_DEVICE_CODE 1
#endif

template <int D>
struct Smem {
  static constexpr uint32_t kQBytes = kBM * D * 2;
  static constexpr uint32_t kKVBytes = kBN * D * 2;  // one K or V tile
  // Q, then K stages, then V stages; + 1 KiB to align the base to a 1024-byte swizzle atom.
  static constexpr size_t kBytes = kQBytes + 2 * kStages * kKVBytes + 1024;
};

// A tensor map over [rows, heads, D] with its dimensions ordered by stride: (D, heads, rows)
// normally, (D, rows, heads) when the head stride is the larger one; coords() orders a
// (column, head, row) triple accordingly.
struct TileMap {
  CUtensorMap map;
  int rows_in_dim1;
#if defined(TK_SM90_DEVICE_CODE)
  __device__ __forceinline__ void load(uint32_t dst, int col, int head, int row, uint64_t* bar) const {
    sm90::tma_load_3d(dst, &map, col, rows_in_dim1 ? row : head, rows_in_dim1 ? head : row, bar);
  }
#endif
};

struct Sm90Params {
  TileMap q, k, v;
  AttentionFwdArgs a;
};

#if defined(TK_SM90_DEVICE_CODE)
template <typename T, int D>
__device__ __forceinline__ void fwd_sm90(const Sm90Params& p) {
  constexpr float kLog2e = 1.4426950408889634f;
  constexpr float kLn2 = 0.6931471805599453f;
  using S = Smem<D>;
  constexpr int kPanels = D / 64;  // 64-column panels of a 128-byte-swizzled tile
  extern __shared__ unsigned char smem_raw[];
  __shared__ uint64_t bar_q;
  __shared__ uint64_t bar_k[kStages];
  __shared__ uint64_t bar_v[kStages];
  const AttentionFwdArgs& a = p.a;

  const uint32_t raw = smem_u32(smem_raw);
  const uint32_t base = (raw + 1023u) & ~1023u;
  unsigned char* base_ptr = smem_raw + (base - raw);
  const uint32_t q_smem = base;
  const uint32_t k_smem = base + S::kQBytes;                       // + stage * kKVBytes
  const uint32_t v_smem = base + S::kQBytes + kStages * S::kKVBytes;  // + stage * kKVBytes

  const int tile = gridDim.x - 1 - blockIdx.x;  // the longest (last, for causal masks) tiles first
  const int h = blockIdx.y;
  const int hk = h / (a.hq / a.hkv);
  const int tid = threadIdx.x, wg = tid / 128, warp = (tid % 128) / 32, lane = tid % 32;
  const int grp = lane / 4, tig = lane % 4;
  const int q0 = tile * kBM;

  const int32_t* tt = a.q_tiles + 4 * tile;
  const int kv_lo = __ldg(tt), kv_hi = __ldg(tt + 1), full_lo = __ldg(tt + 2), full_hi = __ldg(tt + 3);
  const int n_begin = kv_lo < kv_hi ? (kv_lo / kBN) * kBN : 0;
  const int n_tiles = kv_lo < kv_hi ? (kv_hi - n_begin + kBN - 1) / kBN : 0;

  auto issue_kv = [&](int stage, int n0) {
    sm90::mbar_expect_tx(&bar_k[stage], S::kKVBytes);
#pragma unroll
    for (int pn = 0; pn < kPanels; ++pn) {
      p.k.load(k_smem + stage * S::kKVBytes + pn * kBN * 128, pn * 64, hk, n0, &bar_k[stage]);
    }
    sm90::mbar_expect_tx(&bar_v[stage], S::kKVBytes);
#pragma unroll
    for (int pn = 0; pn < kPanels; ++pn) {
      p.v.load(v_smem + stage * S::kKVBytes + pn * kBN * 128, pn * 64, hk, n0, &bar_v[stage]);
    }
  };

  if (tid == 0) {
    sm90::mbar_init(&bar_q, 1);
    for (int s = 0; s < kStages; ++s) {
      sm90::mbar_init(&bar_k[s], 1);
      sm90::mbar_init(&bar_v[s], 1);
    }
    sm90::mbar_fence_init();
  }
  __syncthreads();
  if (tid == 0) {
    sm90::mbar_expect_tx(&bar_q, S::kQBytes);
#pragma unroll
    for (int pn = 0; pn < kPanels; ++pn) p.q.load(q_smem + pn * kBM * 128, pn * 64, h, q0, &bar_q);
    for (int s = 0; s < kStages && s < n_tiles; ++s) issue_kv(s, n_begin + s * kBN);
  }

  // This thread's two query rows and their intervals; rows past the end see nothing.
  const int row0 = q0 + 64 * wg + 16 * warp + grp, row1 = row0 + 8;
  const int s0 = row0 < a.nq ? __ldg(a.kv_start + row0) : 0, e0 = row0 < a.nq ? __ldg(a.kv_end + row0) : 0;
  const int s1 = row1 < a.nq ? __ldg(a.kv_start + row1) : 0, e1 = row1 < a.nq ? __ldg(a.kv_end + row1) : 0;
  const float scale_log2 = a.scale * kLog2e;

  float o[D / 2];  // m64 x D accumulator of this warpgroup
#pragma unroll
  for (int i = 0; i < D / 2; ++i) o[i] = 0.0f;
  float m[2] = {-INFINITY, -INFINITY};  // running row max of the log2-scaled scores
  float l[2] = {0.0f, 0.0f};            // running row sum (this thread's columns only)

  sm90::mbar_wait(&bar_q, 0);
  for (int it = 0; it < n_tiles; ++it) {
    const int stage = it % kStages;
    const uint32_t parity = (it / kStages) & 1;
    const int n0 = n_begin + it * kBN;

    // S = Q K^T (this warpgroup's 64 rows x 128 keys)
    float s[kBN / 2];
#pragma unroll
    for (int i = 0; i < kBN / 2; ++i) s[i] = 0.0f;
    sm90::mbar_wait(&bar_k[stage], parity);
    sm90::wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      sm90::wgmma_ss<T, kBN>(s, attn::desc_kmajor(q_smem, kBM, 64 * wg, kk),
                             attn::desc_kmajor(k_smem + stage * S::kKVBytes, kBN, 0, kk), kk > 0);
    }
    sm90::wgmma_commit();
    sm90::wgmma_wait<0>();
    sm90::fence_operands(s);

    // Scale to log2 units; mask unless every query of the tile sees every key of this step.
    const bool full = classify_tile(n0, kBN, kv_lo, kv_hi, full_lo, full_hi) == kTileFull;
#pragma unroll
    for (int nt = 0; nt < kBN / 8; ++nt) {
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        float x = s[4 * nt + c] * scale_log2;
        if (!full) {
          const int key = n0 + nt * 8 + tig * 2 + (c & 1);
          const bool seen = c < 2 ? interval_visible(s0, e0, key) : interval_visible(s1, e1, key);
          x = seen ? x : -INFINITY;
        }
        s[4 * nt + c] = x;
      }
    }

    // Online softmax: a row's scores live in the 4 threads of a quad.
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx = -INFINITY;
#pragma unroll
      for (int nt = 0; nt < kBN / 8; ++nt) mx = fmaxf(mx, fmaxf(s[4 * nt + 2 * r], s[4 * nt + 2 * r + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float m_new = fmaxf(m[r], mx);
      const float sub = m_new == -INFINITY ? 0.0f : m_new;  // a row that has seen nothing yet
      const float alpha = fast_exp2(m[r] - sub);
      m[r] = m_new;
      l[r] *= alpha;
#pragma unroll
      for (int dt = 0; dt < D / 8; ++dt) {
        o[4 * dt + 2 * r] *= alpha;
        o[4 * dt + 2 * r + 1] *= alpha;
      }
#pragma unroll
      for (int nt = 0; nt < kBN / 8; ++nt) {
        const float p0 = fast_exp2(s[4 * nt + 2 * r] - sub), p1 = fast_exp2(s[4 * nt + 2 * r + 1] - sub);
        s[4 * nt + 2 * r] = p0;
        s[4 * nt + 2 * r + 1] = p1;
        l[r] += p0 + p1;
      }
    }
    // P as wgmma A fragments: the k16 slice kk is n8 blocks 2 kk and 2 kk + 1.
    uint32_t pf[kBN / 16][4];
#pragma unroll
    for (int kk = 0; kk < kBN / 16; ++kk) {
      pf[kk][0] = pack2<T>(s[8 * kk + 0], s[8 * kk + 1]);
      pf[kk][1] = pack2<T>(s[8 * kk + 2], s[8 * kk + 3]);
      pf[kk][2] = pack2<T>(s[8 * kk + 4], s[8 * kk + 5]);
      pf[kk][3] = pack2<T>(s[8 * kk + 6], s[8 * kk + 7]);
    }

    sm90::mbar_wait(&bar_v[stage], parity);
    if (n0 < kv_lo || n0 + kBN > kv_hi) {
      // V rows no query of the tile sees may hold anything (NaN): P is 0 there, but 0 * NaN is
      // not. Zero them (rows past the end of V are already 0 from TMA).
      unsigned char* vt = base_ptr + S::kQBytes + (kStages + stage) * S::kKVBytes;
      for (int i = tid; i < kBN * kPanels * 8; i += kThreads) {
        const int row = i / (kPanels * 8), chunk = i % (kPanels * 8);
        if (n0 + row < kv_lo || n0 + row >= kv_hi) {
          unsigned char* at = vt + (chunk / 8) * kBN * 128 + row * 128 + (chunk % 8) * 16;
          *reinterpret_cast<uint4*>(at) = make_uint4(0, 0, 0, 0);
        }
      }
      sm90::fence_proxy_async();
      __syncthreads();
    }

    // O += P V
    sm90::wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kBN / 16; ++kk) {
      sm90::wgmma_rs_tb<T, D>(o, pf[kk], attn::desc_mnmajor(v_smem + stage * S::kKVBytes, kBN, kk));
    }
    sm90::wgmma_commit();
    sm90::wgmma_wait<0>();
    sm90::fence_operands(o);
    sm90::fence_operands(pf);

    __syncthreads();  // both warpgroups are done with this stage: refill it
    if (tid == 0 && it + kStages < n_tiles) issue_kv(stage, n0 + kStages * kBN);
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
      *reinterpret_cast<uint32_t*>(out_row + dt * 8 + tig * 2) =
          pack2<T>(o[4 * dt + 2 * r] * inv, o[4 * dt + 2 * r + 1] * inv);
    }
    if (tig == 0) a.lse[static_cast<int64_t>(h) * a.nq + row] = l[r] > 0.0f ? (m[r] + log2f(l[r])) * kLn2 : -INFINITY;
  }
}

#endif  // TK_SM90_DEVICE_CODE

template <typename T, int D>
__global__ void __launch_bounds__(kThreads, 1) attention_fwd_sm90_kernel(const __grid_constant__ Sm90Params p) {
#if defined(TK_SM90_DEVICE_CODE)
  fwd_sm90<T, D>(p);
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

template <typename T, int D>
cudaError_t launch(const AttentionFwdArgs& a, DType dtype, cudaStream_t stream) {
  Sm90Params p{};
  p.a = a;
  cudaError_t err;
  err = make_map(p.q, dtype, a.q, a.nq, a.hq, D, a.q_row_stride, a.q_head_stride, kBM);
  if (err != cudaSuccess) return err;
  if (a.nk == 0) {
    p.k = p.v = p.q;  // every interval is empty: no K/V tile is ever loaded
  } else {
    err = make_map(p.k, dtype, a.k, a.nk, a.hkv, D, a.k_row_stride, a.k_head_stride, kBN);
    if (err == cudaSuccess) err = make_map(p.v, dtype, a.v, a.nk, a.hkv, D, a.v_row_stride, a.v_head_stride, kBN);
    if (err != cudaSuccess) return err;
  }
  constexpr size_t smem = Smem<D>::kBytes;
  if ((err = cudaFuncSetAttribute(attention_fwd_sm90_kernel<T, D>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                  static_cast<int>(smem))) != cudaSuccess) {
    return err;
  }
  const dim3 grid(static_cast<unsigned>((a.nq + kBM - 1) / kBM), static_cast<unsigned>(a.hq));
  attention_fwd_sm90_kernel<T, D><<<grid, kThreads, smem, stream>>>(p);
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
  cudaFuncAttributes attr{};
  if (cudaFuncGetAttributes(&attr, attention_fwd_sm90_kernel<__half, 64>) != cudaSuccess) {
    cudaGetLastError();
    return false;  // no sm_90a code in this build
  }
  return attr.binaryVersion == 90;
}

cudaError_t attention_fwd_sm90(const AttentionFwdArgs& a, DType dtype, int head_dim, cudaStream_t stream) {
  if (a.nq == 0 || a.hq == 0) return cudaSuccess;
  if (a.hkv <= 0 || a.hq % a.hkv != 0) return cudaErrorInvalidValue;
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || !attention_sm90_supported(device)) return cudaErrorInvalidDeviceFunction;
  if (a.nq >= (int64_t{1} << 31) || a.nk >= (int64_t{1} << 31)) return cudaErrorInvalidValue;  // int32 TMA coordinates
  if (dtype == DType::kFloat16) {
    if (head_dim == 64) return launch<__half, 64>(a, dtype, stream);
    if (head_dim == 128) return launch<__half, 128>(a, dtype, stream);
  } else if (dtype == DType::kBFloat16) {
    if (head_dim == 64) return launch<__nv_bfloat16, 64>(a, dtype, stream);
    if (head_dim == 128) return launch<__nv_bfloat16, 128>(a, dtype, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace tk
