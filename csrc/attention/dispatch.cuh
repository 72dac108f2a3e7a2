// The attention kernels are instantiated for fp16 / bf16 at head dim 64 / 128, K = 1, 2, 4
// intervals per query, with and without softcap: one place maps the runtime values to those
// instantiations for the four launchers.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <type_traits>

#include "common/dtype.cuh"

namespace tk {
namespace attn {

template <int D>
using HeadDim = std::integral_constant<int, D>;

// Returns launch(T(), HeadDim<D>()) for the matching instantiation, cudaErrorInvalidValue for
// any other pair. launch is a generic lambda: [&](auto t, auto d) { return f<decltype(t), d()>(...); }
template <typename Launch>
cudaError_t dispatch_dtype_head_dim(DType dtype, int head_dim, Launch&& launch) {
  if (head_dim != 64 && head_dim != 128) return cudaErrorInvalidValue;
  if (dtype == DType::kFloat16) return head_dim == 64 ? launch(__half(), HeadDim<64>()) : launch(__half(), HeadDim<128>());
  if (dtype == DType::kBFloat16) {
    return head_dim == 64 ? launch(__nv_bfloat16(), HeadDim<64>()) : launch(__nv_bfloat16(), HeadDim<128>());
  }
  return cudaErrorInvalidValue;
}

template <int K>
using Intervals = std::integral_constant<int, K>;
template <bool B>
using Softcap = std::bool_constant<B>;

// Returns launch(Intervals<K>(), Softcap<softcap != 0>()) for K = 1, 2 or 4 and softcap >= 0,
// cudaErrorInvalidValue otherwise.
template <typename Launch>
cudaError_t dispatch_mask(int num_intervals, float softcap, Launch&& launch) {
  if (!(softcap >= 0.0f)) return cudaErrorInvalidValue;
  auto with_cap = [&](auto k) { return softcap > 0.0f ? launch(k, Softcap<true>()) : launch(k, Softcap<false>()); };
  switch (num_intervals) {
    case 1:
      return with_cap(Intervals<1>());
    case 2:
      return with_cap(Intervals<2>());
    case 4:
      return with_cap(Intervals<4>());
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace attn
}  // namespace tk
