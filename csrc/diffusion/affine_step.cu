#include "diffusion/affine_step.h"

#include "common/philox.cuh"
#include "diffusion/affine_math.cuh"

namespace tk {
namespace {

constexpr int kThreads = 256;

struct Coef {
  float c[6];
};

TK_DEVICE Coef load_coef(const float* __restrict__ coef, int64_t row) {
  Coef k;
#pragma unroll
  for (int i = 0; i < 6; ++i) k.c[i] = __ldg(coef + row * 6 + i);
  return k;
}

// Elements [e0, e0 + N), which may straddle row boundaries when row_len is not a multiple of N.
template <typename T, int N, bool kDraw>
TK_DEVICE void step_elements(const AffineStepArgs& a, int64_t e0) {
  float s[N], m[N], z[N], o[N];
  load_n<T, N>(static_cast<const T*>(a.sample) + e0, s);
  if (a.model_output != nullptr) {
    load_n<T, N>(static_cast<const T*>(a.model_output) + e0, m);
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) m[i] = 0.0f;
  }
  if constexpr (kDraw) {
#pragma unroll
    for (int i = 0; i < N; ++i) z[i] = round_to<T>(philox_randn(a.seed, static_cast<uint64_t>(e0 + i)));
  } else if (a.noise != nullptr) {
    load_n<T, N>(static_cast<const T*>(a.noise) + e0, z);
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) z[i] = 0.0f;
  }

  int64_t row = e0 / a.row_len;
  int64_t row_end = (row + 1) * a.row_len;
  Coef k = load_coef(a.coef, row);
#pragma unroll
  for (int i = 0; i < N; ++i) {
    if (N > 1 && e0 + i >= row_end) {
      while (e0 + i >= row_end) {  // rows shorter than a vector
        ++row;
        row_end += a.row_len;
      }
      k = load_coef(a.coef, row);
    }
    o[i] = affine_element(k.c, s[i], m[i], z[i], a.clip, a.clip_range);
  }
  store_n<T, N>(static_cast<T*>(a.out) + e0, o);
  if (a.velocity) {
#pragma unroll
    for (int i = 0; i < N; ++i) z[i] = velocity_element(s[i], z[i]);
    store_n<T, N>(static_cast<T*>(a.noise_out) + e0, z);
  } else if constexpr (kDraw) {
    if (a.noise_out != nullptr) store_n<T, N>(static_cast<T*>(a.noise_out) + e0, z);
  }
}

// Grid-stride loop over whole vectors of N elements; the numel % N tail goes one element per
// thread to the first threads of the grid.
template <typename T, int N, bool kDraw>
__global__ void __launch_bounds__(kThreads) affine_step_kernel(const AffineStepArgs a) {
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  const int64_t nvec = a.numel / N;
  for (int64_t v = tid; v < nvec; v += stride) step_elements<T, N, kDraw>(a, v * N);
  if constexpr (N > 1) {
    const int64_t e = nvec * N + tid;
    if (e < a.numel) step_elements<T, 1, kDraw>(a, e);
  }
}

template <typename T, int N>
cudaError_t launch(const AffineStepArgs& a, cudaStream_t stream) {
  int device = 0, sms = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) return err;
  const int64_t work = a.numel / N > 0 ? a.numel / N : 1;
  const int64_t max_blocks = static_cast<int64_t>(sms) * 32;  // enough to fill the GPU; the loop does the rest
  int64_t blocks = (work + kThreads - 1) / kThreads;
  if (blocks > max_blocks) blocks = max_blocks;
  if (a.draw_noise) {
    affine_step_kernel<T, N, true><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(a);
  } else {
    affine_step_kernel<T, N, false><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(a);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_typed(const AffineStepArgs& a, cudaStream_t stream) {
  const bool aligned = is_aligned16(a.out) && is_aligned16(a.sample) &&
                       (a.model_output == nullptr || is_aligned16(a.model_output)) &&
                       (a.noise == nullptr || is_aligned16(a.noise)) &&
                       (a.noise_out == nullptr || is_aligned16(a.noise_out));
  return aligned ? launch<T, kVec<T>>(a, stream) : launch<T, 1>(a, stream);
}

}  // namespace

cudaError_t affine_step(const AffineStepArgs& args, DType dtype, cudaStream_t stream) {
  if (args.numel == 0) return cudaSuccess;
  if (args.numel < 0 || args.row_len <= 0 || args.numel % args.row_len != 0) return cudaErrorInvalidValue;
  switch (dtype) {
    case DType::kFloat32:
      return launch_typed<float>(args, stream);
    case DType::kFloat16:
      return launch_typed<__half>(args, stream);
    case DType::kBFloat16:
      return launch_typed<__nv_bfloat16>(args, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace tk
