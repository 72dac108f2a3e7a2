// Runs the attention kernels of csrc/attention/ under the host emulation (cuda_emu.h) on inputs
// written by tests/cuda/test_cuda_attention.py:
//
//   attention_emu fwd_mma|fwd_sm90|bwd|bwd_sm90 DIR
//
// DIR/meta: nq nk hq hkv head_dim dtype(1 fp16, 2 bf16) scale, then (offset, row stride, head
// stride) in elements for q, k, v, out, dout, then optionally the number of intervals K and the
// softcap (default 1 and 0: kv_start, kv_end [nq, K], q_tiles [tiles, K, 4]). DIR/{q,k,v,out,dout}.bin are the 16-bit buffers those
// index into, DIR/{kv_start,kv_end}.bin int32, DIR/lse.bin fp32 [hq, nq] (bwd), DIR/q_tiles.bin
// (forward table) or DIR/{q_tiles,k_tiles}.bin (backward tables) int32. Writes
// DIR/{out,lse}_out.bin or DIR/{dq,dk,dv}_out.bin (contiguous). Outputs start NaN-filled between
// guard words that must survive.
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include "attention/attention.h"
#include "cuda_emu.h"

namespace {

std::vector<unsigned char> read_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) {
    std::fprintf(stderr, "cannot read %s\n", path.c_str());
    std::exit(2);
  }
  return std::vector<unsigned char>(std::istreambuf_iterator<char>(f), {});
}

void write_file(const std::string& path, const void* data, size_t bytes) {
  std::ofstream f(path, std::ios::binary);
  f.write(static_cast<const char*>(data), static_cast<std::streamsize>(bytes));
}

// A 16-byte aligned copy with room on both sides.
struct Buffer {
  std::vector<unsigned char> storage;
  size_t bytes = 0;
  unsigned char* data() { return storage.data() + 64; }
  static Buffer of(size_t bytes, unsigned char fill) {
    Buffer b;
    b.bytes = bytes;
    b.storage.assign(bytes + 128, 0xA5);
    memset(b.data(), fill, bytes);
    return b;
  }
  void expose() { ::emu::register_global(data(), bytes); }  // kernels may read it
  static Buffer from(const std::vector<unsigned char>& src) {
    Buffer b = of(src.size(), 0);
    if (!src.empty()) memcpy(b.data(), src.data(), src.size());
    return b;
  }
  bool guards_intact() const {
    for (size_t i = 0; i < 64; ++i) {
      if (storage[i] != 0xA5 || storage[64 + bytes + i] != 0xA5) return false;
    }
    return true;
  }
};

struct View {
  int64_t offset, row_stride, head_stride;
};

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) return 2;
  const std::string mode = argv[1], dir = std::string(argv[2]) + "/";
  std::ifstream meta(dir + "meta");
  int64_t nq, nk;
  int hq, hkv, d, dt;
  float scale;
  View q_v, k_v, v_v, o_v, do_v;
  meta >> nq >> nk >> hq >> hkv >> d >> dt >> scale;
  for (View* v : {&q_v, &k_v, &v_v, &o_v, &do_v}) meta >> v->offset >> v->row_stride >> v->head_stride;
  if (!meta) return 2;
  int num_intervals = 1;
  float softcap = 0.0f;
  if (!(meta >> num_intervals >> softcap)) num_intervals = 1, softcap = 0.0f;
  const tk::DType dtype = dt == 1 ? tk::DType::kFloat16 : tk::DType::kBFloat16;
  const uint8_t nan_byte = 0xFF;  // 0xFFFF: NaN in fp16, bf16 and fp32

  Buffer q = Buffer::from(read_file(dir + "q.bin")), k = Buffer::from(read_file(dir + "k.bin"));
  Buffer v = Buffer::from(read_file(dir + "v.bin"));
  Buffer kvs = Buffer::from(read_file(dir + "kv_start.bin")), kve = Buffer::from(read_file(dir + "kv_end.bin"));
  Buffer qt = Buffer::from(read_file(dir + "q_tiles.bin"));
  // DIR/q_order.bin (optional): the query tile of each forward / dq block
  std::ifstream has_q_order(dir + "q_order.bin");
  Buffer q_order = has_q_order ? Buffer::from(read_file(dir + "q_order.bin")) : Buffer::of(0, 0);
  for (Buffer* b : {&q, &k, &v, &kvs, &kve, &qt, &q_order}) b->expose();
  const int32_t* q_order_ptr = q_order.bytes ? reinterpret_cast<const int32_t*>(q_order.data()) : nullptr;
  auto at = [](Buffer& b, const View& view) { return b.data() + 2 * view.offset; };

  cudaError_t err;
  if (mode == "fwd_mma" || mode == "fwd_sm90") {
    Buffer out = Buffer::of(static_cast<size_t>(nq) * hq * d * 2, nan_byte);
    Buffer lse = Buffer::of(static_cast<size_t>(nq) * hq * 4, nan_byte);
    tk::AttentionFwdArgs a{};
    a.out = out.data();
    a.lse = reinterpret_cast<float*>(lse.data());
    a.q = at(q, q_v);
    a.k = at(k, k_v);
    a.v = at(v, v_v);
    a.kv_start = reinterpret_cast<const int32_t*>(kvs.data());
    a.kv_end = reinterpret_cast<const int32_t*>(kve.data());
    a.q_tiles = reinterpret_cast<const int32_t*>(qt.data());
    a.q_order = q_order_ptr;
    a.nq = nq, a.nk = nk, a.hq = hq, a.hkv = hkv;
    a.q_row_stride = q_v.row_stride, a.q_head_stride = q_v.head_stride;
    a.k_row_stride = k_v.row_stride, a.k_head_stride = k_v.head_stride;
    a.v_row_stride = v_v.row_stride, a.v_head_stride = v_v.head_stride;
    a.scale = scale;
    a.num_intervals = num_intervals, a.softcap = softcap;
    if (mode == "fwd_sm90" && scale < 0.0f) {  // as cuda.forward calls it: -q and -scale
      for (size_t i = 1; i < q.bytes; i += 2) q.data()[i] ^= 0x80;  // fp16/bf16 sign bits (little-endian)
      a.scale = -scale;
    }
    err = mode == "fwd_mma" ? tk::attention_fwd(a, dtype, d, nullptr) : tk::attention_fwd_sm90(a, dtype, d, nullptr);
    write_file(dir + "out_out.bin", out.data(), out.bytes);
    write_file(dir + "lse_out.bin", lse.data(), lse.bytes);
    if (!out.guards_intact() || !lse.guards_intact()) {
      std::fprintf(stderr, "write outside an output buffer\n");
      return 3;
    }
  } else if (mode == "bwd" || mode == "bwd_sm90") {
    Buffer out = Buffer::from(read_file(dir + "out.bin")), dout = Buffer::from(read_file(dir + "dout.bin"));
    Buffer lse = Buffer::from(read_file(dir + "lse.bin")), kt = Buffer::from(read_file(dir + "k_tiles.bin"));
    Buffer dq = Buffer::of(static_cast<size_t>(nq) * hq * d * 2, nan_byte);
    Buffer dk = Buffer::of(static_cast<size_t>(nk) * hkv * d * 2, nan_byte);
    Buffer dv = Buffer::of(static_cast<size_t>(nk) * hkv * d * 2, nan_byte);
    Buffer scratch = Buffer::of(static_cast<size_t>(nq) * hq * 8, nan_byte);
    // bwd_sm90's workspace: the fp32 dQ accumulator and the semaphores, NaN-filled (it zeroes them)
    Buffer dq_accum = Buffer::of(static_cast<size_t>(nq) * hq * d * 4, nan_byte);
    Buffer dq_sem = Buffer::of(static_cast<size_t>(hq) * ((nq + 63) / 64) * 4, nan_byte);
    // DIR/k_order.bin (optional): the key tile of each dk/dv block
    std::ifstream has_order(dir + "k_order.bin");
    Buffer k_order = has_order ? Buffer::from(read_file(dir + "k_order.bin")) : Buffer::of(0, 0);
    for (Buffer* b : {&out, &dout, &lse, &kt, &scratch, &dq_accum, &dq_sem, &k_order}) b->expose();
    tk::AttentionBwdArgs a{};
    a.dq = dq.data(), a.dk = dk.data(), a.dv = dv.data();
    a.delta = reinterpret_cast<float*>(scratch.data());
    a.lse2 = a.delta + static_cast<int64_t>(hq) * nq;
    a.dout = at(dout, do_v);
    a.q = at(q, q_v);
    a.k = at(k, k_v);
    a.v = at(v, v_v);
    a.out = at(out, o_v);
    a.lse = reinterpret_cast<const float*>(lse.data());
    a.kv_start = reinterpret_cast<const int32_t*>(kvs.data());
    a.kv_end = reinterpret_cast<const int32_t*>(kve.data());
    a.q_tiles = reinterpret_cast<const int32_t*>(qt.data());
    a.k_tiles = reinterpret_cast<const int32_t*>(kt.data());
    a.q_order = q_order_ptr;
    a.nq = nq, a.nk = nk, a.hq = hq, a.hkv = hkv;
    a.q_row_stride = q_v.row_stride, a.q_head_stride = q_v.head_stride;
    a.k_row_stride = k_v.row_stride, a.k_head_stride = k_v.head_stride;
    a.v_row_stride = v_v.row_stride, a.v_head_stride = v_v.head_stride;
    a.o_row_stride = o_v.row_stride, a.o_head_stride = o_v.head_stride;
    a.do_row_stride = do_v.row_stride, a.do_head_stride = do_v.head_stride;
    a.scale = scale;
    a.num_intervals = num_intervals, a.softcap = softcap;
    if (mode == "bwd_sm90") {  // without the workspace, attention_bwd runs the mma.sync kernels
      a.dq_accum = reinterpret_cast<float*>(dq_accum.data());
      a.dq_semaphore = reinterpret_cast<int32_t*>(dq_sem.data());
    }
    if (k_order.bytes) a.k_order = reinterpret_cast<const int32_t*>(k_order.data());
    err = mode == "bwd" ? tk::attention_bwd(a, dtype, d, nullptr) : tk::attention_bwd_sm90(a, dtype, d, nullptr);
    write_file(dir + "dq_out.bin", dq.data(), dq.bytes);
    write_file(dir + "dk_out.bin", dk.data(), dk.bytes);
    write_file(dir + "dv_out.bin", dv.data(), dv.bytes);
    for (Buffer* b : {&dq, &dk, &dv, &scratch, &dq_accum, &dq_sem}) {
      if (!b->guards_intact()) {
        std::fprintf(stderr, "write outside an output buffer\n");
        return 3;
      }
    }
  } else {
    return 2;
  }
  if (err != cudaSuccess) {
    std::fprintf(stderr, "launcher returned error %d\n", static_cast<int>(err));
    return 4;
  }
  return 0;
}
