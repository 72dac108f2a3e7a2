// sm_90a device primitives of the wgmma forward: mbarriers, TMA tile loads, wgmma and the
// fences around it. Only the sm_90a build calls them (the kernel body is compiled for
// __CUDA_ARCH_FEAT_SM90_ALL only).
//
// wgmma.m64nNk16 fragments (per warpgroup of 128 threads, warp w of it owning rows 16 w..16 w + 15;
// lane = 4 * group + tig):
//   accumulator (N / 2 fp32 per thread): d[4 j + 2 h + c] at row 16 w + group + 8 h, column
//     8 j + 2 tig + c: per n8 block j the mma.m16n8 C layout.
//   A from registers (4 x b32 per thread): the mma.m16n8k16 A layout of the warp's 16 rows, so a
//     k16 slice of an accumulator (n8 blocks 2 kk and 2 kk + 1) packed to 16 bits is an A operand.
// Shared-memory operands are described by 64-bit descriptors (attention/layouts.cuh).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "common/mma.cuh"

namespace tk {
namespace sm90 {

// ---------------------------------------------------------------------------------------------
// mbarrier (transaction-counting barrier in shared memory) and TMA
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ void mbar_init(uint64_t* bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_u32(bar)), "r"(count) : "memory");
}

// Makes the initialised barriers visible to the other threads and to the async (TMA) proxy.
__device__ __forceinline__ void mbar_fence_init() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}

// One arrival that also announces `bytes` of TMA transactions the phase waits for.
__device__ __forceinline__ void mbar_expect_tx(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_u32(bar)), "r"(bytes)
               : "memory");
}

// Blocks until the phase with parity `parity` has completed.
__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
  uint32_t done;
  do {
    asm volatile(
        "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(smem_u32(bar)), "r"(parity)
        : "memory");
  } while (!done);
}

// One plain arrival (no transaction bytes): a consumer releasing a stage to the producer.
__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_u32(bar)) : "memory");
}

// 3-D tiled TMA load of the box at coordinates (c0, c1, c2) (innermost first) into shared
// memory; completes `bytes` of the barrier's transaction count. Out-of-range elements are 0.
__device__ __forceinline__ void tma_load_3d(uint32_t dst, const void* tensor_map, int c0, int c1, int c2,
                                            uint64_t* bar) {
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4}], [%5];\n" ::"r"(
          dst),
      "l"(reinterpret_cast<uint64_t>(tensor_map)), "r"(c0), "r"(c1), "r"(c2), "r"(smem_u32(bar))
      : "memory");
}

// 3-D tiled TMA store of the box at (c0, c1, c2) from shared memory (out-of-range elements are
// not written), in this thread's current bulk async-group.
__device__ __forceinline__ void tma_store_3d(const void* tensor_map, int c0, int c1, int c2, uint32_t src) {
  asm volatile("cp.async.bulk.tensor.3d.global.shared::cta.bulk_group [%0, {%2, %3, %4}], [%1];\n" ::"l"(
                   reinterpret_cast<uint64_t>(tensor_map)),
               "r"(src), "r"(c0), "r"(c1), "r"(c2)
               : "memory");
}
__device__ __forceinline__ void tma_store_commit() { asm volatile("cp.async.bulk.commit_group;\n" ::: "memory"); }
// Until at most N of this thread's bulk groups still read their shared-memory source.
template <int N>
__device__ __forceinline__ void tma_store_wait() {
  asm volatile("cp.async.bulk.wait_group.read %0;\n" ::"n"(N) : "memory");
}

// Orders this thread's generic-proxy shared-memory writes before later async-proxy accesses
// (wgmma operand reads, TMA writes).
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

// ---------------------------------------------------------------------------------------------
// named barriers (bar.sync / bar.arrive on hardware barrier id 1..15; 0 is __syncthreads) and
// per-warpgroup register reallocation
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ void named_bar_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
__device__ __forceinline__ void named_bar_arrive(int id, int threads) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
// Every thread of the warpgroup executes these (.sync.aligned).
template <int R>
__device__ __forceinline__ void setmaxnreg_inc() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(R));
}
template <int R>
__device__ __forceinline__ void setmaxnreg_dec() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(R));
}

// ---------------------------------------------------------------------------------------------
// wgmma
// ---------------------------------------------------------------------------------------------
// Before the first wgmma of a batch: orders earlier register writes (accumulators, A operands).
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}

// wgmma writes its accumulators asynchronously: after wgmma_wait, pass every accumulator
// register through an empty asm so the compiler neither reads it earlier nor keeps a stale copy.
template <int N>
__device__ __forceinline__ void fence_operands(float (&r)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}
template <int N>
__device__ __forceinline__ void fence_operands(uint32_t (&r)[N][4]) {
#pragma unroll
  for (int i = 0; i < N; ++i) {
#pragma unroll
    for (int j = 0; j < 4; ++j) asm volatile("" : "+r"(r[i][j])::"memory");
  }
}

// wgmma.m64nNk16 with fp32 accumulators, one specialisation per (T, N); TransA / TransB: the
// shared-memory operand is stored MN-major (M resp. N contiguous), else K-major. The asm operand
// lists are spelled out once here (TK_WGMMA_*) for the 32 and 64 accumulator registers of N = 64
// and N = 128.
template <typename T, int N, bool TransA, bool TransB>
struct WgmmaSS;
template <typename T, int N, bool TransB>
struct WgmmaRS;

#define TK_ACC8(i)                                                                                              \
  "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]), "+f"(d[i + 6]), \
      "+f"(d[i + 7])
#define TK_ACC_32 TK_ACC8(0), TK_ACC8(8), TK_ACC8(16), TK_ACC8(24)
#define TK_ACC_64 TK_ACC_32, TK_ACC8(32), TK_ACC8(40), TK_ACC8(48), TK_ACC8(56)
#define TK_REGS_32                                                                      \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, " \
  "%19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}"
#define TK_REGS_64                                                                       \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, "  \
  "%19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, "   \
  "%36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, "   \
  "%53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}"
#define TK_STR(x) #x
#define TK_ARG(i) "%" TK_STR(i)

// R accumulator registers, the PTX type name; operands after the accumulators: SS a, b,
// accumulate, trans-a, trans-b (R .. R + 4); RS a[4], b, accumulate, trans-b (R .. R + 6).
#define TK_WGMMA(T, N, R, PTX, A0, A1, A2, A3, A4, B0, B1, B2, B3, B4, B5, B6)                                    \
  template <bool TransA, bool TransB>                                                                          \
  struct WgmmaSS<T, N, TransA, TransB> {                                                                       \
    static __device__ __forceinline__ void run(float (&d)[R], uint64_t a, uint64_t b, int accumulate) {        \
      asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, " TK_ARG(A2) ", 0;\n"                                    \
                   "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." PTX "." PTX " " TK_REGS_##R ", " TK_ARG(A0) \
                   ", " TK_ARG(A1) ", p, 1, 1, " TK_ARG(A3) ", " TK_ARG(A4) ";\n}\n"                             \
                   : TK_ACC_##R                                                                                \
                   : "l"(a), "l"(b), "r"(accumulate), "n"(int(TransA)), "n"(int(TransB)));                     \
    }                                                                                                          \
  };                                                                                                           \
  template <bool TransB>                                                                                       \
  struct WgmmaRS<T, N, TransB> {                                                                               \
    static __device__ __forceinline__ void run(float (&d)[R], const uint32_t (&a)[4], uint64_t b,              \
                                               int accumulate) {                                               \
      asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, " TK_ARG(B5) ", 0;\n"                                    \
                   "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." PTX "." PTX " " TK_REGS_##R ", {"          \
                   TK_ARG(B0) ", " TK_ARG(B1) ", " TK_ARG(B2) ", " TK_ARG(B3) "}, " TK_ARG(B4)                 \
                   ", p, 1, 1, " TK_ARG(B6) ";\n}\n"                                                            \
                   : TK_ACC_##R                                                                                \
                   : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(accumulate), "n"(int(TransB)));   \
    }                                                                                                          \
  };

TK_WGMMA(__half, 64, 32, "f16", 32, 33, 34, 35, 36, 32, 33, 34, 35, 36, 37, 38)
TK_WGMMA(__half, 128, 64, "f16", 64, 65, 66, 67, 68, 64, 65, 66, 67, 68, 69, 70)
TK_WGMMA(__nv_bfloat16, 64, 32, "bf16", 32, 33, 34, 35, 36, 32, 33, 34, 35, 36, 37, 38)
TK_WGMMA(__nv_bfloat16, 128, 64, "bf16", 64, 65, 66, 67, 68, 64, 65, 66, 67, 68, 69, 70)

#undef TK_WGMMA
#undef TK_ARG
#undef TK_STR
#undef TK_REGS_64
#undef TK_REGS_32
#undef TK_ACC_64
#undef TK_ACC_32
#undef TK_ACC8

// d (m64 x N fp32) = A B (+ d when accumulate != 0), A (64 x 16) and B (16 x N) in shared memory.
template <typename T, int N, bool TransA, bool TransB>
__device__ __forceinline__ void wgmma_ss_t(float (&d)[N / 2], uint64_t a, uint64_t b, int accumulate) {
  WgmmaSS<T, N, TransA, TransB>::run(d, a, b, accumulate);
}
// The same with A from registers (the accumulator layout packed to 16 bits).
template <typename T, int N, bool TransB>
__device__ __forceinline__ void wgmma_rs_t(float (&d)[N / 2], const uint32_t (&a)[4], uint64_t b, int accumulate) {
  WgmmaRS<T, N, TransB>::run(d, a, b, accumulate);
}
// The forward's two forms: S = Q K^T (both K-major) and O += P V (V N-major).
template <typename T, int N>
__device__ __forceinline__ void wgmma_ss(float (&d)[N / 2], uint64_t a, uint64_t b, int accumulate) {
  wgmma_ss_t<T, N, false, false>(d, a, b, accumulate);
}
template <typename T, int N>
__device__ __forceinline__ void wgmma_rs_tb(float (&d)[N / 2], const uint32_t (&a)[4], uint64_t b) {
  wgmma_rs_t<T, N, true>(d, a, b, 1);
}

}  // namespace sm90
}  // namespace tk
