// Element types of the kernels (fp32, fp16, bf16): conversion to and from float, and 16-byte
// vector loads/stores of kVec<T> elements (one 128-bit memory instruction per thread).
// Host code (the bindings) sees only the DType enum and is_aligned16.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "host_device.cuh"

namespace tk {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

inline bool is_aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

#if defined(__CUDACC__)

TK_DEVICE float to_float(float x) { return x; }
TK_DEVICE float to_float(__half x) { return __half2float(x); }
TK_DEVICE float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
TK_DEVICE T from_float(float x);
template <>
TK_DEVICE float from_float<float>(float x) { return x; }
template <>
TK_DEVICE __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
TK_DEVICE __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// x rounded to T and back: the value a tensor of dtype T would hold.
template <typename T>
TK_DEVICE float round_to(float x) { return to_float(from_float<T>(x)); }

template <typename T>
constexpr int kVec = 16 / sizeof(T);

template <typename T>
struct alignas(16) Vec16 {
  T v[kVec<T>];
};

// p must be 16-byte aligned.
template <typename T>
TK_DEVICE void load_vec(const T* __restrict__ p, float (&out)[kVec<T>]) {
  Vec16<T> r;
  *reinterpret_cast<uint4*>(&r) = __ldg(reinterpret_cast<const uint4*>(p));
#pragma unroll
  for (int i = 0; i < kVec<T>; ++i) out[i] = to_float(r.v[i]);
}

template <typename T>
TK_DEVICE void store_vec(T* __restrict__ p, const float (&in)[kVec<T>]) {
  Vec16<T> r;
#pragma unroll
  for (int i = 0; i < kVec<T>; ++i) r.v[i] = from_float<T>(in[i]);
  *reinterpret_cast<uint4*>(p) = *reinterpret_cast<const uint4*>(&r);
}

#endif  // __CUDACC__

}  // namespace tk
