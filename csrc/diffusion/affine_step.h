// Fused affine diffusion step (add_noise, DDPM and DDIM steps reduce to it). Per row r:
//   x0  = c[r,0] * sample + c[r,1] * model_output        (clamped to +-clip_range if clip)
//   out = c[r,2] * x0 + c[r,3] * sample + c[r,4] * model_output + c[r,5] * noise
// Row r covers the flat elements [r * row_len, (r + 1) * row_len). All math in fp32.
// With velocity, noise_out receives the flow-matching target noise - sample instead of the
// drawn noise (given or drawn noise alike; 0 - sample without noise).
#pragma once

#include <cuda_runtime_api.h>
#include <stdint.h>

#include "common/dtype.cuh"

namespace tk {

struct AffineStepArgs {
  void* out;                 // [numel] T
  const void* sample;        // [numel] T
  const void* model_output;  // [numel] T, or null: read as 0
  const float* coef;         // [numel / row_len, 6] fp32
  const void* noise;         // [numel] T, or null: drawn in-kernel if draw_noise, else 0
  void* noise_out;           // [numel] T, or null: where to write the drawn noise (or the velocity)
  int64_t numel;
  int64_t row_len;
  uint64_t seed;             // Philox key for drawn noise (transfusion_kernels/philox.py)
  bool draw_noise;
  bool clip;
  float clip_range;
  bool velocity;             // noise_out = noise - sample (needs noise_out)
};

// Enqueues the step on `stream`; returns the launch error (cudaSuccess if none).
// Drawn noise is rounded to T before use, so passing the written-out noise back as `noise`
// reproduces `out` exactly.
cudaError_t affine_step(const AffineStepArgs& args, DType dtype, cudaStream_t stream);

}  // namespace tk
