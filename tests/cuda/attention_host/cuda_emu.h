// Host emulation of the CUDA features the attention kernels use, so that the kernel sources in
// csrc/attention/ run unchanged on a CPU (tests/cuda/test_cuda_attention.py builds them with g++
// against this header). A correctness harness, not a performance model: it runs each block's
// threads concurrently and makes every asynchronous unit of the GPU as late and as visible as the
// PTX memory model allows, so that a missing wait, barrier, arrive, commit or fence shows up as
// NaN, a wrong result, an emulation error or a reported deadlock.
//
//   Threads. Every CUDA thread of a block is a std::thread; blocks run one after another. At
//   every synchronisation call a thread may yield or pause, drawn from a seeded schedule
//   (EMU_SEED, which also sets how late TMA lands: seed % 3 == 1 only when waited on, 2 often
//   early, 0 rarely early), so warps reach barriers and issue copies in varying orders. With
//   seed % 4 == 3 one warp (seed / 4 modulo the warps) lags 3 ms after every wait it returns
//   from, so the others run ahead into what it has not written yet. __syncthreads and
//   named barriers (bar.sync / bar.arrive, id 0..15, a thread count) are real rendezvous; warp
//   collectives (shuffles, ldmatrix, mma) rendezvous their 32 threads, setmaxnreg its warpgroup. A watchdog fails the run, naming where threads wait, when no thread makes
//   progress for EMU_DEADLOCK_S seconds (default 20).
//   Shared memory. One arena whose offsets are the kernels' shared-memory addresses, NaN-filled
//   per block, bounds-checked. It has two views: the generic one (ordinary loads and stores,
//   ldmatrix, cp.async) and the async proxy's (wgmma operand reads, TMA stores). TMA loads write
//   both; generic writes reach the async view only at a fence_proxy_async (the emulator cannot
//   tell which thread wrote a byte: a fence publishes every generic write made before it).
//   cp.async. The destination is NaN from issue; the copy lands at the cp.async.wait_group that
//   covers its commit group.
//   mbarriers. PTX phases: pending arrivals and a transaction count; a phase completes when both
//   reach zero; a wait with parity p returns once the phase of parity p has completed; an arrival
//   beyond the count in a phase fails; a thread other than the initialising one may use an
//   mbarrier only after a barrier (bar.sync) that followed its initialisation, and a TMA load
//   may complete on it only after the initialising thread's fence.mbarrier_init (or
//   fence.proxy.async) made the initialisation visible to the async proxy.
//   TMA. A load makes its destination NaN in both views at issue and lands (data, then complete_tx
//   on its mbarrier) out of order at a later synchronisation call of any thread, at the latest
//   when a thread waits on that mbarrier. Stores read the async view at the tma_store_wait that
//   retires their bulk group.
//   wgmma. At issue each thread's inputs are captured (accumulator, A registers) and its
//   accumulator becomes NaN; wgmma_commit closes the thread's group; wgmma_wait<N> retires the
//   thread's oldest groups once every warp of the warpgroup has issued them (it is no barrier
//   between warps). Shared-memory operands (async view) are read either when the warp issues or
//   at the wait, drawn from the schedule: the two ends of what the hardware may do. The results
//   reach the kernel's registers at fence_operands on that accumulator (or the next wgmma that
//   accumulates onto it): without that fence the compiler may read them before the wait. A wgmma
//   needs a wgmma_fence since the last wgmma_wait, and registers it reads or writes must not
//   change between that fence and the wgmma; A-operand registers of a retired wgmma must not be
//   rewritten before fence_operands releases them.
//   setmaxnreg. .sync.aligned per warpgroup; the block's registers (start: what
//   __launch_bounds__(threads, 1) allows) may not exceed 64K: .inc waits for other warpgroups' .dec.
//   Exit. A thread may not exit with cp.async, wgmma or TMA stores in flight, nor a block with
//   TMA loads in flight (the next block may reuse the shared memory).
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
inline int4 make_int4(int x, int y, int z, int w) {
  int4 r;
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
uint64_t syncthreads_completed();  // __syncthreads completions so far in this block

template <class K, class... A>
void launch(K kernel, dim3 grid, dim3 block, size_t smem, cudaStream_t, const A&... args) {
  run_grid(grid, block, smem, [&] { kernel(args...); });
}

// global memory the launch may read (registered by the driver); cp.async and __ldg are checked
void register_global(const void* p, size_t bytes);
void check_global(const void* p, size_t bytes);

// cp.async: queued per thread, performed by the wait_group that covers the commit group (the
// destination is NaN from issue)
void cp_async(void* smem, const void* gmem, int bytes, bool valid);
void cp_async_commit();
void cp_async_wait(int allowed_pending);

// warp collectives
float shfl_xor(float v, int lane_mask);
void ldmatrix(uint32_t (&r)[4], const void* smem, bool trans);
void mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, bool bf16);

// sm_90a: mbarriers, TMA, proxy fence, wgmma
void mbar_init(uint64_t* bar, uint32_t count);
void mbar_fence_init();
void mbar_expect_tx(uint64_t* bar, uint32_t bytes);
void mbar_arrive(uint64_t* bar);
void mbar_wait(uint64_t* bar, uint32_t parity);
void tma_load_3d(uint32_t dst, const void* map, int c0, int c1, int c2, uint64_t* bar);
void tma_store_3d(const void* map, int c0, int c1, int c2, uint32_t src);
void tma_store_commit();
void tma_store_wait(int allowed_pending);
void fence_proxy_async();
void wgmma_fence();
void wgmma_commit();
void wgmma_wait(int allowed_pending);
void fence_operands(float* r, int n);
void fence_operand_regs(uint32_t* r, int n);
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
// A __device__ variable is a host variable here: its value is what the emulated image holds.
template <class T>
cudaError_t cudaMemcpyFromSymbol(void* dst, const T& symbol, size_t count, size_t offset = 0,
                                 cudaMemcpyKind = cudaMemcpyDeviceToHost) {
  if (offset + count > sizeof(T)) return cudaErrorInvalidValue;
  memcpy(dst, reinterpret_cast<const unsigned char*>(&symbol) + offset, count);
  return cudaSuccess;
}
