// Sinusoidal timestep embedding, column by column, as diffusers' get_timestep_embedding:
//   half   = dim / 2
//   freq_k = exp(-ln(max_period) * k / (half - downscale_freq_shift))      k = 0 .. half-1
//   arg_k  = scale * (t * freq_k)
//   emb    = [sin(arg), cos(arg)]  (flip_sin_to_cos: [cos(arg), sin(arg)]), zero pad if dim is odd
// Every step is a float32 operation in the same order as diffusers (no fused multiply-add is
// possible: no step adds), so the arguments match it bit for bit and only sin/cos may differ
// by an ulp. neg_log_max_period is float(-ln(max_period)) computed once on the host
// (sinusoid_neg_log_period), as diffusers multiplies a float32 tensor by that Python float.
#pragma once

#include <math.h>

#include "host_device.cuh"

namespace tk {

struct SinusoidParams {
  int dim;
  float neg_log_max_period;   // float(-ln(max_period))
  float freq_denominator;     // float(half - downscale_freq_shift)
  float scale;
  bool flip_sin_to_cos;
};

inline SinusoidParams make_sinusoid_params(int dim, bool flip_sin_to_cos, double downscale_freq_shift,
                                           double scale, double max_period) {
  return SinusoidParams{dim, static_cast<float>(-log(max_period)),
                        static_cast<float>(static_cast<double>(dim / 2) - downscale_freq_shift),
                        static_cast<float>(scale), flip_sin_to_cos};
}

TK_HD float sinusoid_freq(const SinusoidParams& p, int k) {
  const float exponent = (p.neg_log_max_period * static_cast<float>(k)) / p.freq_denominator;
  return expf(exponent);
}

// Column `col` of the embedding of timestep t, given freq_k of its column pair (k = col or
// col - half): the layout part, shared by sinusoid_value and kernels that read a frequency table.
TK_HD float sinusoid_from_freq(const SinusoidParams& p, float t, int col, float freq_k) {
  const int half = p.dim / 2;
  if (col >= 2 * half) return 0.0f;  // odd dim: zero pad
  const float arg = p.scale * (t * freq_k);
  const bool use_sin = (col < half) != p.flip_sin_to_cos;
  return use_sin ? sinf(arg) : cosf(arg);
}

// Index k of the frequency that column `col` uses (only meaningful when col < 2 * half).
TK_HD int sinusoid_freq_index(int dim, int col) { return col < dim / 2 ? col : col - dim / 2; }

// Column `col` (0 <= col < dim) of the embedding of timestep t.
TK_HD float sinusoid_value(const SinusoidParams& p, float t, int col) {
  if (col >= 2 * (p.dim / 2)) return 0.0f;
  return sinusoid_from_freq(p, t, col, sinusoid_freq(p, sinusoid_freq_index(p.dim, col)));
}

}  // namespace tk
