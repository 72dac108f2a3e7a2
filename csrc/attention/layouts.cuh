// Index math of the attention kernels, shared by host and device: shared-memory tile layouts,
// the per-lane ldmatrix addresses of the mma.sync fragments, the wgmma shared-memory
// descriptors, and the split of a tile's visit range into masked and FULL steps. Plain C++
// under g++ (TK_HD), so tests/cuda/test_cuda_attention.py checks it on the host against an
// emulation of ldmatrix / mma / wgmma / TMA.
#pragma once

#include <stdint.h>

#include "common/host_device.cuh"

namespace tk {
namespace attn {

// ---------------------------------------------------------------------------------------------
// mma.sync tiles (sm_80+): [rows][D] 16-bit elements in 16-byte chunks, the chunk index XOR-ed
// with row % 8, so the 8 rows one ldmatrix matrix reads (same logical chunk) hit 8 distinct
// bank groups. Offsets are in elements.
// ---------------------------------------------------------------------------------------------
template <int D>
TK_HD int swizzle(int row, int chunk) {
  return row * D + ((chunk ^ (row & 7)) << 3);
}

// ldmatrix.x4 lane addresses (lane l gives row l % 8 of matrix l / 8; matrix j lands in
// register j). Fragment layouts of mma.m16n8k16 are listed in common/mma.cuh.
//
// A operand, a 16 x 16 block of a tile stored [m][k]: rows r0.., k columns 16 kk..
//   matrices (rows 0-7, k 0-7), (rows 8-15, k 0-7), (rows 0-7, k 8-15), (rows 8-15, k 8-15)
//   = a0, a1, a2, a3.
template <int D>
TK_HD int frag_a(int r0, int kk, int lane) {
  return swizzle<D>(r0 + lane % 16, 2 * kk + lane / 16);
}

// B operand (k x n) from a tile stored [n][k] (k contiguous; K in S = Q K^T): n rows n0..n0+15,
// k columns 16 kk..; registers {b0, b1} of the n8 block at n0, then of the block at n0 + 8.
template <int D>
TK_HD int frag_b(int n0, int kk, int lane) {
  return swizzle<D>(n0 + (lane / 16) * 8 + lane % 8, 2 * kk + (lane / 8) % 2);
}

// B operand (k x n) from a tile stored [k][n] (n contiguous; V in O = P V), ldmatrix .trans:
// k rows k0..k0+15, n columns 16 np..; registers {b0, b1} of the n8 block at 16 np, then of
// the block at 16 np + 8.
template <int D>
TK_HD int frag_bt(int k0, int np, int lane) {
  return swizzle<D>(k0 + ((lane / 8) % 2) * 8 + lane % 8, 2 * np + lane / 16);
}

// The same offsets split into a per-lane part and a compile-time constant (for r0, n0, k0
// multiples of 8 and unrolled kk, np): the XOR with row % 8 only touches a chunk's low 3 bits,
// which take 4 values over kk % 4. Kernels keep these 12 per-lane numbers in registers instead
// of one hoisted address per (kk, block) pair.
struct FragLane {
  int a[4], b[4], bt[4];
};

template <int D>
TK_HD FragLane make_frag_lane(int lane) {
  FragLane f{};
  for (int j = 0; j < 4; ++j) {
    f.a[j] = swizzle<D>(lane % 16, 2 * j + lane / 16);
    f.b[j] = swizzle<D>((lane / 16) * 8 + lane % 8, 2 * j + (lane / 8) % 2);
    f.bt[j] = swizzle<D>(((lane / 8) % 2) * 8 + lane % 8, 2 * j + lane / 16);
  }
  return f;
}

template <int D>
TK_HD int frag_a(const FragLane& f, int r0, int kk) {
  return f.a[kk % 4] + r0 * D + (kk / 4) * 64;
}
template <int D>
TK_HD int frag_b(const FragLane& f, int n0, int kk) {
  return f.b[kk % 4] + n0 * D + (kk / 4) * 64;
}
template <int D>
TK_HD int frag_bt(const FragLane& f, int k0, int np) {
  return f.bt[np % 4] + k0 * D + (np / 4) * 64;
}

// ---------------------------------------------------------------------------------------------
// Visit range of a tile table row (lo, hi, full_lo, full_hi), split into steps of B rows:
// masked steps, then whole FULL steps anchored at full_lo (a document starting mid-tile still
// gets unmasked steps), then masked steps up to hi. The masked steps before the FULL run end
// exactly at full_lo and may start below lo (even below 0): their loads are bounded to
// [lo, hi). Step i covers [first + i * B, first + (i + 1) * B); it is FULL iff it starts in
// [full_begin, full_end). Without one whole FULL step every step is masked.
// ---------------------------------------------------------------------------------------------
struct Steps {
  int first;       // start of step 0
  int count;       // number of steps (0 when lo >= hi)
  int full_begin;  // FULL steps start here ...
  int full_end;    // ... and end here (full_begin == full_end: none)
};

TK_HD int ceil_div(int a, int b) { return (a + b - 1) / b; }

// Positions stay within int32: tables hold int32 and the masked steps start at most B below lo.
TK_HD Steps make_steps(int32_t lo, int32_t hi, int32_t full_lo, int32_t full_hi, int B) {
  Steps s{lo, 0, hi, hi};
  if (lo >= hi) return s;
  const int n_full = full_hi > full_lo ? (full_hi - full_lo) / B : 0;
  if (n_full > 0) {
    s.full_begin = full_lo;
    s.full_end = full_lo + n_full * B;
    s.first = full_lo - ceil_div(full_lo - lo, B) * B;
  }
  s.count = ceil_div(hi - s.first, B);
  return s;
}

TK_HD bool step_is_full(const Steps& s, int start) { return s.full_begin <= start && start < s.full_end; }

// ---------------------------------------------------------------------------------------------
// wgmma / TMA tiles (sm_90a): TMA's SWIZZLE_128B layout. A [rows][D] tile is stored as D / 64
// panels of [rows][64] elements; a panel row is 128 bytes, its 16-byte chunk c stored at
// c ^ (row % 8); 8 rows make a 1024-byte swizzle atom (tiles are 1024-byte aligned). In
// wgmma's terms (PTX "shared memory matrix layout", CUTLASS's canonical GMMA layouts):
//   K-major operand (Q and K in S = Q K^T: rows = M or N, D = the reduction): 8-row groups
//     1024 bytes apart (SBO); a k16 step moves the start address 32 bytes along the row, the
//     hardware applies the swizzle to the final address; LBO is unused.
//   MN-major operand (V in O = P V: rows = the reduction, D = N): 8-row groups 1024 bytes
//     apart (SBO), the next 64 columns one panel further (LBO = rows * 128 bytes); a k16
//     step moves 16 rows (2048 bytes).
// ---------------------------------------------------------------------------------------------
constexpr uint32_t kSwizzleAtomBytes = 1024;

// Byte offset of element (row, col) in a SWIZZLE_128B tile of `rows` rows (the TMA layout).
TK_HD uint32_t sw128_offset(int rows, int row, int col) {
  const int chunk = ((col % 64) / 8) ^ (row % 8);
  return static_cast<uint32_t>((col / 64) * rows * 128 + row * 128 + chunk * 16 + (col % 8) * 2);
}

// The 64-bit matrix descriptor: start address, LBO, SBO (all >> 4), 128-byte swizzle mode.
TK_HD uint64_t wgmma_desc(uint32_t smem_addr, uint32_t lbo_bytes, uint32_t sbo_bytes) {
  return static_cast<uint64_t>((smem_addr & 0x3FFFFu) >> 4) |
         (static_cast<uint64_t>((lbo_bytes >> 4) & 0x3FFFu) << 16) |
         (static_cast<uint64_t>((sbo_bytes >> 4) & 0x3FFFu) << 32) | (1ull << 62);
}

// K-major operand: rows [row0, row0 + 64 or N) of a tile of `rows` rows, reduction step kk
// (columns 16 kk .. 16 kk + 15).
TK_HD uint64_t desc_kmajor(uint32_t tile_addr, int rows, int row0, int kk) {
  const uint32_t addr = tile_addr + static_cast<uint32_t>((kk / 4) * rows * 128 + row0 * 128 + (kk % 4) * 32);
  return wgmma_desc(addr, 16, kSwizzleAtomBytes);
}

// MN-major operand: reduction rows 16 kk .. 16 kk + 15 of a tile of `rows` rows, all D columns.
TK_HD uint64_t desc_mnmajor(uint32_t tile_addr, int rows, int kk) {
  return wgmma_desc(tile_addr + static_cast<uint32_t>(kk * 16 * 128), static_cast<uint32_t>(rows * 128),
                    kSwizzleAtomBytes);
}

}  // namespace attn
}  // namespace tk
