// The CUDA kernels' entry points: plain C++ with no torch headers (the glue passes device
// addresses), so every file under csrc/cuda/ compiles with nvcc alone and CI checks them on a
// machine without a GPU.
#ifndef SHARDGROK_CUDA_LAUNCH_H
#define SHARDGROK_CUDA_LAUNCH_H

#include <stdint.h>

#if defined(SG_CUDA_EMULATED)
#include "emulated.h"  // the emulated target: the device code on the host (emulated.h says how)
#else
#include <cuda_runtime.h>
// The three places where the kernels need CUDA syntax the host compiler lacks, so that the
// emulated target compiles the same kernels.cu: a launch, a static and a dynamic shared array.
#define SG_LAUNCH(kernel, grid, block, shared, stream) kernel<<<grid, block, shared, stream>>>
#define SG_SHARED(T, name, dims) __shared__ T name dims
#define SG_DYNAMIC_SHARED(T, name) extern __shared__ T name[]
#endif

#include "../grok_math.h"
#include "../job.h"

namespace sg {
namespace cuda {

// SuperGrok's default meta-net as the kernels read it: level order, float2 pieces (grok_math.h).
typedef LevelTable<float2> DeviceTable;

// Everything a launch reads, all addresses in device memory. The segment table is rebuilt by
// the host every step (the gradients' addresses change) and copied asynchronously; the chunk
// table and the per-tensor chunk index are built once per plan.
struct DeviceJob {
  int32_t kind;                  // GROKADAMW or SUPERGROK
  const Segment* segments;
  const Chunk* chunks;
  int64_t n_chunks;
  const int64_t* tensor_offsets;  // [n_tensors + 1]: tensor t's chunks are
  const int32_t* tensor_chunks;   // tensor_chunks[tensor_offsets[t]:tensor_offsets[t + 1]]
  int64_t n_tensors;
  double* partials;               // phase 1 scratch: [n_chunks, N_STATS]
  double* stats;                  // phase 1 output: [n_tensors, n_stats] (the reduction buffer)
  int32_t n_stats;                // 1 (GrokAdamW) or N_STATS (SuperGrok)
  const double* scalars;          // phase 2 input: [n_tensors, N_COLUMNS]
  DeviceTable table;              // in device memory
  int32_t has_table;
  int32_t has_q8;                 // some segment has 8-bit state: phase 2's second launch
};

// Phase 1: per-chunk partial sums, then per-tensor sums into job.stats (two launches, no atomics).
// Each launch's error is read right after it; on an error *failed names the launch.
cudaError_t phase1(const DeviceJob& job, cudaStream_t stream, const char** failed);
// Phase 2: the update in place, one launch over every chunk (and a second for the chunks with
// 8-bit state, when job.has_q8).
cudaError_t phase2(const DeviceJob& job, cudaStream_t stream, const char** failed);

// The largest table kept in shared memory (12 bytes an entry: a breakpoint and a piece, 24 KiB
// at most, beside phase 1's 12 KiB reduction array within the 48 KiB a block may have without
// opting in); larger ones are read from global memory (through the cache).
constexpr int32_t SHARED_TABLE_MAX = 2048;

}  // namespace cuda
}  // namespace sg

#endif  // SHARDGROK_CUDA_LAUNCH_H
