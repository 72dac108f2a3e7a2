// Host emulation of csrc/attention/sm80.cuh (see ../../cuda_emu.h).
#pragma once

#include <string.h>

#include "common/mma.cuh"

namespace tk {
namespace attn {

inline void cp_async_4(void* smem, const void* gmem, bool valid) {
  unsigned char* dst = ::emu::smem_ptr(::emu::smem_addr(smem), 4);
  if (valid) {
    memcpy(dst, gmem, 4);
  } else {
    memset(dst, 0, 4);
  }
}

}  // namespace attn
}  // namespace tk
