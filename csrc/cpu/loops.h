// The CPU kernel's loops, compiled once per instruction set: each isa_*.cpp includes this file
// after its `#pragma GCC target`, and GCC vectorises the plain loops below for that target. Every
// path runs the same scalar operations in the same order (no contraction, fp64 sums in eight
// fixed lanes), so AVX-512, AVX2 and the portable path give identical bits.
//
// Everything here has internal linkage: an instantiation compiled for AVX-512 must never be
// picked by the linker for the portable path.
#include "kernel.h"

namespace {

using namespace sg;
using namespace sg::cpu;

constexpr int LANES = 8;    // fp64 accumulators per sum: element i of a chunk goes to lane i % 8
constexpr int BLOCK = 256;  // elements staged at a time for the meta-net's table search

static_assert(CHUNK % BLOCK == 0 && BLOCK % LANES == 0, "chunks hold whole blocks of lanes");
static_assert(CHUNK % QBLOCK == 0, "chunks after a segment's first hold whole blocks of 8-bit state");

// ---------------------------------------------------------------- 8-bit state
// The index among a segment's scales of the block holding its element i.
SG_HD int64_t scale_index(const Segment& s, int64_t i) {
  return (s.offset + i) / QBLOCK - s.offset / QBLOCK;
}

// Where the block holding segment element i ends, as a segment index (at most `end`).
SG_HD int64_t block_end(const Segment& s, int64_t i, int64_t end) {
  const int64_t e = i + (QBLOCK - (s.offset + i) % QBLOCK);
  return e < end ? e : end;
}

// u[0:len] = mu[at:at + len] as fp32, from any state storage (phase 1 of SuperGrok reads it);
// 8-bit codes in runs of one block, one scale each (a loop the compiler vectorises).
template <int SD>
void read_mu(const Segment& s, int64_t at, int64_t len, float* __restrict u) {
  const typename Storage<SD>::T* __restrict mu = static_cast<const typename Storage<SD>::T*>(s.mu) + at;
  for (int64_t e = 0; e < len; ++e) u[e] = Storage<SD>::load(mu[e]);
}
template <>
void read_mu<Q8>(const Segment& s, int64_t at, int64_t len, float* __restrict u) {
  const int8_t* __restrict mu = static_cast<const int8_t*>(s.mu);
  for (int64_t lo = at; lo < at + len;) {
    const int64_t hi = block_end(s, lo, at + len);
    const float scale = s.mu_scale[scale_index(s, lo)];
    for (int64_t i = lo; i < hi; ++i) u[i - at] = dequantize_signed(mu[i], scale);
    lo = hi;
  }
}

// A block's new values of one state written as codes: its scale is their largest magnitude,
// taken over the fp32 bits without the sign (ordered as the magnitudes for finite values), an
// integer maximum the compiler vectorises.
SG_HD float block_absmax(const float* x, int64_t n) {
  uint32_t a = 0u;
  for (int64_t e = 0; e < n; ++e) {
    const uint32_t y = f32_to_bits(x[e]) & 0x7FFFFFFFu;
    a = y > a ? y : a;
  }
  return bits_to_f32(a);
}

template <bool RS>
void store_codes(const Segment& s, int64_t lo, int64_t n, uint32_t key, const float* m,
                 const float* v, const float* u) {
  const int64_t blk = scale_index(s, lo);
  const float am = block_absmax(m, n), av = block_absmax(v, n), au = block_absmax(u, n);
  const float im = inverse_scale(am), iv = inverse_scale(av), iu = inverse_scale(au);
  int8_t* __restrict mc = static_cast<int8_t*>(s.exp_avg) + lo;
  uint8_t* __restrict vc = static_cast<uint8_t*>(s.exp_avg_sq) + lo;
  int8_t* __restrict uc = static_cast<int8_t*>(s.mu) + lo;
  // a block never straddles a multiple of 2^32: one high word for its draws
  const uint32_t khi = rounding_key_hi(key, s.offset + lo), first = (uint32_t)(s.offset + lo);
  // the codes as 32-bit integers first, then narrowed: GCC vectorises the two loops, not one
  // that mixes 32-bit arithmetic with byte stores
  alignas(64) int32_t qm[QBLOCK], qv[QBLOCK], qu[QBLOCK];
  for (int64_t e = 0; e < n; ++e) {
    const uint32_t base = RS ? rounding_base_lo(khi, first + (uint32_t)e) : 0u;
    qm[e] = quantize_signed(m[e], im, RS, RS ? rounding_bits(base, DRAW_EXP_AVG) : 0u);
    qv[e] = quantize_unsigned(v[e], iv, RS, RS ? rounding_bits(base, DRAW_EXP_AVG_SQ) : 0u);
    qu[e] = quantize_signed(u[e], iu, RS, RS ? rounding_bits(base, DRAW_MU) : 0u);
  }
  for (int64_t e = 0; e < n; ++e) {
    mc[e] = (int8_t)qm[e];
    vc[e] = (uint8_t)qv[e];
    uc[e] = (int8_t)qu[e];
  }
  s.exp_avg_scale[blk] = am;
  s.exp_avg_sq_scale[blk] = av;
  s.mu_scale[blk] = au;
}

SG_HD double combine(const double* a) {
  return ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
}

// ---------------------------------------------------------------- GrokAdamW
template <int GD>
void grokadamw_phase1(const Job&, const Segment& s, int64_t b, int64_t n, double* out) {
  typedef Storage<GD> G;
  const typename G::T* g = static_cast<const typename G::T*>(s.grad) + b;
  double acc[LANES] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + LANES <= n; i += LANES)
    for (int j = 0; j < LANES; ++j) {
      const double x = G::load(g[i + j]);
      acc[j] += x * x;
    }
  for (int j = 0; i + j < n; ++j) {
    const double x = G::load(g[i + j]);
    acc[j] += x * x;
  }
  out[ST_GRAD_SQ] = combine(acc);
}

// RS, RP: the state's and the parameter's bf16 writes round stochastically (grok_math.h); a
// template flag each, so the loops without them carry no hash.
template <int PD, int GD, int SD, bool RS, bool RP>
void grokadamw_phase2(const Job& job, const Segment& s, int64_t b, int64_t n) {
  typedef Storage<PD> P;
  typedef Storage<GD> G;
  typedef Storage<SD> S;
  const double* row = job.scalars + (int64_t)s.tensor * N_COLUMNS;
  const Scalars k = scalars_from_row(row);
  const uint32_t key = rounding_from_row(row, s.tensor).key;
  const int64_t first = s.offset + b;  // the element's index in its whole tensor
  typename P::T* p = static_cast<typename P::T*>(s.param) + b;
  const typename G::T* g = static_cast<const typename G::T*>(s.grad) + b;
  typename S::T* m = static_cast<typename S::T*>(s.exp_avg) + b;
  typename S::T* v = static_cast<typename S::T*>(s.exp_avg_sq) + b;
  typename S::T* mu = static_cast<typename S::T*>(s.mu) + b;
  // runs of one high word of the tensor index (all of the chunk but where it crosses a
  // multiple of 2^32), so the draws' words are 32-bit in the vectorised loop
  for (int64_t lo = 0; lo < n;) {
    const int64_t hi = high_word_end(first, lo, n);
    const uint32_t khi = rounding_key_hi(key, first + lo), low = (uint32_t)(first + lo);
    for (int64_t i = lo; i < hi; ++i) {
      float pi = P::load(p[i]), mi = S::load(m[i]), vi = S::load(v[i]), ui = S::load(mu[i]);
      grokadamw_update(pi, G::load(g[i]), mi, vi, ui, k);
      const uint32_t base = (RS || RP) ? rounding_base_lo(khi, low + (uint32_t)(i - lo)) : 0u;
      p[i] = store_rounded<PD>(pi, RP, base, DRAW_PARAM);
      m[i] = store_rounded<SD>(mi, RS, base, DRAW_EXP_AVG);
      v[i] = store_rounded<SD>(vi, RS, base, DRAW_EXP_AVG_SQ);
      mu[i] = store_rounded<SD>(ui, RS, base, DRAW_MU);
    }
    lo = hi;
  }
}

// ---------------------------------------------------------------- SuperGrok
// x[0:n] = g, h[0:n] = exp(f(g)) g for one block; the rest of the block zero (adds nothing).
template <int GD>
void stage_masked(const Job& job, const Segment& s, int64_t at, int64_t n, float* __restrict x,
                  float* __restrict h) {
  typedef Storage<GD> G;
  const typename G::T* __restrict g = static_cast<const typename G::T*>(s.grad) + at;
  for (int e = 0; e < n; ++e) x[e] = G::load(g[e]);
  for (int e = (int)n; e < BLOCK; ++e) x[e] = 0.0f;
  if (s.h != nullptr) {
    const float* __restrict given = s.h + at;
    for (int e = 0; e < n; ++e) h[e] = given[e];
    for (int e = (int)n; e < BLOCK; ++e) h[e] = 0.0f;
    return;
  }
  const float* __restrict bp = job.table.breakpoints;
  const float* __restrict slope = job.table.slopes;
  const float* __restrict icpt = job.table.intercepts;
  const int32_t size = job.table.size;
#if defined(SG_ISA_AVX512)  // set by isa_avx512.cpp: GCC defines no feature macros under a target pragma
  // The same search as table_search, 16 lanes at a time, with no memory gather for tables of
  // up to 128 entries: the levels of step >= 8 probe only every 8th breakpoint, which fit in one
  // register (a permute); the last three levels and the piece look up the whole array held in
  // up to 8 registers (two-register permutes, blended by the index's high bits). Larger tables
  // use hardware gathers (GCC's generic tuning would emulate those element by element).
  if (size <= 128) {
    const int32_t regs = size <= 16 ? 1 : size / 16;
    __m512 bpr[8], slr[8], icr[8];
    for (int32_t r = 0; r < regs; ++r) {
      const int32_t left = size - 16 * r;  // entries of the array in this register
      const __mmask16 m = (__mmask16)(left >= 16 ? 0xFFFFu : (1u << left) - 1u);
      bpr[r] = _mm512_maskz_loadu_ps(m, bp + 16 * r);
      slr[r] = _mm512_maskz_loadu_ps(m, slope + 16 * r);
      icr[r] = _mm512_maskz_loadu_ps(m, icpt + 16 * r);
    }
    // pivots: breakpoints 7, 15, 23, ...
    alignas(64) float piv[16] = {};
    for (int32_t k = 0; 8 * k + 7 < size && k < 16; ++k) piv[k] = bp[8 * k + 7];
    const __m512 pivv = _mm512_load_ps(piv);
    const auto lookup = [regs](const __m512* r, __m512i i) SG_LOOKUP_TARGET {
      if (regs == 1) return _mm512_permutexvar_ps(i, r[0]);
      __m512 pair[4];
      for (int32_t q = 0; 2 * q < regs; ++q) pair[q] = _mm512_permutex2var_ps(r[2 * q], i, r[2 * q + 1]);
      if (regs == 2) return pair[0];
      const __m512 lo = _mm512_mask_blend_ps(_mm512_test_epi32_mask(i, _mm512_set1_epi32(32)), pair[0], pair[1]);
      if (regs == 4) return lo;
      const __m512 hi = _mm512_mask_blend_ps(_mm512_test_epi32_mask(i, _mm512_set1_epi32(32)), pair[2], pair[3]);
      return _mm512_mask_blend_ps(_mm512_test_epi32_mask(i, _mm512_set1_epi32(64)), lo, hi);
    };
    for (int e = 0; e < BLOCK; e += 16) {
      const __m512 xv = _mm512_load_ps(x + e);
      __m512i idx = _mm512_setzero_si512();
      for (int32_t step = size >> 1; step > 0; step >>= 1) {
        const __m512i probe = _mm512_add_epi32(idx, _mm512_set1_epi32(step - 1));
        const __m512 b = step >= 8 ? _mm512_permutexvar_ps(_mm512_srli_epi32(probe, 3), pivv)
                                   : lookup(bpr, probe);
        idx = _mm512_mask_add_epi32(idx, _mm512_cmp_ps_mask(xv, b, _CMP_GE_OQ), idx,
                                    _mm512_set1_epi32(step));
      }
      _mm512_store_ps(h + e, _mm512_add_ps(_mm512_mul_ps(lookup(slr, idx), xv), lookup(icr, idx)));
    }
  } else {
    // masked gathers with a zero source: the plain ones trip GCC 12's -Wmaybe-uninitialized
#define SG_GATHER16(i, base) _mm512_mask_i32gather_ps(_mm512_setzero_ps(), 0xFFFF, (i), (base), 4)
    for (int e = 0; e < BLOCK; e += 16) {
      const __m512 xv = _mm512_load_ps(x + e);
      __m512i idx = _mm512_setzero_si512();
      for (int32_t step = size >> 1; step > 0; step >>= 1) {
        const __m512 b = SG_GATHER16(_mm512_add_epi32(idx, _mm512_set1_epi32(step - 1)), bp);
        idx = _mm512_mask_add_epi32(idx, _mm512_cmp_ps_mask(xv, b, _CMP_GE_OQ), idx,
                                    _mm512_set1_epi32(step));
      }
      const __m512 sl = SG_GATHER16(idx, slope), ic = SG_GATHER16(idx, icpt);
      _mm512_store_ps(h + e, _mm512_add_ps(_mm512_mul_ps(sl, xv), ic));
    }
#undef SG_GATHER16
  }
#elif defined(SG_ISA_AVX2)
  // 8 lanes: tables of up to 16 entries in two registers (permutes, blended by index bit 3);
  // larger ones look the levels of step >= size / 8 up in 8 pivots (breakpoints size/8 - 1,
  // 2 size/8 - 1, ...) held in a register, and the rest by hardware gathers.
  const int32_t stride = size <= 16 ? 16 : size / 8;
  __m256 lo[3], hi[3];  // breakpoints, slopes, intercepts: entries 0-7 and 8-15
  const float* arrays[3] = {bp, slope, icpt};
  for (int a = 0; a < 3; ++a) {
    alignas(32) float buf[16] = {};
    for (int32_t i = 0; i < size && i < 16; ++i) buf[i] = arrays[a][i];
    lo[a] = _mm256_load_ps(buf);
    hi[a] = _mm256_load_ps(buf + 8);
  }
  alignas(32) float piv[8] = {};
  for (int32_t k = 0; k < 8 && stride * k + stride - 1 < size; ++k) piv[k] = bp[stride * k + stride - 1];
  const __m256 pivv = _mm256_load_ps(piv);
  int shift = 0;
  while ((1 << shift) < stride) ++shift;
  for (int e = 0; e < BLOCK; e += 8) {
    const __m256 xv = _mm256_load_ps(x + e);
    __m256i idx = _mm256_setzero_si256();
    for (int32_t step = size >> 1; step > 0; step >>= 1) {
      const __m256i probe = _mm256_add_epi32(idx, _mm256_set1_epi32(step - 1));
      __m256 b;
      if (size <= 16) {
        const __m256 bit3 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_srli_epi32(probe, 3), 31));
        b = _mm256_blendv_ps(_mm256_permutevar8x32_ps(lo[0], probe), _mm256_permutevar8x32_ps(hi[0], probe), bit3);
      } else if (step >= stride) {
        b = _mm256_permutevar8x32_ps(pivv, _mm256_srli_epi32(probe, shift));
      } else {
        b = _mm256_i32gather_ps(bp, probe, 4);
      }
      const __m256i ge = _mm256_castps_si256(_mm256_cmp_ps(xv, b, _CMP_GE_OQ));
      idx = _mm256_add_epi32(idx, _mm256_and_si256(ge, _mm256_set1_epi32(step)));
    }
    __m256 sl, ic;
    if (size <= 16) {
      const __m256 bit3 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_srli_epi32(idx, 3), 31));
      sl = _mm256_blendv_ps(_mm256_permutevar8x32_ps(lo[1], idx), _mm256_permutevar8x32_ps(hi[1], idx), bit3);
      ic = _mm256_blendv_ps(_mm256_permutevar8x32_ps(lo[2], idx), _mm256_permutevar8x32_ps(hi[2], idx), bit3);
    } else {
      sl = _mm256_i32gather_ps(slope, idx, 4);
      ic = _mm256_i32gather_ps(icpt, idx, 4);
    }
    _mm256_store_ps(h + e, _mm256_add_ps(_mm256_mul_ps(sl, xv), ic));
  }
#else
  int32_t idx[BLOCK];
  for (int e = 0; e < BLOCK; ++e) idx[e] = 0;
  for (int32_t step = size >> 1; step > 0; step >>= 1)
    for (int e = 0; e < BLOCK; ++e) idx[e] += (x[e] >= bp[idx[e] + step - 1]) ? step : 0;
  for (int e = 0; e < BLOCK; ++e) h[e] = slope[idx[e]] * x[e] + icpt[idx[e]];
#endif
  for (int e = 0; e < BLOCK; ++e) h[e] = masked(clamp_log_mask(h[e]), x[e]);
}

template <int GD, int SD>
void supergrok_phase1(const Job& job, const Segment& s, int64_t b, int64_t n, double* out) {
  // GCC vector types: one 8-double "lane group" per sum, the same per-lane operations on every
  // target (one zmm, two ymm or four xmm registers)
  typedef double v8d __attribute__((vector_size(64)));
  typedef float v8f __attribute__((vector_size(32)));
  v8d acc[N_STATS] = {};
  alignas(64) float x[BLOCK], h[BLOCK], u[BLOCK];
  for (int64_t at = b; at < b + n; at += BLOCK) {
    const int64_t len = (b + n - at) < BLOCK ? (b + n - at) : BLOCK;
    stage_masked<GD>(job, s, at, len, x, h);
    read_mu<SD>(s, at, len, u);
    for (int e = (int)len; e < BLOCK; ++e) u[e] = 0.0f;
    for (int i = 0; i < BLOCK; i += LANES) {
      v8f xf, hf, uf;
      __builtin_memcpy(&xf, x + i, sizeof xf);
      __builtin_memcpy(&hf, h + i, sizeof hf);
      __builtin_memcpy(&uf, u + i, sizeof uf);
      const v8d dg = __builtin_convertvector(xf, v8d), dh = __builtin_convertvector(hf, v8d),
                du = __builtin_convertvector(uf, v8d);
      acc[ST_GRAD_SQ] += dg * dg;
      acc[ST_H_SQ] += dh * dh;
      acc[ST_H_MU] += dh * du;
      acc[ST_H_GRAD] += dh * dg;
      acc[ST_MU_SQ] += du * du;
      acc[ST_MU_GRAD] += du * dg;
    }
  }
  for (int q = 0; q < N_STATS; ++q) {
    double lanes[LANES];
    __builtin_memcpy(lanes, &acc[q], sizeof lanes);
    out[q] = combine(lanes);
  }
}

template <int PD, int GD, int SD, bool RS, bool RP>
void supergrok_phase2(const Job& job, const Segment& s, int64_t b, int64_t n) {
  typedef Storage<PD> P;
  typedef Storage<SD> S;
  const double* row = job.scalars + (int64_t)s.tensor * N_COLUMNS;
  const Scalars k = scalars_from_row(row);
  const uint32_t key = rounding_from_row(row, s.tensor).key;
  typename P::T* p = static_cast<typename P::T*>(s.param);
  typename S::T* m = static_cast<typename S::T*>(s.exp_avg);
  typename S::T* v = static_cast<typename S::T*>(s.exp_avg_sq);
  typename S::T* mu = static_cast<typename S::T*>(s.mu);
  alignas(64) float x[BLOCK], h[BLOCK];
  for (int64_t at = b; at < b + n; at += BLOCK) {
    const int64_t len = (b + n - at) < BLOCK ? (b + n - at) : BLOCK;
    stage_masked<GD>(job, s, at, len, x, h);
    for (int64_t e0 = 0; e0 < len;) {  // runs of one high word, as in grokadamw_phase2
      const int64_t e1 = high_word_end(s.offset + at, e0, len);
      const uint32_t khi = rounding_key_hi(key, s.offset + at + e0);
      const uint32_t low = (uint32_t)(s.offset + at + e0);
      for (int64_t e = e0; e < e1; ++e) {
        const int64_t i = at + e;
        float pi = P::load(p[i]), mi = S::load(m[i]), vi = S::load(v[i]), ui = S::load(mu[i]);
        supergrok_update(pi, x[e], h[e], mi, vi, ui, k);
        const uint32_t base = (RS || RP) ? rounding_base_lo(khi, low + (uint32_t)(e - e0)) : 0u;
        p[i] = store_rounded<PD>(pi, RP, base, DRAW_PARAM);
        m[i] = store_rounded<SD>(mi, RS, base, DRAW_EXP_AVG);
        v[i] = store_rounded<SD>(vi, RS, base, DRAW_EXP_AVG_SQ);
        mu[i] = store_rounded<SD>(ui, RS, base, DRAW_MU);
      }
      e0 = e1;
    }
  }
}

// ---------------------------------------------------------------- 8-bit state, both optimizers
// Block by block (a chunk holds whole blocks of its tensor, but its first): the update in fp32
// from the dequantized state, the parameter written, then the block's codes.
template <int PD, int GD, bool SUPER, bool RS, bool RP>
void phase2_q8(const Job& job, const Segment& s, int64_t b, int64_t n) {
  typedef Storage<PD> P;
  typedef Storage<GD> G;
  const double* row = job.scalars + (int64_t)s.tensor * N_COLUMNS;
  const Scalars k = scalars_from_row(row);
  const uint32_t key = rounding_from_row(row, s.tensor).key;
  typename P::T* p = static_cast<typename P::T*>(s.param);
  const typename G::T* g = static_cast<const typename G::T*>(s.grad);
  const int8_t* mc = static_cast<const int8_t*>(s.exp_avg);
  const uint8_t* vc = static_cast<const uint8_t*>(s.exp_avg_sq);
  const int8_t* uc = static_cast<const int8_t*>(s.mu);
  alignas(64) float x[BLOCK], h[BLOCK], m[QBLOCK], v[QBLOCK], u[QBLOCK];
  static_assert(BLOCK == QBLOCK, "one staging block per block of 8-bit state");
  for (int64_t lo = b; lo < b + n;) {
    const int64_t hi = block_end(s, lo, b + n), blk = scale_index(s, lo);
    const float sm = s.exp_avg_scale[blk], sv = s.exp_avg_sq_scale[blk], su = s.mu_scale[blk];
    if (SUPER) stage_masked<GD>(job, s, lo, hi - lo, x, h);
    const uint32_t khi = rounding_key_hi(key, s.offset + lo), low = (uint32_t)(s.offset + lo);
    for (int64_t i = lo; i < hi; ++i) {
      const int64_t e = i - lo;
      float pi = P::load(p[i]);
      m[e] = dequantize_signed(mc[i], sm);
      v[e] = dequantize_unsigned(vc[i], sv);
      u[e] = dequantize_signed(uc[i], su);
      if (SUPER) supergrok_update(pi, x[e], h[e], m[e], v[e], u[e], k);
      else grokadamw_update(pi, G::load(g[i]), m[e], v[e], u[e], k);
      p[i] = store_rounded<PD>(pi, RP, RP ? rounding_base_lo(khi, low + (uint32_t)e) : 0u, DRAW_PARAM);
    }
    store_codes<RS>(s, lo, hi - lo, key, m, v, u);
    lo = hi;
  }
}

// ---------------------------------------------------------------- dtype dispatch
typedef void (*Phase1Fn)(const Job&, const Segment&, int64_t, int64_t, double*);
typedef void (*Phase2Fn)(const Job&, const Segment&, int64_t, int64_t);

template <int PD, int GD, int SD>
struct Instance;

template <int PD, int GD>
struct Instance<PD, GD, Q8> {
  template <bool RS, bool RP>
  static void run(const Job& job, const Segment& s, int64_t b, int64_t n) {
    if (job.kind == GROKADAMW) phase2_q8<PD, GD, false, RS, RP>(job, s, b, n);
    else phase2_q8<PD, GD, true, RS, RP>(job, s, b, n);
  }
  static constexpr bool CAN_RP = PD == BF16;
  static void p2(const Job& job, const Segment& s, int64_t b, int64_t n) {
    const RoundingRow r = rounding_from_row(job.scalars + (int64_t)s.tensor * N_COLUMNS, s.tensor);
    const bool rp = CAN_RP && r.param;
    if (r.state && rp) run<true, CAN_RP>(job, s, b, n);
    else if (r.state) run<true, false>(job, s, b, n);
    else if (rp) run<false, CAN_RP>(job, s, b, n);
    else run<false, false>(job, s, b, n);
  }
};

template <int PD, int GD, int SD>
struct Instance {
  template <bool RS, bool RP>
  static void run(const Job& job, const Segment& s, int64_t b, int64_t n) {
    if (job.kind == GROKADAMW) grokadamw_phase2<PD, GD, SD, RS, RP>(job, s, b, n);
    else supergrok_phase2<PD, GD, SD, RS, RP>(job, s, b, n);
  }
  // the rounding flags apply to bf16 storage only: other dtypes never instantiate them
  static constexpr bool CAN_RS = SD == BF16, CAN_RP = PD == BF16;
  static void p2(const Job& job, const Segment& s, int64_t b, int64_t n) {
    const RoundingRow r = rounding_from_row(job.scalars + (int64_t)s.tensor * N_COLUMNS, s.tensor);
    const bool rs = CAN_RS && r.state, rp = CAN_RP && r.param;
    if (rs && rp) run<CAN_RS, CAN_RP>(job, s, b, n);
    else if (rs) run<CAN_RS, false>(job, s, b, n);
    else if (rp) run<false, CAN_RP>(job, s, b, n);
    else run<false, false>(job, s, b, n);
  }
};

template <int GD, int SD>
void phase1_of(const Job& job, const Segment& s, int64_t b, int64_t n, double* out) {
  if (job.kind == GROKADAMW) grokadamw_phase1<GD>(job, s, b, n, out);
  else supergrok_phase1<GD, SD>(job, s, b, n, out);
}

#define SG_ROW(P, G) \
  {Instance<P, G, F32>::p2, Instance<P, G, BF16>::p2, Instance<P, G, F16>::p2, Instance<P, G, Q8>::p2}
#define SG_PLANE(P) {SG_ROW(P, F32), SG_ROW(P, BF16), SG_ROW(P, F16)}
const Phase2Fn PHASE2[3][3][4] = {SG_PLANE(F32), SG_PLANE(BF16), SG_PLANE(F16)};
#undef SG_PLANE
#undef SG_ROW
#define SG_ROW(G) {phase1_of<G, F32>, phase1_of<G, BF16>, phase1_of<G, F16>, phase1_of<G, Q8>}
const Phase1Fn PHASE1[3][4] = {SG_ROW(F32), SG_ROW(BF16), SG_ROW(F16)};
#undef SG_ROW

void run_phase1(const Job& job, int64_t first, int64_t last) {
  for (int64_t c = first; c < last; ++c) {
    const Chunk& ch = job.chunks[c];
    const Segment& s = job.segments[ch.segment];
    double* out = job.partials + c * N_STATS;
    for (int q = 0; q < N_STATS; ++q) out[q] = 0.0;
    PHASE1[s.grad_dtype][s.state_dtype](job, s, ch.begin, ch.size, out);
  }
}

void run_phase2(const Job& job, int64_t first, int64_t last) {
  for (int64_t c = first; c < last; ++c) {
    const Chunk& ch = job.chunks[c];
    const Segment& s = job.segments[ch.segment];
    PHASE2[s.param_dtype][s.grad_dtype][s.state_dtype](job, s, ch.begin, ch.size);
  }
}

}  // namespace
