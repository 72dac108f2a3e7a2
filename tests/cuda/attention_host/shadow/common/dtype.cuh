// Host emulation of csrc/common/dtype.cuh (see ../../cuda_emu.h): what the attention kernels use.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>
#include <string.h>

namespace tk {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

inline float to_float(__half x) { return ::emu::half_to_float(x.bits); }
inline float to_float(__nv_bfloat16 x) { return ::emu::bf16_to_float(x.bits); }

template <typename T>
constexpr int kVec = 16 / sizeof(T);

template <typename T>
inline void load_vec(const T* p, float (&out)[kVec<T>]) {
  if (reinterpret_cast<uintptr_t>(p) % 16) ::emu::fail("load_vec: address not 16-byte aligned");
  T v[kVec<T>];
  memcpy(v, p, 16);
  for (int i = 0; i < kVec<T>; ++i) out[i] = to_float(v[i]);
}

}  // namespace tk
