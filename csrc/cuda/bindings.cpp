// Python glue of the CUDA kernel: pybind11 and the CUDA runtime only, no torch. The tables and
// buffers are torch tensors on the Python side (shardgrok/kernels/cuda.py), which passes their
// device addresses and the current stream here; so this file, like the kernels, builds with
// nvcc and pybind11 alone, and CI links and imports it on a machine without a GPU. Built with
// SG_CUDA_EMULATED, it is the glue of the emulated target (cuda/emulated.h) unchanged.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "launch.h"
#include "order.h"

namespace py = pybind11;

namespace {

template <class T>
T* address(uint64_t a) {
  return reinterpret_cast<T*>(static_cast<uintptr_t>(a));
}

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("shardgrok CUDA ") + what + ": " + cudaGetErrorName(err) +
                             ": " + cudaGetErrorString(err));
}

sg::cuda::DeviceJob job_of(int64_t kind, uint64_t segments, uint64_t chunks, int64_t n_chunks,
                           uint64_t tensor_offsets, uint64_t tensor_chunks, int64_t n_tensors,
                           uint64_t nodes, uint64_t pieces, int64_t table_size) {
  // the checks the CPU plan makes (csrc/plan.cpp); the arrays' lengths are checked by the
  // Python glue, which has them as tensors
  if (kind != sg::GROKADAMW && kind != sg::SUPERGROK)
    throw std::invalid_argument("kind must be GROKADAMW (0) or SUPERGROK (1), got " + std::to_string(kind));
  if (n_chunks < 0 || n_tensors < 0) throw std::invalid_argument("negative chunk or tensor count");
  if (n_chunks > INT32_MAX || n_tensors > INT32_MAX)
    throw std::invalid_argument("more chunks or tensors than one launch's grid holds");
  sg::cuda::DeviceJob job{};
  job.kind = (int32_t)kind;
  job.segments = address<const sg::Segment>(segments);
  job.chunks = address<const sg::Chunk>(chunks);
  job.n_chunks = n_chunks;
  job.tensor_offsets = address<const int64_t>(tensor_offsets);
  job.tensor_chunks = address<const int32_t>(tensor_chunks);
  job.n_tensors = n_tensors;
  if (segments == 0 && n_chunks > 0) throw std::invalid_argument("no segment table");
  if (chunks == 0 && n_chunks > 0) throw std::invalid_argument("no chunk table");
  job.has_table = nodes != 0;
  if (job.has_table && kind != sg::SUPERGROK)
    throw std::invalid_argument("a meta-net table is SuperGrok's only");
  if (job.has_table && pieces == 0)
    throw std::invalid_argument("table: level-order breakpoints given without the pieces");
  if (job.has_table) {
    if (table_size < 1 || (table_size & (table_size - 1)) != 0)
      throw std::invalid_argument("table size must be a power of two, got " + std::to_string(table_size));
    if (table_size > INT32_MAX)
      throw std::invalid_argument("table size " + std::to_string(table_size) + " exceeds int32");
    if (pieces % alignof(float2) != 0)  // the kernel reads a piece in one 8-byte load
      throw std::invalid_argument("table: the pieces must be 8-byte aligned");
    job.table = {address<const float>(nodes), address<const float2>(pieces), (int32_t)table_size};
  }
  return job;
}

void phase1(int64_t kind, uint64_t segments, uint64_t chunks, int64_t n_chunks,
            uint64_t tensor_offsets, uint64_t tensor_chunks, int64_t n_tensors, uint64_t partials,
            uint64_t stats, uint64_t nodes, uint64_t pieces, int64_t table_size,
            uint64_t stream) {
  sg::cuda::DeviceJob job = job_of(kind, segments, chunks, n_chunks, tensor_offsets,
                                   tensor_chunks, n_tensors, nodes, pieces, table_size);
  job.partials = address<double>(partials);
  job.stats = address<double>(stats);
  job.n_stats = kind == sg::SUPERGROK ? sg::N_STATS : 1;
  if (n_tensors > 0 && (tensor_offsets == 0 || stats == 0))
    throw std::invalid_argument("phase 1 needs the per-tensor chunk offsets and the stats buffer");
  if (n_chunks > 0 && (partials == 0 || tensor_chunks == 0))
    throw std::invalid_argument("phase 1 needs its partials and the per-tensor chunk index");
  const char* failed = "";
  const cudaError_t err = sg::cuda::phase1(job, address<CUstream_st>(stream), &failed);
  check(err, failed);  // after the call: it names the launch that failed
}

void phase2(int64_t kind, uint64_t segments, uint64_t chunks, int64_t n_chunks, int64_t n_tensors,
            uint64_t scalars, uint64_t nodes, uint64_t pieces, int64_t table_size,
            uint64_t stream, bool has_q8) {
  sg::cuda::DeviceJob job = job_of(kind, segments, chunks, n_chunks, 0, 0, n_tensors, nodes,
                                   pieces, table_size);
  job.scalars = address<const double>(scalars);
  job.has_q8 = has_q8 ? 1 : 0;
  if (n_chunks > 0 && scalars == 0) throw std::invalid_argument("phase 2 needs the scalar table");
  const char* failed = "";
  const cudaError_t err = sg::cuda::phase2(job, address<CUstream_st>(stream), &failed);
  check(err, failed);  // after the call: it names the launch that failed
}

// A step's segment records, checked on the host before they are copied to the device: what the
// kernels would otherwise read through a null or misread record. ``has_table``: SuperGrok's h
// comes from the table, so a segment needs none. Raises naming the first bad record; returns
// whether a segment that steps has 8-bit state (phase 2's second launch).
bool check_segments(uint64_t host, int64_t n_segments, int64_t kind, bool has_table,
                    int64_t n_tensors) {
  if (n_segments < 0) throw std::invalid_argument("negative segment count");
  if (n_segments > 0 && host == 0) throw std::invalid_argument("no segment table");
  const sg::Segment* segs = address<const sg::Segment>(host);
  bool q8 = false;
  for (int64_t i = 0; i < n_segments; ++i) {
    const sg::Segment& s = segs[i];
    const std::string where = "segment " + std::to_string(i) + ": ";
    for (int32_t code : {s.param_dtype, s.grad_dtype})
      if (code != sg::F32 && code != sg::BF16 && code != sg::F16)
        throw std::invalid_argument(where + "unknown dtype code " + std::to_string(code) +
                                    " (0: float32, 1: bfloat16, 2: float16)");
    if (s.state_dtype != sg::F32 && s.state_dtype != sg::BF16 && s.state_dtype != sg::F16 &&
        s.state_dtype != sg::Q8)
      throw std::invalid_argument(where + "unknown dtype code " + std::to_string(s.state_dtype) +
                                  " (0: float32, 1: bfloat16, 2: float16, 3: 8-bit state)");
    if (s.numel < 0) throw std::invalid_argument(where + "negative length");
    if (s.offset < 0) throw std::invalid_argument(where + "negative start in its tensor");
    if (s.tensor < 0 || s.tensor >= n_tensors)
      throw std::invalid_argument(where + "tensor index " + std::to_string(s.tensor) +
                                  " outside [0, " + std::to_string(n_tensors) + ")");
    if (s.grad == nullptr || s.numel == 0) continue;  // skipped by the kernels
    q8 = q8 || s.state_dtype == sg::Q8;
    if (s.param == nullptr || s.exp_avg == nullptr || s.exp_avg_sq == nullptr || s.mu == nullptr)
      throw std::invalid_argument(where + "a parameter or state address is null");
    if (s.state_dtype == sg::Q8 &&
        (s.exp_avg_scale == nullptr || s.exp_avg_sq_scale == nullptr || s.mu_scale == nullptr))
      throw std::invalid_argument(where + "8-bit state without its scales");
    if (kind == sg::SUPERGROK && !has_table && s.h == nullptr)
      throw std::invalid_argument(where + "SuperGrok needs either the meta-net's table or the "
                                  "masked gradient h, and it has neither");
  }
  return q8;
}

// The chunk table against the segments' lengths, once per plan.
void check_chunks(uint64_t host_chunks, int64_t n_chunks, uint64_t host_segments,
                  int64_t n_segments) {
  const sg::Chunk* chunks = address<const sg::Chunk>(host_chunks);
  const sg::Segment* segs = address<const sg::Segment>(host_segments);
  for (int64_t c = 0; c < n_chunks; ++c) {
    const sg::Chunk& k = chunks[c];
    if (k.segment < 0 || k.segment >= n_segments || k.begin < 0 || k.size < 1 ||
        k.size > sg::CHUNK || k.begin + k.size > segs[k.segment].numel)
      throw std::invalid_argument("chunk " + std::to_string(c) + " lies outside its segment");
  }
}

int device_count() {
  int n = 0;
  const cudaError_t err = cudaGetDeviceCount(&n);
  if (err != cudaSuccess) {
    (void)cudaGetLastError();  // no driver or no device: not sticky, report none
    return 0;
  }
  return n;
}

int runtime_version() {
  int v = 0;
  check(cudaRuntimeGetVersion(&v), "runtime version");
  return v;
}

}  // namespace

#ifndef TORCH_EXTENSION_NAME  // set by torch.utils.cpp_extension; CI's nvcc check links it as
#define TORCH_EXTENSION_NAME shardgrok_cuda_check
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "shardgrok's fused CUDA step (csrc/cuda/): launches over device addresses";
  m.def("phase1", &phase1, py::arg("kind"), py::arg("segments"), py::arg("chunks"),
        py::arg("n_chunks"), py::arg("tensor_offsets"), py::arg("tensor_chunks"),
        py::arg("n_tensors"), py::arg("partials"), py::arg("stats"), py::arg("nodes") = 0,
        py::arg("pieces") = 0, py::arg("table_size") = 0, py::arg("stream") = 0);
  m.def("phase2", &phase2, py::arg("kind"), py::arg("segments"), py::arg("chunks"),
        py::arg("n_chunks"), py::arg("n_tensors"), py::arg("scalars"), py::arg("nodes") = 0,
        py::arg("pieces") = 0, py::arg("table_size") = 0, py::arg("stream") = 0,
        py::arg("has_q8") = false);
  m.def("check_segments", &check_segments, py::arg("segments"), py::arg("n_segments"),
        py::arg("kind"), py::arg("has_table"), py::arg("n_tensors"));
  m.def("check_chunks", &check_chunks, py::arg("chunks"), py::arg("n_chunks"),
        py::arg("segments"), py::arg("n_segments"));
  m.def("device_count", &device_count, "CUDA devices the runtime sees (0 without a driver)");
  m.def("runtime_version", &runtime_version);
#ifdef SHARDGROK_DIGEST
#define SG_STRINGIFY2(x) #x
#define SG_STRINGIFY(x) SG_STRINGIFY2(x)
  m.attr("digest") = SG_STRINGIFY(SHARDGROK_DIGEST);
#else
  m.attr("digest") = "";
#endif
  m.attr("THREADS") = sg::cuda::THREADS;
  m.attr("GROUP") = sg::cuda::GROUP;
  m.attr("CHUNK") = sg::CHUNK;
  m.attr("SEGMENT_BYTES") = (int)sizeof(sg::Segment);
  m.attr("CHUNK_BYTES") = (int)sizeof(sg::Chunk);
  m.attr("SHARED_TABLE_MAX") = sg::cuda::SHARED_TABLE_MAX;
#if defined(SG_CUDA_EMULATED)
  m.attr("EMULATED") = true;
#else
  m.attr("EMULATED") = false;
#endif
}
