// sm_80 primitives of the attention kernels beyond common/mma.cuh (inline PTX only; the logic
// that uses them lives in tile_io.cuh and the kernels).
#pragma once

#include "common/mma.cuh"

namespace tk {
namespace attn {

// 4-byte global -> shared copy (cp.async.ca); zero-filled when !valid.
__device__ __forceinline__ void cp_async_4(void* smem, const void* gmem, bool valid) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_u32(smem)), "l"(gmem), "r"(valid ? 4 : 0));
}

// tanh(x) in one MUFU op (tanh.approx.f32, sm_75+; relative error about 2^-11): the softcap's
// one transcendental per score.
__device__ __forceinline__ float fast_tanh(float x) {
  float y;
  asm("tanh.approx.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

}  // namespace attn
}  // namespace tk
