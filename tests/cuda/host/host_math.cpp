// Host build of the __host__ __device__ math in csrc/common/ (compiled with g++, no CUDA).
// tests/cuda/test_cuda_host_math.py drives it and checks every line it prints against the
// Python references: transfusion_kernels.philox, diffusers' get_timestep_embedding and a
// naive interval predicate.
//
//   host_math philox C0 C1 C2 C3 K0 K1      -> the four output words (hex)
//   host_math randn SEED OFFSET COUNT       -> COUNT normals (%.9g), flat indices OFFSET..
//   host_math sinusoid DIM FLIP SHIFT SCALE MAX_PERIOD T...   -> one row per timestep
//   host_math affine C0 C1 C2 C3 C4 C5 CLIP CLIP_RANGE  (stdin: triples s m z)
//       -> per triple: the step's output and the velocity z - s (%.9g, fp32 math)
//   host_math interval BLOCK  (stdin: N, then N pairs kv_start kv_end, then NK)
//       -> the dense mask (one 0/1 line per query), then for every query tile of BLOCK rows
//          its table row and the kind of every key tile of BLOCK columns
#include <cinttypes>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "common/interval_mask.cuh"
#include "common/philox.cuh"
#include "common/sinusoid.cuh"
#include "diffusion/affine_math.cuh"

static uint64_t parse_u64(const char* s) { return std::strtoull(s, nullptr, 0); }

static int run_philox(int argc, char** argv) {
  if (argc != 8) return 2;
  tk::U32x4 ctr{static_cast<uint32_t>(parse_u64(argv[2])), static_cast<uint32_t>(parse_u64(argv[3])),
                static_cast<uint32_t>(parse_u64(argv[4])), static_cast<uint32_t>(parse_u64(argv[5]))};
  const tk::U32x4 r = tk::philox4x32_10(ctr, static_cast<uint32_t>(parse_u64(argv[6])),
                                        static_cast<uint32_t>(parse_u64(argv[7])));
  std::printf("%08" PRIx32 " %08" PRIx32 " %08" PRIx32 " %08" PRIx32 "\n", r.x, r.y, r.z, r.w);
  return 0;
}

static int run_randn(int argc, char** argv) {
  if (argc != 5) return 2;
  const uint64_t seed = parse_u64(argv[2]), offset = parse_u64(argv[3]), count = parse_u64(argv[4]);
  for (uint64_t i = 0; i < count; ++i) std::printf("%.9g\n", static_cast<double>(tk::philox_randn(seed, offset + i)));
  return 0;
}

static int run_sinusoid(int argc, char** argv) {
  if (argc < 8) return 2;
  const int dim = std::atoi(argv[2]);
  const tk::SinusoidParams p = tk::make_sinusoid_params(dim, std::atoi(argv[3]) != 0, std::atof(argv[4]),
                                                        std::atof(argv[5]), std::atof(argv[6]));
  for (int a = 7; a < argc; ++a) {
    const float t = static_cast<float>(std::atof(argv[a]));
    for (int col = 0; col < dim; ++col) std::printf(col ? " %.9g" : "%.9g", static_cast<double>(tk::sinusoid_value(p, t, col)));
    std::printf("\n");
  }
  return 0;
}

static int run_interval(int argc, char** argv) {
  if (argc != 3) return 2;
  const int block = std::atoi(argv[2]);
  int nq = 0, nk = 0;
  if (std::scanf("%d", &nq) != 1) return 3;
  std::vector<int32_t> lo(nq), hi(nq);
  for (int i = 0; i < nq; ++i)
    if (std::scanf("%d %d", &lo[i], &hi[i]) != 2) return 3;
  if (std::scanf("%d", &nk) != 1) return 3;
  for (int i = 0; i < nq; ++i) {
    for (int j = 0; j < nk; ++j) std::putchar(tk::interval_visible(lo[i], hi[i], j) ? '1' : '0');
    std::putchar('\n');
  }
  for (int m0 = 0; m0 < nq; m0 += block) {
    const int m1 = m0 + block < nq ? m0 + block : nq;
    int32_t kv_lo = lo[m0], kv_hi = hi[m0], full_lo = lo[m0], full_hi = hi[m0];
    for (int i = m0 + 1; i < m1; ++i) {
      kv_lo = lo[i] < kv_lo ? lo[i] : kv_lo;
      kv_hi = hi[i] > kv_hi ? hi[i] : kv_hi;
      full_lo = lo[i] > full_lo ? lo[i] : full_lo;
      full_hi = hi[i] < full_hi ? hi[i] : full_hi;
    }
    std::printf("tile %d %d %d %d %d %" PRId64 " %" PRId64 ":", m0, kv_lo, kv_hi, full_lo, full_hi,
                tk::first_tile(kv_lo, block), tk::end_tile(kv_lo, kv_hi, block));
    for (int n0 = 0; n0 < nk; n0 += block) std::printf(" %d", tk::classify_tile(n0, block, kv_lo, kv_hi, full_lo, full_hi));
    std::printf("\n");
  }
  return 0;
}

static int run_affine(int argc, char** argv) {
  if (argc != 10) return 2;
  float c[6];
  for (int i = 0; i < 6; ++i) c[i] = static_cast<float>(std::atof(argv[2 + i]));
  const bool clip = std::atoi(argv[8]) != 0;
  const float clip_range = static_cast<float>(std::atof(argv[9]));
  float s, m, z;
  while (std::scanf("%f %f %f", &s, &m, &z) == 3) {
    std::printf("%.9g %.9g\n", static_cast<double>(tk::affine_element(c, s, m, z, clip, clip_range)),
                static_cast<double>(tk::velocity_element(s, z)));
  }
  return 0;
}

int main(int argc, char** argv) {
  if (argc < 2) return 2;
  if (!std::strcmp(argv[1], "philox")) return run_philox(argc, argv);
  if (!std::strcmp(argv[1], "randn")) return run_randn(argc, argv);
  if (!std::strcmp(argv[1], "sinusoid")) return run_sinusoid(argc, argv);
  if (!std::strcmp(argv[1], "interval")) return run_interval(argc, argv);
  if (!std::strcmp(argv[1], "affine")) return run_affine(argc, argv);
  return 2;
}
