// Hooks only the tests call: the shared header's functions (exp, the fp16/bf16 conversions, the
// meta-net's table search in both layouts) and the CUDA kernel's summation order run on the
// host, and the compiler's view of the header's enums.
//
// They ship in the CPU extension, not in a test-only one, because what they test is this very
// build: the header compiled by the same compiler with the kernel's flags (-ffp-contract=off
// changes bits), so a test of another build would not vouch for this one. They are small and
// cost the step nothing; a second extension would cost every environment another build.
#include <ATen/ATen.h>
#include <torch/csrc/utils/pybind.h>  // the tensor casters (see plan.cpp)

#include <algorithm>
#include <cctype>
#include <string>
#include <tuple>

#include "bindings.h"
#include "cuda/order.h"
#include "grok_math.h"
#include "job.h"

namespace {

at::Tensor header_exp(const at::Tensor& x) {
  auto in = x.to(at::kFloat).contiguous();
  auto out = at::empty_like(in);
  const float* a = in.data_ptr<float>();
  float* o = out.data_ptr<float>();
  for (int64_t i = 0; i < in.numel(); ++i) o[i] = sg::exp_clamped(sg::clamp_log_mask(a[i]));
  return out;
}

at::Tensor header_round(const at::Tensor& x, const std::string& to) {
  TORCH_CHECK(to == "bf16" || to == "f16", "to must be bf16 or f16, got '", to, "'");
  auto in = x.to(at::kFloat).contiguous();
  auto out = at::empty_like(in);
  const float* a = in.data_ptr<float>();
  float* o = out.data_ptr<float>();
  for (int64_t i = 0; i < in.numel(); ++i)
    o[i] = to == "bf16" ? sg::bf16_to_f32(sg::f32_to_bf16(a[i]))
                        : sg::f16_to_f32(sg::f32_to_f16(a[i]));
  return out;
}

// The stochastic rounding's draws (grok_math.h) for elements `index` (int64) of one tensor at
// one step: the 32-bit words, as int64.
at::Tensor header_rounding_bits(int64_t seed, int64_t step, int64_t tensor, const at::Tensor& index,
                                int64_t which) {
  TORCH_CHECK(seed >= 0 && seed < (int64_t(1) << 32), "seed must lie in [0, 2^32)");
  TORCH_CHECK(step >= 0 && tensor >= 0 && tensor < (int64_t(1) << 31) && which >= 0 && which < 4,
              "step >= 0, 0 <= tensor < 2^31, 0 <= which < 4");
  auto in = index.to(at::kLong).contiguous();
  auto out = at::empty_like(in);
  const uint32_t key = sg::rounding_key((uint32_t)seed, (uint64_t)step, (uint32_t)tensor);
  const int64_t* a = in.data_ptr<int64_t>();
  int64_t* o = out.data_ptr<int64_t>();
  for (int64_t i = 0; i < in.numel(); ++i)
    o[i] = sg::rounding_bits(sg::rounding_base(key, a[i]), (uint32_t)which);
  return out;
}

// x (fp32) rounded to bf16 by the words `bits` (int64, low 32 bits used), back as fp32.
at::Tensor header_round_stochastic(const at::Tensor& x, const at::Tensor& bits) {
  auto in = x.to(at::kFloat).contiguous();
  auto b = bits.to(at::kLong).contiguous();
  TORCH_CHECK(in.numel() == b.numel(), "one word per value");
  auto out = at::empty_like(in);
  const float* a = in.data_ptr<float>();
  const int64_t* w = b.data_ptr<int64_t>();
  float* o = out.data_ptr<float>();
  for (int64_t i = 0; i < in.numel(); ++i)
    o[i] = sg::bf16_to_f32(sg::f32_to_bf16_stochastic(a[i], (uint32_t)w[i]));
  return out;
}

// The 8-bit state's codes (grok_math.h) of x (fp32) at 1 / scale = inv_scale, "signed" (m, mu)
// or "unsigned" (v), rounded to nearest or, with `bits` (int64, low 32 bits), stochastically;
// as int64. And back: the values of codes at `scale`.
at::Tensor header_quantize(const at::Tensor& x, double inv_scale, const std::string& kind,
                           const c10::optional<at::Tensor>& bits) {
  TORCH_CHECK(kind == "signed" || kind == "unsigned", "kind must be signed or unsigned");
  auto in = x.to(at::kFloat).contiguous();
  auto out = at::empty(in.sizes(), at::kLong);
  at::Tensor b;
  if (bits.has_value()) {
    b = bits->to(at::kLong).contiguous();
    TORCH_CHECK(b.numel() == in.numel(), "one word per value");
  }
  const float* a = in.data_ptr<float>();
  const int64_t* w = bits.has_value() ? b.data_ptr<int64_t>() : nullptr;
  int64_t* o = out.data_ptr<int64_t>();
  const float inv = (float)inv_scale;
  for (int64_t i = 0; i < in.numel(); ++i) {
    const uint32_t r = w ? (uint32_t)w[i] : 0u;
    o[i] = kind == "signed" ? (int64_t)sg::quantize_signed(a[i], inv, w != nullptr, r)
                            : (int64_t)sg::quantize_unsigned(a[i], inv, w != nullptr, r);
  }
  return out;
}

at::Tensor header_dequantize(const at::Tensor& codes, double scale, const std::string& kind) {
  TORCH_CHECK(kind == "signed" || kind == "unsigned", "kind must be signed or unsigned");
  auto in = codes.to(at::kLong).contiguous();
  auto out = at::empty(in.sizes(), at::kFloat);
  const int64_t* a = in.data_ptr<int64_t>();
  float* o = out.data_ptr<float>();
  for (int64_t i = 0; i < in.numel(); ++i)
    o[i] = kind == "signed" ? sg::dequantize_signed((int8_t)a[i], (float)scale)
                            : sg::dequantize_unsigned((uint8_t)a[i], (float)scale);
  return out;
}

at::Tensor header_table(const at::Tensor& x, const at::Tensor& bp, const at::Tensor& slopes,
                        const at::Tensor& intercepts, int64_t size) {
  TORCH_CHECK(size >= 1 && (size & (size - 1)) == 0, "table size must be a power of two, got ",
              size);
  for (const at::Tensor* t : {&bp, &slopes, &intercepts})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->device().is_cpu(),
                "table arrays must be contiguous fp32 CPU tensors");
  TORCH_CHECK(bp.numel() >= size - 1 && slopes.numel() >= size && intercepts.numel() >= size,
              "table arrays shorter than its size ", size);
  auto in = x.to(at::kFloat).contiguous();
  auto out = at::empty_like(in);
  sg::Table t{bp.data_ptr<float>(), slopes.data_ptr<float>(), intercepts.data_ptr<float>(),
              (int32_t)size};
  const float* a = in.data_ptr<float>();
  float* o = out.data_ptr<float>();
  for (int64_t i = 0; i < in.numel(); ++i) o[i] = sg::table_log_mask(t, a[i]);
  return out;
}

// The CUDA kernel's level-order table (grok_math.h's LevelTable), read through a pair of the
// float2 layout the kernel reads.
struct alignas(8) HostPair {
  float x, y;
};

sg::LevelTable<HostPair> level_table(const at::Tensor& nodes, const at::Tensor& pieces,
                                     int64_t size) {
  TORCH_CHECK(size >= 1 && (size & (size - 1)) == 0, "table size must be a power of two, got ",
              size);
  for (const at::Tensor* t : {&nodes, &pieces})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->device().is_cpu(),
                "table arrays must be contiguous fp32 CPU tensors");
  TORCH_CHECK(pieces.dim() == 2 && pieces.size(1) == 2, "pieces must be [P, 2]");
  TORCH_CHECK(nodes.numel() >= size - 1 && pieces.size(0) >= size,
              "table arrays shorter than its size ", size);
  TORCH_CHECK(reinterpret_cast<uintptr_t>(pieces.data_ptr()) % alignof(HostPair) == 0,
              "pieces must be 8-byte aligned");
  return {nodes.data_ptr<float>(), reinterpret_cast<const HostPair*>(pieces.data_ptr<float>()),
          (int32_t)size};
}

at::Tensor header_table_level(const at::Tensor& x, const at::Tensor& nodes,
                              const at::Tensor& pieces, int64_t size) {
  const sg::LevelTable<HostPair> t = level_table(nodes, pieces, size);
  auto in = x.to(at::kFloat).contiguous();
  auto out = at::empty_like(in);
  const float* a = in.data_ptr<float>();
  float* o = out.data_ptr<float>();
  for (int64_t i = 0; i < in.numel(); ++i) o[i] = sg::table_level_log_mask(t, a[i]);
  return out;
}

// A breakpoint array that logs the index of each entry a search reads.
struct Logged {
  const float* values;
  int32_t* log;
  int32_t capacity;
  int32_t* reads;
  float operator[](int32_t i) const {
    if (*reads < capacity) log[*reads] = i;
    ++*reads;
    return values[i];
  }
};

// The header's searches (sorted_search, level_search: the loops the kernels run) on every x,
// over `array` (sorted breakpoints, or level-order nodes if `level`): the piece index [n] and the
// array index each step read [n, log2(size)], in order.
std::tuple<at::Tensor, at::Tensor> header_table_trace(const at::Tensor& x, const at::Tensor& array,
                                                      int64_t size, bool level) {
  TORCH_CHECK(size >= 1 && (size & (size - 1)) == 0, "table size must be a power of two, got ",
              size);
  TORCH_CHECK(array.scalar_type() == at::kFloat && array.is_contiguous() && array.device().is_cpu(),
              "the array must be a contiguous fp32 CPU tensor");
  TORCH_CHECK(array.numel() >= size - 1, "array shorter than the table's size ", size);
  int32_t levels = 0;
  while ((int64_t{1} << levels) < size) ++levels;
  auto in = x.to(at::kFloat).contiguous();
  auto piece = at::empty({in.numel()}, at::kInt);
  auto read = at::empty({in.numel(), levels}, at::kInt);
  const float* a = in.data_ptr<float>();
  for (int64_t i = 0; i < in.numel(); ++i) {
    int32_t reads = 0;
    const Logged bp{array.data_ptr<float>(), read.data_ptr<int32_t>() + i * levels, levels,
                    &reads};
    piece.data_ptr<int32_t>()[i] = level ? sg::level_search(bp, (int32_t)size, a[i])
                                         : sg::sorted_search(bp, (int32_t)size, a[i]);
    TORCH_CHECK(reads == levels, "a search read ", reads, " entries, not ", levels);
  }
  return {piece, read};
}

// The CUDA kernel's summation order (cuda/order.h) on the host: what the GPU's sums must equal.
double cuda_order_sum(const at::Tensor& terms, int64_t group) {
  TORCH_CHECK(group >= 1, "group must be >= 1");
  auto t = terms.to(at::kDouble).contiguous();
  return sg::cuda::strided_tree_sum(t.data_ptr<double>(), t.numel(), (int)group);
}

std::string lower(std::string s) {
  std::transform(s.begin(), s.end(), s.begin(), [](unsigned char c) { return std::tolower(c); });
  return s;
}

}  // namespace

// SG_ENTRY(d, COL_, ALPHA) sets d["alpha"] to sg::COL_ALPHA: the value is the compiler's, the
// name the enumerator's own spelling, so tests/kernels/test_kernel_constants.py can hold
// shardgrok/kernels/header.py's parse of the header text to both.
#define SG_ENTRY(d, prefix, name) d[py::str(lower(#name))] = (int)sg::prefix##name

void sg::bind_test_hooks(py::module_& m) {
  m.def("header_exp", &header_exp);
  m.def("header_round", &header_round);
  m.def("header_rounding_bits", &header_rounding_bits, py::arg("seed"), py::arg("step"),
        py::arg("tensor"), py::arg("index"), py::arg("which"));
  m.def("header_round_stochastic", &header_round_stochastic);
  m.def("header_quantize", &header_quantize, py::arg("x"), py::arg("inv_scale"), py::arg("kind"),
        py::arg("bits") = py::none());
  m.def("header_dequantize", &header_dequantize, py::arg("codes"), py::arg("scale"),
        py::arg("kind"));
  m.attr("QBLOCK") = sg::QBLOCK;
  m.attr("QMIN_NUMEL") = sg::QMIN_NUMEL;
  m.def("header_table", &header_table);
  m.def("header_table_level", &header_table_level);
  m.def("header_table_trace", &header_table_trace, py::arg("x"), py::arg("array"),
        py::arg("size"), py::arg("level"));
  m.def("cuda_order_sum", &cuda_order_sum, py::arg("terms"), py::arg("group"));
  m.attr("CUDA_THREADS") = sg::cuda::THREADS;
  m.attr("CUDA_GROUP") = sg::cuda::GROUP;

  py::dict columns, stats, kinds, rounding, draws;
  SG_ENTRY(columns, COL_, GRAD_SCALE);
  SG_ENTRY(columns, COL_, ALPHA);
  SG_ENTRY(columns, COL_, ONE_MINUS_ALPHA);
  SG_ENTRY(columns, COL_, AMP);
  SG_ENTRY(columns, COL_, SMART_SCALE);
  SG_ENTRY(columns, COL_, BETA1);
  SG_ENTRY(columns, COL_, ONE_MINUS_BETA1);
  SG_ENTRY(columns, COL_, BETA2);
  SG_ENTRY(columns, COL_, ONE_MINUS_BETA2);
  SG_ENTRY(columns, COL_, SQRT_BC2);
  SG_ENTRY(columns, COL_, EPS);
  SG_ENTRY(columns, COL_, DECAY);
  SG_ENTRY(columns, COL_, STEP_SIZE);
  SG_ENTRY(columns, COL_, STEP);
  SG_ENTRY(columns, COL_, ROUNDING);
  SG_ENTRY(columns, COL_, SEED);
  SG_ENTRY(stats, ST_, GRAD_SQ);
  SG_ENTRY(stats, ST_, H_SQ);
  SG_ENTRY(stats, ST_, H_MU);
  SG_ENTRY(stats, ST_, H_GRAD);
  SG_ENTRY(stats, ST_, MU_SQ);
  SG_ENTRY(stats, ST_, MU_GRAD);
  SG_ENTRY(kinds, , GROKADAMW);
  SG_ENTRY(kinds, , SUPERGROK);
  SG_ENTRY(rounding, ROUND_, STATE);
  SG_ENTRY(rounding, ROUND_, PARAM);
  SG_ENTRY(draws, DRAW_, EXP_AVG);
  SG_ENTRY(draws, DRAW_, EXP_AVG_SQ);
  SG_ENTRY(draws, DRAW_, MU);
  SG_ENTRY(draws, DRAW_, PARAM);
  m.attr("COLUMN_INDEX") = columns;
  m.attr("ROUNDING_INDEX") = rounding;
  m.attr("DRAW_INDEX") = draws;
  m.attr("STAT_INDEX") = stats;
  m.attr("KIND_INDEX") = kinds;
}
