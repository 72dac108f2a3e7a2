// The ordered-reduction semaphore of the wgmma backward's fp32 dQ accumulator (its wgmma forms,
// either operand transposed, are attention/sm90.cuh's wgmma_ss_t / wgmma_rs_t). sm_90a device
// code only; tests/cuda/attention_host/shadow/attention/ emulates it.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

namespace tk {
namespace sm90 {

// Semaphore of an ordered reduction, one thread of the block calling. wait: spins until *sem
// equals `value` (acquire: the writes of the blocks that signalled before are visible to this
// block after its next barrier). signal: after a block barrier, publishes the block's writes
// (release) and adds one.
__device__ __forceinline__ void semaphore_wait(const int32_t* sem, int32_t value) {
  int32_t now;
  do {
    asm volatile("ld.acquire.gpu.global.b32 %0, [%1];\n" : "=r"(now) : "l"(sem) : "memory");
  } while (now != value);
}
__device__ __forceinline__ void semaphore_signal(int32_t* sem) {
  asm volatile("fence.acq_rel.gpu;\nred.relaxed.gpu.global.add.s32 [%0], 1;\n" ::"l"(sem) : "memory");
}
// acc[0, 2) += (x, y): one thread's part of a block's addition to the fp32 dQ accumulator, made
// while the block holds the turn on `sem` (after the barrier that follows semaphore_wait, before
// the one that precedes semaphore_signal). `sem` names the turn for the host emulation, which
// checks that it is held; here the addition is a plain load and store.
__device__ __forceinline__ void dq_accum_add(const int32_t* sem, float* acc, float x, float y) {
  (void)sem;
  float2 v = *reinterpret_cast<float2*>(acc);
  v.x += x;
  v.y += y;
  *reinterpret_cast<float2*>(acc) = v;
}

}  // namespace sm90
}  // namespace tk
