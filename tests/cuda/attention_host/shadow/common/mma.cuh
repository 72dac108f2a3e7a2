// Host emulation of csrc/common/mma.cuh (see ../../cuda_emu.h): the same functions, on the
// emulator's warp collectives and shared-memory arena.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#include <type_traits>

namespace tk {

inline uint32_t smem_u32(const void* p) { return ::emu::smem_addr(p); }

// Lands only at the cp.async.wait_group that covers its commit group (see emu.cpp).
inline void cp_async_16(void* smem, const void* gmem, bool valid) { ::emu::cp_async(smem, gmem, 16, valid); }
inline void cp_async_commit() { ::emu::cp_async_commit(); }
template <int N>
inline void cp_async_wait() {
  ::emu::cp_async_wait(N);
}

inline void ldmatrix_x4(uint32_t (&r)[4], const void* smem) { ::emu::ldmatrix(r, smem, false); }
inline void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem) { ::emu::ldmatrix(r, smem, true); }

template <typename T>
inline void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  ::emu::mma16816(d, a, b0, b1, std::is_same<T, __nv_bfloat16>::value);
}

template <typename T>
inline uint32_t pack2(float x, float y) {
  if constexpr (std::is_same<T, __nv_bfloat16>::value) {
    return ::emu::float_to_bf16(x) | static_cast<uint32_t>(::emu::float_to_bf16(y)) << 16;
  } else {
    return ::emu::float_to_half(x) | static_cast<uint32_t>(::emu::float_to_half(y)) << 16;
  }
}

inline float fast_exp2(float x) { return exp2f(x); }

}  // namespace tk
