// The CPU kernel's work description: plain C++ (no torch), so the instruction-set translation
// units build without torch's headers under their own target options. The segments and chunks
// are the backends' shared ones (../job.h).
#ifndef SHARDGROK_CPU_KERNEL_H
#define SHARDGROK_CPU_KERNEL_H

#include <stdint.h>
#if defined(__x86_64__)
#include <immintrin.h>  // before any target pragma: the intrinsics carry their own targets
#endif

#include "../grok_math.h"
#include "../job.h"

namespace sg {
namespace cpu {

struct Job {
  int32_t kind;
  const Segment* segments;
  const Chunk* chunks;
  double* partials;       // phase 1: [n_chunks, N_STATS] (GrokAdamW fills column 0 only)
  const double* scalars;  // phase 2: [n_tensors, N_COLUMNS]
  Table table;            // SuperGrok's default meta-net (unused when segments carry h)
  bool has_table;
};

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
