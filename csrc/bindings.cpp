// Python bindings of the CUDA kernels: transfusion_kernels._C.
//
// The module is torch-independent: tensors arrive as raw device pointers (tensor.data_ptr()),
// the stream as an integer (torch.cuda.current_stream().cuda_stream), sizes as integers. The
// Python wrappers (transfusion_kernels/*/cuda.py) check shapes, dtypes and devices and allocate
// the outputs. Importing the module does not touch the CUDA driver, so it imports on machines
// without a GPU; device_count() / cuda_status() say whether kernels can run.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cuda_runtime_api.h>

#include <cmath>
#include <initializer_list>
#include <optional>
#include <tuple>
#include <stdexcept>
#include <string>

#include "attention/attention.h"
#include "diffusion/affine_step.h"
#include "timestep/timestep.h"

namespace py = pybind11;

#ifndef TK_CUDA_ARCHS
#define TK_CUDA_ARCHS ""
#endif
#ifndef TK_NVCC_VERSION
#define TK_NVCC_VERSION ""
#endif
#ifndef TK_HOST_COMPILER
#define TK_HOST_COMPILER ""
#endif
#ifndef TK_BUILD_TYPE
#define TK_BUILD_TYPE ""
#endif
#ifndef TK_SOURCE_HASH
#define TK_SOURCE_HASH ""
#endif

namespace {

void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string(what) + " failed: " + cudaGetErrorName(err) + ": " + cudaGetErrorString(err));
  }
}

tk::DType parse_dtype(const std::string& name) {
  if (name == "float32") return tk::DType::kFloat32;
  if (name == "float16") return tk::DType::kFloat16;
  if (name == "bfloat16") return tk::DType::kBFloat16;
  throw std::invalid_argument("dtype must be 'float32', 'float16' or 'bfloat16', got '" + name + "'");
}

template <typename T>
T* as_ptr(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

py::list split_archs(const std::string& s) {
  py::list out;
  size_t start = 0;
  while (start < s.size()) {
    size_t end = s.find(',', start);
    if (end == std::string::npos) end = s.size();
    if (end > start) out.append("sm_" + s.substr(start, end - start));
    start = end + 1;
  }
  return out;
}

void diffusion_affine_step(uintptr_t out, uintptr_t sample, uintptr_t model_output, uintptr_t coef,
                           uintptr_t noise, uintptr_t noise_out, int64_t numel, int64_t rows,
                           const std::string& dtype, uint64_t seed, bool draw_noise,
                           std::optional<double> clip_range, uintptr_t stream, bool velocity) {
  if (out == 0 || sample == 0 || coef == 0) {
    if (numel != 0) throw std::invalid_argument("out, sample and coef must be non-null device pointers");
  }
  if (numel < 0) throw std::invalid_argument("numel must be >= 0");
  if (numel > 0 && (rows <= 0 || numel % rows != 0)) {
    throw std::invalid_argument("rows must be positive and divide numel (got numel=" + std::to_string(numel) +
                                ", rows=" + std::to_string(rows) + ")");
  }
  if (draw_noise && noise != 0) throw std::invalid_argument("pass either noise or draw_noise=True, not both");
  if (!draw_noise && !velocity && noise_out != 0) {
    throw std::invalid_argument("noise_out is only written when draw_noise=True or velocity=True");
  }
  if (velocity && noise_out == 0 && numel != 0) {
    throw std::invalid_argument("velocity=True writes noise - sample to noise_out: pass a non-null noise_out");
  }
  if (clip_range && !(*clip_range >= 0.0)) throw std::invalid_argument("clip_range must be >= 0");
  const tk::DType dt = parse_dtype(dtype);
  if (numel == 0) return;

  tk::AffineStepArgs args{};
  args.out = as_ptr<void>(out);
  args.sample = as_ptr<const void>(sample);
  args.model_output = as_ptr<const void>(model_output);
  args.coef = as_ptr<const float>(coef);
  args.noise = as_ptr<const void>(noise);
  args.noise_out = as_ptr<void>(noise_out);
  args.numel = numel;
  args.row_len = numel / rows;
  args.seed = seed;
  args.draw_noise = draw_noise;
  args.clip = clip_range.has_value();
  args.clip_range = clip_range ? static_cast<float>(*clip_range) : 0.0f;
  args.velocity = velocity;
  cudaError_t err;
  {
    py::gil_scoped_release release;
    err = tk::affine_step(args, dt, reinterpret_cast<cudaStream_t>(stream));
  }
  check_cuda(err, "diffusion_affine_step launch");
}

void require(bool ok, const std::string& what) {
  if (!ok) throw std::invalid_argument(what);
}

cudaStream_t as_stream(uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

void timestep_sinusoid(uintptr_t out, uintptr_t t, uintptr_t freq, int64_t num_images, int dim, bool flip_sin_to_cos,
                       double downscale_freq_shift, double scale, double max_period, uintptr_t stream) {
  require(num_images >= 0 && dim >= 0, "num_images and dim must be >= 0");
  if (num_images == 0 || dim == 0) return;
  require(out != 0 && t != 0 && (dim < 2 || freq != 0), "out, t and freq must be non-null device pointers");
  const tk::SinusoidParams p = tk::make_sinusoid_params(dim, flip_sin_to_cos, downscale_freq_shift, scale, max_period);
  cudaError_t err;
  {
    py::gil_scoped_release release;
    err = tk::timestep_sinusoid(as_ptr<float>(out), as_ptr<const float>(t), as_ptr<const float>(freq), num_images, p,
                                as_stream(stream));
  }
  check_cuda(err, "timestep_sinusoid launch");
}

void timestep_add_rows(uintptr_t y, uintptr_t x, uintptr_t emb, uintptr_t image_index, int64_t rows, int64_t dim,
                       const std::string& dtype, uintptr_t stream) {
  require(rows >= 0 && dim >= 0, "rows and dim must be >= 0");
  const tk::DType dt = parse_dtype(dtype);
  if (rows == 0 || dim == 0) return;
  require(y != 0 && x != 0 && image_index != 0, "y, x and image_index must be non-null device pointers");
  cudaError_t err;
  {
    py::gil_scoped_release release;
    err = tk::timestep_add_rows(as_ptr<void>(y), as_ptr<const void>(x), as_ptr<const float>(emb),
                                as_ptr<const int32_t>(image_index), rows, dim, dt, as_stream(stream));
  }
  check_cuda(err, "timestep_add_rows launch");
}

void timestep_segment_sum(uintptr_t demb, uintptr_t partial, uintptr_t dy, uintptr_t order, uintptr_t seg,
                          uintptr_t piece_offsets, int64_t num_images, int64_t dim, int64_t max_pieces,
                          int64_t piece_rows, const std::string& dtype, uintptr_t stream) {
  require(num_images >= 0 && dim >= 0 && max_pieces >= 0, "num_images, dim and max_pieces must be >= 0");
  require(piece_rows > 0, "piece_rows must be > 0");
  const tk::DType dt = parse_dtype(dtype);
  if (num_images == 0 || dim == 0) return;
  require(demb != 0 && seg != 0 && piece_offsets != 0, "demb, seg and piece_offsets must be non-null device pointers");
  require(max_pieces == 0 || (partial != 0 && dy != 0 && order != 0),
          "partial, dy and order must be non-null device pointers");
  tk::SegmentSumArgs a{};
  a.demb = as_ptr<float>(demb);
  a.partial = as_ptr<float>(partial);
  a.dy = as_ptr<const void>(dy);
  a.order = as_ptr<const int64_t>(order);
  a.seg = as_ptr<const int64_t>(seg);
  a.piece_offsets = as_ptr<const int64_t>(piece_offsets);
  a.num_images = num_images;
  a.dim = dim;
  a.max_pieces = max_pieces;
  a.piece_rows = piece_rows;
  cudaError_t err;
  {
    py::gil_scoped_release release;
    err = tk::timestep_segment_sum(a, dt, as_stream(stream));
  }
  check_cuda(err, "timestep_segment_sum launch");
}

using Strides = std::tuple<int64_t, int64_t>;  // (row, head) strides in elements

// Checks shared by the attention entry points; returns the element type.
tk::DType check_attention(int64_t nq, int64_t nk, int hq, int hkv, int head_dim, const std::string& dtype,
                          std::initializer_list<Strides> strides, int num_intervals, double softcap) {
  require(num_intervals == 1 || num_intervals == 2 || num_intervals == 4,
          "num_intervals must be 1, 2 or 4 (pad a mask of 3 intervals per query with an empty one)");
  require(std::isfinite(softcap) && softcap >= 0.0, "softcap must be finite and >= 0 (0: none)");
  require(nq >= 0 && nk >= 0, "nq and nk must be >= 0");
  require(hq > 0 && hkv > 0 && hq % hkv == 0, "hq must be a positive multiple of hkv");
  require(head_dim == 64 || head_dim == 128, "head_dim must be 64 or 128");
  const tk::DType dt = parse_dtype(dtype);
  require(dt != tk::DType::kFloat32, "dtype must be 'float16' or 'bfloat16'");
  for (const Strides& st : strides) {
    require(std::get<0>(st) % 8 == 0 && std::get<1>(st) % 8 == 0,
            "row and head strides must be multiples of 8 elements (16-byte copies)");
  }
  return dt;
}

void attention_fwd_impl(bool sm90, uintptr_t out, uintptr_t lse, uintptr_t q, uintptr_t k, uintptr_t v,
                        uintptr_t kv_start, uintptr_t kv_end, uintptr_t q_tiles, int64_t nq, int64_t nk, int hq,
                        int hkv, int head_dim, Strides q_strides, Strides k_strides, Strides v_strides, double scale,
                        const std::string& dtype, uintptr_t stream, uintptr_t q_order, int num_intervals,
                        double softcap) {
  const tk::DType dt =
      check_attention(nq, nk, hq, hkv, head_dim, dtype, {q_strides, k_strides, v_strides}, num_intervals, softcap);
  if (nq == 0) return;
  require(out != 0 && lse != 0 && q != 0 && kv_start != 0 && kv_end != 0 && q_tiles != 0,
          "out, lse, q, kv_start, kv_end and q_tiles must be non-null device pointers");
  require(nk == 0 || (k != 0 && v != 0), "k and v must be non-null device pointers");
  require(((q | k | v | out) & 15u) == 0, "q, k, v and out must be 16-byte aligned");
  tk::AttentionFwdArgs a{};
  a.out = as_ptr<void>(out);
  a.lse = as_ptr<float>(lse);
  a.q = as_ptr<const void>(q);
  a.k = as_ptr<const void>(k);
  a.v = as_ptr<const void>(v);
  a.kv_start = as_ptr<const int32_t>(kv_start);
  a.kv_end = as_ptr<const int32_t>(kv_end);
  a.q_tiles = as_ptr<const int32_t>(q_tiles);
  a.q_order = as_ptr<const int32_t>(q_order);  // 0: blockIdx order
  a.nq = nq;
  a.nk = nk;
  a.hq = hq;
  a.hkv = hkv;
  std::tie(a.q_row_stride, a.q_head_stride) = q_strides;
  std::tie(a.k_row_stride, a.k_head_stride) = k_strides;
  std::tie(a.v_row_stride, a.v_head_stride) = v_strides;
  a.scale = static_cast<float>(scale);
  a.num_intervals = num_intervals;
  a.softcap = static_cast<float>(softcap);
  cudaError_t err;
  {
    py::gil_scoped_release release;
    err = sm90 ? tk::attention_fwd_sm90(a, dt, head_dim, as_stream(stream))
               : tk::attention_fwd(a, dt, head_dim, as_stream(stream));
  }
  check_cuda(err, sm90 ? "attention_fwd_sm90 launch" : "attention_fwd launch");
}

void attention_fwd(uintptr_t out, uintptr_t lse, uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t kv_start,
                   uintptr_t kv_end, uintptr_t q_tiles, int64_t nq, int64_t nk, int hq, int hkv, int head_dim,
                   Strides q_strides, Strides k_strides, Strides v_strides, double scale, const std::string& dtype,
                   uintptr_t stream, uintptr_t q_order, int num_intervals, double softcap) {
  attention_fwd_impl(false, out, lse, q, k, v, kv_start, kv_end, q_tiles, nq, nk, hq, hkv, head_dim, q_strides,
                     k_strides, v_strides, scale, dtype, stream, q_order, num_intervals, softcap);
}

void attention_fwd_sm90(uintptr_t out, uintptr_t lse, uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t kv_start,
                        uintptr_t kv_end, uintptr_t q_tiles, int64_t nq, int64_t nk, int hq, int hkv, int head_dim,
                        Strides q_strides, Strides k_strides, Strides v_strides, double scale,
                        const std::string& dtype, uintptr_t stream, uintptr_t q_order, int num_intervals,
                        double softcap) {
  attention_fwd_impl(true, out, lse, q, k, v, kv_start, kv_end, q_tiles, nq, nk, hq, hkv, head_dim, q_strides,
                     k_strides, v_strides, scale, dtype, stream, q_order, num_intervals, softcap);
}

void attention_bwd(uintptr_t dq, uintptr_t dk, uintptr_t dv, uintptr_t scratch, uintptr_t dout, uintptr_t q,
                   uintptr_t k, uintptr_t v, uintptr_t out, uintptr_t lse, uintptr_t kv_start, uintptr_t kv_end,
                   uintptr_t q_tiles, uintptr_t k_tiles, int64_t nq, int64_t nk, int hq, int hkv, int head_dim,
                   Strides q_strides, Strides k_strides, Strides v_strides, Strides o_strides, Strides do_strides,
                   double scale, const std::string& dtype, uintptr_t stream, uintptr_t q_order, uintptr_t k_order,
                   uintptr_t dq_workspace, int num_intervals, double softcap) {
  const tk::DType dt = check_attention(nq, nk, hq, hkv, head_dim, dtype,
                                       {q_strides, k_strides, v_strides, o_strides, do_strides}, num_intervals, softcap);
  if (nk == 0 && nq == 0) return;
  require(nk == 0 || (dk != 0 && dv != 0 && k != 0 && v != 0 && k_tiles != 0),
          "dk, dv, k, v and k_tiles must be non-null device pointers");
  require(nq == 0 || (dq != 0 && scratch != 0 && dout != 0 && q != 0 && out != 0 && lse != 0 && kv_start != 0 &&
                      kv_end != 0 && q_tiles != 0),
          "dq, scratch, dout, q, out, lse, kv_start, kv_end and q_tiles must be non-null device pointers");
  require(((dq | dk | dv | dout | q | k | v | out) & 15u) == 0,
          "dq, dk, dv, dout, q, k, v and out must be 16-byte aligned");
  tk::AttentionBwdArgs a{};
  a.dq = as_ptr<void>(dq);
  a.dk = as_ptr<void>(dk);
  a.dv = as_ptr<void>(dv);
  a.delta = as_ptr<float>(scratch);
  a.lse2 = a.delta == nullptr ? nullptr : a.delta + static_cast<int64_t>(hq) * nq;
  a.dout = as_ptr<const void>(dout);
  a.q = as_ptr<const void>(q);
  a.k = as_ptr<const void>(k);
  a.v = as_ptr<const void>(v);
  a.out = as_ptr<const void>(out);
  a.lse = as_ptr<const float>(lse);
  a.kv_start = as_ptr<const int32_t>(kv_start);
  a.kv_end = as_ptr<const int32_t>(kv_end);
  a.q_tiles = as_ptr<const int32_t>(q_tiles);
  a.k_tiles = as_ptr<const int32_t>(k_tiles);
  a.q_order = as_ptr<const int32_t>(q_order);  // 0: blockIdx order
  a.k_order = as_ptr<const int32_t>(k_order);
  a.nq = nq;
  a.nk = nk;
  a.hq = hq;
  a.hkv = hkv;
  std::tie(a.q_row_stride, a.q_head_stride) = q_strides;
  std::tie(a.k_row_stride, a.k_head_stride) = k_strides;
  std::tie(a.v_row_stride, a.v_head_stride) = v_strides;
  std::tie(a.o_row_stride, a.o_head_stride) = o_strides;
  std::tie(a.do_row_stride, a.do_head_stride) = do_strides;
  a.scale = static_cast<float>(scale);
  a.num_intervals = num_intervals;
  a.softcap = static_cast<float>(softcap);
  if (dq_workspace != 0 && nq > 0) {  // fp32 dQ [nq, hq, D], then the int32 semaphores
    require((dq_workspace & 15u) == 0, "dq_workspace must be a 16-byte aligned device pointer");
    a.dq_accum = as_ptr<float>(dq_workspace);
    a.dq_semaphore = reinterpret_cast<int32_t*>(a.dq_accum + nq * hq * head_dim);
  }
  cudaError_t err;
  {
    py::gil_scoped_release release;
    err = tk::attention_bwd(a, dt, head_dim, as_stream(stream));
  }
  check_cuda(err, "attention_bwd launch");
}

bool attention_sm90_supported(int device) {
  py::gil_scoped_release release;
  return tk::attention_sm90_supported(device);
}

py::dict cuda_status() {
  py::dict d;
  int count = 0, driver = 0, runtime = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    count = 0;
    cudaGetLastError();  // clear it: the next call may succeed once a driver appears
  }
  if (cudaDriverGetVersion(&driver) != cudaSuccess) driver = 0;
  if (cudaRuntimeGetVersion(&runtime) != cudaSuccess) runtime = 0;
  d["device_count"] = count;
  d["error"] = err == cudaSuccess ? py::object(py::none())
                                  : py::object(py::str(std::string(cudaGetErrorName(err)) + ": " + cudaGetErrorString(err)));
  d["driver_version"] = driver;    // e.g. 13000 for CUDA 13.0; 0 when no driver is installed
  d["runtime_version"] = runtime;  // the CUDA runtime linked into this module
  return d;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "transfusion-kernels CUDA kernels (torch-independent; pointers and streams as integers)";

  m.def("build_info", [] {
    py::dict d;
    d["archs"] = split_archs(TK_CUDA_ARCHS);
    d["nvcc_version"] = TK_NVCC_VERSION;
    d["cuda_runtime_version"] = CUDART_VERSION;
    d["host_compiler"] = TK_HOST_COMPILER;
    d["build_type"] = TK_BUILD_TYPE;
    d["source_hash"] = TK_SOURCE_HASH;
    return d;
  }, "What this module was compiled for: SASS targets, nvcc version, CUDA runtime version, host compiler, "
     "build type, hash of the csrc/ sources it was built from.");

  m.def("cuda_status", &cuda_status,
        "Query the CUDA driver: dict(device_count, error, driver_version, runtime_version). Never raises.");
  m.def("device_count", [] { return cuda_status()["device_count"]; },
        "Number of CUDA devices the module's runtime sees (0 when there is no driver or device).");

  m.def("diffusion_affine_step", &diffusion_affine_step, py::arg("out"), py::arg("sample"), py::arg("model_output"),
        py::arg("coef"), py::arg("noise"), py::arg("noise_out"), py::arg("numel"), py::arg("rows"), py::arg("dtype"),
        py::arg("seed"), py::arg("draw_noise"), py::arg("clip_range"), py::arg("stream"), py::arg("velocity") = false,
        "Fused affine diffusion step on `stream` (see csrc/diffusion/affine_step.h). Pointers are device "
        "addresses (0 for an absent model_output / noise / noise_out); coef is fp32 [rows, 6]. velocity=True "
        "writes noise - sample to noise_out (given or drawn noise).");

  m.def("timestep_sinusoid", &timestep_sinusoid, py::arg("out"), py::arg("t"), py::arg("freq"),
        py::arg("num_images"), py::arg("dim"), py::arg("flip_sin_to_cos"), py::arg("downscale_freq_shift"),
        py::arg("scale"), py::arg("max_period"), py::arg("stream"),
        "fp32 out[M, dim] = sinusoidal embedding of fp32 t[M], frequencies from fp32 freq[dim // 2].");
  m.def("timestep_add_rows", &timestep_add_rows, py::arg("y"), py::arg("x"), py::arg("emb"), py::arg("image_index"),
        py::arg("rows"), py::arg("dim"), py::arg("dtype"), py::arg("stream"),
        "y[p] = x[p] + emb[image_index[p]] (x, y [rows, dim] of dtype; emb fp32 [M, dim]; int32 index, -1 = none).");
  m.def("timestep_segment_sum", &timestep_segment_sum, py::arg("demb"), py::arg("partial"), py::arg("dy"),
        py::arg("order"), py::arg("seg"), py::arg("piece_offsets"), py::arg("num_images"), py::arg("dim"),
        py::arg("max_pieces"), py::arg("piece_rows"), py::arg("dtype"), py::arg("stream"),
        "Deterministic per-image row sums of dy (see csrc/timestep/timestep.h).");

  m.attr("ATTENTION_BLOCK_M") = tk::kAttentionBlockM;
  m.attr("ATTENTION_BLOCK_N") = tk::kAttentionBlockN;
  m.attr("ATTENTION_SM90_BLOCK_M") = tk::kAttentionSm90BlockM;
  m.attr("ATTENTION_BWD_BLOCK_M") = tk::kAttentionBwdBlockM;
  m.attr("ATTENTION_BWD_BLOCK_N") = tk::kAttentionBwdBlockN;
  m.def("attention_fwd", &attention_fwd, py::arg("out"), py::arg("lse"), py::arg("q"), py::arg("k"), py::arg("v"),
        py::arg("kv_start"), py::arg("kv_end"), py::arg("q_tiles"), py::arg("nq"), py::arg("nk"), py::arg("hq"),
        py::arg("hkv"), py::arg("head_dim"), py::arg("q_strides"), py::arg("k_strides"), py::arg("v_strides"),
        py::arg("scale"), py::arg("dtype"), py::arg("stream"), py::arg("q_order") = 0, py::arg("num_intervals") = 1,
        py::arg("softcap") = 0.0,
        "Interval-mask attention forward on mma.sync (sm_80+; fp16/bf16, head_dim 64/128): out [nq, hq, D] "
        "contiguous, lse [hq, nq] fp32; kv_start, kv_end int32 [nq, num_intervals] (1, 2 or 4 sorted, "
        "disjoint intervals per query, unused ones empty); q_tiles = plan.query_runs(mask, ATTENTION_BLOCK_M) "
        "[tiles, num_intervals, 4]; strides as (row, head) in elements; q_order: int32 [tiles], the query tile "
        "of each block (plan.heaviest_first(q_tiles)), 0 for blockIdx order; softcap: scores s -> softcap * "
        "tanh(s / softcap), 0 for none.");
  m.def("attention_fwd_sm90", &attention_fwd_sm90, py::arg("out"), py::arg("lse"), py::arg("q"), py::arg("k"),
        py::arg("v"), py::arg("kv_start"), py::arg("kv_end"), py::arg("q_tiles"), py::arg("nq"), py::arg("nk"),
        py::arg("hq"), py::arg("hkv"), py::arg("head_dim"), py::arg("q_strides"), py::arg("k_strides"),
        py::arg("v_strides"), py::arg("scale"), py::arg("dtype"), py::arg("stream"), py::arg("q_order") = 0,
        py::arg("num_intervals") = 1, py::arg("softcap") = 0.0,
        "The same forward on wgmma with TMA loads (compute capability 9.0 and an sm_90a build only: see "
        "attention_sm90_supported); q_tiles = plan.query_runs(mask, ATTENTION_SM90_BLOCK_M), q_order its "
        "tile order.");
  m.def("attention_sm90_supported", &attention_sm90_supported, py::arg("device"),
        "Whether attention_fwd_sm90 can run on this CUDA device (compute capability 9.0, sm_90a code in this "
        "build).");
  m.def("attention_bwd", &attention_bwd, py::arg("dq"), py::arg("dk"), py::arg("dv"), py::arg("scratch"),
        py::arg("dout"), py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("lse"),
        py::arg("kv_start"), py::arg("kv_end"), py::arg("q_tiles"), py::arg("k_tiles"), py::arg("nq"),
        py::arg("nk"), py::arg("hq"), py::arg("hkv"), py::arg("head_dim"), py::arg("q_strides"),
        py::arg("k_strides"), py::arg("v_strides"), py::arg("o_strides"), py::arg("do_strides"), py::arg("scale"),
        py::arg("dtype"), py::arg("stream"), py::arg("q_order") = 0, py::arg("k_order") = 0,
        py::arg("dq_workspace") = 0, py::arg("num_intervals") = 1, py::arg("softcap") = 0.0,
        "Interval-mask attention backward on mma.sync (fp16/bf16, head_dim 64/128): dq [nq, hq, D], dk, dv "
        "[nk, hkv, D] contiguous (dk, dv summed over each kv head's query heads); scratch fp32 [2, hq, nq]; "
        "lse fp32 [hq, nq] contiguous; q_tiles = plan.query_runs(mask, ATTENTION_BWD_BLOCK_M), k_tiles = "
        "plan.key_tiles(mask, ATTENTION_BWD_BLOCK_N); num_intervals, softcap as attention_fwd; q_order / k_order: int32 tile orders of q_tiles (dq "
        "blocks) and k_tiles (dk/dv blocks), 0 for blockIdx order."
        " dq_workspace: 0, or fp32 [nq * hq * head_dim + hq * ceil(nq / ATTENTION_BWD_BLOCK_M)] on the "
        "device: then devices that run the sm_90a code take the wgmma backward (attention_bwd_sm90).");
}
