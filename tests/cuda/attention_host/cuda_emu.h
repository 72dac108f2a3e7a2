// Host emulation of the CUDA features the attention kernels use, so that the kernel sources in
// csrc/attention/ run unchanged on a CPU (tests/cuda/test_cuda_attention.py builds them with g++
// against this header). Every CUDA thread of a block is a std::thread; __syncthreads, warp and
// warpgroup collectives (shuffles, ldmatrix, mma, wgmma) are rendezvous on std::barrier. A
// cp.async lands when a cp.async.wait_group covers its commit group (late, as the hardware may);
// TMA completes at issue and signals its mbarrier; wgmma is synchronous. Shared memory is one
// arena whose offsets are the kernels' shared-memory addresses. Not a performance model: a
// correctness harness that also checks shared-memory bounds and poisons unwritten shared memory
// with NaN.
//
// The kernel sources are rewritten textually before compiling (test_cuda_attention.py):
//   extern __shared__ ... name[];   -> unsigned char* name = ::emu::dynamic_smem();
//   __shared__ T name[N];            -> auto& name = ::emu::static_array<T, N>();
//   __shared__ T name;               -> auto& name = ::emu::static_array<T, 1>()[0];
//   kernel<<<grid, block, smem, s>>>(args)  -> ::emu::launch(kernel, grid, block, smem, s, args)
#pragma once

#include <cuda_runtime_api.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#include <functional>

#define __launch_bounds__(...)

extern thread_local dim3 threadIdx;
extern thread_local dim3 blockIdx;
extern dim3 gridDim;
extern dim3 blockDim;

inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) {
  uint4 r;
  r.x = x, r.y = y, r.z = z, r.w = w;
  return r;
}

namespace emu {

[[noreturn]] void fail(const char* what);

// shared memory: offsets from the arena start are shared-memory addresses
unsigned char* dynamic_smem();
unsigned char* static_smem(size_t bytes, size_t align);
template <class T, size_t N>
T (&static_array())[N] {
  return *reinterpret_cast<T(*)[N]>(static_smem(sizeof(T) * N, alignof(T) > 16 ? alignof(T) : 16));
}
uint32_t smem_addr(const void* p);
unsigned char* smem_ptr(uint32_t addr, size_t bytes);  // checked against the launch's dynamic size

// thread model
void run_grid(dim3 grid, dim3 block, size_t smem, const std::function<void()>& body);
void syncthreads();
int thread_rank();

template <class K, class... A>
void launch(K kernel, dim3 grid, dim3 block, size_t smem, cudaStream_t, const A&... args) {
  run_grid(grid, block, smem, [&] { kernel(args...); });
}

// global memory the launch may read (registered by the driver); cp.async and __ldg are checked
void register_global(const void* p, size_t bytes);
void check_global(const void* p, size_t bytes);

// cp.async: queued per thread, performed by the wait_group that covers the commit group
void cp_async(void* smem, const void* gmem, int bytes, bool valid);
void cp_async_commit();
void cp_async_wait(int allowed_pending);

// warp collectives
float shfl_xor(float v, int lane_mask);
void ldmatrix(uint32_t (&r)[4], const void* smem, bool trans);
void mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, bool bf16);

// sm_90a: mbarriers, TMA, wgmma
void mbar_init(uint64_t* bar, uint32_t count);
void mbar_expect_tx(uint64_t* bar, uint32_t bytes);
void mbar_arrive(uint64_t* bar);
void mbar_wait(uint64_t* bar, uint32_t parity);
void tma_load_3d(uint32_t dst, const void* map, int c0, int c1, int c2, uint64_t* bar);
void tma_store_3d(const void* map, int c0, int c1, int c2, uint32_t src);
void tma_store_commit();
void tma_store_wait(int allowed_pending);
void wgmma(float* d, int n, const uint32_t* a_regs, uint64_t desc_a, uint64_t desc_b, int accumulate, bool trans_a,
           bool trans_b, bool bf16);

// sm_90a: named barriers (bar.sync / bar.arrive) and warpgroup register reallocation
void named_bar_sync(int id, int threads);
void named_bar_arrive(int id, int threads);
void setmaxnreg(int regs, bool increase);

// 16-bit floats (round to nearest even, as the GPU's conversions)
float half_to_float(uint16_t h);
uint16_t float_to_half(float x);
float bf16_to_float(uint16_t b);
uint16_t float_to_bf16(float x);

}  // namespace emu

#define __syncthreads() ::emu::syncthreads()
#define __shfl_xor_sync(mask, v, m) ::emu::shfl_xor((v), (m))

template <class T>
inline T __ldg(const T* p) {
  ::emu::check_global(p, sizeof(T));
  return *p;
}

// The runtime's C++ overloads that take kernels (nvcc's cuda_runtime.h); the C entry points the
// launchers call are stubbed in emu.cpp.
template <class T>
cudaError_t cudaFuncSetAttribute(T*, cudaFuncAttribute attr, int value) {
  if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize && value > 227 * 1024) return cudaErrorInvalidValue;
  return cudaSuccess;
}
template <class T>
cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attr, T*) {
  memset(attr, 0, sizeof(*attr));
  attr->binaryVersion = 90;
  attr->ptxVersion = 90;
  return cudaSuccess;
}
