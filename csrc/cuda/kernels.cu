// The CUDA kernel of the two-call step (docs/design.md): multi-tensor launches over the chunk
// table, one block per chunk, the per-element math from ../grok_math.h (the lines the CPU
// kernel and the host tests run). Build with --fmad=false (build.py): no multiply-add the
// reference does not have.
//
// Phase 1 writes one fp64 partial sum per (chunk, statistic) and a second launch reduces them
// per tensor in the order of order.h: deterministic, no atomics. Phase 2 reads each tensor's
// scalars from the device table. SuperGrok's breakpoint table, in level order (grok_math.h
// says why), is copied into shared memory by every block that needs it.
//
// Loads: GROUP = 8 consecutive elements per thread and iteration, as 128-bit loads (two for
// fp32) when every array of the segment is 16-byte aligned, else element by element; either
// way each thread gets the same elements, so the sums do not depend on alignment.
#include "launch.h"
#include "order.h"

namespace sg {
namespace cuda {
namespace {

// Each code on its own: the switches below combine them into one case index, where an unknown
// code would alias a known combination.
__device__ __forceinline__ bool known_dtypes(const Segment& s) {
  return (uint32_t)s.param_dtype < 3u && (uint32_t)s.grad_dtype < 3u && (uint32_t)s.state_dtype < 4u;
}

__device__ __forceinline__ bool aligned16(const void* p) {
  return p == nullptr || (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
}

// GROUP consecutive elements of a D-typed array at element i, as fp32.
template <int D>
struct Group;

template <>
struct Group<F32> {
  __device__ __forceinline__ static void load_vec(const void* base, int64_t i, float* x) {
    const float4* p = reinterpret_cast<const float4*>(static_cast<const float*>(base) + i);
    const float4 a = p[0], b = p[1];
    x[0] = a.x; x[1] = a.y; x[2] = a.z; x[3] = a.w;
    x[4] = b.x; x[5] = b.y; x[6] = b.z; x[7] = b.w;
  }
  __device__ __forceinline__ static void store_vec(void* base, int64_t i, const float* x) {
    float4* p = reinterpret_cast<float4*>(static_cast<float*>(base) + i);
    p[0] = make_float4(x[0], x[1], x[2], x[3]);
    p[1] = make_float4(x[4], x[5], x[6], x[7]);
  }
};

template <int D>
struct Group16 {  // bf16 and fp16: eight 16-bit values in one uint4
  __device__ __forceinline__ static void load_vec(const void* base, int64_t i, float* x) {
    const uint4 q = *reinterpret_cast<const uint4*>(static_cast<const uint16_t*>(base) + i);
    const uint32_t w[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      x[2 * e] = Storage<D>::load((uint16_t)(w[e] & 0xFFFFu));
      x[2 * e + 1] = Storage<D>::load((uint16_t)(w[e] >> 16));
    }
  }
  __device__ __forceinline__ static void store_vec(void* base, int64_t i, const float* x) {
    uint32_t w[4];
#pragma unroll
    for (int e = 0; e < 4; ++e)
      w[e] = (uint32_t)Storage<D>::store(x[2 * e]) | ((uint32_t)Storage<D>::store(x[2 * e + 1]) << 16);
    *reinterpret_cast<uint4*>(static_cast<uint16_t*>(base) + i) = make_uint4(w[0], w[1], w[2], w[3]);
  }
};
template <>
struct Group<BF16> : Group16<BF16> {};
template <>
struct Group<F16> : Group16<F16> {};

// n <= GROUP elements; the rest of x is zero (a zero adds nothing to any sum)
template <int D>
__device__ __forceinline__ void load_group(const void* base, int64_t i, int n, bool vec, float* x) {
  if (vec && n == GROUP) {
    Group<D>::load_vec(base, i, x);
    return;
  }
  const typename Storage<D>::T* p = static_cast<const typename Storage<D>::T*>(base) + i;
#pragma unroll
  for (int e = 0; e < GROUP; ++e) x[e] = e < n ? Storage<D>::load(p[e]) : 0.0f;
}

template <int D>
__device__ __forceinline__ void store_group(void* base, int64_t i, int n, bool vec, const float* x) {
  if (vec && n == GROUP) {
    Group<D>::store_vec(base, i, x);
    return;
  }
  typename Storage<D>::T* p = static_cast<typename Storage<D>::T*>(base) + i;
#pragma unroll
  for (int e = 0; e < GROUP; ++e)
    if (e < n) p[e] = Storage<D>::store(x[e]);
}

// store_group with bf16 rounded stochastically (grok_math.h): bases[e] is element i + e's
// rounding_base, `which` the value's draw. Element by element: the writes are 2 bytes wide
// and this path is taken only for bf16 storage.
template <int D>
__device__ __forceinline__ void store_group_rounded(void* base, int64_t i, int n, bool vec,
                                                    const float* x, bool stochastic,
                                                    const uint32_t* bases, uint32_t which) {
  if (D != BF16 || !stochastic) return store_group<D>(base, i, n, vec, x);
  uint16_t* p = static_cast<uint16_t*>(base) + i;
#pragma unroll
  for (int e = 0; e < GROUP; ++e)
    if (e < n) p[e] = store_rounded<BF16>(x[e], true, bases[e], which);
}

// mu as fp32 for phase 1: GROUP elements from i (n of them valid), any state storage; 8-bit
// codes element by element, each with its block's scale.
template <int SD>
__device__ __forceinline__ void load_mu(const Segment& s, int64_t i, int n, bool vec, float* u) {
  if constexpr (SD == Q8) {
    const int8_t* codes = static_cast<const int8_t*>(s.mu);
#pragma unroll
    for (int e = 0; e < GROUP; ++e) {
      const int64_t j = i + e;
      u[e] = e < n ? dequantize_signed(codes[j], s.mu_scale[(s.offset + j) / QBLOCK - s.offset / QBLOCK])
                   : 0.0f;
    }
  } else {
    load_group<SD>(s.mu, i, n, vec, u);
  }
}

// The block's view of the meta-net's table: in shared memory when it fits (every block
// copies it; the copy is 12 bytes a piece, against 16384 elements of work). The pieces come
// first: the dynamic array is float2-aligned, so they are too, whatever the size.
__device__ __forceinline__ DeviceTable block_table(const DeviceJob& job, float2* smem) {
  DeviceTable t = job.table;
  if (t.size <= SHARED_TABLE_MAX) {
    float* nodes = reinterpret_cast<float*>(smem + t.size);
    for (int32_t i = threadIdx.x; i < t.size; i += THREADS) {
      smem[i] = t.pieces[i];
      nodes[i] = t.nodes[i];
    }
    __syncthreads();
    t.pieces = smem;
    t.nodes = nodes;
  }
  return t;
}

__device__ __forceinline__ void masked_group(const Segment& s, const DeviceTable& tab, int64_t i,
                                             int n, bool vec, const float* g, float* h) {
  if (s.h != nullptr) {
    load_group<F32>(s.h, i, n, vec, h);
    return;
  }
#pragma unroll
  for (int e = 0; e < GROUP; ++e) h[e] = masked(table_level_log_mask(tab, g[e]), g[e]);
}

// Combine the block's per-thread sums by order.h's tree; thread 0 gets the result in red[q][0].
template <int K>
__device__ __forceinline__ void block_tree(double (*red)[THREADS], const double* acc) {
#pragma unroll
  for (int q = 0; q < K; ++q) red[q][threadIdx.x] = acc[q];
  __syncthreads();
  for (int width = THREADS / 2; width > 0; width >>= 1) {
#pragma unroll
    for (int q = 0; q < K; ++q) tree_level(red[q], threadIdx.x, width);
    __syncthreads();
  }
}

// ---------------------------------------------------------------- phase 1
template <int GD, int SD, bool SUPER>
__device__ __forceinline__ void chunk_sums(const Segment& s, const Chunk& c,
                                           const DeviceTable& tab, double* acc) {
  const bool vec = aligned16(s.grad) && (!SUPER || (aligned16(s.mu) && aligned16(s.h)));
  const int64_t groups = (c.size + GROUP - 1) / GROUP;
  for (int64_t q = threadIdx.x; q < groups; q += THREADS) {
    const int64_t i = c.begin + q * GROUP;
    const int n = (int)(c.size - q * GROUP < GROUP ? c.size - q * GROUP : GROUP);
    float g[GROUP];
    load_group<GD>(s.grad, i, n, vec, g);
    if (!SUPER) {
#pragma unroll
      for (int e = 0; e < GROUP; ++e) {
        const double x = g[e];
        if (e < n) acc[ST_GRAD_SQ] = acc[ST_GRAD_SQ] + x * x;
      }
      continue;
    }
    float u[GROUP], h[GROUP];
    load_mu<SD>(s, i, n, vec, u);
    masked_group(s, tab, i, n, vec, g, h);
#pragma unroll
    for (int e = 0; e < GROUP; ++e) {
      if (e >= n) continue;
      const double dg = g[e], dh = h[e], du = u[e];
      acc[ST_GRAD_SQ] = acc[ST_GRAD_SQ] + dg * dg;
      acc[ST_H_SQ] = acc[ST_H_SQ] + dh * dh;
      acc[ST_H_MU] = acc[ST_H_MU] + dh * du;
      acc[ST_H_GRAD] = acc[ST_H_GRAD] + dh * dg;
      acc[ST_MU_SQ] = acc[ST_MU_SQ] + du * du;
      acc[ST_MU_GRAD] = acc[ST_MU_GRAD] + du * dg;
    }
  }
}

template <bool SUPER>
__global__ void __launch_bounds__(THREADS) phase1_chunks(DeviceJob job) {
  constexpr int K = SUPER ? N_STATS : 1;
  SG_DYNAMIC_SHARED(float2, smem);
  SG_SHARED(double, red, [K][THREADS]);
  const Chunk c = job.chunks[blockIdx.x];
  const Segment s = job.segments[c.segment];
  double acc[K];
#pragma unroll
  for (int q = 0; q < K; ++q) acc[q] = 0.0;
  if (!known_dtypes(s)) return __trap();  // the glue checks the codes: never skip one silently
  if (s.grad != nullptr) {  // uniform over the block
    DeviceTable tab = job.table;
    if (SUPER && job.has_table) tab = block_table(job, smem);
    switch (s.grad_dtype * 4 + (SUPER ? s.state_dtype : 0)) {
#define SG_CASE(G, S) \
  case G * 4 + S: chunk_sums<G, S, SUPER>(s, c, tab, acc); break;
      SG_CASE(F32, F32) SG_CASE(F32, BF16) SG_CASE(F32, F16) SG_CASE(F32, Q8)
      SG_CASE(BF16, F32) SG_CASE(BF16, BF16) SG_CASE(BF16, F16) SG_CASE(BF16, Q8)
      SG_CASE(F16, F32) SG_CASE(F16, BF16) SG_CASE(F16, F16) SG_CASE(F16, Q8)
#undef SG_CASE
      default: __trap();
    }
  }
  block_tree<K>(red, acc);
  if (threadIdx.x == 0) {
    double* out = job.partials + (int64_t)blockIdx.x * N_STATS;
#pragma unroll
    for (int q = 0; q < K; ++q) out[q] = red[q][0];
  }
}

// Per tensor: its chunks' partials in chunk order, strided over the block and combined by the tree.
template <int K>
__global__ void __launch_bounds__(THREADS) reduce_tensors(DeviceJob job) {
  SG_SHARED(double, red, [K][THREADS]);
  const int64_t t = blockIdx.x;
  const int64_t lo = job.tensor_offsets[t], hi = job.tensor_offsets[t + 1];
  double acc[K];
#pragma unroll
  for (int q = 0; q < K; ++q) acc[q] = 0.0;
  for (int64_t j = lo + threadIdx.x; j < hi; j += THREADS) {
    const double* p = job.partials + (int64_t)job.tensor_chunks[j] * N_STATS;
#pragma unroll
    for (int q = 0; q < K; ++q) acc[q] = acc[q] + p[q];
  }
  block_tree<K>(red, acc);
  if (threadIdx.x == 0) {
#pragma unroll
    for (int q = 0; q < K; ++q) job.stats[t * K + q] = red[q][0];
  }
}

// ---------------------------------------------------------------- phase 2
template <int PD, int GD, int SD, bool SUPER>
__device__ __forceinline__ void chunk_update(const Segment& s, const Chunk& c,
                                             const DeviceTable& tab, const double* row) {
  const Scalars k = scalars_from_row(row);
  const RoundingRow r = rounding_from_row(row, s.tensor);
  const bool vec = aligned16(s.param) && aligned16(s.grad) && aligned16(s.exp_avg) &&
                   aligned16(s.exp_avg_sq) && aligned16(s.mu) && aligned16(s.h);
  const int64_t groups = (c.size + GROUP - 1) / GROUP;
  for (int64_t q = threadIdx.x; q < groups; q += THREADS) {
    const int64_t i = c.begin + q * GROUP;
    const int n = (int)(c.size - q * GROUP < GROUP ? c.size - q * GROUP : GROUP);
    float p[GROUP], g[GROUP], m[GROUP], v[GROUP], u[GROUP];
    load_group<PD>(s.param, i, n, vec, p);
    load_group<GD>(s.grad, i, n, vec, g);
    load_group<SD>(s.exp_avg, i, n, vec, m);
    load_group<SD>(s.exp_avg_sq, i, n, vec, v);
    load_group<SD>(s.mu, i, n, vec, u);
    if (SUPER) {
      float h[GROUP];
      masked_group(s, tab, i, n, vec, g, h);
#pragma unroll
      for (int e = 0; e < GROUP; ++e) supergrok_update(p[e], g[e], h[e], m[e], v[e], u[e], k);
    } else {
#pragma unroll
      for (int e = 0; e < GROUP; ++e) grokadamw_update(p[e], g[e], m[e], v[e], u[e], k);
    }
    uint32_t bases[GROUP];
    if ((PD == BF16 && r.param) || (SD == BF16 && r.state)) {  // uniform over the block
#pragma unroll
      for (int e = 0; e < GROUP; ++e) bases[e] = rounding_base(r.key, s.offset + i + e);
    }
    store_group_rounded<PD>(s.param, i, n, vec, p, r.param, bases, DRAW_PARAM);
    store_group_rounded<SD>(s.exp_avg, i, n, vec, m, r.state, bases, DRAW_EXP_AVG);
    store_group_rounded<SD>(s.exp_avg_sq, i, n, vec, v, r.state, bases, DRAW_EXP_AVG_SQ);
    store_group_rounded<SD>(s.mu, i, n, vec, u, r.state, bases, DRAW_MU);
  }
}

// 8-bit state: the chunk in rounds of THREADS * GROUP elements counted from the start of its
// first block of the tensor (earlier only for a segment's first chunk), so that each warp's
// 32 x GROUP = 256 elements are one block. A thread updates its valid elements (inside the
// chunk), the warp's largest magnitudes meet in shared memory, and the thread writes its codes
// against the block's new scales. Element by element: the codes are bytes, the scales per block.
static_assert(32 * GROUP == QBLOCK, "a warp's elements are one block of 8-bit state");
static_assert(THREADS % 32 == 0 && CHUNK % QBLOCK == 0, "rounds of whole blocks");

template <int PD, int GD, bool SUPER>
__device__ __forceinline__ void chunk_update_q8(const Segment& s, const Chunk& c,
                                                const DeviceTable& tab, const double* row,
                                                uint32_t (*red)[THREADS]) {
  typedef Storage<PD> P;
  typedef Storage<GD> G;
  const Scalars k = scalars_from_row(row);
  const RoundingRow r = rounding_from_row(row, s.tensor);
  typename P::T* p = static_cast<typename P::T*>(s.param);
  const typename G::T* g = static_cast<const typename G::T*>(s.grad);
  int8_t* mc = static_cast<int8_t*>(s.exp_avg);
  uint8_t* vc = static_cast<uint8_t*>(s.exp_avg_sq);
  int8_t* uc = static_cast<int8_t*>(s.mu);
  const int64_t lead = (s.offset + c.begin) % QBLOCK;
  const int64_t first = c.begin - lead, end = c.begin + c.size;
  const int64_t rounds = (lead + c.size + (int64_t)THREADS * GROUP - 1) / ((int64_t)THREADS * GROUP);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int64_t round = 0; round < rounds; ++round) {  // uniform over the block
    const int64_t block0 = first + round * THREADS * GROUP + (int64_t)warp * QBLOCK;
    const bool live = block0 < end && block0 + QBLOCK > c.begin;  // uniform over the warp
    const int64_t blk = (s.offset + block0) / QBLOCK - s.offset / QBLOCK;
    const float sm = live ? s.exp_avg_scale[blk] : 0.0f, sv = live ? s.exp_avg_sq_scale[blk] : 0.0f,
                su = live ? s.mu_scale[blk] : 0.0f;
    const int64_t i0 = block0 + (int64_t)lane * GROUP;
    float m[GROUP], v[GROUP], u[GROUP];
    uint32_t am = 0u, av = 0u, au = 0u;
#pragma unroll
    for (int e = 0; e < GROUP; ++e) {
      const int64_t i = i0 + e;
      m[e] = v[e] = u[e] = 0.0f;
      if (i < c.begin || i >= end) continue;
      float pi = P::load(p[i]);
      const float gi = G::load(g[i]);
      m[e] = dequantize_signed(mc[i], sm);
      v[e] = dequantize_unsigned(vc[i], sv);
      u[e] = dequantize_signed(uc[i], su);
      if (SUPER) {
        const float h = s.h != nullptr ? s.h[i] : masked(table_level_log_mask(tab, gi), gi);
        supergrok_update(pi, gi, h, m[e], v[e], u[e], k);
      } else {
        grokadamw_update(pi, gi, m[e], v[e], u[e], k);
      }
      p[i] = store_rounded<PD>(pi, r.param, r.param ? rounding_base(r.key, s.offset + i) : 0u,
                               DRAW_PARAM);
      const uint32_t bm = f32_to_bits(m[e]) & 0x7FFFFFFFu, bv = f32_to_bits(v[e]) & 0x7FFFFFFFu,
                     bu = f32_to_bits(u[e]) & 0x7FFFFFFFu;
      am = bm > am ? bm : am;
      av = bv > av ? bv : av;
      au = bu > au ? bu : au;
    }
    red[0][threadIdx.x] = am;
    red[1][threadIdx.x] = av;
    red[2][threadIdx.x] = au;
    __syncthreads();
    for (int j = 0; j < 32; ++j) {  // the warp's maxima: the same reads in every lane
      const int t = warp * 32 + j;
      am = red[0][t] > am ? red[0][t] : am;
      av = red[1][t] > av ? red[1][t] : av;
      au = red[2][t] > au ? red[2][t] : au;
    }
    __syncthreads();  // every lane has read before the next round writes
    const float nm = bits_to_f32(am), nv = bits_to_f32(av), nu = bits_to_f32(au);
    const float im = inverse_scale(nm), iv = inverse_scale(nv), iu = inverse_scale(nu);
#pragma unroll
    for (int e = 0; e < GROUP; ++e) {
      const int64_t i = i0 + e;
      if (i < c.begin || i >= end) continue;
      const uint32_t base = r.state ? rounding_base(r.key, s.offset + i) : 0u;
      mc[i] = quantize_signed(m[e], im, r.state, r.state ? rounding_bits(base, DRAW_EXP_AVG) : 0u);
      vc[i] = quantize_unsigned(v[e], iv, r.state, r.state ? rounding_bits(base, DRAW_EXP_AVG_SQ) : 0u);
      uc[i] = quantize_signed(u[e], iu, r.state, r.state ? rounding_bits(base, DRAW_MU) : 0u);
    }
    if (live && lane == 0) {
      s.exp_avg_scale[blk] = nm;
      s.exp_avg_sq_scale[blk] = nv;
      s.mu_scale[blk] = nu;
    }
  }
}

// Two blocks per SM for GrokAdamW (<= 128 registers, no spills); SuperGrok's table search needs
// a few more registers than that, so it gets one (sm_90 spills at 128). Not tuned on a GPU yet.
template <bool SUPER>
__global__ void __launch_bounds__(THREADS, SUPER ? 1 : 2) phase2_chunks(DeviceJob job) {
  SG_DYNAMIC_SHARED(float2, smem);
  const Chunk c = job.chunks[blockIdx.x];
  const Segment s = job.segments[c.segment];
  if (!known_dtypes(s)) return __trap();
  if (s.grad == nullptr || s.state_dtype == Q8) return;  // uniform; 8-bit: phase2_q8_chunks
  DeviceTable tab = job.table;
  if (SUPER && job.has_table) tab = block_table(job, smem);
  const double* row = job.scalars + (int64_t)s.tensor * N_COLUMNS;
  switch ((s.param_dtype * 3 + s.grad_dtype) * 3 + s.state_dtype) {
#define SG_CASE(P, G, S) \
  case (P * 3 + G) * 3 + S: chunk_update<P, G, S, SUPER>(s, c, tab, row); break;
#define SG_ROW(P, G) SG_CASE(P, G, F32) SG_CASE(P, G, BF16) SG_CASE(P, G, F16)
#define SG_PLANE(P) SG_ROW(P, F32) SG_ROW(P, BF16) SG_ROW(P, F16)
    SG_PLANE(F32) SG_PLANE(BF16) SG_PLANE(F16)
#undef SG_PLANE
#undef SG_ROW
#undef SG_CASE
    default: __trap();
  }
}

// Phase 2 of the chunks with 8-bit state, a second launch over the same chunk table when a
// plan has any (its own kernel: the codes' registers would make phase2_chunks spill). One
// block per SM, as SuperGrok's. Not tuned on a GPU yet.
template <bool SUPER>
__global__ void __launch_bounds__(THREADS, 1) phase2_q8_chunks(DeviceJob job) {
  SG_DYNAMIC_SHARED(float2, smem);
  SG_SHARED(uint32_t, qred, [3][THREADS]);  // the blocks' maxima
  const Chunk c = job.chunks[blockIdx.x];
  const Segment s = job.segments[c.segment];
  if (!known_dtypes(s)) return __trap();
  if (s.grad == nullptr || s.state_dtype != Q8) return;  // uniform over the block
  DeviceTable tab = job.table;
  if (SUPER && job.has_table) tab = block_table(job, smem);
  const double* row = job.scalars + (int64_t)s.tensor * N_COLUMNS;
  switch (s.param_dtype * 3 + s.grad_dtype) {
#define SG_CASE(P, G) \
  case P * 3 + G: chunk_update_q8<P, G, SUPER>(s, c, tab, row, qred); break;
    SG_CASE(F32, F32) SG_CASE(F32, BF16) SG_CASE(F32, F16)
    SG_CASE(BF16, F32) SG_CASE(BF16, BF16) SG_CASE(BF16, F16)
    SG_CASE(F16, F32) SG_CASE(F16, BF16) SG_CASE(F16, F16)
#undef SG_CASE
    default: __trap();
  }
}

constexpr size_t TABLE_ENTRY_BYTES = sizeof(float2) + sizeof(float);  // a piece and a node
static_assert(SHARED_TABLE_MAX * TABLE_ENTRY_BYTES + N_STATS * THREADS * sizeof(double) <=
                  48 * 1024,
              "phase 1's table and reduction array must fit the 48 KiB of a default launch");

static_assert(SHARED_TABLE_MAX * TABLE_ENTRY_BYTES + 3 * THREADS * sizeof(uint32_t) <= 48 * 1024,
              "phase 2's table and 8-bit maxima must fit the 48 KiB of a default launch");

size_t table_bytes(const DeviceJob& job) {
  const bool shared = job.kind == SUPERGROK && job.has_table && job.table.size <= SHARED_TABLE_MAX;
  return shared ? TABLE_ENTRY_BYTES * (size_t)job.table.size : 0;
}

}  // namespace

// A launch, then its error: read here, once per launch, so an error names the launch it came from.
#define SG_RUN(name, launch)                   \
  do {                                         \
    launch;                                    \
    const cudaError_t err_ = cudaGetLastError(); \
    if (err_ != cudaSuccess) {                 \
      *failed = name;                          \
      return err_;                             \
    }                                          \
  } while (0)

cudaError_t phase1(const DeviceJob& job, cudaStream_t stream, const char** failed) {
  const bool super = job.kind == SUPERGROK;
  const unsigned chunks = (unsigned)job.n_chunks, tensors = (unsigned)job.n_tensors;
  if (job.n_chunks > 0) {
    if (super)
      SG_RUN("phase 1 (per chunk)",
             SG_LAUNCH(phase1_chunks<true>, chunks, THREADS, table_bytes(job), stream)(job));
    else
      SG_RUN("phase 1 (per chunk)", SG_LAUNCH(phase1_chunks<false>, chunks, THREADS, 0, stream)(job));
  }
  if (job.n_tensors > 0) {
    if (super)
      SG_RUN("phase 1 (per tensor)",
             SG_LAUNCH(reduce_tensors<N_STATS>, tensors, THREADS, 0, stream)(job));
    else
      SG_RUN("phase 1 (per tensor)", SG_LAUNCH(reduce_tensors<1>, tensors, THREADS, 0, stream)(job));
  }
  return cudaSuccess;
}

cudaError_t phase2(const DeviceJob& job, cudaStream_t stream, const char** failed) {
  const unsigned chunks = (unsigned)job.n_chunks;
  if (job.n_chunks > 0) {
    if (job.kind == SUPERGROK)
      SG_RUN("phase 2", SG_LAUNCH(phase2_chunks<true>, chunks, THREADS, table_bytes(job), stream)(job));
    else
      SG_RUN("phase 2", SG_LAUNCH(phase2_chunks<false>, chunks, THREADS, 0, stream)(job));
    if (job.has_q8 && job.kind == SUPERGROK)
      SG_RUN("phase 2 (8-bit state)",
             SG_LAUNCH(phase2_q8_chunks<true>, chunks, THREADS, table_bytes(job), stream)(job));
    else if (job.has_q8)
      SG_RUN("phase 2 (8-bit state)", SG_LAUNCH(phase2_q8_chunks<false>, chunks, THREADS, 0, stream)(job));
  }
  return cudaSuccess;
}
#undef SG_RUN

}  // namespace cuda
}  // namespace sg
