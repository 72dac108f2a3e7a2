// The attention mask as one key interval per query: query i sees key j iff
// kv_start[i] <= j < kv_end[i] (transfusion_kernels/masks.py builds the arrays and the tile
// tables). Tile tables summarise a query tile as (kv_lo, kv_hi, full_lo, full_hi):
//   kv_lo = min kv_start, kv_hi = max kv_end      -> no key outside [kv_lo, kv_hi) is visible
//   full_lo = max kv_start, full_hi = min kv_end  -> every key in [full_lo, full_hi) is visible
// and a key tile as (q_lo, q_hi, qfull_lo, qfull_hi), the mirror for the backward pass.
#pragma once

#include <stdint.h>

#include "host_device.cuh"

namespace tk {

TK_HD bool interval_visible(int32_t kv_start, int32_t kv_end, int64_t key) {
  return kv_start <= key && key < kv_end;
}

enum TileKind : int { kTileSkip = 0, kTilePartial = 1, kTileFull = 2 };

// Block [b0, b0 + bsize) against a table row (lo, hi, full_lo, full_hi): SKIP when it misses
// [lo, hi), FULL when it lies inside [full_lo, full_hi) (no per-element mask needed),
// PARTIAL otherwise. A tail block that runs past the end of the sequence is never FULL: the
// per-element predicate then also drops the out-of-range indices.
TK_HD int classify_tile(int64_t b0, int64_t bsize, int32_t lo, int32_t hi, int32_t full_lo,
                        int32_t full_hi) {
  const int64_t b1 = b0 + bsize;
  if (lo >= hi || b1 <= lo || b0 >= hi) return kTileSkip;
  if (full_lo <= b0 && b1 <= full_hi) return kTileFull;
  return kTilePartial;
}

// Key tiles a query tile visits: [first, last) in units of block_n (empty when lo >= hi).
TK_HD int64_t first_tile(int32_t lo, int64_t block) { return lo / block; }
TK_HD int64_t end_tile(int32_t lo, int32_t hi, int64_t block) {
  return lo < hi ? (static_cast<int64_t>(hi) + block - 1) / block : lo / block;
}

}  // namespace tk
