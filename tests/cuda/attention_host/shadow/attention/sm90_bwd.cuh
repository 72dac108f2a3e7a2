// Host emulation of csrc/attention/sm90_bwd.cuh (see ../../cuda_emu.h): the transposed wgmma
// forms come from the sm90.cuh shadow; the semaphore is a plain atomic. Blocks run one at a
// time in launch order, so a wait is already satisfied when it starts; one that is not waits
// for a later block (a protocol error on hardware too) and fails.
// The turn: a block's wait on a semaphore takes its turn, the signal passes it on. The other
// threads' additions to the dQ accumulator must lie inside the turn and be ordered by block
// barriers: after a __syncthreads that completed after the wait (the waiting thread's acquire
// reaches them only through it) and before one that completes before the signal (its release
// covers them only through it). An addition that is not fails.
#pragma once

#include <stdint.h>

#include <atomic>
#include <map>
#include <mutex>

#include "attention/sm90.cuh"

namespace tk {
namespace sm90 {

namespace turn {
struct Held {
  unsigned block_x, block_y;
  int holder;           // the thread that waited
  uint64_t taken_at;    // __syncthreads completions when it waited
  uint64_t last_add;    // the same at the latest other thread's addition (+ 1; 0: none)
};
inline std::mutex mu;
inline std::map<const int32_t*, Held> held;  // semaphore -> the turn taken on it
inline Held* mine(const int32_t* sem) {
  auto it = held.find(sem);
  return it != held.end() && it->second.block_x == blockIdx.x && it->second.block_y == blockIdx.y ? &it->second
                                                                                                  : nullptr;
}
}  // namespace turn

inline void semaphore_wait(const int32_t* sem, int32_t value) {
  ::emu::check_global(sem, 4);
  const int32_t now = std::atomic_ref<int32_t>(*const_cast<int32_t*>(sem)).load(std::memory_order_acquire);
  if (now != value) ::emu::fail("semaphore wait on a block that runs later (or never signals)");
  const uint64_t at = ::emu::syncthreads_completed();
  std::lock_guard<std::mutex> lock(turn::mu);
  turn::held[sem] = turn::Held{blockIdx.x, blockIdx.y, ::emu::thread_rank(), at, 0};
}
inline void semaphore_signal(int32_t* sem) {
  ::emu::check_global(sem, 4);
  const uint64_t at = ::emu::syncthreads_completed();
  {
    std::lock_guard<std::mutex> lock(turn::mu);
    turn::Held* t = turn::mine(sem);
    if (t == nullptr) ::emu::fail("semaphore signalled without the block's wait on it");
    if (t->last_add > at) ::emu::fail("semaphore signalled before a barrier after the block's dQ additions");
    turn::held.erase(sem);
  }
  std::atomic_ref<int32_t>(*sem).fetch_add(1, std::memory_order_acq_rel);
}
inline void dq_accum_add(const int32_t* sem, float* acc, float x, float y) {
  const uint64_t at = ::emu::syncthreads_completed();
  {
    std::lock_guard<std::mutex> lock(turn::mu);
    turn::Held* t = turn::mine(sem);
    if (t == nullptr) ::emu::fail("dQ accumulator added to outside the block's turn on its semaphore");
    if (::emu::thread_rank() != t->holder) {
      if (at == t->taken_at) ::emu::fail("dQ accumulator added to before a barrier after the semaphore wait");
      if (at + 1 > t->last_add) t->last_add = at + 1;
    }
  }
  acc[0] += x;
  acc[1] += y;
}

}  // namespace sm90
}  // namespace tk
