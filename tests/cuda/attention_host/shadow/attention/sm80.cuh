// Host emulation of csrc/attention/sm80.cuh (see ../../cuda_emu.h).
#pragma once

#include "common/mma.cuh"

namespace tk {
namespace attn {

inline void cp_async_4(void* smem, const void* gmem, bool valid) { ::emu::cp_async(smem, gmem, 4, valid); }

}  // namespace attn
}  // namespace tk
