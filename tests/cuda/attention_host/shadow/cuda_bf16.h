// Host emulation (see ../cuda_emu.h): the 16-bit float storage types only.
#pragma once
#include <stdint.h>
struct __nv_bfloat16 {
  uint16_t bits;
};
