// The summation order of the CUDA kernel's statistics, as plain functions: the kernels call
// them, and the host tests run the same lines (through the CPU extension) to predict the GPU's
// sums bit for bit.
//
// Phase 1, per chunk (one block of THREADS threads): element i of the chunk belongs to thread
// (i / GROUP) % THREADS, which adds its elements' terms in increasing i into an fp64
// accumulator; the THREADS accumulators are then combined by a fixed tree (tree_level, widths
// THREADS/2, ..., 1). Per tensor (one block again): its chunks' partial sums, in chunk order,
// are dealt to the threads the same way with GROUP = 1 and combined by the same tree. The
// order depends on nothing but the chunk table: not on alignment (the vector and scalar loads
// give each thread the same elements), not on the launch, not on the number of SMs.
#ifndef SHARDGROK_CUDA_ORDER_H
#define SHARDGROK_CUDA_ORDER_H

#include <stdint.h>

#include "../grok_math.h"

namespace sg {
namespace cuda {

constexpr int THREADS = 256;  // per block, both phases and the per-tensor reduction
constexpr int GROUP = 8;      // consecutive elements a thread takes at a time (one 128-bit load of
                              // 16-bit values, two of fp32)

// One level of the tree: slot t takes slot t + width.
SG_HD void tree_level(double* a, int t, int width) {
  if (t < width) a[t] = a[t] + a[t + width];
}

// Host model of one strided-then-tree sum: ``terms[0:n]`` dealt to THREADS threads in runs of
// ``group``, each thread's run added in order, the accumulators combined by the tree.
inline double strided_tree_sum(const double* terms, int64_t n, int group) {
  double acc[THREADS];
  for (int t = 0; t < THREADS; ++t) acc[t] = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    const int t = (int)((i / group) % THREADS);
    acc[t] = acc[t] + terms[i];
  }
  for (int width = THREADS / 2; width > 0; width >>= 1)
    for (int t = 0; t < width; ++t) tree_level(acc, t, width);
  return acc[0];
}

}  // namespace cuda
}  // namespace sg

#endif  // SHARDGROK_CUDA_ORDER_H
