// What a step's kernels are given, shared by the CPU and CUDA backends: the segments (one local
// piece of one tensor: where its parameter, gradient and state live) and the chunk table that
// cuts them into fixed slices. Plain C++ with no torch and no CUDA headers, so the CPU
// instruction-set files, nvcc and the host tests all compile it; the structs have one layout
// on the host and on the device (nvcc guarantees it), so the host-built tables are copied to the
// GPU as they are.
#ifndef SHARDGROK_JOB_H
#define SHARDGROK_JOB_H

#include <stdint.h>

#include <vector>

namespace sg {

struct Segment {
  void* param;
  const void* grad;     // null: no gradient this step (the segment is skipped)
  void* exp_avg;
  void* exp_avg_sq;
  void* mu;
  const float* h;       // SuperGrok with a user's meta-net: h = exp(f(g)) g, computed by PyTorch
  float* exp_avg_scale;     // state_dtype Q8: one scale per block the segment touches (the
  float* exp_avg_sq_scale;  // first is the block holding element `offset` of the tensor);
  float* mu_scale;          // null otherwise
  int64_t numel;
  int64_t offset;       // index of the segment's first element in its whole tensor (the
                        // stochastic rounding's counter: the same whatever the sharding)
  int32_t tensor;       // global tensor index: the row of the stats / scalar tables
  int32_t param_dtype, grad_dtype, state_dtype;
};

// A fixed slice of a segment. Chunks are cut independently of the thread (CPU) or block (GPU)
// count, and phase 1 writes one partial sum per chunk, reduced per tensor afterwards in a fixed
// order: the same bits whatever the parallelism.
struct Chunk {
  int32_t segment;
  int64_t begin, size;
};

// The optimizer a step runs (shardgrok/kernels/header.py reads it: KERNEL_KINDS).
enum Kind : int32_t { GROKADAMW = 0, SUPERGROK = 1 };

// Chunk length: big enough that per-chunk overhead vanishes (CPU: a task; GPU: a block), small
// enough that 2-16 threads balance on a 1M-element model. A multiple of every lane count.
constexpr int64_t CHUNK = 16384;

// The chunk table of segments of the given lengths, in segment order. A segment with a `lead`
// (8-bit state whose first element sits `lead` elements into a block of its tensor) gets a
// first chunk that much shorter, so every later chunk begins on a block of the tensor and no
// block is shared by two chunks (two threads would each settle its scale).
inline std::vector<Chunk> cut_chunks(const std::vector<int64_t>& numels,
                                     const std::vector<int64_t>& leads = {}) {
  std::vector<Chunk> out;
  for (size_t i = 0; i < numels.size(); ++i) {
    const int64_t lead = i < leads.size() ? leads[i] : 0;
    for (int64_t b = 0; b < numels[i];) {
      const int64_t size = (b == 0 ? CHUNK - lead : CHUNK);
      const int64_t n = numels[i] - b < size ? numels[i] - b : size;
      out.push_back({(int32_t)i, b, n});
      b += n;
    }
  }
  return out;
}

// Every tensor's chunks, in chunk order (CSR: tensor t owns index[offsets[t]:offsets[t+1]]):
// the order in which the GPU's per-tensor reduction reads the per-chunk partial sums.
struct ChunksByTensor {
  std::vector<int64_t> offsets;  // [n_tensors + 1]
  std::vector<int32_t> index;    // [n_chunks]
};

inline ChunksByTensor chunks_by_tensor(const std::vector<Chunk>& chunks,
                                       const std::vector<int32_t>& tensor_of_segment,
                                       int64_t n_tensors) {
  ChunksByTensor out;
  out.offsets.assign((size_t)n_tensors + 1, 0);
  for (const Chunk& c : chunks) ++out.offsets[(size_t)tensor_of_segment[(size_t)c.segment] + 1];
  for (int64_t t = 0; t < n_tensors; ++t) out.offsets[(size_t)t + 1] += out.offsets[(size_t)t];
  out.index.resize(chunks.size());
  std::vector<int64_t> at(out.offsets.begin(), out.offsets.end() - 1);
  for (size_t c = 0; c < chunks.size(); ++c)
    out.index[(size_t)at[(size_t)tensor_of_segment[(size_t)chunks[c].segment]]++] = (int32_t)c;
  return out;
}

}  // namespace sg

#endif  // SHARDGROK_JOB_H
