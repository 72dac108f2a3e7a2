// Host emulation of csrc/attention/sm90_bwd.cuh (see ../../cuda_emu.h): the transposed wgmma
// forms come from the sm90.cuh shadow; the semaphore is a plain atomic. Blocks run one at a
// time in launch order, so a wait is already satisfied when it starts; one that is not waits
// for a later block (a protocol error on hardware too) and fails.
#pragma once

#include <stdint.h>

#include <atomic>

#include "attention/sm90.cuh"

namespace tk {
namespace sm90 {

inline void semaphore_wait(const int32_t* sem, int32_t value) {
  ::emu::check_global(sem, 4);
  const int32_t now = std::atomic_ref<int32_t>(*const_cast<int32_t*>(sem)).load(std::memory_order_acquire);
  if (now != value) ::emu::fail("semaphore wait on a block that runs later (or never signals)");
}
inline void semaphore_signal(int32_t* sem) {
  ::emu::check_global(sem, 4);
  std::atomic_ref<int32_t>(*sem).fetch_add(1, std::memory_order_acq_rel);
}

}  // namespace sm90
}  // namespace tk
