// The per-element math of the fused affine step (affine_step.h), shared by the kernel and the
// host build in tests/cuda/host, which checks it against the Python reference without a GPU.
#pragma once

#include "common/host_device.cuh"

namespace tk {

// out = c2 * clamp(c0 * s + c1 * m) + c3 * s + c4 * m + c5 * z; the clamp keeps NaN.
TK_HD float affine_element(const float c[6], float s, float m, float z, bool clip, float clip_range) {
  float x0 = c[0] * s + c[1] * m;
  if (clip) x0 = x0 < -clip_range ? -clip_range : (x0 > clip_range ? clip_range : x0);
  return c[2] * x0 + c[3] * s + c[4] * m + c[5] * z;
}

// The flow-matching target written with velocity: noise - sample, in fp32 before rounding.
TK_HD float velocity_element(float s, float z) { return z - s; }

}  // namespace tk
