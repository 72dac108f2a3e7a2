// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11) and the
// Box-Muller transform of transfusion_kernels/philox.py. Noise element e drawn with `seed` is
//
//   (c0, c1, _, _) = Philox4x32-10(counter = (e_lo, e_hi, 0, 0), key = (seed_lo, seed_hi))
//   u1 = ((c0 >> 8) + 0.5) / 2^24,  u2 = (c1 >> 8) / 2^24
//   z  = sqrt(-2 log u1) * cos(2 pi u2)
//
// so every backend draws the same noise for the same seed, independent of launch geometry.
#pragma once

#include <stdint.h>

#if !defined(__CUDACC__)
#include <cmath>
#endif

#include "host_device.cuh"

namespace tk {

struct U32x4 {
  uint32_t x, y, z, w;
};

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;  // golden ratio
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;  // sqrt(3) - 1

TK_HD uint32_t mulhi32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

// Ten rounds; the key is bumped between rounds (Random123's philox4x32_R with R = 10).
TK_HD U32x4 philox4x32_10(U32x4 ctr, uint32_t k0, uint32_t k1) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    const uint32_t hi0 = mulhi32(kPhiloxM0, ctr.x), lo0 = kPhiloxM0 * ctr.x;
    const uint32_t hi1 = mulhi32(kPhiloxM1, ctr.z), lo1 = kPhiloxM1 * ctr.z;
    ctr = U32x4{hi1 ^ ctr.y ^ k0, lo1, hi0 ^ ctr.w ^ k1, lo0};
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  return ctr;
}

// -2 log(u1) for u1 = (a + 0.5) / 2^24, a = c0 >> 8 in [0, 2^24), accurate to a few float ulp.
// (a + 0.5) / 2^24 is not a float when a >= 2^23; there 1 - u1 = (2^24 - a - 0.5) / 2^24 is, and
// log1p(-(1 - u1)) keeps the precision that matters for u1 near 1 (small |z|).
TK_HD float box_muller_radius_sq(uint32_t a) {
  if (a < (1u << 23)) {
    const float u1 = (static_cast<float>(a) + 0.5f) * 0x1p-24f;  // exact
#if defined(__CUDA_ARCH__)
    return -2.0f * logf(u1);
#else
    return -2.0f * std::log(u1);
#endif
  }
  const float one_minus_u1 = (static_cast<float>((1u << 24) - a) - 0.5f) * 0x1p-24f;  // exact
#if defined(__CUDA_ARCH__)
  return -2.0f * log1pf(-one_minus_u1);
#else
  return -2.0f * std::log1p(-one_minus_u1);
#endif
}

// cos(2 pi u2) for u2 = b / 2^24, b = c1 >> 8.
TK_HD float box_muller_cos(uint32_t b) {
  const float two_u2 = static_cast<float>(b) * 0x1p-23f;  // exact
#if defined(__CUDA_ARCH__)
  return cospif(two_u2);
#else
  return static_cast<float>(std::cos(3.14159265358979323846 * static_cast<double>(two_u2)));
#endif
}

TK_HD float box_muller(uint32_t c0, uint32_t c1) {
  const float r2 = box_muller_radius_sq(c0 >> 8);
#if defined(__CUDA_ARCH__)
  return sqrtf(r2) * box_muller_cos(c1 >> 8);
#else
  return std::sqrt(r2) * box_muller_cos(c1 >> 8);
#endif
}

// Standard normal noise for flat element index `index` drawn with `seed`.
TK_HD float philox_randn(uint64_t seed, uint64_t index) {
  const U32x4 ctr{static_cast<uint32_t>(index), static_cast<uint32_t>(index >> 32), 0u, 0u};
  const U32x4 r = philox4x32_10(ctr, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  return box_muller(r.x, r.y);
}

}  // namespace tk
