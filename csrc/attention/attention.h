// Interval-mask attention forward (FlashAttention-2 style) with mma.sync tensor-core tiles:
// query i sees keys kv_start[i] <= j < kv_end[i]; q_tiles (transfusion_kernels/masks.py,
// HybridMask.query_tiles(kAttentionBlockM)) bounds the key tiles each query tile visits and marks
// the ones every query sees in full (no mask arithmetic there).
#pragma once

#include <cuda_runtime_api.h>
#include <stdint.h>

#include "common/dtype.cuh"

namespace tk {

constexpr int kAttentionBlockM = 64;  // query rows per block (16 per warp, 4 warps)
constexpr int kAttentionBlockN = 64;  // keys per step

struct AttentionFwdArgs {
  void* out;                // [nq, hq, D] T, contiguous
  float* lse;               // [hq, nq] fp32: natural log of the softmax denominator, -inf if empty
  const void* q;            // [nq, hq, D] T, rows/heads strided (multiples of 8 elements), unit last stride
  const void* k;            // [nk, hkv, D] T
  const void* v;            // [nk, hkv, D] T
  const int32_t* kv_start;  // [nq]
  const int32_t* kv_end;    // [nq]
  const int32_t* q_tiles;   // [ceil(nq / kAttentionBlockM), 4]: kv_lo, kv_hi, full_lo, full_hi
  int64_t nq, nk;
  int hq, hkv;
  int64_t q_row_stride, q_head_stride, k_row_stride, k_head_stride, v_row_stride, v_head_stride;
  float scale;              // softmax scale (applied to q . k)
};

// fp16 / bf16, head_dim 64 or 128; anything else returns cudaErrorInvalidValue.
cudaError_t attention_fwd(const AttentionFwdArgs& args, DType dtype, int head_dim, cudaStream_t stream);

}  // namespace tk
