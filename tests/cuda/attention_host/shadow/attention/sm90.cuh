// Host emulation of csrc/attention/sm90.cuh (see ../../cuda_emu.h for the asynchronous model):
// mbarriers with transaction counts, TMA tile loads and stores (128-byte swizzle, zero fill),
// named barriers, setmaxnreg, and wgmma reading shared memory through its descriptors.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include <type_traits>

#include "common/mma.cuh"

namespace tk {
namespace sm90 {

inline void mbar_init(uint64_t* bar, uint32_t count) { ::emu::mbar_init(bar, count); }
inline void mbar_fence_init() { ::emu::mbar_fence_init(); }
inline void mbar_expect_tx(uint64_t* bar, uint32_t bytes) { ::emu::mbar_expect_tx(bar, bytes); }
inline void mbar_arrive(uint64_t* bar) { ::emu::mbar_arrive(bar); }
inline void mbar_wait(uint64_t* bar, uint32_t parity) { ::emu::mbar_wait(bar, parity); }
inline void tma_load_3d(uint32_t dst, const void* tensor_map, int c0, int c1, int c2, uint64_t* bar) {
  ::emu::tma_load_3d(dst, tensor_map, c0, c1, c2, bar);
}
inline void tma_store_3d(const void* tensor_map, int c0, int c1, int c2, uint32_t src) {
  ::emu::tma_store_3d(tensor_map, c0, c1, c2, src);
}
inline void tma_store_commit() { ::emu::tma_store_commit(); }
template <int N>
inline void tma_store_wait() {
  ::emu::tma_store_wait(N);
}
inline void fence_proxy_async() { ::emu::fence_proxy_async(); }

inline void named_bar_sync(int id, int threads) { ::emu::named_bar_sync(id, threads); }
inline void named_bar_arrive(int id, int threads) { ::emu::named_bar_arrive(id, threads); }
template <int R>
inline void setmaxnreg_inc() {
  ::emu::setmaxnreg(R, true);
}
template <int R>
inline void setmaxnreg_dec() {
  ::emu::setmaxnreg(R, false);
}

inline void wgmma_fence() { ::emu::wgmma_fence(); }
inline void wgmma_commit() { ::emu::wgmma_commit(); }
template <int N>
inline void wgmma_wait() {
  ::emu::wgmma_wait(N);
}
template <int N>
inline void fence_operands(float (&r)[N]) {
  ::emu::fence_operands(r, N);
}
template <int N>
inline void fence_operands(uint32_t (&r)[N][4]) {
  ::emu::fence_operand_regs(&r[0][0], 4 * N);
}

template <typename T, int N, bool TransA, bool TransB>
inline void wgmma_ss_t(float (&d)[N / 2], uint64_t a, uint64_t b, int accumulate) {
  ::emu::wgmma(d, N, nullptr, a, b, accumulate, TransA, TransB, std::is_same<T, __nv_bfloat16>::value);
}
template <typename T, int N, bool TransB>
inline void wgmma_rs_t(float (&d)[N / 2], const uint32_t (&a)[4], uint64_t b, int accumulate) {
  ::emu::wgmma(d, N, a, 0, b, accumulate, false, TransB, std::is_same<T, __nv_bfloat16>::value);
}
template <typename T, int N>
inline void wgmma_ss(float (&d)[N / 2], uint64_t a, uint64_t b, int accumulate) {
  wgmma_ss_t<T, N, false, false>(d, a, b, accumulate);
}
template <typename T, int N>
inline void wgmma_rs_tb(float (&d)[N / 2], const uint32_t (&a)[4], uint64_t b) {
  wgmma_rs_t<T, N, true>(d, a, b, 1);
}

}  // namespace sm90
}  // namespace tk
