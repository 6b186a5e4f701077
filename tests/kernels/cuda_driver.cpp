// A standalone driver of the emulated CUDA kernels (csrc/cuda/kernels.cu built against
// csrc/cuda/emulated.h), for the sanitizer builds of tests/kernels/test_cuda_sanitizers.py:
// plain C++17, no torch, no Python, so AddressSanitizer, UndefinedBehaviorSanitizer and
// ThreadSanitizer see the kernels and the emulation alone.
//
// It builds synthetic jobs in host memory (host addresses are device addresses there), runs
// phase 1 and phase 2 and checks both bit for bit against a host computation written here:
// the per-tensor sums in order.h's order (strided_tree_sum per chunk with GROUP, then over each
// tensor's chunk partials with group 1), the update element by element with grok_math.h's
// scalar functions (8-bit state: block by block, the codes written at the block's largest
// magnitude, to nearest). Every array the kernels read is its own heap allocation of the exact size,
// so that AddressSanitizer reports a read one past any of them.
//
//   g++ -std=c++17 -ffp-contract=off -I csrc tests/kernels/cuda_driver.cpp -o driver
//   ./driver            every case
//   ./driver --quick    a few small launches (256 OS threads a block under SG_EMU_OS_THREADS)
//   ./driver --case S   the cases whose name contains S;  --list  their names
// Exit status 0 when every result matches; 1 with a message naming the first mismatches.
#define SG_CUDA_EMULATED 1
#include "cuda/emulated.cpp"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

namespace {

using sg::Chunk;
using sg::Segment;
using sg::Table;
using sg::cuda::DeviceJob;
using sg::cuda::DeviceTable;

const char* const DTYPE_NAMES[] = {"f32", "bf16", "f16", "q8"};
const char* const STAT_NAMES[] = {"grad_sq", "h_sq", "h_mu", "h_grad", "mu_sq", "mu_grad"};

size_t element_bytes(int dtype) { return dtype == sg::F32 ? 4 : dtype == sg::Q8 ? 1 : 2; }

float load_at(const void* base, int dtype, int64_t i) {
  if (dtype == sg::Q8) return (float)static_cast<const int8_t*>(base)[i];  // the code (reports)
  if (dtype == sg::F32) {
    float x;
    memcpy(&x, static_cast<const char*>(base) + 4 * i, 4);
    return x;
  }
  uint16_t u;
  memcpy(&u, static_cast<const char*>(base) + 2 * i, 2);
  return dtype == sg::BF16 ? sg::bf16_to_f32(u) : sg::f16_to_f32(u);
}

void store_at(void* base, int dtype, int64_t i, float x) {
  if (dtype == sg::F32) {
    memcpy(static_cast<char*>(base) + 4 * i, &x, 4);
    return;
  }
  const uint16_t u = dtype == sg::BF16 ? sg::f32_to_bf16(x) : sg::f32_to_f16(x);
  memcpy(static_cast<char*>(base) + 2 * i, &u, 2);
}

uint32_t bits_at(const void* base, int dtype, int64_t i) {
  if (dtype == sg::Q8) return static_cast<const uint8_t*>(base)[i];  // a code's byte
  if (dtype == sg::F32) {
    uint32_t u;
    memcpy(&u, static_cast<const char*>(base) + 4 * i, 4);
    return u;
  }
  uint16_t u;
  memcpy(&u, static_cast<const char*>(base) + 2 * i, 2);
  return u;
}

uint64_t double_bits(double x) {
  uint64_t u;
  memcpy(&u, &x, 8);
  return u;
}

struct Rng {  // splitmix64: the same data on every platform
  uint64_t s;
  uint64_t next() {
    uint64_t z = (s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  float uniform(float lo, float hi) { return lo + (hi - lo) * (float)((next() >> 40) * 0x1.0p-24); }
};

// Exact-size heap blocks, freed together.
struct Arena {
  std::vector<void*> blocks;
  Arena() = default;
  Arena(const Arena&) = delete;
  Arena& operator=(const Arena&) = delete;
  ~Arena() {
    for (void* p : blocks) free(p);
  }
  void* take(size_t bytes) {
    void* p = nullptr;  // 16-byte aligned: a segment is misaligned only where a case says so
    if (posix_memalign(&p, 16, bytes ? bytes : 1) != 0) p = nullptr;
    if (p == nullptr) {
      fprintf(stderr, "out of memory\n");
      exit(2);
    }
    blocks.push_back(p);
    return p;
  }
  template <class T>
  T* copy(const std::vector<T>& v) {
    T* p = static_cast<T*>(take(v.size() * sizeof(T)));
    if (!v.empty()) memcpy(static_cast<void*>(p), v.data(), v.size() * sizeof(T));
    return p;
  }
};

// ------------------------------------------------------------------ cases
enum HSource { H_NONE, H_TABLE, H_ARRAY };  // where SuperGrok's masked gradient comes from

struct SegSpec {
  int64_t numel;
  int32_t tensor;
  int param_dtype, grad_dtype, state_dtype;
  bool misaligned;  // every array of the segment one element past a 16-byte boundary
  bool no_grad;
  int64_t start = 0;  // 8-bit state: where the segment starts in its tensor (its blocks)
};

struct Case {
  std::string name;
  int kind;
  HSource h_source;
  int32_t table_size;  // H_TABLE only
  int32_t n_tensors;
  std::vector<SegSpec> segs;
  bool quick;
};

const int DTYPES[][3] = {  // (param, grad, state)
    {sg::F32, sg::F32, sg::F32},   {sg::BF16, sg::BF16, sg::F32}, {sg::F16, sg::F16, sg::F16},
    {sg::BF16, sg::BF16, sg::BF16}, {sg::F32, sg::BF16, sg::F16}, {sg::F16, sg::F32, sg::BF16},
    {sg::BF16, sg::F16, sg::F32},  {sg::F32, sg::F16, sg::BF16},
};
constexpr int N_DTYPES = sizeof(DTYPES) / sizeof(DTYPES[0]);

SegSpec seg(int64_t numel, int32_t tensor, int dtypes, bool misaligned = false,
            bool no_grad = false) {
  const int* d = DTYPES[dtypes % N_DTYPES];
  return {numel, tensor, d[0], d[1], d[2], misaligned, no_grad};
}

// Lengths that leave every kind of tail (1, 7, 17: a partial group; CHUNK + 5: a second chunk
// of 5), a whole chunk, a misaligned segment long enough for full groups, one without a
// gradient, an empty one, and a tensor in two segments that are not adjacent.
std::vector<SegSpec> full_segments(int rot) {
  const int64_t C = sg::CHUNK;
  return {seg(1, 0, rot + 0),
          seg(7, 1, rot + 1),
          seg(17, 2, rot + 2),
          seg(C + 5, 3, rot + 3),
          seg(C + 5 + 8 * 3, 4, rot + 4, /*misaligned=*/true),
          seg(33, 5, rot + 5, false, /*no_grad=*/true),
          seg(C, 6, rot + 6),
          seg(0, 7, rot + 7),
          seg(2 * C + 1001, 1, rot + 1),  // tensor 1's second segment
          seg(9, 5, rot + 5, true)};      // tensor 5: one segment without a gradient, one with
}

// 8-bit state (state_dtype Q8): pieces starting and ending inside blocks of their tensor (the
// first chunk shortened to end on a block), one of several chunks, one without a gradient,
// beside fp32 state (phase 2's two launches). The codes and scales are random, not those of a
// previous step: the kernels read any.
SegSpec qseg(int64_t numel, int32_t tensor, int dtypes, int64_t start, bool misaligned = false,
             bool no_grad = false) {
  SegSpec out = seg(numel, tensor, dtypes, misaligned, no_grad);
  out.state_dtype = sg::Q8;
  out.start = start;
  return out;
}

std::vector<SegSpec> q8_segments(int rot) {
  const int64_t C = sg::CHUNK;
  return {qseg(4096, 0, rot + 0, 0),
          qseg(300, 1, rot + 1, 100),                 // inside two blocks
          qseg(2 * C + 700, 2, rot + 2, 37, true),    // a short first chunk, then whole blocks
          qseg(513, 3, rot + 3, 256, false, true),    // no gradient
          seg(C + 5, 4, rot + 4),                     // fp32 state
          qseg(200, 1, rot + 1, 5000)};               // tensor 1's second piece
}

// A few blocks only: under SG_EMU_OS_THREADS every block is 256 OS threads.
std::vector<SegSpec> quick_segments(int rot) {
  return {seg(17, 0, rot + 0), seg(301, 1, rot + 3, /*misaligned=*/true),
          seg(9, 0, rot + 2, false, /*no_grad=*/true)};
}

std::vector<Case> all_cases() {
  std::vector<Case> out;
  const int32_t SHARED_MAX = sg::cuda::SHARED_TABLE_MAX;
  for (int rot = 0; rot < 2; ++rot) {
    const std::string r = "/dtypes" + std::to_string(rot);
    out.push_back({"grokadamw" + r, sg::GROKADAMW, H_NONE, 0, 8, full_segments(rot * 4), false});
    out.push_back({"supergrok/table-shared-64" + r, sg::SUPERGROK, H_TABLE, 64, 8,
                   full_segments(rot * 4 + 1), false});
    out.push_back({"supergrok/table-shared-max" + r, sg::SUPERGROK, H_TABLE, SHARED_MAX, 8,
                   full_segments(rot * 4 + 2), false});
    out.push_back({"supergrok/table-global" + r, sg::SUPERGROK, H_TABLE, 2 * SHARED_MAX, 8,
                   full_segments(rot * 4 + 3), false});
    out.push_back({"supergrok/h-array" + r, sg::SUPERGROK, H_ARRAY, 0, 8, full_segments(rot * 4 + 5),
                   false});
  }
  // every barrier pattern of the kernels: both kinds' three launches, the table's copy
  out.push_back({"quick/grokadamw", sg::GROKADAMW, H_NONE, 0, 2, quick_segments(0), true});
  out.push_back({"quick/supergrok/table-shared", sg::SUPERGROK, H_TABLE, 64, 2,
                 quick_segments(1), true});
  for (int rot = 0; rot < 2; ++rot) {
    const std::string r = "/dtypes" + std::to_string(rot);
    out.push_back({"int8/grokadamw" + r, sg::GROKADAMW, H_NONE, 0, 5, q8_segments(rot * 3), false});
    out.push_back({"int8/supergrok/table-shared-64" + r, sg::SUPERGROK, H_TABLE, 64, 5,
                   q8_segments(rot * 3 + 1), false});
  }
  // phase 2's second launch: a block's maxima met in shared memory
  out.push_back({"quick/int8/grokadamw", sg::GROKADAMW, H_NONE, 0, 2,
                 {qseg(300, 0, 0, 100), seg(17, 1, 1)}, true});
  out.push_back({"quick/int8/supergrok", sg::SUPERGROK, H_TABLE, 64, 2,
                 {qseg(300, 0, 1, 200, true), seg(17, 1, 2)}, true});
  return out;
}

// ------------------------------------------------------------------ one run
struct Arrays {  // one segment's arrays: the kernel's, and the host computation's copies
  void *param = nullptr, *grad = nullptr, *exp_avg = nullptr, *exp_avg_sq = nullptr,
       *mu = nullptr;
  float* h = nullptr;
  float* scales[3] = {nullptr, nullptr, nullptr};  // 8-bit state: m's, v's, mu's per block
};

// How many blocks of 8-bit state a piece of `numel` elements from element `start` touches.
int64_t blocks_of(int64_t start, int64_t numel) {
  return numel == 0 ? 0 : (start + numel - 1) / sg::QBLOCK - start / sg::QBLOCK + 1;
}

int64_t block_of(const SegSpec& sp, int64_t j) { return (sp.start + j) / sg::QBLOCK - sp.start / sg::QBLOCK; }

// One state value of element j (8-bit: its code at its block's scale).
float state_at(const Arrays& a, const SegSpec& sp, int which, int64_t j) {
  const void* arr = which == 0 ? a.exp_avg : which == 1 ? a.exp_avg_sq : a.mu;
  if (sp.state_dtype != sg::Q8) return load_at(arr, sp.state_dtype, j);
  const float scale = a.scales[which][block_of(sp, j)];
  if (which == 1) return sg::dequantize_unsigned(static_cast<const uint8_t*>(arr)[j], scale);
  return sg::dequantize_signed(static_cast<const int8_t*>(arr)[j], scale);
}

float absmax(const std::vector<float>& x) {
  uint32_t a = 0;
  for (float y : x) a = std::max(a, sg::f32_to_bits(y) & 0x7FFFFFFFu);
  return sg::bits_to_f32(a);
}

struct Mismatches {
  std::string where;
  int64_t count = 0;
  void report(const std::string& what, uint64_t want, uint64_t got, double want_v, double got_v) {
    if (count++ < 12)
      fprintf(stderr, "MISMATCH %s: %s: expected %#llx (%.9g), got %#llx (%.9g)\n", where.c_str(),
              what.c_str(), (unsigned long long)want, want_v, (unsigned long long)got, got_v);
  }
};

void fill_scalars(double* row, int32_t tensor) {
  const int step = tensor + 1;
  const double b1 = 0.9, b2 = 0.999, lr = 1e-3, wd = 0.01 * (tensor % 3);
  row[sg::COL_GRAD_SCALE] = tensor % 2 ? 1.0 : 0.625 + 0.01 * tensor;
  row[sg::COL_ALPHA] = tensor == 2 ? 0.0 : 0.98;
  row[sg::COL_ONE_MINUS_ALPHA] = 1.0 - row[sg::COL_ALPHA];
  row[sg::COL_AMP] = tensor % 3 == 1 ? 0.0 : 2.0 + 0.25 * tensor;  // SuperGrok's gate off / on
  row[sg::COL_SMART_SCALE] = 1.1 + 0.01 * tensor;
  row[sg::COL_BETA1] = b1;
  row[sg::COL_ONE_MINUS_BETA1] = 1.0 - b1;
  row[sg::COL_BETA2] = b2;
  row[sg::COL_ONE_MINUS_BETA2] = 1.0 - b2;
  row[sg::COL_SQRT_BC2] = std::sqrt(1.0 - std::pow(b2, step));
  row[sg::COL_EPS] = 1e-8;
  row[sg::COL_DECAY] = 1.0 - lr * wd;
  row[sg::COL_STEP_SIZE] = -lr / (1.0 - std::pow(b1, step));
}

// A valid table (grok_math.h): `size` a power of two, sorted breakpoints in the gradients'
// range padded with +inf (at least one pad), a piece per slot. The host computation searches
// it sorted (Table); the kernels get it in level order (DeviceTable), built here by the
// definition in grok_math.h: node 2^k - 1 + r holds bp[(2r + 1) size / 2^(k+1) - 1].
struct Tables {
  Table sorted{nullptr, nullptr, nullptr, 0};
  DeviceTable level{nullptr, nullptr, 0};
};

Tables make_table(Arena& arena, Rng& rng, int32_t size) {
  float* bp = static_cast<float*>(arena.take(sizeof(float) * (size_t)size));
  float* slopes = static_cast<float*>(arena.take(sizeof(float) * (size_t)size));
  float* intercepts = static_cast<float*>(arena.take(sizeof(float) * (size_t)size));
  const int32_t real = size - 1 - size / 8;
  for (int32_t i = 0; i < real; ++i) bp[i] = rng.uniform(-1.25f, 1.25f);
  std::sort(bp, bp + real);
  for (int32_t i = real; i < size; ++i) bp[i] = INFINITY;
  for (int32_t i = 0; i < size; ++i) {
    slopes[i] = rng.uniform(-3.0f, 3.0f);
    intercepts[i] = rng.uniform(-2.0f, 2.0f);
  }
  intercepts[0] = -30.0f;  // below the first breakpoint the log-mask clamps (exp(-20))

  float* nodes = static_cast<float*>(arena.take(sizeof(float) * (size_t)size));
  float2* pieces = static_cast<float2*>(arena.take(sizeof(float2) * (size_t)size));
  for (int32_t j = 0; j + 1 < size; ++j) {
    int32_t k = 0;
    while ((2 << k) <= j + 1) ++k;  // level k: j + 1 in [2^k, 2^(k+1))
    const int64_t r = j + 1 - (1 << k);
    nodes[j] = bp[(2 * r + 1) * size / (2 << k) - 1];
  }
  nodes[size - 1] = INFINITY;  // padding, never read
  for (int32_t i = 0; i < size; ++i) pieces[i] = make_float2(slopes[i], intercepts[i]);

  Tables t;
  t.sorted = {bp, slopes, intercepts, size};
  t.level = {nodes, pieces, size};
  return t;
}

bool run_case(const Case& cs) {
  Arena arena;
  uint64_t seed = 0xCBF29CE484222325ull;  // FNV-1a of the name: each case its own data
  for (char ch : cs.name) seed = (seed ^ (uint8_t)ch) * 0x100000001B3ull;
  Rng rng{seed};
  const bool super = cs.kind == sg::SUPERGROK;
  const int K = super ? sg::N_STATS : 1;
  const size_t n_segs = cs.segs.size();

  Tables tables;
  if (cs.h_source == H_TABLE) tables = make_table(arena, rng, cs.table_size);
  const Table& table = tables.sorted;

  // the kernels' arrays, and the host computation's copies (same dtypes, same values)
  std::vector<Arrays> dev(n_segs), ref(n_segs);
  std::vector<Segment> segments(n_segs);
  for (size_t i = 0; i < n_segs; ++i) {
    const SegSpec& sp = cs.segs[i];
    const int64_t off = sp.misaligned ? 1 : 0;
    auto make = [&](int dtype, float lo, float hi, void** d, void** r) {
      const size_t es = element_bytes(dtype);
      char* a = static_cast<char*>(arena.take(es * (size_t)(sp.numel + off)));
      char* b = static_cast<char*>(arena.take(es * (size_t)(sp.numel + off)));
      *d = a + es * off;
      *r = b + es * off;
      for (int64_t j = 0; j < sp.numel; ++j) store_at(*d, dtype, j, rng.uniform(lo, hi));
      memcpy(*r, *d, es * (size_t)sp.numel);
    };
    make(sp.param_dtype, -1.0f, 1.0f, &dev[i].param, &ref[i].param);
    if (!sp.no_grad) make(sp.grad_dtype, -1.5f, 1.5f, &dev[i].grad, &ref[i].grad);
    if (sp.state_dtype == sg::Q8) {  // codes over the whole map, scales per block
      auto codes = [&](bool is_signed, void** d, void** r) {
        char* a = static_cast<char*>(arena.take((size_t)(sp.numel + off)));
        char* b = static_cast<char*>(arena.take((size_t)(sp.numel + off)));
        *d = a + off;
        *r = b + off;
        for (int64_t j = 0; j < sp.numel; ++j) {
          const int32_t c = (int32_t)(rng.next() % 241) - (is_signed ? 120 : -7);
          a[off + j] = (char)(is_signed ? (int8_t)c : (int8_t)(uint8_t)c);
        }
        memcpy(*r, *d, (size_t)sp.numel);
      };
      codes(true, &dev[i].exp_avg, &ref[i].exp_avg);
      codes(false, &dev[i].exp_avg_sq, &ref[i].exp_avg_sq);
      codes(true, &dev[i].mu, &ref[i].mu);
      const float hi[3] = {0.1f, 0.01f, 0.5f};
      const int64_t nb = blocks_of(sp.start, sp.numel);
      for (int k = 0; k < 3; ++k) {
        std::vector<float> sc((size_t)nb);
        for (float& x : sc) x = rng.uniform(0.2f * hi[k], hi[k]);
        dev[i].scales[k] = arena.copy(sc);
        ref[i].scales[k] = arena.copy(sc);
      }
    } else {
      make(sp.state_dtype, -0.1f, 0.1f, &dev[i].exp_avg, &ref[i].exp_avg);
      make(sp.state_dtype, 0.0f, 0.01f, &dev[i].exp_avg_sq, &ref[i].exp_avg_sq);
      make(sp.state_dtype, -0.5f, 0.5f, &dev[i].mu, &ref[i].mu);
    }
    if (cs.h_source == H_ARRAY && !sp.no_grad) {
      void *d, *r;
      make(sg::F32, -2.0f, 2.0f, &d, &r);
      dev[i].h = static_cast<float*>(d);
      ref[i].h = static_cast<float*>(r);
    }
    Segment& s = segments[i];
    s.param = dev[i].param;
    s.grad = dev[i].grad;
    s.exp_avg = dev[i].exp_avg;
    s.exp_avg_sq = dev[i].exp_avg_sq;
    s.mu = dev[i].mu;
    s.h = dev[i].h;
    s.numel = sp.numel;
    s.exp_avg_scale = dev[i].scales[0];
    s.exp_avg_sq_scale = dev[i].scales[1];
    s.mu_scale = dev[i].scales[2];
    s.offset = sp.start;  // the draws of stochastic rounding: off in these cases (fill_scalars)
    s.tensor = sp.tensor;
    s.param_dtype = sp.param_dtype;
    s.grad_dtype = sp.grad_dtype;
    s.state_dtype = sp.state_dtype;
  }

  std::vector<int64_t> numels, leads;
  std::vector<int32_t> tensor_of;
  bool has_q8 = false;
  for (const SegSpec& sp : cs.segs) {
    numels.push_back(sp.numel);
    leads.push_back(sp.state_dtype == sg::Q8 ? sp.start % sg::QBLOCK : 0);
    tensor_of.push_back(sp.tensor);
    has_q8 |= sp.state_dtype == sg::Q8;
  }
  const std::vector<Chunk> chunks = sg::cut_chunks(numels, leads);
  const sg::ChunksByTensor by_tensor = sg::chunks_by_tensor(chunks, tensor_of, cs.n_tensors);
  const int64_t n_chunks = (int64_t)chunks.size();

  std::vector<double> scalars((size_t)cs.n_tensors * sg::N_COLUMNS);
  for (int32_t t = 0; t < cs.n_tensors; ++t) fill_scalars(&scalars[(size_t)t * sg::N_COLUMNS], t);

  DeviceJob job{};
  job.kind = cs.kind;
  job.segments = arena.copy(segments);
  job.chunks = arena.copy(chunks);
  job.n_chunks = n_chunks;
  job.tensor_offsets = arena.copy(by_tensor.offsets);
  job.tensor_chunks = arena.copy(by_tensor.index);
  job.n_tensors = cs.n_tensors;
  // NaN: a partial or a statistic the kernels do not write shows
  job.partials = arena.copy(std::vector<double>((size_t)n_chunks * sg::N_STATS, NAN));
  job.stats = arena.copy(std::vector<double>((size_t)cs.n_tensors * K, NAN));
  job.n_stats = K;
  job.scalars = arena.copy(scalars);
  job.table = tables.level;
  job.has_table = cs.h_source == H_TABLE;
  job.has_q8 = has_q8;

  Mismatches bad;
  bad.where = cs.name;

  // ---------------- the host computation of phase 1, from the arrays before the update
  std::vector<double> partial((size_t)n_chunks * K, 0.0);
  std::vector<std::vector<double>> terms((size_t)K);
  for (int64_t c = 0; c < n_chunks; ++c) {
    const Chunk& ch = chunks[(size_t)c];
    const SegSpec& sp = cs.segs[(size_t)ch.segment];
    const Arrays& a = ref[(size_t)ch.segment];
    for (auto& v : terms) v.assign((size_t)ch.size, 0.0);
    if (sp.no_grad) {
      for (int q = 0; q < K; ++q) partial[(size_t)(c * K + q)] = 0.0;
      continue;
    }
    for (int64_t e = 0; e < ch.size; ++e) {
      const int64_t i = ch.begin + e;
      const float gf = load_at(a.grad, sp.grad_dtype, i);
      const double g = gf;
      terms[sg::ST_GRAD_SQ][(size_t)e] = g * g;
      if (!super) continue;
      const double h = a.h != nullptr ? a.h[i] : sg::masked(sg::table_log_mask(table, gf), gf);
      const double u = state_at(a, sp, 2, i);
      terms[sg::ST_H_SQ][(size_t)e] = h * h;
      terms[sg::ST_H_MU][(size_t)e] = h * u;
      terms[sg::ST_H_GRAD][(size_t)e] = h * g;
      terms[sg::ST_MU_SQ][(size_t)e] = u * u;
      terms[sg::ST_MU_GRAD][(size_t)e] = u * g;
    }
    for (int q = 0; q < K; ++q)
      partial[(size_t)(c * K + q)] =
          sg::cuda::strided_tree_sum(terms[(size_t)q].data(), ch.size, sg::cuda::GROUP);
  }
  std::vector<double> want_stats((size_t)cs.n_tensors * K);
  for (int32_t t = 0; t < cs.n_tensors; ++t)
    for (int q = 0; q < K; ++q) {
      std::vector<double> mine;  // the tensor's chunk partials in chunk order
      for (int64_t c = 0; c < n_chunks; ++c)
        if (cs.segs[(size_t)chunks[(size_t)c].segment].tensor == t)
          mine.push_back(partial[(size_t)(c * K + q)]);
      want_stats[(size_t)(t * K + q)] =
          sg::cuda::strided_tree_sum(mine.data(), (int64_t)mine.size(), 1);
    }

  // NaN compares equal to NaN bit for bit here: the data must keep every result finite
  for (double x : want_stats)
    if (!std::isfinite(x)) {
      fprintf(stderr, "FAIL %s: the host sums are not all finite: fix the case's data\n",
              cs.name.c_str());
      return false;
    }

  // ---------------- phase 1
  const char* failed = "";
  cudaError_t err = sg::cuda::phase1(job, nullptr, &failed);
  if (err != cudaSuccess) {
    fprintf(stderr, "FAIL %s: %s: %s\n", cs.name.c_str(), failed, cudaGetErrorName(err));
    return false;
  }
  for (int32_t t = 0; t < cs.n_tensors; ++t)
    for (int q = 0; q < K; ++q) {
      const double want = want_stats[(size_t)(t * K + q)], got = job.stats[t * K + q];
      if (double_bits(want) != double_bits(got))
        bad.report("phase 1 tensor " + std::to_string(t) + " " + STAT_NAMES[q], double_bits(want),
                   double_bits(got), want, got);
    }

  // ---------------- the host computation of phase 2, then phase 2
  for (size_t i = 0; i < n_segs; ++i) {
    const SegSpec& sp = cs.segs[i];
    Arrays& a = ref[i];
    if (sp.no_grad) continue;
    const sg::Scalars k = sg::scalars_from_row(&scalars[(size_t)sp.tensor * sg::N_COLUMNS]);
    // element j's update of the state values m, v, u (in place); the parameter is written
    auto update = [&](int64_t j, float& m, float& v, float& u) {
      float p = load_at(a.param, sp.param_dtype, j);
      const float g = load_at(a.grad, sp.grad_dtype, j);
      if (super) {
        const float h = a.h != nullptr ? a.h[j] : sg::masked(sg::table_log_mask(table, g), g);
        sg::supergrok_update(p, g, h, m, v, u, k);
      } else {
        sg::grokadamw_update(p, g, m, v, u, k);
      }
      store_at(a.param, sp.param_dtype, j, p);
    };
    if (sp.state_dtype == sg::Q8) {  // block by block: the update, then the block's codes
      for (int64_t lo = 0; lo < sp.numel;) {
        const int64_t b = block_of(sp, lo);
        int64_t hi = lo;
        while (hi < sp.numel && block_of(sp, hi) == b) ++hi;
        std::vector<float> m, v, u;
        for (int64_t j = lo; j < hi; ++j) {
          float mj = state_at(a, sp, 0, j), vj = state_at(a, sp, 1, j), uj = state_at(a, sp, 2, j);
          update(j, mj, vj, uj);
          m.push_back(mj);
          v.push_back(vj);
          u.push_back(uj);
        }
        const float am = absmax(m), av = absmax(v), au = absmax(u);
        for (int64_t j = lo; j < hi; ++j) {
          const size_t e = (size_t)(j - lo);
          static_cast<int8_t*>(a.exp_avg)[j] = sg::quantize_signed(m[e], sg::inverse_scale(am), false, 0u);
          static_cast<uint8_t*>(a.exp_avg_sq)[j] = sg::quantize_unsigned(v[e], sg::inverse_scale(av), false, 0u);
          static_cast<int8_t*>(a.mu)[j] = sg::quantize_signed(u[e], sg::inverse_scale(au), false, 0u);
        }
        a.scales[0][b] = am;
        a.scales[1][b] = av;
        a.scales[2][b] = au;
        if (!std::isfinite(am) || !std::isfinite(av) || !std::isfinite(au)) {
          fprintf(stderr, "FAIL %s: segment %zu block %lld: the host update is not finite: fix "
                  "the case's data\n", cs.name.c_str(), i, (long long)b);
          return false;
        }
        lo = hi;
      }
      continue;
    }
    for (int64_t j = 0; j < sp.numel; ++j) {
      float m = load_at(a.exp_avg, sp.state_dtype, j);
      float v = load_at(a.exp_avg_sq, sp.state_dtype, j);
      float u = load_at(a.mu, sp.state_dtype, j);
      update(j, m, v, u);
      store_at(a.exp_avg, sp.state_dtype, j, m);
      store_at(a.exp_avg_sq, sp.state_dtype, j, v);
      store_at(a.mu, sp.state_dtype, j, u);
      if (!std::isfinite(load_at(a.param, sp.param_dtype, j)) ||
          !std::isfinite(load_at(a.exp_avg, sp.state_dtype, j)) ||
          !std::isfinite(load_at(a.exp_avg_sq, sp.state_dtype, j)) ||
          !std::isfinite(load_at(a.mu, sp.state_dtype, j))) {
        fprintf(stderr, "FAIL %s: segment %zu element %lld: the host update is not finite: fix "
                "the case's data\n", cs.name.c_str(), i, (long long)j);
        return false;
      }
    }
  }
  err = sg::cuda::phase2(job, nullptr, &failed);
  if (err != cudaSuccess) {
    fprintf(stderr, "FAIL %s: %s: %s\n", cs.name.c_str(), failed, cudaGetErrorName(err));
    return false;
  }
  int64_t elements = 0;
  for (size_t i = 0; i < n_segs; ++i) {
    const SegSpec& sp = cs.segs[i];
    elements += sp.numel;
    struct {
      const char* name;
      const void *d, *r;
      int dtype;
    } const arrays[] = {{"param", dev[i].param, ref[i].param, sp.param_dtype},
                        {"grad", dev[i].grad, ref[i].grad, sp.grad_dtype},
                        {"exp_avg", dev[i].exp_avg, ref[i].exp_avg, sp.state_dtype},
                        {"exp_avg_sq", dev[i].exp_avg_sq, ref[i].exp_avg_sq, sp.state_dtype},
                        {"mu", dev[i].mu, ref[i].mu, sp.state_dtype},
                        {"h", dev[i].h, ref[i].h, sg::F32}};
    const char* const scale_names[] = {"exp_avg_scale", "exp_avg_sq_scale", "mu_scale"};
    for (int q = 0; q < 3 && sp.state_dtype == sg::Q8; ++q)
      for (int64_t b = 0; b < blocks_of(sp.start, sp.numel); ++b) {
        const float want = ref[i].scales[q][b], got = dev[i].scales[q][b];
        if (sg::f32_to_bits(want) != sg::f32_to_bits(got))
          bad.report("phase 2 segment " + std::to_string(i) + " " + scale_names[q] + "[" +
                         std::to_string(b) + "]",
                     sg::f32_to_bits(want), sg::f32_to_bits(got), want, got);
      }
    for (const auto& arr : arrays) {
      if (arr.d == nullptr) continue;
      for (int64_t j = 0; j < sp.numel; ++j) {
        const uint32_t want = bits_at(arr.r, arr.dtype, j), got = bits_at(arr.d, arr.dtype, j);
        if (want != got)
          bad.report("phase 2 segment " + std::to_string(i) + " (" +
                         DTYPE_NAMES[sp.param_dtype] + "/" + DTYPE_NAMES[sp.grad_dtype] + "/" +
                         DTYPE_NAMES[sp.state_dtype] + (sp.misaligned ? ", misaligned" : "") +
                         ") " + arr.name + "[" + std::to_string(j) + "]",
                     want, got, load_at(arr.r, arr.dtype, j), load_at(arr.d, arr.dtype, j));
      }
    }
  }
  if (bad.count > 0) {
    fprintf(stderr, "FAIL %s: %lld mismatches\n", cs.name.c_str(), (long long)bad.count);
    return false;
  }
  printf("ok   %-40s %3lld chunks %6lld elements\n", cs.name.c_str(), (long long)n_chunks,
         (long long)elements);
  return true;
}

// ---------------------------------------------------------------- the emulator's own rules
// What a launch on a GPU refuses or guarantees, which the kernels above rely on the emulator to
// refuse or guarantee alike: the shared-memory limit (static and dynamic together), the block
// and grid limits, a barrier every thread waits at, threads that exit before a barrier, a trap.
__global__ void shared_hog(int* out) {
  SG_SHARED(double, big, [4096]);  // 32 KiB static
  SG_DYNAMIC_SHARED(float, dyn);
  if (threadIdx.x == 0) {
    big[0] = 1.0;
    dyn[0] = 1.0f;
    out[0] += 1;
  }
}

__global__ void reverse_through_shared(int* out) {
  SG_SHARED(int, slot, [64]);
  slot[threadIdx.x] = (int)(blockIdx.x * 64 + threadIdx.x);
  __syncthreads();
  out[blockIdx.x * 64 + threadIdx.x] = slot[63 - threadIdx.x];
}

__global__ void half_exit_early(int* out) {
  SG_SHARED(int, slot, [64]);
  if (threadIdx.x % 2) return;  // these no longer count at the barrier
  slot[threadIdx.x] = 7;
  __syncthreads();
  out[threadIdx.x] = slot[(threadIdx.x + 2) % 64];
}

__global__ void traps(int* /*out*/) {
  if (threadIdx.x == 0) __trap();
}

bool check_launch_limits() {
  int out[3 * 64] = {0};
  bool ok = true;
  auto expect = [&](const char* what, cudaError_t want) {
    const cudaError_t got = cudaGetLastError();
    if (got != want) {
      fprintf(stderr, "FAIL launch limits: %s: expected %s, got %s\n", what,
              cudaGetErrorName(want), cudaGetErrorName(got));
      ok = false;
    }
  };
  SG_LAUNCH(shared_hog, 1, 64, 16 * 1024, nullptr)(out);  // 48 KiB in all: the limit
  expect("48 KiB of shared memory", cudaSuccess);
  SG_LAUNCH(shared_hog, 1, 64, 16 * 1024 + 4, nullptr)(out);  // 4 bytes over, with the static
  expect("48 KiB + 4 bytes of shared memory", cudaErrorInvalidValue);
  const int before = out[0];
  SG_LAUNCH(shared_hog, 1, 64, 48 * 1024 + 4, nullptr)(out);  // dynamic alone over: not run
  expect("dynamic shared memory over 48 KiB", cudaErrorInvalidValue);
  if (out[0] != before) {
    fprintf(stderr, "FAIL launch limits: a refused launch ran\n");
    ok = false;
  }
  SG_LAUNCH(reverse_through_shared, 1, 1025, 0, nullptr)(out);
  expect("1,025 threads", cudaErrorInvalidConfiguration);
  SG_LAUNCH(reverse_through_shared, 0, 64, 0, nullptr)(out);
  expect("an empty grid", cudaErrorInvalidConfiguration);
  SG_LAUNCH(reverse_through_shared, 3, 64, 0, nullptr)(out);
  expect("a barrier", cudaSuccess);
  for (int i = 0; i < 3 * 64; ++i)
    if (out[i] != (i / 64) * 64 + 63 - i % 64) {
      fprintf(stderr, "FAIL launch limits: thread %d read %d across the barrier\n", i, out[i]);
      ok = false;
      break;
    }
  SG_LAUNCH(half_exit_early, 1, 64, 0, nullptr)(out);
  expect("threads that exit before a barrier", cudaSuccess);
  for (int i = 0; i < 64; i += 2)
    if (out[i] != 7) {
      fprintf(stderr, "FAIL launch limits: thread %d read %d\n", i, out[i]);
      ok = false;
      break;
    }
  SG_LAUNCH(traps, 2, 32, 0, nullptr)(out);
  expect("a trap", cudaErrorLaunchFailure);
  expect("the error, once read", cudaSuccess);
  if (ok) printf("ok   launch limits, barriers and traps\n");
  return ok;
}

int usage() {
  fprintf(stderr, "usage: cuda_driver [--quick | --case SUBSTRING | --list]\n");
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  bool quick = false, list = false;
  std::string filter;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--quick") quick = true;
    else if (a == "--list") list = true;
    else if (a == "--case" && i + 1 < argc) filter = argv[++i];
    else return usage();
  }
  const auto start = std::chrono::steady_clock::now();
  int run = 0, failed = 0;
  if (!list && filter.empty()) {
    ++run;
    if (!check_launch_limits()) ++failed;
  }
  for (const Case& cs : all_cases()) {
    if (quick && !cs.quick) continue;
    if (!quick && filter.empty() && cs.quick) continue;  // the full cases cover these
    if (!filter.empty() && cs.name.find(filter) == std::string::npos) continue;
    if (list) {
      printf("%s\n", cs.name.c_str());
      continue;
    }
    ++run;
    if (!run_case(cs)) ++failed;
  }
  if (list) return 0;
  const double secs =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  if (run == 0) {
    fprintf(stderr, "FAIL: no case selected\n");
    return 1;
  }
  if (failed > 0) {
    fprintf(stderr, "FAIL: %d of %d cases\n", failed, run);
    return 1;
  }
  printf("all %d cases passed (%.2f s)\n", run, secs);
  return 0;
}
