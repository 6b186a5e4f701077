// Python glue of the CUDA kernel: pybind11 and the CUDA runtime only, no torch. The tables and
// buffers are torch tensors on the Python side (shardgrok/kernels/cuda.py), which passes their
// device addresses and the current stream here; so this file, like the kernels, builds with
// nvcc and pybind11 alone, and CI links and imports it on a machine without a GPU.
#include <pybind11/pybind11.h>

#include <cuda_runtime.h>

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
                           uint64_t breakpoints, uint64_t slopes, uint64_t intercepts,
                           int64_t table_size) {
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
  job.has_table = breakpoints != 0;
  if (job.has_table) {
    if (table_size < 1 || (table_size & (table_size - 1)) != 0)
      throw std::invalid_argument("table size must be a power of two, got " + std::to_string(table_size));
    job.table = {address<const float>(breakpoints), address<const float>(slopes),
                 address<const float>(intercepts), (int32_t)table_size};
  }
  return job;
}

void phase1(int64_t kind, uint64_t segments, uint64_t chunks, int64_t n_chunks,
            uint64_t tensor_offsets, uint64_t tensor_chunks, int64_t n_tensors, uint64_t partials,
            uint64_t stats, uint64_t breakpoints, uint64_t slopes, uint64_t intercepts,
            int64_t table_size, uint64_t stream) {
  sg::cuda::DeviceJob job = job_of(kind, segments, chunks, n_chunks, tensor_offsets,
                                   tensor_chunks, n_tensors, breakpoints, slopes, intercepts,
                                   table_size);
  job.partials = address<double>(partials);
  job.stats = address<double>(stats);
  job.n_stats = kind == sg::SUPERGROK ? sg::N_STATS : 1;
  check(sg::cuda::phase1(job, address<CUstream_st>(stream)), "phase 1 launch");
}

void phase2(int64_t kind, uint64_t segments, uint64_t chunks, int64_t n_chunks, int64_t n_tensors,
            uint64_t scalars, uint64_t breakpoints, uint64_t slopes, uint64_t intercepts,
            int64_t table_size, uint64_t stream) {
  sg::cuda::DeviceJob job = job_of(kind, segments, chunks, n_chunks, 0, 0, n_tensors, breakpoints,
                                   slopes, intercepts, table_size);
  job.scalars = address<const double>(scalars);
  check(sg::cuda::phase2(job, address<CUstream_st>(stream)), "phase 2 launch");
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
        py::arg("n_tensors"), py::arg("partials"), py::arg("stats"), py::arg("breakpoints") = 0,
        py::arg("slopes") = 0, py::arg("intercepts") = 0, py::arg("table_size") = 0,
        py::arg("stream") = 0);
  m.def("phase2", &phase2, py::arg("kind"), py::arg("segments"), py::arg("chunks"),
        py::arg("n_chunks"), py::arg("n_tensors"), py::arg("scalars"), py::arg("breakpoints") = 0,
        py::arg("slopes") = 0, py::arg("intercepts") = 0, py::arg("table_size") = 0,
        py::arg("stream") = 0);
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
}
