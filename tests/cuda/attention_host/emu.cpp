// Host emulation runtime (see cuda_emu.h for the model): threads, barriers, collectives, the two
// views of shared memory, asynchronous TMA / cp.async / wgmma, mbarriers, the seeded schedule and
// the deadlock watchdog, and the CUDA runtime / driver entry points the launchers call.
#include "cuda_emu.h"

#include <cuda.h>
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

thread_local dim3 threadIdx;
thread_local dim3 blockIdx;
dim3 gridDim;
dim3 blockDim;

namespace emu {
namespace {

// ---------------------------------------------------------------------------------------------
// shared memory: the generic view (what ld/st.shared and cp.async see) and the async-proxy view
// (what wgmma operand reads and TMA stores see). TMA loads write both; generic writes reach the
// async view only through fence_proxy_async.
// ---------------------------------------------------------------------------------------------
constexpr size_t kArenaBytes = 320 * 1024;
constexpr uint32_t kDynamicOffset = 16;  // the dynamic base is 16-byte aligned, not 1024: kernels align it
constexpr uint32_t kStaticBase = 256 * 1024;  // static __shared__ variables: [kStaticBase, kArenaBytes)
alignas(4096) unsigned char g_arena[kArenaBytes];
alignas(4096) unsigned char g_async[kArenaBytes];
size_t g_dynamic_bytes = 0;
std::atomic<uint32_t> g_static_end{kStaticBase};  // end of the static allocations of this launch
thread_local uint32_t tl_static_next = kStaticBase;

// One lock for all cross-thread emulator state (mbarriers, named barriers, queued TMA, the async
// view, register budget), one condition per kind of waiter.
std::mutex g_mu;
std::condition_variable g_bar_cv;   // named barriers: a barrier completed
std::condition_variable g_mbar_cv;  // mbarrier waits: a phase completed or a TMA load was issued
std::condition_variable g_reg_cv;   // setmaxnreg.inc: registers released

// ---------------------------------------------------------------------------------------------
// schedule: seeded jitter and the deadlock watchdog
// ---------------------------------------------------------------------------------------------
uint64_t g_seed = 1;
// A queued TMA load lands at a jitter point with probability 2^-g_land_shift; 0: only when a
// thread waits on its mbarrier (as late as possible).
int g_land_shift = 0;
// A warp that lags after every wait it returns from (EMU_SEED % 4 == 3), so that the others run
// ahead of it into what it has not written yet: a missing barrier shows; -1: none.
int g_slow_warp = -1;
double g_deadlock_s = 20;
struct alignas(64) Progress {
  std::atomic<uint64_t> n{0};
};
std::vector<Progress>* g_progress = nullptr;  // per thread: emulator calls made (the watchdog's sign of life)
thread_local uint64_t tl_rng = 0;
std::vector<std::atomic<const char*>>* g_where = nullptr;  // per thread: what it is blocked in

uint64_t next_random() {  // splitmix64
  uint64_t z = (tl_rng += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

thread_local int tl_rank = 0;
void set_where(const char* w) { (*g_where)[tl_rank].store(w, std::memory_order_relaxed); }
void progress() { (*g_progress)[tl_rank].n.fetch_add(1, std::memory_order_relaxed); }

void land_some_loads(uint64_t r);

// After a blocking wait returns: the slow warp lags there.
void lag() {
  if (tl_rank / 32 == g_slow_warp) std::this_thread::sleep_for(std::chrono::milliseconds(3));
}

// At every synchronisation-relevant emulator call: the calling thread may yield or pause (warps
// reach barriers and issue copies in varying orders) and a queued TMA load may land.
void jitter() {
  progress();
  const uint64_t r = next_random();
  if ((r & 15) == 0) std::this_thread::yield();
  if (((r >> 3) & 511) == 0) std::this_thread::sleep_for(std::chrono::microseconds(50));
  land_some_loads(r >> 12);
}

// ---------------------------------------------------------------------------------------------
// blocks, warps, warpgroups
// ---------------------------------------------------------------------------------------------
// A rendezvous of n threads that sleeps in the kernel (futex) rather than spinning: the block's
// threads far outnumber the cores.
class Rendezvous {
 public:
  explicit Rendezvous(int n) : n_(n) {}
  void arrive_and_wait() {
    const uint32_t gen = gen_.load(std::memory_order_acquire);
    if (count_.fetch_add(1, std::memory_order_acq_rel) + 1 == n_) {
      count_.store(0, std::memory_order_relaxed);
      gen_.fetch_add(1, std::memory_order_acq_rel);
      syscall(SYS_futex, reinterpret_cast<uint32_t*>(&gen_), FUTEX_WAKE_PRIVATE, INT32_MAX, nullptr, nullptr, 0);
      return;
    }
    while (gen_.load(std::memory_order_acquire) == gen) {
      syscall(SYS_futex, reinterpret_cast<uint32_t*>(&gen_), FUTEX_WAIT_PRIVATE, gen, nullptr, nullptr, 0);
    }
  }

 private:
  const int n_;
  std::atomic<int> count_{0};
  std::atomic<uint32_t> gen_{0};
};
static_assert(sizeof(std::atomic<uint32_t>) == 4, "futex word");
// Collectives exchange through two slot sets used alternately: one barrier per operation (a lane
// can only be one operation ahead of the slowest, so the set it writes is never being read).
struct Slots {
  const unsigned char* ptr[32];
  uint32_t u[32][6];
  float f[32];
};
struct Warp {
  Rendezvous bar{32};
  Slots slots[2];
};

// One asynchronous wgmma of a warpgroup: every thread records its part at issue.
struct WgmmaOp {
  int n = 0;
  bool bf16 = false, trans_a = false, trans_b = false, from_regs = false;
  uint64_t desc[128][2];
  int accumulate[128];
  bool chained[128];       // accumulates onto an earlier in-flight wgmma's result: read it then
  uint32_t a[128][4];      // A operand registers, captured at issue
  const uint32_t* a_ptr[128];
  std::vector<float> in;   // [128][n / 2] accumulator input captured at issue
  // Per thread: its shared-memory operand values (see read_operands) when the schedule made the
  // wgmma read them at issue; empty: read at the wgmma_wait. Hardware reads them at some point in
  // between: the earliest catches operands not yet ready, the latest ones released too early.
  std::vector<float> early[128];
  int registered = 0;
};

struct Warpgroup {
  Rendezvous bar{128};
  int flags[128];
  std::mutex mu;
  std::condition_variable issued;  // an operation has all 128 threads' parts
  std::map<uint64_t, std::shared_ptr<WgmmaOp>> issuing;  // by issue number, until all 128 registered
};

struct Block {
  explicit Block(int threads) {
    for (int w = 0; w < (threads + 31) / 32; ++w) warps.push_back(std::make_unique<Warp>());
    for (int g = 0; g < threads / 128; ++g) groups.push_back(std::make_unique<Warpgroup>());
  }
  std::vector<std::unique_ptr<Warp>> warps;
  std::vector<std::unique_ptr<Warpgroup>> groups;
};

thread_local Block* tl_block = nullptr;
thread_local unsigned tl_warp_ops = 0;

Warp& warp() { return *tl_block->warps[tl_rank / 32]; }
Slots& next_slots() { return warp().slots[tl_warp_ops++ & 1]; }
Warpgroup& warpgroup() {
  if (tl_rank / 128 >= static_cast<int>(tl_block->groups.size())) fail("warpgroup operation outside a whole warpgroup");
  return *tl_block->groups[tl_rank / 128];
}

// hardware barriers 0..15 (bar.sync / bar.arrive; 0 is also __syncthreads)
struct NamedBarrier {
  int expected = 0, arrived = 0;
  uint64_t generation = 0, completed_at = 0;  // completed_at: g_syncs at its last completion
};
NamedBarrier g_named[16];

// setmaxnreg: registers per thread of each warpgroup
std::vector<int> g_wg_regs;

// ---------------------------------------------------------------------------------------------
// cp.async: per thread, poisoned at issue, performed by the wait_group that covers the group
// ---------------------------------------------------------------------------------------------
struct Copy {
  unsigned char* dst;
  const void* src;
  int bytes;
  bool valid;
};
thread_local std::vector<Copy> tl_open_group;                // issued, not yet committed
thread_local std::deque<std::vector<Copy>> tl_committed;     // committed, not yet performed

// ---------------------------------------------------------------------------------------------
// wgmma state of this thread
// ---------------------------------------------------------------------------------------------
thread_local uint64_t tl_wgmma_issued = 0;
using Issued = std::pair<std::shared_ptr<WgmmaOp>, float*>;  // an operation and this thread's accumulator
thread_local std::vector<Issued> tl_wgmma_open;               // issued, not yet committed
thread_local std::deque<std::vector<Issued>> tl_wgmma_groups;  // committed, not yet retired
thread_local std::map<float*, int> tl_dest_in_flight;          // accumulator -> wgmmas in flight on it
thread_local bool tl_wgmma_fenced = false;  // a wgmma_fence since the last wgmma_wait
// Results of completed wgmmas not yet handed to the kernel's registers (fence_operands, or the
// next wgmma that reads them as its accumulator): destination -> values.
thread_local std::map<float*, std::vector<float>> tl_staged;
// Register arrays (accumulators, A operands) as of the last wgmma_fence or emulator write: a
// later difference is a register write the fence did not order.
thread_local std::map<const void*, std::vector<uint32_t>> tl_reg_snapshot;
// A operands of completed wgmmas not yet released by fence_operands: pointer -> captured values.
thread_local std::map<const uint32_t*, std::vector<uint32_t>> tl_a_unreleased;

// ---------------------------------------------------------------------------------------------
// TMA stores: per thread bulk async-groups, performed (shared memory read) at tma_store_wait
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

struct Store {
  FakeMap map;
  int c[3];
  uint32_t src;
};
thread_local std::vector<Store> tl_store_open;
thread_local std::deque<std::vector<Store>> tl_store_committed;

// ---------------------------------------------------------------------------------------------
// mbarriers (PTX: pending arrivals, transaction count, phase) and queued TMA loads
// ---------------------------------------------------------------------------------------------
struct MBarrier {
  uint32_t count = 0, pending = 0, phase = 0;  // phase: number of completed phases
  int64_t tx = 0;
  int init_thread = 0;
  uint64_t init_syncs = 0;  // barrier completions before the initialisation
  // The initialisation is a generic-proxy write: TMA (the async proxy) may complete transactions
  // on the barrier only after the initialising thread's fence.mbarrier_init or fence.proxy.async.
  bool async_visible = false;
};
// Barrier (bar.sync) completions in this block, and per thread the count as of the last one it
// passed: an mbarrier's initialisation is visible to another thread only across a barrier.
uint64_t g_syncs = 0;
thread_local uint64_t tl_syncs_seen = 0;
std::map<const uint64_t*, MBarrier> g_mbars;

struct Load {
  FakeMap map;
  int c[3];
  uint32_t dst;
  uint64_t* bar;
};
std::vector<Load> g_loads;  // issued, not landed (guarded by g_mu)
std::atomic<int> g_loads_pending{0};

MBarrier& mbar(const uint64_t* bar, const char* what) {
  auto it = g_mbars.find(bar);
  if (it == g_mbars.end()) fail(what);
  if (it->second.init_thread != tl_rank && tl_syncs_seen <= it->second.init_syncs) {
    fail("mbarrier used by another thread before a barrier made its initialisation visible");
  }
  return it->second;
}

void publish_inits_locked() {
  for (auto& [bar, b] : g_mbars) {
    if (b.init_thread == tl_rank) b.async_visible = true;
  }
}

void mbar_try_complete(MBarrier& b) {
  if (b.pending == 0 && b.tx == 0) {
    ++b.phase;
    b.pending = b.count;
    g_mbar_cv.notify_all();
  }
}

void mbar_arrive_locked(MBarrier& b) {
  if (b.pending == 0) fail("mbarrier: more arrivals than its count in one phase");
  --b.pending;
  mbar_try_complete(b);
}

uint32_t swizzle128(uint32_t addr) { return addr ^ (((addr >> 7) & 7) << 4); }

bool in_box(const FakeMap& m, const int (&c)[3], uint32_t i0, uint32_t i1, uint32_t i2, const unsigned char** at) {
  const int64_t x[3] = {int64_t{c[0]} + i0, int64_t{c[1]} + i1, int64_t{c[2]} + i2};
  for (int i = 0; i < 3; ++i) {
    if (x[i] < 0 || static_cast<uint64_t>(x[i]) >= m.dims[i]) return false;
  }
  *at = m.base + x[0] * 2 + x[1] * m.strides[0] + x[2] * m.strides[1];
  return true;
}

uint32_t box_bytes(const FakeMap& m) { return m.box[0] * m.box[1] * m.box[2] * 2; }

// A TMA load lands: the box in both views, then its bytes complete on the mbarrier.
void land_locked(size_t i) {
  const Load l = g_loads[i];
  g_loads.erase(g_loads.begin() + static_cast<std::ptrdiff_t>(i));
  --g_loads_pending;
  uint32_t lin = 0;
  for (uint32_t i2 = 0; i2 < l.map.box[2]; ++i2) {
    for (uint32_t i1 = 0; i1 < l.map.box[1]; ++i1) {
      for (uint32_t i0 = 0; i0 < l.map.box[0]; ++i0, lin += 2) {
        uint16_t v = 0;  // out of range: zero
        const unsigned char* src;
        if (in_box(l.map, l.c, i0, i1, i2, &src)) memcpy(&v, src, 2);
        const uint32_t at = swizzle128(l.dst + lin);
        memcpy(smem_ptr(at, 2), &v, 2);
        memcpy(g_async + at, &v, 2);
      }
    }
  }
  MBarrier& b = mbar(l.bar, "TMA completes on an uninitialised mbarrier");
  b.tx -= lin;
  if (b.pending == 0 && b.tx < 0) fail("mbarrier: more transaction bytes completed than expected");
  mbar_try_complete(b);
  progress();
}

// Loads may land out of order, at any jitter point of any thread.
void land_some_loads(uint64_t r) {
  if (g_land_shift == 0 || g_loads_pending.load(std::memory_order_relaxed) == 0 ||
      (r & ((1u << g_land_shift) - 1)) != 0) {
    return;
  }
  std::lock_guard<std::mutex> lock(g_mu);
  if (!g_loads.empty()) land_locked((r >> 8) % g_loads.size());
}

// ---------------------------------------------------------------------------------------------
// tensor maps: the fake cuTensorMapEncodeTiled stores its arguments in the opaque map
// ---------------------------------------------------------------------------------------------
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

FakeMap read_map(const void* map) {
  FakeMap m;
  memcpy(&m, map, sizeof(m));
  if (m.magic != kMagic) fail("TMA with a tensor map that was not encoded");
  return m;
}

// ---------------------------------------------------------------------------------------------
// wgmma operand reads (PTX shared memory matrix layouts, 128-byte swizzle), from the async view
// ---------------------------------------------------------------------------------------------
struct Desc {
  uint32_t start, lbo, sbo;
};
Desc decode(uint64_t d) {
  if ((d >> 62) != 1) fail("wgmma descriptor: not the 128-byte swizzle mode");
  if (((d >> 49) & 7) != 0) fail("wgmma descriptor: non-zero base offset");
  return {static_cast<uint32_t>(d & 0x3FFF) << 4, static_cast<uint32_t>((d >> 16) & 0x3FFF) << 4,
          static_cast<uint32_t>((d >> 32) & 0x3FFF) << 4};
}

float to_f32(uint16_t v, bool bf16) { return bf16 ? bf16_to_float(v) : half_to_float(v); }

float load_async16(uint32_t addr, bool bf16) {
  smem_ptr(addr, 2);  // bounds
  uint16_t v;
  memcpy(&v, g_async + addr, 2);
  return to_f32(v, bf16);
}

// element (mn, k) of a K-major operand; element (k, mn) of an MN-major one
float kmajor(const Desc& d, int mn, int k, bool bf16) {
  return load_async16(swizzle128(d.start + (mn % 8) * 128 + (mn / 8) * d.sbo + (k / 8) * 16 + (k % 8) * 2), bf16);
}
float mnmajor(const Desc& d, int k, int mn, bool bf16) {
  return load_async16(swizzle128(d.start + (mn % 64) * 2 + (mn / 64) * d.lbo + (k % 8) * 128 + (k / 8) * d.sbo),
                      bf16);
}

float half_of(uint32_t reg, int hi, bool bf16) { return to_f32(static_cast<uint16_t>(hi ? reg >> 16 : reg & 0xFFFF), bf16); }

std::vector<uint32_t> words(const void* p, size_t n) {
  std::vector<uint32_t> w(n);
  memcpy(w.data(), p, n * 4);
  return w;
}
bool same_words(const void* p, const std::vector<uint32_t>& w) { return memcmp(p, w.data(), w.size() * 4) == 0; }

// Thread t's shared-memory operand values from the async view: A (unless from registers) rows
// 16 warp + group + 8 h by k, then B columns 8 j + 2 tig + c by k.
void read_operands(const WgmmaOp& op, int t, std::vector<float>& v) {
  const int warp = t / 32, lane = t % 32, gq = lane / 4, tq = lane % 4;
  v.clear();
  if (!op.from_regs) {
    const Desc da = decode(op.desc[t][0]);
    for (int h = 0; h < 2; ++h) {
      const int row = 16 * warp + gq + 8 * h;
      for (int k = 0; k < 16; ++k) v.push_back(op.trans_a ? mnmajor(da, k, row, op.bf16) : kmajor(da, row, k, op.bf16));
    }
  }
  const Desc db = decode(op.desc[t][1]);
  for (int j = 0; j < op.n / 8; ++j) {
    for (int c = 0; c < 2; ++c) {
      const int col = 8 * j + 2 * tq + c;
      for (int k = 0; k < 16; ++k) v.push_back(op.trans_b ? mnmajor(db, k, col, op.bf16) : kmajor(db, col, k, op.bf16));
    }
  }
}

// This thread's part of a wgmma, performed at the wgmma_wait that retires its group (shared
// memory read now unless read at issue); the result is staged until the kernel's fence_operands
// (or the next wgmma on the same accumulator) takes it.
void perform(const WgmmaOp& op, float* d) {
  const int t = tl_rank % 128, half_n = op.n / 2;
  for (int u = 0; u < 128; ++u) {  // .sync.aligned: the whole warpgroup issues the same operation
    if (op.desc[u][0] != op.desc[0][0] || op.desc[u][1] != op.desc[0][1] || op.accumulate[u] != op.accumulate[0]) {
      fail("wgmma operands differ between the threads of a warpgroup");
    }
  }
  if (op.from_regs && !same_words(op.a_ptr[t], words(op.a[t], 4))) {
    fail("wgmma A-operand registers rewritten while the wgmma reading them is in flight");
  }
  std::vector<float> late;
  if (op.early[t].empty()) read_operands(op, t, late);
  const std::vector<float>& v = op.early[t].empty() ? late : op.early[t];
  const float* b = v.data() + (op.from_regs ? 0 : 32);
  const float* in = op.chained[t] ? tl_staged.at(d).data() : &op.in[static_cast<size_t>(t) * half_n];
  std::vector<float> out(half_n);
  const int warp = t / 32, lane = t % 32, gq = lane / 4;
  for (int j = 0; j < op.n / 8; ++j) {
    for (int h = 0; h < 2; ++h) {
      for (int c = 0; c < 2; ++c) {
        const int row = 16 * warp + gq + 8 * h, i = 4 * j + 2 * h + c;
        float acc = op.accumulate[t] ? in[i] : 0.0f;
        for (int k = 0; k < 16; ++k) {
          float av;
          if (op.from_regs) {  // the mma.m16n8k16 A layout of warp row / 16
            const int r = row % 16, owner = 32 * (row / 16) + 4 * (r % 8) + (k % 8) / 2;
            av = half_of(op.a[owner][(r >= 8) + 2 * (k >= 8)], k % 2, op.bf16);
          } else {
            av = v[16 * h + k];
          }
          acc += av * b[16 * (2 * j + c) + k];
        }
        out[i] = acc;
      }
    }
  }
  tl_staged[d] = std::move(out);
  if (op.from_regs) tl_a_unreleased[op.a_ptr[t]] = words(op.a[t], 4);
}

// What each thread is bound to at exit: nothing of its own may still be in flight (a new block
// may reuse the shared memory while a copy still writes or reads it).
void check_exit() {
  if (!tl_open_group.empty() || !tl_committed.empty()) fail("cp.async still in flight when the thread exits");
  if (!tl_wgmma_open.empty() || !tl_wgmma_groups.empty()) fail("wgmma still in flight when the thread exits");
  for (const auto& g : tl_store_committed) {
    if (!g.empty()) fail("TMA store still reading shared memory when the thread exits");
  }
  if (!tl_store_open.empty()) fail("TMA store issued but never committed");
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
  if (const char* s = std::getenv("EMU_SEED")) g_seed = std::strtoull(s, nullptr, 10);
  if (const char* s = std::getenv("EMU_DEADLOCK_S")) g_deadlock_s = std::atof(s);
  constexpr int kLandShift[3] = {6, 0, 2};  // the seed also picks how late TMA lands (1: lazy)
  g_land_shift = kLandShift[g_seed % 3];
  const int warps = static_cast<int>((block.x * block.y * block.z + 31) / 32);
  g_slow_warp = g_seed % 4 == 3 ? static_cast<int>(g_seed / 4 % static_cast<uint64_t>(warps)) : -1;
  gridDim = grid;
  blockDim = block;
  g_dynamic_bytes = smem;
  g_static_end = kStaticBase;
  const int threads = static_cast<int>(block.x * block.y * block.z);
  std::vector<std::atomic<const char*>> where(threads);
  std::vector<Progress> made(threads);
  g_where = &where;
  g_progress = &made;
  for (unsigned z = 0; z < grid.z; ++z) {
    for (unsigned y = 0; y < grid.y; ++y) {
      for (unsigned x = 0; x < grid.x; ++x) {
        memset(g_arena, 0xFF, kArenaBytes);  // NaN in 16 and 32 bits: unwritten shared memory shows
        memset(g_async, 0xFF, kArenaBytes);
        g_mbars.clear();
        g_syncs = 0;
        for (NamedBarrier& b : g_named) b = NamedBarrier{};
        // registers per thread before any setmaxnreg: what __launch_bounds__(threads, 1) allows
        const int groups = (threads + 127) / 128;
        g_wg_regs.assign(groups, std::min(255, 65536 / (128 * groups) / 8 * 8));
        for (auto& w : where) w = "running";
        Block blk(threads);
        std::atomic<int> running{threads};
        // Watchdog: no emulator progress for g_deadlock_s while threads still run is a deadlock.
        std::thread watchdog([&] {
          auto total = [&] {
            uint64_t sum = 0;
            for (const Progress& p : made) sum += p.n.load(std::memory_order_relaxed);
            return sum;
          };
          uint64_t last = total();
          auto since = std::chrono::steady_clock::now();
          while (running.load() > 0) {
            std::this_thread::sleep_for(std::chrono::milliseconds(50));
            const uint64_t now = total();
            if (now != last) {
              last = now;
              since = std::chrono::steady_clock::now();
            } else if (std::chrono::duration<double>(std::chrono::steady_clock::now() - since).count() > g_deadlock_s) {
              std::map<std::string, int> at;
              for (auto& w : where) ++at[w.load()];
              std::string msg = "deadlock: no thread made progress for " + std::to_string(g_deadlock_s) + " s;";
              for (auto& [what, n] : at) msg += " " + std::to_string(n) + " in " + what + ";";
              std::fprintf(stderr, "emulation error: %s (block %u %u)\n", msg.c_str(), x, y);
              std::fflush(stderr);
              std::abort();
            }
          }
        });
        std::vector<std::thread> ts;
        ts.reserve(threads);
        for (int t = 0; t < threads; ++t) {
          ts.emplace_back([&, t] {
            tl_block = &blk;
            tl_rank = t;
            tl_rng = g_seed * 0x100000001B3ull ^ (((uint64_t{z} * grid.y + y) * grid.x + x) << 12 | t);
            tl_static_next = kStaticBase;
            tl_syncs_seen = 0;
            tl_warp_ops = 0;
            tl_open_group.clear();
            tl_committed.clear();
            tl_wgmma_issued = 0;
            tl_wgmma_open.clear();
            tl_wgmma_groups.clear();
            tl_dest_in_flight.clear();
            tl_wgmma_fenced = false;
            tl_staged.clear();
            tl_reg_snapshot.clear();
            tl_a_unreleased.clear();
            tl_store_open.clear();
            tl_store_committed.clear();
            threadIdx = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
            blockIdx = dim3(x, y, z);
            body();
            check_exit();
            where[t] = "exited";
            --running;
            progress();
          });
        }
        for (auto& th : ts) th.join();
        watchdog.join();
        if (!g_loads.empty()) fail("TMA load still in flight when the block exits");
      }
    }
  }
  g_where = nullptr;
  g_progress = nullptr;
}

// A hardware barrier: `threads` arrivals complete it; sync waits for that, arrive does not.
static void named_bar(int id, int threads, bool wait, const char* what) {
  jitter();
  if (id < 0 || id > 15) fail("named barrier id outside 0..15");
  if (threads <= 0 || threads % 32 || threads > static_cast<int>(blockDim.x * blockDim.y * blockDim.z)) {
    fail("named barrier thread count not a positive multiple of 32 within the block");
  }
  std::unique_lock<std::mutex> lock(g_mu);
  NamedBarrier& b = g_named[id];
  if (b.arrived == 0) b.expected = threads;
  if (b.expected != threads) fail("barrier used with two different thread counts at once");
  const uint64_t gen = b.generation;
  if (++b.arrived == threads) {
    b.arrived = 0;
    ++b.generation;
    b.completed_at = ++g_syncs;
    tl_syncs_seen = g_syncs;
    g_bar_cv.notify_all();
  } else if (wait) {
    set_where(what);
    g_bar_cv.wait(lock, [&] { return b.generation != gen; });
    tl_syncs_seen = b.completed_at;
    set_where("running");
  }
  progress();
  lock.unlock();
  lag();
}

void syncthreads() { named_bar(0, static_cast<int>(blockDim.x * blockDim.y * blockDim.z), true, "__syncthreads"); }
void named_bar_sync(int id, int threads) { named_bar(id, threads, true, "named_bar_sync"); }
void named_bar_arrive(int id, int threads) { named_bar(id, threads, false, "named_bar_arrive"); }

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
  jitter();
  if (smem_addr(smem) % bytes) fail("cp.async: shared destination not aligned to the copy size");
  if (valid) {
    if (reinterpret_cast<uintptr_t>(gmem) % bytes) fail("cp.async: global source not aligned to the copy size");
    check_global(gmem, bytes);
  }
  unsigned char* dst = smem_ptr(smem_addr(smem), bytes);
  memset(dst, 0xFF, bytes);  // in flight: the destination holds no defined value
  tl_open_group.push_back(Copy{dst, gmem, bytes, valid});
}
void cp_async_commit() {
  jitter();
  tl_committed.push_back(std::move(tl_open_group));
  tl_open_group.clear();
}
void cp_async_wait(int allowed_pending) {
  jitter();
  while (static_cast<int>(tl_committed.size()) > allowed_pending) {
    for (const Copy& c : tl_committed.front()) {
      if (c.valid) {
        memcpy(c.dst, c.src, c.bytes);
      } else {
        memset(c.dst, 0, c.bytes);
      }
    }
    tl_committed.pop_front();
  }
}
int thread_rank() { return tl_rank; }
uint64_t syncthreads_completed() {
  std::lock_guard<std::mutex> lock(g_mu);
  return g_named[0].generation;
}

float shfl_xor(float v, int lane_mask) {
  progress();
  Slots& w = next_slots();
  const int lane = tl_rank % 32;
  w.f[lane] = v;
  warp().bar.arrive_and_wait();
  return w.f[lane ^ lane_mask];
}

void ldmatrix(uint32_t (&r)[4], const void* smem, bool trans) {
  progress();
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

// ---------------------------------------------------------------------------------------------
// mbarriers and TMA
// ---------------------------------------------------------------------------------------------
void mbar_init(uint64_t* bar, uint32_t count) {
  jitter();
  if (count == 0) fail("mbarrier initialised with count 0");
  std::lock_guard<std::mutex> lock(g_mu);
  for (const Load& l : g_loads) {
    if (l.bar == bar) fail("mbarrier re-initialised while a TMA load completes on it");
  }
  g_mbars[bar] = MBarrier{count, count, 0, 0, tl_rank, g_syncs, false};
}

// fence.mbarrier_init: this thread's initialisations so far become visible to the async proxy.
void mbar_fence_init() {
  jitter();
  std::lock_guard<std::mutex> lock(g_mu);
  publish_inits_locked();
}

void mbar_expect_tx(uint64_t* bar, uint32_t bytes) {
  jitter();
  std::lock_guard<std::mutex> lock(g_mu);
  MBarrier& b = mbar(bar, "expect_tx on an uninitialised mbarrier");
  b.tx += bytes;
  mbar_arrive_locked(b);
}

void mbar_arrive(uint64_t* bar) {
  jitter();
  std::lock_guard<std::mutex> lock(g_mu);
  mbar_arrive_locked(mbar(bar, "arrive on an uninitialised mbarrier"));
}

// Returns once the phase with parity `parity` has completed (the current phase's parity differs).
// A waiter that finds it incomplete makes the loads completing on this barrier land: no later.
void mbar_wait(uint64_t* bar, uint32_t parity) {
  jitter();
  std::unique_lock<std::mutex> lock(g_mu);
  if ((mbar(bar, "wait on an uninitialised mbarrier").phase & 1) != parity) return;
  for (size_t i = g_loads.size(); i-- > 0;) {
    if (g_loads[i].bar == bar) land_locked(i);
  }
  set_where("mbar_wait");
  while ((mbar(bar, "wait on an uninitialised mbarrier").phase & 1) == parity) {
    g_mbar_cv.wait(lock);
    for (size_t i = g_loads.size(); i-- > 0;) {
      if (g_loads[i].bar == bar) land_locked(i);
    }
  }
  set_where("running");
  lock.unlock();
  lag();
}

// Issue: the destination box becomes undefined (NaN) in both views until the copy lands.
void tma_load_3d(uint32_t dst, const void* map, int c0, int c1, int c2, uint64_t* bar) {
  jitter();
  const FakeMap m = read_map(map);
  if (dst % 128) fail("TMA destination not 128-byte aligned");
  Load l{m, {c0, c1, c2}, dst, bar};
  std::lock_guard<std::mutex> lock(g_mu);
  if (!mbar(bar, "TMA load on an uninitialised mbarrier").async_visible) {
    fail("TMA load completes on an mbarrier whose initialisation no fence.mbarrier_init or fence.proxy.async of "
         "the initialising thread made visible to the async proxy");
  }
  for (uint32_t lin = 0; lin < box_bytes(m); lin += 2) {
    const uint32_t at = swizzle128(dst + lin);
    memset(smem_ptr(at, 2), 0xFF, 2);
    memset(g_async + at, 0xFF, 2);
  }
  g_loads.push_back(l);
  ++g_loads_pending;
  g_mbar_cv.notify_all();  // a thread already waiting on `bar` lands it
}

void tma_store_3d(const void* map, int c0, int c1, int c2, uint32_t src) {
  jitter();
  Store s{read_map(map), {c0, c1, c2}, src};
  if (src % 128) fail("TMA store source not 128-byte aligned");
  smem_ptr(src, box_bytes(s.map));
  tl_store_open.push_back(s);
}
void tma_store_commit() {
  jitter();
  tl_store_committed.push_back(std::move(tl_store_open));
  tl_store_open.clear();
}
// Retires the oldest groups: they read the async view of shared memory now and write global.
void tma_store_wait(int allowed_pending) {
  jitter();
  std::lock_guard<std::mutex> lock(g_mu);
  while (static_cast<int>(tl_store_committed.size()) > allowed_pending) {
    for (const Store& s : tl_store_committed.front()) {
      uint32_t lin = 0;
      for (uint32_t i2 = 0; i2 < s.map.box[2]; ++i2) {
        for (uint32_t i1 = 0; i1 < s.map.box[1]; ++i1) {
          for (uint32_t i0 = 0; i0 < s.map.box[0]; ++i0, lin += 2) {
            const unsigned char* at;
            if (in_box(s.map, s.c, i0, i1, i2, &at)) {  // out of range: not written
              memcpy(const_cast<unsigned char*>(at), g_async + swizzle128(s.src + lin), 2);
            }
          }
        }
      }
    }
    tl_store_committed.pop_front();
  }
}

// Generic-proxy writes so far become visible to the async proxy. The emulator cannot tell which
// thread wrote a byte, so the fence publishes all of them (a fence missing in only some of the
// writing threads goes unnoticed; one missing everywhere does not).
void fence_proxy_async() {
  jitter();
  std::lock_guard<std::mutex> lock(g_mu);
  publish_inits_locked();  // mbarrier initialisations are generic-proxy writes too
  memcpy(g_async + kDynamicOffset, g_arena + kDynamicOffset, g_dynamic_bytes);
  memcpy(g_async + kStaticBase, g_arena + kStaticBase, g_static_end.load() - kStaticBase);
}

// ---------------------------------------------------------------------------------------------
// wgmma
// ---------------------------------------------------------------------------------------------
namespace {
void snapshot(const void* p, size_t words_n) { tl_reg_snapshot[p] = words(p, words_n); }

// Registers the kernel wrote since the last wgmma_fence (or emulator write): unordered with the
// wgmma about to read or write them.
void check_fenced(const void* p, const char* what) {
  auto it = tl_reg_snapshot.find(p);
  if (it != tl_reg_snapshot.end() && !same_words(p, it->second)) fail(what);
}

// A operands of completed wgmmas must stay untouched until fence_operands releases them (without
// it the compiler may move the kernel's writes above the wgmma_wait).
void check_unreleased() {
  for (const auto& [p, w] : tl_a_unreleased) {
    if (!same_words(p, w)) {
      fail("wgmma A-operand registers rewritten after wgmma_wait without fence_operands on them");
    }
  }
}

void take_staged(float* d, size_t n) {  // the wgmma results become the kernel's register values
  auto it = tl_staged.find(d);
  if (it == tl_staged.end()) return;
  memcpy(d, it->second.data(), n * 4);
  tl_staged.erase(it);
  snapshot(d, n);
}
}  // namespace

// Issue: inputs captured (accumulator unless chained onto an in-flight wgmma, A registers), the
// accumulator poisoned, the operation queued in this thread's open group.
void wgmma(float* d, int n, const uint32_t* a_regs, uint64_t desc_a, uint64_t desc_b, int accumulate, bool trans_a,
           bool trans_b, bool bf16) {
  jitter();
  Warpgroup& g = warpgroup();
  const int t = tl_rank % 128, half_n = n / 2;
  if (!tl_wgmma_fenced) fail("wgmma without a wgmma_fence since the last wgmma_wait");
  check_unreleased();
  const bool chained = tl_dest_in_flight[d] > 0;
  if (!chained) {
    take_staged(d, half_n);  // the asm reads the registers the retired wgmma wrote
    check_fenced(d, "accumulator registers written after the last wgmma_fence, before a wgmma on them");
  } else if (!std::all_of(d, d + half_n, [](float x) { return x != x; })) {
    fail("accumulator registers written while a wgmma on them is in flight");
  }
  if (a_regs) check_fenced(a_regs, "A-operand registers written after the last wgmma_fence");

  std::shared_ptr<WgmmaOp> op;
  {
    std::lock_guard<std::mutex> lock(g.mu);
    auto& slot = g.issuing[tl_wgmma_issued];
    if (!slot) {
      slot = std::make_shared<WgmmaOp>();
      slot->n = n, slot->bf16 = bf16, slot->trans_a = trans_a, slot->trans_b = trans_b;
      slot->from_regs = a_regs != nullptr;
      slot->in.assign(static_cast<size_t>(128) * half_n, 0.0f);
    }
    op = slot;
    if (op->n != n || op->bf16 != bf16 || op->trans_a != trans_a || op->trans_b != trans_b ||
        op->from_regs != (a_regs != nullptr)) {
      fail("wgmma shapes differ between the threads of a warpgroup");
    }
  }
  const uint64_t issue_no = tl_wgmma_issued++;
  op->desc[t][0] = a_regs ? 0 : desc_a;
  op->desc[t][1] = desc_b;
  op->accumulate[t] = accumulate;
  op->chained[t] = chained;
  op->a_ptr[t] = a_regs;
  if (a_regs) memcpy(op->a[t], a_regs, 16);
  // Read at issue, drawn per warp and operation: after the whole warp issued (.sync), as the
  // warp's slice of the product may start then.
  uint64_t h = (g_seed * 0x9E3779B97F4A7C15ull) ^ (issue_no * 0xBF58476D1CE4E5B9ull) ^ (tl_rank / 32 + 1);
  h ^= h >> 29;
  if ((h * 0x94D049BB133111EBull) >> 63) {
    warp().bar.arrive_and_wait();
    std::lock_guard<std::mutex> lock(g_mu);  // a consistent view (TMA lands under the lock)
    read_operands(*op, t, op->early[t]);
  }
  if (!chained) memcpy(&op->in[static_cast<size_t>(t) * half_n], d, half_n * 4);
  {
    std::lock_guard<std::mutex> lock(g.mu);
    if (++op->registered == 128) {
      g.issuing.erase(issue_no);
      g.issued.notify_all();
    }
  }
  std::fill(d, d + half_n, std::numeric_limits<float>::quiet_NaN());  // undefined until the wait
  snapshot(d, half_n);
  if (a_regs) snapshot(a_regs, 4);
  ++tl_dest_in_flight[d];
  tl_wgmma_open.emplace_back(std::move(op), d);
}

// wgmma.fence: orders the kernel's earlier register writes before the wgmmas that follow.
void wgmma_fence() {
  jitter();
  check_unreleased();
  tl_wgmma_fenced = true;
  for (auto& [p, w] : tl_reg_snapshot) memcpy(w.data(), p, w.size() * 4);
}

void wgmma_commit() {
  jitter();
  tl_wgmma_groups.push_back(std::move(tl_wgmma_open));
  tl_wgmma_open.clear();
}

// wgmma.wait_group (.sync.aligned per warp, not a warpgroup barrier): retires this thread's
// oldest groups until at most `allowed_pending` remain. Uncommitted wgmmas stay in flight.
void wgmma_wait(int allowed_pending) {
  jitter();
  Warpgroup& g = warpgroup();
  while (static_cast<int>(tl_wgmma_groups.size()) > allowed_pending) {
    for (const auto& [op, d] : tl_wgmma_groups.front()) {
      {  // an operation completes once every warp of the warpgroup has issued its part
        std::unique_lock<std::mutex> lock(g.mu);
        set_where("wgmma_wait");
        g.issued.wait(lock, [&] { return op->registered == 128; });
        set_where("running");
      }
      perform(*op, d);
      --tl_dest_in_flight[d];
    }
    tl_wgmma_groups.pop_front();
  }
  tl_wgmma_fenced = false;
  progress();
  lag();
}

// The compiler-ordering fences: retired results reach the kernel's accumulator registers; A
// operand registers of retired wgmmas are released for rewriting.
void fence_operands(float* r, int n) {
  for (auto it = tl_staged.begin(); it != tl_staged.end();) {
    float* d = it->first;
    if (d >= r && d + it->second.size() <= r + n) {
      memcpy(d, it->second.data(), it->second.size() * 4);
      snapshot(d, it->second.size());
      it = tl_staged.erase(it);
    } else {
      ++it;
    }
  }
}
void fence_operand_regs(uint32_t* r, int n) {
  for (auto it = tl_a_unreleased.begin(); it != tl_a_unreleased.end();) {
    it = it->first >= r && it->first + 4 <= r + n ? tl_a_unreleased.erase(it) : std::next(it);
  }
}

// setmaxnreg: .sync.aligned over the warpgroup; .inc blocks until the block's register file has
// room (other warpgroups' .dec release registers).
void setmaxnreg(int regs, bool increase) {
  jitter();
  if (regs < 24 || regs > 256 || regs % 8) fail("setmaxnreg: register count not a multiple of 8 in [24, 256]");
  Warpgroup& g = warpgroup();
  g.flags[tl_rank % 128] = regs * 2 + increase;
  set_where("setmaxnreg");
  g.bar.arrive_and_wait();
  for (int u = 0; u < 128; ++u) {
    if (g.flags[u] != regs * 2 + increase) fail("setmaxnreg differs between the threads of a warpgroup");
  }
  if (tl_rank % 128 == 0) {
    std::unique_lock<std::mutex> lock(g_mu);
    int& mine = g_wg_regs[tl_rank / 128];
    if (increase ? regs < mine : regs > mine) fail("setmaxnreg.inc lowers (or .dec raises) the register count");
    auto total = [&] {
      int sum = 0;
      for (size_t w = 0; w < g_wg_regs.size(); ++w) {
        sum += 128 * (static_cast<int>(w) == tl_rank / 128 ? regs : g_wg_regs[w]);
      }
      return sum;
    };
    g_reg_cv.wait(lock, [&] { return total() <= 65536; });  // the watchdog reports one that never fits
    mine = regs;
    g_reg_cv.notify_all();
  }
  g.bar.arrive_and_wait();
  set_where("running");
  progress();
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
