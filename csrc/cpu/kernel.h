// The CPU kernel's work description: plain C++ (no torch), so the instruction-set translation
// units build without torch's headers under their own target options.
#ifndef SHARDGROK_CPU_KERNEL_H
#define SHARDGROK_CPU_KERNEL_H

#include <stdint.h>
#if defined(__x86_64__)
#include <immintrin.h>  // before any target pragma: the intrinsics carry their own targets
#endif

#include "../grok_math.h"

namespace sg {
namespace cpu {

// One local piece of one original tensor: where its parameter, gradient and state live.
struct Segment {
  void* param;
  const void* grad;
  void* exp_avg;
  void* exp_avg_sq;
  void* mu;
  const float* h;       // SuperGrok with a user's meta-net: h = exp(f(g)) g, computed by PyTorch
  int64_t numel;
  int32_t tensor;       // global tensor index: the row of the stats / scalar tables
  int32_t param_dtype, grad_dtype, state_dtype;
};

// A fixed slice of a segment. Chunks are cut independently of the thread count, and phase 1
// writes one partial sum per chunk, reduced afterwards in chunk order: the same bits with any
// number of threads.
struct Chunk {
  int32_t segment;
  int64_t begin, size;
};

enum Kind : int32_t { GROKADAMW = 0, SUPERGROK = 1 };

struct Job {
  int32_t kind;
  const Segment* segments;
  const Chunk* chunks;
  double* partials;       // phase 1: [n_chunks, N_STATS] (GrokAdamW fills column 0 only)
  const double* scalars;  // phase 2: [n_tensors, N_COLUMNS]
  Table table;            // SuperGrok's default meta-net (unused when segments carry h)
  bool has_table;
};

// Chunk length: big enough that per-chunk overhead vanishes, small enough that 2-16 threads
// balance on a 1M-element model. A multiple of the lane count (8).
constexpr int64_t CHUNK = 16384;

// Instruction sets, best first.
enum Isa : int32_t { ISA_AVX512 = 0, ISA_AVX2 = 1, ISA_GENERIC = 2 };

typedef void (*ChunkFn)(const Job&, int64_t first, int64_t last);

struct Kernels {
  ChunkFn phase1;
  ChunkFn phase2;
};

// Defined per instruction set (isa_*.cpp); the x86 ones are null pointers elsewhere.
Kernels kernels_avx512();
Kernels kernels_avx2();
Kernels kernels_generic();

}  // namespace cpu
}  // namespace sg

#endif  // SHARDGROK_CPU_KERNEL_H
