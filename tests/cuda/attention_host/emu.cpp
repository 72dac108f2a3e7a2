// Host emulation runtime (see cuda_emu.h): threads, barriers, collectives, shared memory, TMA,
// mbarriers, wgmma, and the CUDA runtime / driver entry points the launchers call.
#include "cuda_emu.h"

#include <cuda.h>

#include <atomic>
#include <barrier>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

thread_local dim3 threadIdx;
thread_local dim3 blockIdx;
dim3 gridDim;
dim3 blockDim;

namespace emu {
namespace {

// ---------------------------------------------------------------------------------------------
// shared memory
// ---------------------------------------------------------------------------------------------
constexpr size_t kArenaBytes = 320 * 1024;
constexpr uint32_t kDynamicOffset = 16;  // the dynamic base is 16-byte aligned, not 1024: kernels align it
constexpr uint32_t kStaticBase = 256 * 1024;  // static __shared__ variables: [kStaticBase, kArenaBytes)
alignas(4096) unsigned char g_arena[kArenaBytes];
size_t g_dynamic_bytes = 0;
std::atomic<uint32_t> g_static_end{kStaticBase};  // end of the static allocations of this launch
thread_local uint32_t tl_static_next = kStaticBase;

// ---------------------------------------------------------------------------------------------
// blocks, warps, warpgroups
// ---------------------------------------------------------------------------------------------
// Collectives exchange through two slot sets used alternately: one barrier per operation (a lane
// can only be one operation ahead of the slowest, so the set it writes is never being read).
struct Slots {
  const unsigned char* ptr[32];
  uint32_t u[32][6];
  float f[32];
};
struct Warp {
  std::barrier<> bar{32};
  Slots slots[2];
};

struct Warpgroup {
  std::barrier<> bar{128};
  float acc[128][128];
  uint32_t a[128][4];
  uint64_t desc[128][2];
  int flags[128];
};

struct Block {
  explicit Block(int threads) : bar(threads) {
    for (int w = 0; w < (threads + 31) / 32; ++w) warps.push_back(std::make_unique<Warp>());
    for (int g = 0; g < threads / 128; ++g) groups.push_back(std::make_unique<Warpgroup>());
  }
  std::barrier<> bar;
  std::vector<std::unique_ptr<Warp>> warps;
  std::vector<std::unique_ptr<Warpgroup>> groups;
};

// hardware barriers 0..15 (bar.sync / bar.arrive; 0 is also __syncthreads)
struct NamedBarrier {
  int expected = 0, arrived = 0;
  uint64_t generation = 0;
};
std::mutex g_bar_mutex;
std::condition_variable g_bar_cv;
NamedBarrier g_named[16];

// setmaxnreg: registers per thread of each warpgroup
std::mutex g_reg_mutex;
std::condition_variable g_reg_cv;
std::vector<int> g_wg_regs;  // per warpgroup: registers per thread

thread_local Block* tl_block = nullptr;
thread_local int tl_rank = 0;
thread_local unsigned tl_warp_ops = 0;

struct Copy {
  unsigned char* dst;
  const void* src;
  int bytes;
  bool valid;
};
thread_local std::vector<Copy> tl_open_group;                // issued, not yet committed
thread_local std::vector<std::vector<Copy>> tl_committed;    // committed, not yet performed

Warp& warp() { return *tl_block->warps[tl_rank / 32]; }
Slots& next_slots() { return warp().slots[tl_warp_ops++ & 1]; }
Warpgroup& warpgroup() {
  if (tl_rank / 128 >= static_cast<int>(tl_block->groups.size())) fail("wgmma outside a whole warpgroup");
  return *tl_block->groups[tl_rank / 128];
}

// ---------------------------------------------------------------------------------------------
// mbarriers
// ---------------------------------------------------------------------------------------------
struct MBarrier {
  uint32_t count = 0, pending = 0, phase = 0;
  int64_t tx = 0;
};
std::mutex g_mbar_mutex;
std::map<const uint64_t*, MBarrier> g_mbars;

void mbar_try_complete(MBarrier& b) {
  if (b.pending == 0 && b.tx == 0) {
    ++b.phase;
    b.pending = b.count;
  }
}

void complete_tx(uint64_t* bar, uint32_t bytes) {
  std::lock_guard<std::mutex> lock(g_mbar_mutex);
  auto it = g_mbars.find(bar);
  if (it == g_mbars.end()) fail("complete_tx on an uninitialised mbarrier");
  it->second.tx -= bytes;
  if (it->second.tx < 0) fail("mbarrier: more transaction bytes completed than expected");
  mbar_try_complete(it->second);
}

// ---------------------------------------------------------------------------------------------
// tensor maps: the fake cuTensorMapEncodeTiled stores its arguments in the opaque map
// ---------------------------------------------------------------------------------------------
struct FakeMap {
  uint64_t magic;
  const unsigned char* base;
  uint64_t dims[3];
  uint64_t strides[2];  // bytes, dims 1 and 2
  uint32_t box[3];
  uint32_t swizzle128;
};
static_assert(sizeof(FakeMap) <= sizeof(CUtensorMap), "fits the opaque map");
constexpr uint64_t kMagic = 0x7e7a7e7a12345678ull;

CUresult fake_encode(CUtensorMap* map, CUtensorMapDataType type, cuuint32_t rank, void* base, const cuuint64_t* dims,
                     const cuuint64_t* strides, const cuuint32_t* box, const cuuint32_t* elem_strides,
                     CUtensorMapInterleave interleave, CUtensorMapSwizzle swizzle, CUtensorMapL2promotion,
                     CUtensorMapFloatOOBfill fill) {
  // The driver's documented requirements for what the kernels ask.
  if (rank != 3 || (type != CU_TENSOR_MAP_DATA_TYPE_FLOAT16 && type != CU_TENSOR_MAP_DATA_TYPE_BFLOAT16)) {
    return CUDA_ERROR_INVALID_VALUE;
  }
  if (reinterpret_cast<uintptr_t>(map) % 64 || reinterpret_cast<uintptr_t>(base) % 16) return CUDA_ERROR_INVALID_VALUE;
  for (int i = 0; i < 3; ++i) {
    if (dims[i] == 0 || dims[i] > (1ull << 32) || box[i] == 0 || box[i] > 256 || elem_strides[i] != 1) {
      return CUDA_ERROR_INVALID_VALUE;
    }
  }
  for (int i = 0; i < 2; ++i) {
    if (strides[i] % 16 || strides[i] >= (1ull << 40)) return CUDA_ERROR_INVALID_VALUE;
  }
  if (interleave != CU_TENSOR_MAP_INTERLEAVE_NONE || (box[0] * 2) % 16) return CUDA_ERROR_INVALID_VALUE;
  if (swizzle == CU_TENSOR_MAP_SWIZZLE_128B && box[0] * 2 > 128) return CUDA_ERROR_INVALID_VALUE;
  if (swizzle != CU_TENSOR_MAP_SWIZZLE_128B || fill != CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) {
    return CUDA_ERROR_INVALID_VALUE;  // the only modes the kernels use
  }
  FakeMap m{kMagic, static_cast<const unsigned char*>(base), {dims[0], dims[1], dims[2]}, {strides[0], strides[1]},
            {box[0], box[1], box[2]}, 1};
  memset(map, 0, sizeof(*map));
  memcpy(map, &m, sizeof(m));
  return CUDA_SUCCESS;
}

// ---------------------------------------------------------------------------------------------
// wgmma operand reads (PTX shared memory matrix layouts, 128-byte swizzle)
// ---------------------------------------------------------------------------------------------
uint32_t swizzle128(uint32_t addr) { return addr ^ (((addr >> 7) & 7) << 4); }

struct Desc {
  uint32_t start, lbo, sbo;
};
Desc decode(uint64_t d) {
  if ((d >> 62) != 1) fail("wgmma descriptor: not the 128-byte swizzle mode");
  if (((d >> 49) & 7) != 0) fail("wgmma descriptor: non-zero base offset");
  return {static_cast<uint32_t>(d & 0x3FFF) << 4, static_cast<uint32_t>((d >> 16) & 0x3FFF) << 4,
          static_cast<uint32_t>((d >> 32) & 0x3FFF) << 4};
}

float load16(uint32_t addr, bool bf16) {
  uint16_t v;
  memcpy(&v, smem_ptr(addr, 2), 2);
  return bf16 ? bf16_to_float(v) : half_to_float(v);
}

// element (mn, k) of a K-major operand; element (k, mn) of an MN-major one
float kmajor(const Desc& d, int mn, int k, bool bf16) {
  return load16(swizzle128(d.start + (mn % 8) * 128 + (mn / 8) * d.sbo + (k / 8) * 16 + (k % 8) * 2), bf16);
}
float mnmajor(const Desc& d, int k, int mn, bool bf16) {
  return load16(swizzle128(d.start + (mn % 64) * 2 + (mn / 64) * d.lbo + (k % 8) * 128 + (k / 8) * d.sbo), bf16);
}

float half_of(uint32_t reg, int hi, bool bf16) {
  const uint16_t v = static_cast<uint16_t>(hi ? reg >> 16 : reg & 0xFFFF);
  return bf16 ? bf16_to_float(v) : half_to_float(v);
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// public
// ---------------------------------------------------------------------------------------------
void fail(const char* what) {
  std::fprintf(stderr, "emulation error: %s (block %u %u, thread %d)\n", what, blockIdx.x, blockIdx.y, tl_rank);
  std::fflush(stderr);
  std::abort();
}

unsigned char* dynamic_smem() { return g_arena + kDynamicOffset; }

uint32_t smem_addr(const void* p) {
  const unsigned char* c = static_cast<const unsigned char*>(p);
  if (c < g_arena || c >= g_arena + kArenaBytes) fail("shared-memory address of a pointer outside shared memory");
  return static_cast<uint32_t>(c - g_arena);
}

unsigned char* static_smem(size_t bytes, size_t align) {
  // Every thread declares the same variables in the same order: the same offsets.
  tl_static_next = static_cast<uint32_t>((tl_static_next + align - 1) / align * align);
  const uint32_t at = tl_static_next;
  tl_static_next += static_cast<uint32_t>(bytes);
  if (tl_static_next > kArenaBytes) fail("static shared memory larger than the arena's static region");
  uint32_t end = g_static_end.load();
  while (end < tl_static_next && !g_static_end.compare_exchange_weak(end, tl_static_next)) {
  }
  return g_arena + at;
}

unsigned char* smem_ptr(uint32_t addr, size_t bytes) {
  if (addr >= kStaticBase && addr + bytes <= g_static_end.load()) return g_arena + addr;
  if (addr < kDynamicOffset || addr + bytes > kDynamicOffset + g_dynamic_bytes) {
    char msg[160];
    std::snprintf(msg, sizeof msg, "shared-memory access [%u, %zu) outside the launch's %zu dynamic bytes", addr,
                  addr + bytes, g_dynamic_bytes);
    fail(msg);
  }
  return g_arena + addr;
}

void run_grid(dim3 grid, dim3 block, size_t smem, const std::function<void()>& body) {
  if (smem + kDynamicOffset > kStaticBase) fail("dynamic shared memory larger than the arena");
  gridDim = grid;
  blockDim = block;
  g_dynamic_bytes = smem;
  g_static_end = kStaticBase;
  const int threads = static_cast<int>(block.x * block.y * block.z);
  for (unsigned z = 0; z < grid.z; ++z) {
    for (unsigned y = 0; y < grid.y; ++y) {
      for (unsigned x = 0; x < grid.x; ++x) {
        memset(g_arena, 0xFF, kArenaBytes);  // NaN in 16 and 32 bits: unwritten shared memory shows
        Block blk(threads);
        for (NamedBarrier& b : g_named) b = NamedBarrier{};
        // registers per thread before any setmaxnreg: what __launch_bounds__(threads, 1) allows
        const int groups = (threads + 127) / 128;
        g_wg_regs.assign(groups, std::min(255, 65536 / (128 * groups) / 8 * 8));
        std::vector<std::thread> ts;
        ts.reserve(threads);
        for (int t = 0; t < threads; ++t) {
          ts.emplace_back([&, t] {
            tl_block = &blk;
            tl_rank = t;
            tl_static_next = kStaticBase;
            tl_warp_ops = 0;
            tl_open_group.clear();
            tl_committed.clear();
            threadIdx = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
            blockIdx = dim3(x, y, z);
            body();
          });
        }
        for (auto& th : ts) th.join();
      }
    }
  }
}

void syncthreads() { tl_block->bar.arrive_and_wait(); }

namespace {
std::vector<std::pair<const unsigned char*, size_t>> g_globals;
}
void register_global(const void* p, size_t bytes) {
  g_globals.emplace_back(static_cast<const unsigned char*>(p), bytes);
}
void check_global(const void* p, size_t bytes) {
  const unsigned char* c = static_cast<const unsigned char*>(p);
  for (const auto& [base, size] : g_globals) {
    if (c >= base && c + bytes <= base + size) return;
  }
  fail("global read outside every input and output buffer");
}

void cp_async(void* smem, const void* gmem, int bytes, bool valid) {
  if (smem_addr(smem) % bytes) fail("cp.async: shared destination not aligned to the copy size");
  if (valid) {
    if (reinterpret_cast<uintptr_t>(gmem) % bytes) fail("cp.async: global source not aligned to the copy size");
    check_global(gmem, bytes);
  }
  tl_open_group.push_back(Copy{smem_ptr(smem_addr(smem), bytes), gmem, bytes, valid});
}
void cp_async_commit() {
  tl_committed.push_back(std::move(tl_open_group));
  tl_open_group.clear();
}
void cp_async_wait(int allowed_pending) {
  while (static_cast<int>(tl_committed.size()) > allowed_pending) {
    for (const Copy& c : tl_committed.front()) {
      if (c.valid) {
        memcpy(c.dst, c.src, c.bytes);
      } else {
        memset(c.dst, 0, c.bytes);
      }
    }
    tl_committed.erase(tl_committed.begin());
  }
}
int thread_rank() { return tl_rank; }

float shfl_xor(float v, int lane_mask) {
  Slots& w = next_slots();
  const int lane = tl_rank % 32;
  w.f[lane] = v;
  warp().bar.arrive_and_wait();
  return w.f[lane ^ lane_mask];
}

void ldmatrix(uint32_t (&r)[4], const void* smem, bool trans) {
  Slots& w = next_slots();
  const int lane = tl_rank % 32;
  w.ptr[lane] = smem_ptr(smem_addr(smem), 16);  // each lane: one 16-byte row
  if (smem_addr(smem) % 16) fail("ldmatrix: row address not 16-byte aligned");
  warp().bar.arrive_and_wait();
  for (int j = 0; j < 4; ++j) {
    uint16_t lo, hi;
    if (!trans) {  // row lane / 4, columns 2 (lane % 4), +1
      memcpy(&lo, w.ptr[8 * j + lane / 4] + 4 * (lane % 4), 2);
      memcpy(&hi, w.ptr[8 * j + lane / 4] + 4 * (lane % 4) + 2, 2);
    } else {  // transposed: rows 2 (lane % 4), +1 of column lane / 4
      memcpy(&lo, w.ptr[8 * j + 2 * (lane % 4)] + 2 * (lane / 4), 2);
      memcpy(&hi, w.ptr[8 * j + 2 * (lane % 4) + 1] + 2 * (lane / 4), 2);
    }
    r[j] = lo | static_cast<uint32_t>(hi) << 16;
  }
}

void mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, bool bf16) {
  Slots& w = next_slots();
  const int lane = tl_rank % 32;
  for (int i = 0; i < 4; ++i) w.u[lane][i] = a[i];
  w.u[lane][4] = b0;
  w.u[lane][5] = b1;
  warp().bar.arrive_and_wait();
  const int g = lane / 4, t = lane % 4;
  for (int i = 0; i < 4; ++i) {
    const int row = g + 8 * (i / 2), col = 2 * t + (i % 2);
    float acc = d[i];
    for (int k = 0; k < 16; ++k) {
      // A (row, k): lane 4 (row % 8) + (k % 8) / 2, register (row >= 8) + 2 (k >= 8)
      const float av = half_of(w.u[4 * (row % 8) + (k % 8) / 2][(row >= 8) + 2 * (k >= 8)], k % 2, bf16);
      // B (k, col): lane 4 col + (k % 8) / 2, register b0 / b1 by k >= 8
      const float bv = half_of(w.u[4 * col + (k % 8) / 2][4 + (k >= 8)], k % 2, bf16);
      acc += av * bv;
    }
    d[i] = acc;
  }
}

void mbar_init(uint64_t* bar, uint32_t count) {
  std::lock_guard<std::mutex> lock(g_mbar_mutex);
  g_mbars[bar] = MBarrier{count, count, 0, 0};
}

void mbar_expect_tx(uint64_t* bar, uint32_t bytes) {
  std::lock_guard<std::mutex> lock(g_mbar_mutex);
  auto it = g_mbars.find(bar);
  if (it == g_mbars.end()) fail("expect_tx on an uninitialised mbarrier");
  if (it->second.pending == 0) fail("mbarrier: more arrivals than its count");
  it->second.tx += bytes;
  --it->second.pending;
  mbar_try_complete(it->second);
}

void mbar_wait(uint64_t* bar, uint32_t parity) {
  for (long spins = 0;; ++spins) {
    {
      std::lock_guard<std::mutex> lock(g_mbar_mutex);
      auto it = g_mbars.find(bar);
      if (it == g_mbars.end()) fail("wait on an uninitialised mbarrier");
      if ((it->second.phase & 1) != parity) return;
    }
    if (spins > 200000000L) fail("mbarrier wait never completes");
    std::this_thread::yield();
  }
}

void tma_load_3d(uint32_t dst, const void* map, int c0, int c1, int c2, uint64_t* bar) {
  FakeMap m;
  memcpy(&m, map, sizeof(m));
  if (m.magic != kMagic) fail("TMA with a tensor map that was not encoded");
  if (dst % 128) fail("TMA destination not 128-byte aligned");
  const int c[3] = {c0, c1, c2};
  uint32_t lin = 0;
  for (uint32_t i2 = 0; i2 < m.box[2]; ++i2) {
    for (uint32_t i1 = 0; i1 < m.box[1]; ++i1) {
      for (uint32_t i0 = 0; i0 < m.box[0]; ++i0, lin += 2) {
        const int64_t x[3] = {int64_t{c[0]} + i0, int64_t{c[1]} + i1, int64_t{c[2]} + i2};
        uint16_t v = 0;  // out of range: zero
        if (x[0] >= 0 && x[1] >= 0 && x[2] >= 0 && static_cast<uint64_t>(x[0]) < m.dims[0] &&
            static_cast<uint64_t>(x[1]) < m.dims[1] && static_cast<uint64_t>(x[2]) < m.dims[2]) {
          memcpy(&v, m.base + x[0] * 2 + x[1] * m.strides[0] + x[2] * m.strides[1], 2);
        }
        memcpy(smem_ptr(swizzle128(dst + lin), 2), &v, 2);
      }
    }
  }
  complete_tx(bar, lin);
}

void wgmma(float* d, int n, const uint32_t* a_regs, uint64_t desc_a, uint64_t desc_b, int accumulate, bool trans_a,
           bool trans_b, bool bf16) {
  Warpgroup& g = warpgroup();
  const int t = tl_rank % 128;
  for (int i = 0; i < n / 2; ++i) g.acc[t][i] = d[i];
  if (a_regs) {
    for (int i = 0; i < 4; ++i) g.a[t][i] = a_regs[i];
  }
  g.desc[t][0] = desc_a;
  g.desc[t][1] = desc_b;
  g.flags[t] = accumulate;
  g.bar.arrive_and_wait();
  for (int u = 0; u < 128; ++u) {  // .sync.aligned: the whole warpgroup issues the same operation
    if (g.desc[u][0] != desc_a || g.desc[u][1] != desc_b || g.flags[u] != accumulate) {
      fail("wgmma operands differ between the threads of a warpgroup");
    }
  }
  const Desc da = a_regs ? Desc{0, 0, 0} : decode(desc_a), db = decode(desc_b);
  const int warp = t / 32, lane = t % 32, gq = lane / 4, tq = lane % 4;
  for (int j = 0; j < n / 8; ++j) {
    for (int h = 0; h < 2; ++h) {
      for (int c = 0; c < 2; ++c) {
        const int row = 16 * warp + gq + 8 * h, col = 8 * j + 2 * tq + c;
        float acc = accumulate ? g.acc[t][4 * j + 2 * h + c] : 0.0f;
        for (int k = 0; k < 16; ++k) {
          float av;
          if (a_regs) {  // the mma.m16n8k16 A layout of warp row / 16
            const int r = row % 16, owner = 32 * (row / 16) + 4 * (r % 8) + (k % 8) / 2;
            av = half_of(g.a[owner][(r >= 8) + 2 * (k >= 8)], k % 2, bf16);
          } else {
            av = trans_a ? mnmajor(da, k, row, bf16) : kmajor(da, row, k, bf16);
          }
          const float bv = trans_b ? mnmajor(db, k, col, bf16) : kmajor(db, col, k, bf16);
          acc += av * bv;
        }
        d[4 * j + 2 * h + c] = acc;
      }
    }
  }
  g.bar.arrive_and_wait();
}

void mbar_arrive(uint64_t* bar) {
  std::lock_guard<std::mutex> lock(g_mbar_mutex);
  auto it = g_mbars.find(bar);
  if (it == g_mbars.end()) fail("arrive on an uninitialised mbarrier");
  if (it->second.pending == 0) fail("mbarrier: more arrivals than its count");
  --it->second.pending;
  mbar_try_complete(it->second);
}

namespace {

void named_bar(int id, int threads, bool wait) {
  if (id < 0 || id > 15) fail("named barrier id outside 0..15");
  if (threads <= 0 || threads % 32 || threads > static_cast<int>(blockDim.x * blockDim.y * blockDim.z)) {
    fail("named barrier thread count not a positive multiple of 32 within the block");
  }
  std::unique_lock<std::mutex> lock(g_bar_mutex);
  NamedBarrier& b = g_named[id];
  if (b.arrived == 0) b.expected = threads;
  if (b.expected != threads) fail("named barrier used with two different thread counts at once");
  const uint64_t gen = b.generation;
  if (++b.arrived == threads) {
    b.arrived = 0;
    ++b.generation;
    g_bar_cv.notify_all();
  } else if (wait) {
    g_bar_cv.wait(lock, [&] { return b.generation != gen; });
  }
}
}  // namespace

namespace {
// TMA stores: queued per thread (bulk async-groups), performed by the tma_store_wait that covers
// their group (shared memory is read then, as late as the hardware may).
struct Store {
  FakeMap map;
  int c[3];
  uint32_t src;
};
thread_local std::vector<Store> tl_store_open;
thread_local std::vector<std::vector<Store>> tl_store_committed;

void perform_store(const Store& s) {
  uint32_t lin = 0;
  for (uint32_t i2 = 0; i2 < s.map.box[2]; ++i2) {
    for (uint32_t i1 = 0; i1 < s.map.box[1]; ++i1) {
      for (uint32_t i0 = 0; i0 < s.map.box[0]; ++i0, lin += 2) {
        const int64_t x[3] = {int64_t{s.c[0]} + i0, int64_t{s.c[1]} + i1, int64_t{s.c[2]} + i2};
        if (x[0] < 0 || x[1] < 0 || x[2] < 0 || static_cast<uint64_t>(x[0]) >= s.map.dims[0] ||
            static_cast<uint64_t>(x[1]) >= s.map.dims[1] || static_cast<uint64_t>(x[2]) >= s.map.dims[2]) {
          continue;  // out of range: not written
        }
        unsigned char* dst = const_cast<unsigned char*>(s.map.base) + x[0] * 2 + x[1] * s.map.strides[0] +
                             x[2] * s.map.strides[1];
        memcpy(dst, smem_ptr(swizzle128(s.src + lin), 2), 2);
      }
    }
  }
}
}  // namespace

void tma_store_3d(const void* map, int c0, int c1, int c2, uint32_t src) {
  Store s;
  memcpy(&s.map, map, sizeof(s.map));
  if (s.map.magic != kMagic) fail("TMA store with a tensor map that was not encoded");
  if (src % 128) fail("TMA store source not 128-byte aligned");
  s.c[0] = c0, s.c[1] = c1, s.c[2] = c2;
  s.src = src;
  tl_store_open.push_back(s);
}
void tma_store_commit() {
  tl_store_committed.push_back(std::move(tl_store_open));
  tl_store_open.clear();
}
void tma_store_wait(int allowed_pending) {
  while (static_cast<int>(tl_store_committed.size()) > allowed_pending) {
    for (const Store& s : tl_store_committed.front()) perform_store(s);
    tl_store_committed.erase(tl_store_committed.begin());
  }
}

void named_bar_sync(int id, int threads) { named_bar(id, threads, true); }
void named_bar_arrive(int id, int threads) { named_bar(id, threads, false); }

namespace {
}
void setmaxnreg(int regs, bool increase) {
  if (regs < 24 || regs > 256 || regs % 8) fail("setmaxnreg: register count not a multiple of 8 in [24, 256]");
  Warpgroup& g = warpgroup();  // .sync.aligned: the whole warpgroup executes it
  g.flags[tl_rank % 128] = regs * 2 + increase;
  g.bar.arrive_and_wait();
  for (int u = 0; u < 128; ++u) {
    if (g.flags[u] != regs * 2 + increase) fail("setmaxnreg differs between the threads of a warpgroup");
  }
  if (tl_rank % 128 == 0) {
    std::unique_lock<std::mutex> lock(g_reg_mutex);
    int& mine = g_wg_regs[tl_rank / 128];
    if (increase ? regs < mine : regs > mine) fail("setmaxnreg.inc lowers (or .dec raises) the register count");
    auto total = [&] {
      int sum = 0;
      for (size_t w = 0; w < g_wg_regs.size(); ++w) sum += 128 * (w == static_cast<size_t>(tl_rank / 128) ? regs : g_wg_regs[w]);
      return sum;
    };
    // .inc blocks until the block's register file has room (other warpgroups' .dec release it)
    if (total() > 65536 && !increase) fail("setmaxnreg: block needs more than 64K registers");
    g_reg_cv.wait(lock, [&] { return total() <= 65536; });
    mine = regs;
    g_reg_cv.notify_all();
  }
  g.bar.arrive_and_wait();
}

float half_to_float(uint16_t h) {
  _Float16 f;
  memcpy(&f, &h, 2);
  return static_cast<float>(f);
}
uint16_t float_to_half(float x) {
  const _Float16 f = static_cast<_Float16>(x);
  uint16_t h;
  memcpy(&h, &f, 2);
  return h;
}
float bf16_to_float(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}
uint16_t float_to_bf16(float x) {
  uint32_t u;
  memcpy(&u, &x, 4);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0;  // NaN
  u += 0x7FFFu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

}  // namespace emu

// ---------------------------------------------------------------------------------------------
// CUDA runtime entry points the launchers call (an emulated device of compute capability 9.0)
// ---------------------------------------------------------------------------------------------
extern "C" {
cudaError_t cudaGetLastError(void) { return cudaSuccess; }
cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
cudaError_t cudaDeviceGetAttribute(int* value, enum cudaDeviceAttr attr, int) {
  if (attr == cudaDevAttrComputeCapabilityMajor) {
    *value = 9;
  } else if (attr == cudaDevAttrComputeCapabilityMinor) {
    *value = 0;
  } else {
    return cudaErrorInvalidValue;
  }
  return cudaSuccess;
}
cudaError_t cudaGetDriverEntryPointByVersion(const char* symbol, void** fn, unsigned int, unsigned long long,
                                             cudaDriverEntryPointQueryResult* status) {
  if (strcmp(symbol, "cuTensorMapEncodeTiled") != 0) return cudaErrorInvalidValue;
  *fn = reinterpret_cast<void*>(&emu::fake_encode);
  if (status) *status = cudaDriverEntryPointSuccess;
  return cudaSuccess;
}
}
