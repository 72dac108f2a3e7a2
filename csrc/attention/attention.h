// Interval-mask attention (FlashAttention-2 style) on tensor cores: query i sees keys
// kv_start[i] <= j < kv_end[i]. The mask's tile tables (transfusion_kernels/masks.py,
// HybridMask.query_tiles / key_tiles) bound the key tiles a query tile visits (and the query
// tiles a key tile is seen by) and mark the ones seen in full (no mask arithmetic there).
//
//   attention_fwd       mma.sync m16n8k16 (sm_80+), q_tiles = query_tiles(kAttentionBlockM)
//   attention_fwd_sm90  wgmma + TMA + mbarrier pipeline (sm_90a only),
//                       q_tiles = query_tiles(kAttentionSm90BlockM)
//   attention_bwd       mma.sync (sm_80+): delta = rowsum(dO * O), then dk/dv per key tile and
//                       dq per query tile (deterministic: no atomics)
//   attention_bwd_sm90  wgmma (sm_90a only): dk/dv per key tile, dq summed in fp32 over the
//                       key tiles in a fixed order (deterministic), no recomputation
//
// fp16 / bf16, head_dim 64 or 128; rows and heads strided (multiples of 8 elements, 16-byte
// aligned bases), unit stride along head_dim. GQA: query head h uses kv head h / (hq / hkv).
//
// Interval unions: query i sees key j iff kv_start[i, k] <= j < kv_end[i, k] for some of its K
// slots (num_intervals; sorted, disjoint, unused slots empty). The query tables then hold one
// run per slot (plan.query_runs: [tiles, K, 4]); a query tile walks its K runs one after the
// other and tests only slot k in run k (each pair counted once). The key table (dk/dv) stays
// [tiles, 4]; its masked steps test the union. K is a template parameter (1, 2 or 4), as is the
// softcap (scores s -> softcap * tanh(s / softcap), one tanh.approx per score): the K = 1,
// no-softcap kernels are the same code as without either feature.
#pragma once

#include <cuda_runtime_api.h>
#include <stdint.h>

#include "common/dtype.cuh"

namespace tk {

constexpr int kAttentionBlockM = 128;      // forward (mma.sync): query rows per block (32 per warp, 4 warps)
constexpr int kAttentionBlockN = 64;       // forward (mma.sync): keys per step
constexpr int kAttentionSm90BlockM = 128;  // forward (wgmma): query rows per block (64 per warpgroup, 2 warpgroups)
constexpr int kAttentionBwdBlockM = 64;    // dq: query rows per block; table query_tiles(64)
constexpr int kAttentionBwdBlockN = 64;    // dk/dv: keys per block; table key_tiles(64)
constexpr int kAttentionMaxIntervals = 4;  // K of the compiled kernels: 1, 2 or 4 (callers pad K = 3 to 4)

struct AttentionFwdArgs {
  void* out;                // [nq, hq, D] T, contiguous
  float* lse;               // [hq, nq] fp32: natural log of the softmax denominator, -inf if empty
  const void* q;            // [nq, hq, D] T, rows/heads strided (multiples of 8 elements), unit last stride
  const void* k;            // [nk, hkv, D] T
  const void* v;            // [nk, hkv, D] T
  const int32_t* kv_start;  // [nq, num_intervals]
  const int32_t* kv_end;    // [nq, num_intervals]
  const int32_t* q_tiles;   // [ceil(nq / block_m), num_intervals, 4]: kv_lo, kv_hi, full_lo, full_hi per run
  const int32_t* q_order;   // [ceil(nq / block_m)]: query tile of each block rank, heaviest first
                            // (nullptr: the rank itself); both forwards run block b as rank
                            // b / hq, head b % hq (longest first over all heads' blocks)
  int64_t nq, nk;
  int hq, hkv;
  int64_t q_row_stride, q_head_stride, k_row_stride, k_head_stride, v_row_stride, v_head_stride;
  float scale;              // softmax scale (applied to q . k)
  int num_intervals = 1;    // K: 1, 2 or 4
  float softcap = 0.0f;     // 0: none; else scale q . k -> softcap * tanh(scale q . k / softcap)
};

struct AttentionBwdArgs {
  void* dq;                 // [nq, hq, D] T, contiguous
  void* dk;                 // [nk, hkv, D] T, contiguous (summed over the kv head's query heads)
  void* dv;                 // [nk, hkv, D] T, contiguous
  float* delta;             // scratch [hq, nq] fp32: rowsum(dO * O)
  float* lse2;              // scratch [hq, nq] fp32: lse * log2(e), +inf for rows that see nothing
  const void* dout;         // [nq, hq, D] T, strided like q
  const void* q;            // [nq, hq, D] T
  const void* k;            // [nk, hkv, D] T
  const void* v;            // [nk, hkv, D] T
  const void* out;          // [nq, hq, D] T (the forward's output)
  const float* lse;         // [hq, nq] fp32, contiguous (the forward's lse)
  const int32_t* kv_start;  // [nq, num_intervals]
  const int32_t* kv_end;    // [nq, num_intervals]
  const int32_t* q_tiles;   // [ceil(nq / kAttentionBwdBlockM), num_intervals, 4]: query_runs(kAttentionBwdBlockM)
  const int32_t* k_tiles;   // [ceil(nk / kAttentionBwdBlockN), 4]: key_tiles(kAttentionBwdBlockN)
  const int32_t* q_order;   // [rows of q_tiles]: query tile of each dq block, heaviest first (nullptr: in order)
  const int32_t* k_order;   // [rows of k_tiles]: key tile of each dk/dv block, heaviest first (nullptr: in order)
                            // attention_bwd runs dq block b as rank b / hq (head b % hq), dk/dv
                            // block b as rank b / hkv (kv head b % hkv)
  int64_t nq, nk;
  int hq, hkv;
  int64_t q_row_stride, q_head_stride, k_row_stride, k_head_stride, v_row_stride, v_head_stride;
  int64_t o_row_stride, o_head_stride, do_row_stride, do_head_stride;
  float scale;
  int num_intervals = 1;    // K: 1, 2 or 4
  float softcap = 0.0f;     // 0: none (as AttentionFwdArgs)
  // Workspace of attention_bwd_sm90 only (the mma.sync attention_bwd ignores both); the
  // backward zeroes them itself.
  float* dq_accum;          // [nq, hq, D] fp32: dQ summed over the key tiles
  int32_t* dq_semaphore;    // [hq, ceil(nq / kAttentionBwdBlockM)]: the key tiles' turns per query tile
};

// fp16 / bf16, head_dim 64 or 128, num_intervals 1, 2 or 4, softcap >= 0; anything else returns
// cudaErrorInvalidValue.
cudaError_t attention_fwd(const AttentionFwdArgs& args, DType dtype, int head_dim, cudaStream_t stream);

// The sm_90a forward. Needs a device of compute capability 9.0 and a build with sm_90a
// (cudaErrorInvalidDeviceFunction otherwise) and the driver's cuTensorMapEncodeTiled
// (cudaErrorNotSupported when the driver does not provide it); q_tiles at kAttentionSm90BlockM.
cudaError_t attention_fwd_sm90(const AttentionFwdArgs& args, DType dtype, int head_dim, cudaStream_t stream);

// Whether attention_fwd_sm90 can run on `device`: compute capability 9.0 and sm_90a code in
// this build.
bool attention_sm90_supported(int device);

// dq, dk, dv (and the delta / lse2 scratch); fp16 / bf16, head_dim 64 or 128. Runs
// attention_bwd_sm90 when dq_accum and dq_semaphore are given and attention_sm90_supported.
cudaError_t attention_bwd(const AttentionBwdArgs& args, DType dtype, int head_dim, cudaStream_t stream);

// The sm_90a backward (wgmma): dk/dv per key tile with the dQ contributions of the same step
// added, in a fixed order, to dq_accum (5 GEMMs per step; see attention_bwd_sm90.cu). Needs
// dq_accum and dq_semaphore besides the delta / lse2 scratch, tables as attention_bwd, and what
// attention_sm90_supported checks (cudaErrorInvalidDeviceFunction otherwise).
cudaError_t attention_bwd_sm90(const AttentionBwdArgs& args, DType dtype, int head_dim, cudaStream_t stream);

}  // namespace tk
