// Host emulation of csrc/attention/sm80.cuh (see ../../cuda_emu.h).
#pragma once

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "common/mma.cuh"

namespace tk {
namespace attn {

inline void cp_async_4(void* smem, const void* gmem, bool valid) { ::emu::cp_async(smem, gmem, 4, valid); }

// tanh.approx.f32 is accurate to about 2^-11 relative: tanh truncated toward zero to 11
// fraction bits, so the emulated kernels carry at least the hardware's error.
inline float fast_tanh(float x) {
  float y = tanhf(x);
  uint32_t bits;
  memcpy(&bits, &y, 4);
  bits &= ~((1u << 12) - 1u);
  memcpy(&y, &bits, 4);
  return y;
}

}  // namespace attn
}  // namespace tk
