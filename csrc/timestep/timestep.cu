#include "timestep/timestep.h"

namespace tk {
namespace {

constexpr int kThreads = 256;

// Enough blocks to fill the GPU; the grid-stride loops do the rest.
cudaError_t max_blocks(int& cap) {
  int device = 0, sms = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  cap = sms * 32;
  return err;
}

int64_t grid_for(int64_t work, int cap) {
  int64_t blocks = (work + kThreads - 1) / kThreads;
  if (blocks < 1) blocks = 1;
  return blocks < cap ? blocks : cap;
}

__global__ void __launch_bounds__(kThreads)
    sinusoid_kernel(float* __restrict__ out, const float* __restrict__ t, const float* __restrict__ freq,
                    int64_t num_images, SinusoidParams p) {
  const int64_t n = num_images * p.dim;
  const int half = p.dim / 2;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; e < n;
       e += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t m = e / p.dim;
    const int col = static_cast<int>(e - m * p.dim);
    const float f = col < 2 * half ? __ldg(freq + sinusoid_freq_index(p.dim, col)) : 0.0f;
    out[e] = sinusoid_from_freq(p, __ldg(t + m), col, f);
  }
}

// One thread per N consecutive elements of a row (dim % N == 0 when N > 1): x + the row's
// embedding, gathered from emb (M x D fp32, small enough to stay in L2).
template <typename T, int N>
__global__ void __launch_bounds__(kThreads)
    add_rows_kernel(T* __restrict__ y, const T* __restrict__ x, const float* __restrict__ emb,
                    const int32_t* __restrict__ image_index, int64_t rows, int64_t dim) {
  const int64_t per_row = dim / N;
  const int64_t nvec = rows * per_row;
  for (int64_t v = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; v < nvec;
       v += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t row = v / per_row;
    const int64_t col = (v - row * per_row) * N;
    float a[N];
    load_n<T, N>(x + row * dim + col, a);
    const int32_t m = __ldg(image_index + row);
    if (m >= 0) {
      float e[N];
      load_f32<N>(emb + static_cast<int64_t>(m) * dim + col, e);
#pragma unroll
      for (int i = 0; i < N; ++i) a[i] += e[i];
    }
    store_n<T, N>(y + row * dim + col, a);
  }
}

// Pass 1: block (piece, column block) sums the piece's rows of dy, in order, for its columns.
template <typename T>
__global__ void __launch_bounds__(kThreads) piece_sum_kernel(const SegmentSumArgs a) {
  const int64_t piece = blockIdx.x;
  const int64_t col = static_cast<int64_t>(blockIdx.y) * kThreads + threadIdx.x;
  if (piece >= __ldg(a.piece_offsets + a.num_images) || col >= a.dim) return;
  // The image owning this piece: piece_offsets[m] <= piece < piece_offsets[m + 1].
  int64_t lo = 0, hi = a.num_images;
  while (hi - lo > 1) {
    const int64_t mid = (lo + hi) / 2;
    if (__ldg(a.piece_offsets + mid) <= piece) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  const int64_t r0 = __ldg(a.seg + lo) + (piece - __ldg(a.piece_offsets + lo)) * a.piece_rows;
  const int64_t seg_end = __ldg(a.seg + lo + 1);
  const int64_t r1 = r0 + a.piece_rows < seg_end ? r0 + a.piece_rows : seg_end;
  const T* dy = static_cast<const T*>(a.dy);
  float acc = 0.0f;
  for (int64_t r = r0; r < r1; ++r) acc += to_float(dy[__ldg(a.order + r) * a.dim + col]);
  a.partial[piece * a.dim + col] = acc;
}

// Pass 2: block (image, column block) sums the image's pieces in order.
__global__ void __launch_bounds__(kThreads) image_sum_kernel(const SegmentSumArgs a) {
  const int64_t m = blockIdx.x;
  const int64_t col = static_cast<int64_t>(blockIdx.y) * kThreads + threadIdx.x;
  if (col >= a.dim) return;
  float acc = 0.0f;
  const int64_t q1 = __ldg(a.piece_offsets + m + 1);
  for (int64_t q = __ldg(a.piece_offsets + m); q < q1; ++q) acc += a.partial[q * a.dim + col];
  a.demb[m * a.dim + col] = acc;
}

template <typename T>
cudaError_t add_rows_typed(void* y, const void* x, const float* emb, const int32_t* image_index, int64_t rows,
                           int64_t dim, cudaStream_t stream) {
  int cap = 0;
  if (const cudaError_t err = max_blocks(cap); err != cudaSuccess) return err;
  constexpr int V = kVec<T>;
  // emb rows are D fp32 apart: 16-byte aligned whenever D % V == 0 (V >= 4).
  const bool vec = dim % V == 0 && is_aligned16(x) && is_aligned16(y) && is_aligned16(emb);
  if (vec) {
    add_rows_kernel<T, V><<<grid_for(rows * dim / V, cap), kThreads, 0, stream>>>(
        static_cast<T*>(y), static_cast<const T*>(x), emb, image_index, rows, dim);
  } else {
    add_rows_kernel<T, 1><<<grid_for(rows * dim, cap), kThreads, 0, stream>>>(
        static_cast<T*>(y), static_cast<const T*>(x), emb, image_index, rows, dim);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t segment_sum_typed(const SegmentSumArgs& a, cudaStream_t stream) {
  const dim3 col_blocks(1, static_cast<unsigned>((a.dim + kThreads - 1) / kThreads));
  if (a.max_pieces > 0) {
    piece_sum_kernel<T><<<dim3(static_cast<unsigned>(a.max_pieces), col_blocks.y), kThreads, 0, stream>>>(a);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  image_sum_kernel<<<dim3(static_cast<unsigned>(a.num_images), col_blocks.y), kThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace

cudaError_t timestep_sinusoid(float* out, const float* t, const float* freq, int64_t num_images,
                              const SinusoidParams& p, cudaStream_t stream) {
  if (num_images == 0 || p.dim == 0) return cudaSuccess;
  int cap = 0;
  if (const cudaError_t err = max_blocks(cap); err != cudaSuccess) return err;
  sinusoid_kernel<<<grid_for(num_images * p.dim, cap), kThreads, 0, stream>>>(out, t, freq, num_images, p);
  return cudaGetLastError();
}

cudaError_t timestep_add_rows(void* y, const void* x, const float* emb, const int32_t* image_index, int64_t rows,
                              int64_t dim, DType dtype, cudaStream_t stream) {
  if (rows == 0 || dim == 0) return cudaSuccess;
  switch (dtype) {
    case DType::kFloat32:
      return add_rows_typed<float>(y, x, emb, image_index, rows, dim, stream);
    case DType::kFloat16:
      return add_rows_typed<__half>(y, x, emb, image_index, rows, dim, stream);
    case DType::kBFloat16:
      return add_rows_typed<__nv_bfloat16>(y, x, emb, image_index, rows, dim, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t timestep_segment_sum(const SegmentSumArgs& args, DType dtype, cudaStream_t stream) {
  if (args.num_images == 0 || args.dim == 0) return cudaSuccess;
  switch (dtype) {
    case DType::kFloat32:
      return segment_sum_typed<float>(args, stream);
    case DType::kFloat16:
      return segment_sum_typed<__half>(args, stream);
    case DType::kBFloat16:
      return segment_sum_typed<__nv_bfloat16>(args, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace tk
