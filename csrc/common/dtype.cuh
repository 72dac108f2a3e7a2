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

// N elements at p: one 16-byte access when N == kVec<T> (p 16-byte aligned), else N == 1.
template <typename T, int N>
TK_DEVICE void load_n(const T* __restrict__ p, float (&out)[N]) {
  static_assert(N == 1 || N == kVec<T>, "N must be 1 or kVec<T>");
  if constexpr (N == 1) {
    out[0] = to_float(p[0]);
  } else {
    load_vec<T>(p, out);
  }
}

template <typename T, int N>
TK_DEVICE void store_n(T* __restrict__ p, const float (&in)[N]) {
  static_assert(N == 1 || N == kVec<T>, "N must be 1 or kVec<T>");
  if constexpr (N == 1) {
    p[0] = from_float<T>(in[0]);
  } else {
    store_vec<T>(p, in);
  }
}

// N fp32 values at p: float4 accesses when N % 4 == 0 (p 16-byte aligned).
template <int N>
TK_DEVICE void load_f32(const float* __restrict__ p, float (&out)[N]) {
  if constexpr (N % 4 == 0) {
#pragma unroll
    for (int i = 0; i < N; i += 4) {
      const float4 v = __ldg(reinterpret_cast<const float4*>(p + i));
      out[i] = v.x, out[i + 1] = v.y, out[i + 2] = v.z, out[i + 3] = v.w;
    }
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) out[i] = __ldg(p + i);
  }
}

#endif  // __CUDACC__

}  // namespace tk
