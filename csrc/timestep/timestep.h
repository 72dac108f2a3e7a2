// Patch timestep embedding: y[p] = x[p] + emb[image_index[p]] over a packed batch of patches,
// emb computed once per image (M rows); and the segmented sum of the backward pass.
#pragma once

#include <cuda_runtime_api.h>
#include <stdint.h>

#include "common/dtype.cuh"
#include "common/sinusoid.cuh"

namespace tk {

// out[m, col] = column col of the sinusoidal embedding of t[m] (fp32 [M, p.dim]), with the
// frequencies read from freq[half] (diffusers' own fp32 table, so arguments match it exactly).
cudaError_t timestep_sinusoid(float* out, const float* t, const float* freq, int64_t num_images,
                              const SinusoidParams& p, cudaStream_t stream);

// y[p, :] = x[p, :] + emb[image_index[p], :] (fp32 add, one rounding to T); rows with a negative
// index are copied. x, y: T [P, D]; emb: fp32 [M, D]; image_index: int32 [P] in [-1, M).
cudaError_t timestep_add_rows(void* y, const void* x, const float* emb, const int32_t* image_index,
                              int64_t rows, int64_t dim, DType dtype, cudaStream_t stream);

// Deterministic segmented sum demb[m, :] = sum of dy[p, :] over the rows p of image m, in a fixed
// order: the rows of each image (order[seg[m]] .. order[seg[m + 1] - 1], the stable sort of
// image_index) are cut into pieces of piece_rows rows; piece j of image m is piece
// piece_offsets[m] + j. Pass 1 sums each piece into partial (fp32 [max_pieces, D]), pass 2 sums
// each image's pieces in order (zero for an image without rows).
struct SegmentSumArgs {
  float* demb;                   // [M, D]
  float* partial;                // [max_pieces, D] scratch
  const void* dy;                // T [P, D]
  const int64_t* order;          // [P] rows sorted by image (rows of index -1 first, unused)
  const int64_t* seg;            // [M + 1] start of image m in order; seg[M] = end of the last
  const int64_t* piece_offsets;  // [M + 1] first piece of image m; piece_offsets[M] = total
  int64_t num_images;
  int64_t dim;
  int64_t max_pieces;            // >= piece_offsets[M]: the grid size of pass 1
  int64_t piece_rows;
};
cudaError_t timestep_segment_sum(const SegmentSumArgs& args, DType dtype, cudaStream_t stream);

}  // namespace tk
