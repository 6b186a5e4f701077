// Per-element math of GrokAdamW and SuperGrok, shared by every backend.
//
// g++ compiles it into each CPU instruction-set translation unit (functions have internal
// linkage, so an AVX-512 copy never replaces the portable one at link time) and nvcc into the
// CUDA kernels (__host__ __device__). The host-side tests run these same lines against
// shardgrok/reference.py, the oracle.
//
// Rules that keep every backend's bits equal (CPU paths agree bit for bit with each other, the
// CUDA kernel with the host copy of this file):
// - no fused multiply-add unless written (-ffp-contract=off / --fmad=false), no fast-math;
// - exp, the fp16/bf16 conversions and the meta-net table search are written out here, not
//   taken from a vendor library whose rounding differs by platform;
// - sums are never formed here: callers accumulate in fp64 with a fixed lane order.
#ifndef SHARDGROK_GROK_MATH_H
#define SHARDGROK_GROK_MATH_H

#include <stdint.h>

#if defined(__CUDACC__)
// static: the functions are called as Storage<D>::load(...) and keep internal linkage as under g++
#define SG_HD static __host__ __device__ __forceinline__
#else
// internal linkage: each instruction-set translation unit keeps its own copy; always inlined so
// the copy is compiled for the caller's target
#define SG_HD static inline __attribute__((always_inline))
#endif

namespace sg {

// Storage dtypes a segment's parameter, gradient or state may have; Q8 is the state's 8-bit
// blockwise format (state only: m and mu int8 codes, v uint8 codes, fp32 scales per block).
enum Dtype : int32_t { F32 = 0, BF16 = 1, F16 = 2, Q8 = 3 };

// The enums below (Column, Stat) and job.h's Kind are the one definition of these names:
// shardgrok/kernels/header.py reads them from this text for the Python side (no compiler
// needed), so keep each a plain list of enumerators, integer literals only, and Column and Stat
// numbered 0, 1, ... up to their count.

// Columns of the per-tensor scalar table phase 2 reads (one row per tensor, fp64, built by
// shardgrok/reference.py's *_step_table from the reduced statistics).
enum Column : int32_t {
  COL_GRAD_SCALE = 0,   // clip coefficient applied to the gradient (GrokAdamW) / final (SuperGrok)
  COL_ALPHA,            // EMA momentum of mu (SuperGrok: 0 on a tensor's first step)
  COL_ONE_MINUS_ALPHA,
  COL_AMP,              // GrokAdamW: lamb; SuperGrok: lamb where the cosine gate engaged, else 0
  COL_SMART_SCALE,      // SuperGrok: rescale * ||g|| / ||h||
  COL_BETA1,            // the tensor's layer-wise beta1
  COL_ONE_MINUS_BETA1,
  COL_BETA2,
  COL_ONE_MINUS_BETA2,
  COL_SQRT_BC2,         // sqrt(1 - beta2^t)
  COL_EPS,
  COL_DECAY,            // 1 - lr * weight_decay
  COL_STEP_SIZE,        // -lr / (1 - beta1^t)
  COL_STEP,             // t, the tensor's step count after this step (an integer)
  COL_ROUNDING,         // enum Rounding's flags: which bf16 writes round stochastically
  COL_SEED,             // the optimizer's rounding seed (an integer below 2^32)
  N_COLUMNS
};

// Which bf16 writes of phase 2 round stochastically (bit flags in COL_ROUNDING); the others
// round to nearest even. Only bf16 storage is ever rounded stochastically.
enum Rounding : int32_t { ROUND_STATE = 1, ROUND_PARAM = 2 };

// Per-tensor sums phase 1 produces (SuperGrok order; GrokAdamW uses the first only).
// shardgrok/reference.py's GROKADAMW_STATS / SUPERGROK_STATS name them in this order (a test
// holds them to this enum).
enum Stat : int32_t { ST_GRAD_SQ = 0, ST_H_SQ, ST_H_MU, ST_H_GRAD, ST_MU_SQ, ST_MU_GRAD, N_STATS };

// The range f(g) is clamped to before exp (metanet.LOG_MASK_LIMIT).
#define SG_LOG_MASK_LIMIT 20.0f

struct Scalars {  // one tensor's row of the table, in fp32 as the update uses it
  float grad_scale, alpha, one_minus_alpha, amp, smart_scale;
  float beta1, one_minus_beta1, beta2, one_minus_beta2, sqrt_bc2, eps, decay, step_size;
};  // COL_STEP, COL_ROUNDING and COL_SEED are integers: rounding_from_row reads them

SG_HD Scalars scalars_from_row(const double* r) {
  Scalars k;
  k.grad_scale = (float)r[COL_GRAD_SCALE];
  k.alpha = (float)r[COL_ALPHA];
  k.one_minus_alpha = (float)r[COL_ONE_MINUS_ALPHA];
  k.amp = (float)r[COL_AMP];
  k.smart_scale = (float)r[COL_SMART_SCALE];
  k.beta1 = (float)r[COL_BETA1];
  k.one_minus_beta1 = (float)r[COL_ONE_MINUS_BETA1];
  k.beta2 = (float)r[COL_BETA2];
  k.one_minus_beta2 = (float)r[COL_ONE_MINUS_BETA2];
  k.sqrt_bc2 = (float)r[COL_SQRT_BC2];
  k.eps = (float)r[COL_EPS];
  k.decay = (float)r[COL_DECAY];
  k.step_size = (float)r[COL_STEP_SIZE];
  return k;
}

// ------------------------------------------------------------------ bit casts and conversions
SG_HD float bits_to_f32(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  __builtin_memcpy(&f, &u, 4);
  return f;
#endif
}

SG_HD uint32_t f32_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  __builtin_memcpy(&u, &f, 4);
  return u;
#endif
}

SG_HD float bf16_to_f32(uint16_t h) { return bits_to_f32((uint32_t)h << 16); }

// Round to nearest even, NaN to the canonical quiet NaN: what torch's bfloat16 conversion does.
SG_HD uint16_t f32_to_bf16(float f) {
  uint32_t u = f32_to_bits(f);
  uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return (f != f) ? (uint16_t)0x7FC0u : (uint16_t)rounded;
}

// IEEE binary16 <-> binary32 by integer and fp32 arithmetic only (exact, round to nearest even,
// subnormals included), so the result does not depend on F16C or the GPU's converter.
SG_HD float f16_to_f32(uint16_t h) {
  const uint32_t w = (uint32_t)h << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  // normal: move the exponent and mantissa into fp32 position and rebias by 2^-112
  const float normal = bits_to_f32((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  // subnormal: the mantissa as the low bits of 0.5's significand, minus 0.5
  const float subnormal = bits_to_f32((two_w >> 17) | (126u << 23)) - 0.5f;
  const uint32_t body = two_w < (1u << 27) ? f32_to_bits(subnormal) : f32_to_bits(normal);
  return bits_to_f32(sign | body);
}

SG_HD uint16_t f32_to_f16(float f) {
  const uint32_t w = f32_to_bits(f);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  // scaling by 2^112 then 2^-110 saturates overflow to inf and rounds at the fp16 precision
  float base = ((f < 0 ? -f : f) * 0x1.0p+112f) * 0x1.0p-110f;
  uint32_t bias = shl1_w & 0xFF000000u;
  bias = bias < 0x71000000u ? 0x71000000u : bias;
  base = bits_to_f32((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = f32_to_bits(base);
  const uint32_t nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
  return (uint16_t)((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}

template <int D> struct Storage;
template <> struct Storage<F32> {
  typedef float T;
  SG_HD float load(T x) { return x; }
  SG_HD T store(float x) { return x; }
};
template <> struct Storage<BF16> {
  typedef uint16_t T;
  SG_HD float load(T x) { return bf16_to_f32(x); }
  SG_HD T store(float x) { return f32_to_bf16(x); }
};
template <> struct Storage<F16> {
  typedef uint16_t T;
  SG_HD float load(T x) { return f16_to_f32(x); }
  SG_HD T store(float x) { return f32_to_f16(x); }
};

// ------------------------------------------------------------------ stochastic rounding
// A bf16 write rounds up with probability (the dropped 16 bits) / 2^16, so its expected value
// is the fp32 value: a bf16 v decays by 0.999 per step on average where round-to-nearest would
// keep it. The random bits are a counter-based function of (seed, step, tensor, the element's
// index in the whole tensor, which value), with no state and no dependence on where the element
// is computed: every layout, world size, thread count, instruction set and backend draws the
// same bits for it. shardgrok/reference.py computes the same function with torch's integer ops
// (a test holds both to each other).

// Chris Wellons' "lowbias32" integer hash: a bijection of 32-bit words with low bias.
SG_HD uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  x ^= x >> 16;
  return x;
}

// One tensor's key for one step.
SG_HD uint32_t rounding_key(uint32_t seed, uint64_t step, uint32_t tensor) {
  uint32_t k = mix32(seed ^ 0x9E3779B9u);
  k = mix32(k ^ (uint32_t)step);
  k = mix32(k ^ (uint32_t)(step >> 32));
  return mix32(k ^ tensor);
}

// What the values of one element share: the key and the element's index in the whole tensor.
// In two parts, so a loop over elements whose index has one high word runs on 32-bit words:
// the key with the index's high word folded in, then the low word.
SG_HD uint32_t rounding_key_hi(uint32_t key, int64_t index) {
  return key + (uint32_t)((uint64_t)index >> 32) * 0x9E3779B9u;
}

SG_HD uint32_t rounding_base_lo(uint32_t key_hi, uint32_t low) { return mix32(low ^ key_hi); }

SG_HD uint32_t rounding_base(uint32_t key, int64_t index) {
  return rounding_base_lo(rounding_key_hi(key, index), (uint32_t)(uint64_t)index);
}

// Where the run of segment elements from `i` whose tensor index keeps its high word ends
// (at most `end`; segment indices, the segment starting at element `offset` of its tensor).
SG_HD int64_t high_word_end(int64_t offset, int64_t i, int64_t end) {
  const int64_t next = (int64_t)(((uint64_t)(offset + i) | 0xFFFFFFFFull) + 1ull) - offset;
  return next < end ? next : end;
}

// Which value of an element a draw is for.
enum RoundingWhich : uint32_t { DRAW_EXP_AVG = 0, DRAW_EXP_AVG_SQ = 1, DRAW_MU = 2, DRAW_PARAM = 3 };

SG_HD uint32_t rounding_bits(uint32_t base, uint32_t which) {
  return mix32(base + (which + 1u) * 0x632BE5ABu);
}

// x rounded to bf16 up or down by the top 16 of `bits`: adding them below the kept bits
// carries into the kept ones with probability (dropped bits) / 2^16. Infinities stay (their
// dropped bits are zero, and no carry reaches the exponent); the largest finite values may
// round to infinity, as a round up does; NaN becomes the canonical quiet NaN.
SG_HD uint16_t f32_to_bf16_stochastic(float x, uint32_t bits) {
  const uint32_t u = f32_to_bits(x);
  return (x != x) ? (uint16_t)0x7FC0u : (uint16_t)((u + (bits >> 16)) >> 16);
}

// ------------------------------------------------------------------ 8-bit blockwise state
// state_dtype="int8": m, v and mu as 8-bit codes, one fp32 scale per block of QBLOCK elements
// along the tensor's own element index (the block's largest magnitude; 0 for a block of
// zeros). A code is a small float relative to its block's scale, non-linear like bitsandbytes'
// and torchao's dynamic maps but computed from the fp32 bits, not looked up: magnitude codes
// q >= 8 are (e << 3 | f), worth 2^(e - B) (1 + f / 8) for e in [1, B], and codes q < 8 are
// q * 2^(-B - 2) (the linear steps below the smallest of those, as IEEE subnormals). The
// scale itself (|x| / scale = 1) is code B << 3, the largest used.
// - m and mu: signed codes (int8, two's complement, -120..120) of B = 15: three bits of
//   mantissa over 15 binades, down to 2^-17 of the scale;
// - v: unsigned codes (uint8, 0..248) of B = 31: v is a square, so twice the binades, down to
//   2^-33 of the scale (the smallest gradients' v stays non-zero where their m does).
// Writing rounds to nearest (ties of the subnormal steps up), or stochastically with the same
// draws as bf16 (state_rounding="stochastic", the default), which keeps the codes unbiased.
constexpr int32_t QBLOCK = 256;        // elements per scale
constexpr int64_t QMIN_NUMEL = 4096;   // smaller tensors keep fp32 state (as torchao does)
enum QuantBias : int32_t { QBIAS_SIGNED = 15, QBIAS_UNSIGNED = 31 };

// The magnitude code of n >= 0 (finite; at most 1 plus a few ulps: x * (1 / scale)).
// Both candidates are computed and one selected (no branch: the CPU loops vectorise).
template <int B>
SG_HD uint32_t quantize_magnitude(float n, bool stochastic, uint32_t bits) {
  const uint32_t u = f32_to_bits(n);
  // n >= 2^(1 - B): the exponent-and-mantissa codes, rounded in the fp32 bits as bf16 is
  const uint32_t add = stochastic ? (bits >> 12) : 0x7FFFFu + ((u >> 20) & 1u);
  uint32_t high = (u - ((uint32_t)(127 - B) << 23) + add) >> 20;
  high = high < ((uint32_t)B << 3) ? high : ((uint32_t)B << 3);
  // below: the linear codes, t in [0, 8) exactly, plus 1/2 or a draw in [0, 1) of 20 bits (fine
  // enough that t + d is exact for every code's own value, which then stays whatever the draw);
  // 8 when it carries into the smallest exponent code, the same value. (t is clamped for the
  // lanes that take the other candidate, so the conversion stays in range.)
  float t = n * bits_to_f32((uint32_t)(127 + B + 2) << 23);
  t = t < 8.0f ? t : 8.0f;
  const float d = stochastic ? (float)(int32_t)(bits >> 12) * 0x1p-20f : 0.5f;
  const uint32_t low = (uint32_t)(int32_t)(t + d);
  return u >= ((uint32_t)(128 - B) << 23) ? high : low;
}

template <int B>
SG_HD float dequantize_magnitude(uint32_t q) {
  const float high = bits_to_f32((q << 20) + ((uint32_t)(127 - B) << 23));
  const float low = (float)(int32_t)q * bits_to_f32((uint32_t)(127 - B - 2) << 23);
  return q >= 8u ? high : low;
}

// m and mu: x * inv_scale in [-1, 1] to a signed code, and back.
SG_HD int8_t quantize_signed(float x, float inv_scale, bool stochastic, uint32_t bits) {
  const float n = x * inv_scale;
  const float a = bits_to_f32(f32_to_bits(n) & 0x7FFFFFFFu);  // |n|, -0 included
  const int32_t q = (int32_t)quantize_magnitude<QBIAS_SIGNED>(a, stochastic, bits);
  return (int8_t)(n < 0.0f ? -q : q);
}

SG_HD float dequantize_signed(int8_t c, float scale) {
  const float mag = dequantize_magnitude<QBIAS_SIGNED>((uint32_t)(c < 0 ? -(int32_t)c : (int32_t)c)) * scale;
  return c < 0 ? -mag : mag;
}

// v >= 0.
SG_HD uint8_t quantize_unsigned(float x, float inv_scale, bool stochastic, uint32_t bits) {
  return (uint8_t)quantize_magnitude<QBIAS_UNSIGNED>(x * inv_scale, stochastic, bits);
}

SG_HD float dequantize_unsigned(uint8_t c, float scale) {
  return dequantize_magnitude<QBIAS_UNSIGNED>((uint32_t)c) * scale;
}

// What multiplies a block's values before quantizing: 1 / scale, 0 for a block of zeros.
SG_HD float inverse_scale(float scale) { return scale > 0.0f ? 1.0f / scale : 0.0f; }

// A tensor's rounding for one step, from its row of the scalar table.
struct RoundingRow {
  uint32_t key;
  bool state, param;  // ROUND_STATE, ROUND_PARAM
};

SG_HD RoundingRow rounding_from_row(const double* r, int32_t tensor) {
  RoundingRow out;
  const int32_t flags = (int32_t)r[COL_ROUNDING];
  out.state = (flags & ROUND_STATE) != 0;
  out.param = (flags & ROUND_PARAM) != 0;
  out.key = rounding_key((uint32_t)r[COL_SEED], (uint64_t)r[COL_STEP], (uint32_t)tensor);
  return out;
}

// A value of storage dtype D written back: stochastically where `stochastic` (bf16 only),
// else to nearest.
template <int D>
SG_HD typename Storage<D>::T store_rounded(float x, bool stochastic, uint32_t base, uint32_t which) {
  if (D == BF16 && stochastic) return (typename Storage<D>::T)f32_to_bf16_stochastic(x, rounding_bits(base, which));
  return Storage<D>::store(x);
}

// ------------------------------------------------------------------ exp on the clamped log-mask
// exp(x) for x in [-SG_LOG_MASK_LIMIT, SG_LOG_MASK_LIMIT]: x = n ln2 + r, |r| <= ln2 / 2, with a
// degree-6 minimax polynomial for e^r (Cephes' expf coefficients); about 1 ulp.
SG_HD float exp_clamped(float x) {
  const float t = x * 1.44269504088896341f + 12582912.0f;  // 1.5 * 2^23: rounds x/ln2 to an int
  const float n = t - 12582912.0f;
  const int32_t ni = (int32_t)(f32_to_bits(t) - 0x4B400000u);
  float r = x - n * 0.693359375f;       // ln2 split in two so n * hi is exact
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  return p * bits_to_f32((uint32_t)(ni + 127) << 23);
}

SG_HD float clamp_log_mask(float f) {
  f = f < -SG_LOG_MASK_LIMIT ? -SG_LOG_MASK_LIMIT : f;
  return f > SG_LOG_MASK_LIMIT ? SG_LOG_MASK_LIMIT : f;
}

// ------------------------------------------------------------------ the meta-net's table
// SimpleMetaNet's log-mask is exactly piecewise linear in g (shardgrok/metanet/table.py builds
// the table). The search counts the breakpoints <= x: breakpoints sorted and padded with +inf,
// `size` a power of two with at least one more slot than real breakpoints, pieces indexed by
// the count (slopes/intercepts have size entries).
struct Table {
  const float* breakpoints;
  const float* slopes;
  const float* intercepts;
  int32_t size;
};

// The search over any indexable breakpoint array (a pointer; the host tests pass one that logs
// the entries read, so what they count is this very loop).
template <class Breakpoints>
SG_HD int32_t sorted_search(Breakpoints bp, int32_t size, float x) {
  int32_t idx = 0;
  for (int32_t step = size >> 1; step > 0; step >>= 1)
    idx += (x >= bp[idx + step - 1]) ? step : 0;
  return idx;
}

SG_HD int32_t table_search(const Table& t, float x) {
  return sorted_search(t.breakpoints, t.size, x);
}

SG_HD float table_log_mask(const Table& t, float x) {
  const int32_t i = table_search(t, x);
  return clamp_log_mask(t.slopes[i] * x + t.intercepts[i]);
}

// The same table in level order, for the CUDA kernel (shardgrok/metanet/table.py's
// level_order builds it; the CPU kernel keeps the sorted Table). Why: a warp's 32 searches read
// shared memory together, and in the sorted array the candidates of one step lie size / 2^k
// words apart, a multiple of 32 words at the first steps, so they fall into the same few of
// the 32 banks and the read is split into that many transactions. Level order stores the
// candidates of step k next to each other (2^k consecutive words): a step reads from at most
// ceil(2^k / 32) words per bank.
//
// The sorted search is a walk down the complete binary tree whose in-order is bp[0..size-2]:
// the candidate of step k after the choices b_0..b_{k-1} is bp[(2r + 1) size / 2^(k+1) - 1],
// r = the choices read as a binary number. Level order stores that breakpoint at node
// 2^k - 1 + r, whose children are 2j + 1 and 2j + 2; so the walk below compares x with the
// same breakpoints in the same order, and its leaf, minus size - 1, is the sorted search's
// index for every x (ties, infinities, NaN and subnormals included: the comparisons are the
// same ones).
//
// Each piece is one (slope, intercept) pair, .x and .y, so that the kernel reads it in one
// 8-byte load: Pair is CUDA's float2 in kernels.cu (the emulated target's float2 has its size
// and alignment), a struct of that layout in the host tests.
template <class Pair>
struct LevelTable {
  const float* nodes;  // size entries: the size - 1 breakpoints of the search in level order,
                       // then one of padding (never read)
  const Pair* pieces;  // size entries: pieces 0..size-1, as Table's slopes and intercepts
  int32_t size;        // a power of two, as Table's
};

template <class Nodes>
SG_HD int32_t level_search(Nodes nodes, int32_t size, float x) {
  int32_t j = 0;
  for (int32_t n = size; n > 1; n >>= 1) j = 2 * j + 1 + ((x >= nodes[j]) ? 1 : 0);
  return j - (size - 1);
}

template <class Pair>
SG_HD int32_t table_level_search(const LevelTable<Pair>& t, float x) {
  return level_search(t.nodes, t.size, x);
}

// table_log_mask's arithmetic, bit for bit: one product, one sum, the clamp
template <class Pair>
SG_HD float table_level_log_mask(const LevelTable<Pair>& t, float x) {
  const Pair p = t.pieces[table_level_search(t, x)];
  return clamp_log_mask(p.x * x + p.y);
}

// h = exp(f(g)) * g, the meta-net's masked gradient (before the norm correction)
SG_HD float masked(float log_mask, float g) { return exp_clamped(log_mask) * g; }

// ------------------------------------------------------------------ updates
// IEEE square root, correctly rounded on both sides (CUDA's sqrtf is too only under
// -prec-sqrt=true; the intrinsic says so whatever the flags).
SG_HD float sqrt_f32(float x) {
#if defined(__CUDA_ARCH__)
  return __fsqrt_rn(x);
#else
  return __builtin_sqrtf(x);
#endif
}

// The Adam part, as shardgrok/reference.py's adamw_ orders it.
SG_HD void adamw(float& p, float& m, float& v, float u, const Scalars& k) {
  m = m * k.beta1 + u * k.one_minus_beta1;
  v = v * k.beta2 + (u * u) * k.one_minus_beta2;
  const float denom = sqrt_f32(v) / k.sqrt_bc2 + k.eps;
  p = p * k.decay;
  p = p + k.step_size * (m / denom);
}

// GrokAdamW: g clipped, mu = a mu + (1 - a) g, AdamW on g + lamb mu.
SG_HD void grokadamw_update(float& p, float g, float& m, float& v, float& mu, const Scalars& k) {
  g = g * k.grad_scale;
  mu = mu * k.alpha + g * k.one_minus_alpha;
  adamw(p, m, v, g + k.amp * mu, k);
}

// SuperGrok: mu from the raw g, final = smart (+ lamb mu where the gate engaged), clipped.
SG_HD void supergrok_update(float& p, float g, float h, float& m, float& v, float& mu,
                            const Scalars& k) {
  mu = mu * k.alpha + g * k.one_minus_alpha;
  float final_ = h * k.smart_scale;
  if (k.amp != 0.0f) final_ = final_ + k.amp * mu;
  adamw(p, m, v, final_ * k.grad_scale, k);
}

}  // namespace sg

#endif  // SHARDGROK_GROK_MATH_H
