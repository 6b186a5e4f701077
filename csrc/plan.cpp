// The plan of a rank's step: a cached description of its segments, and the two kernel calls.
//
// The plan is built once from a layout's segments (shardgrok/kernels/plan.py) and holds the
// parameter and state views; every step it re-reads the gradients (a new tensor after
// zero_grad(set_to_none=True)), so the per-step work outside the kernels is a pass over the
// sources in C++, not Python.
//
// A plan of CUDA tensors is built and resolved here too (this file needs no CUDA); it does not
// run the CPU kernel but hands out the tables the CUDA kernel reads (segment_table,
// chunk_table, chunks_by_tensor), which shardgrok/kernels/cuda.py copies to the GPU.
//
// ATen and torch's pybind11 casters, not <torch/extension.h>: its C++ frontend (torch::nn, ...)
// is nothing this file uses and made it half again as slow to compile (41 s against 28 s of CPU
// time here).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/csrc/utils/pybind.h>

#include <cstring>
#include <string>
#include <vector>

#include "bindings.h"
#include "cpu/dispatch.h"
#include "cpu/kernel.h"

namespace {

using sg::Chunk;
using sg::cpu::Job;
using sg::cpu::Kernels;
using sg::Segment;

// The instruction set's kernels, looked up per call: set_isa may change it between calls.
Kernels active_kernels() { return sg::cpu::kernels_for(sg::cpu::active_isa()); }

int32_t dtype_code(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return sg::F32;
    case at::kBFloat16: return sg::BF16;
    case at::kHalf: return sg::F16;
    default: return -1;
  }
}

std::string describe(const at::Tensor& t) {
  std::string s = std::string(c10::toString(t.scalar_type())) + " " + t.device().str() + " [";
  for (int64_t i = 0; i < t.dim(); ++i) s += (i ? ", " : "") + std::to_string(t.size(i));
  return s + "]";
}

struct PlanSegment {
  int64_t source;   // which source's gradient this piece reads
  int64_t offset;   // element offset of the piece inside the source's flat gradient
  int64_t numel;
  int64_t start;    // index of the piece's first element in its whole tensor
  int32_t tensor;   // global tensor index
  at::Tensor param, exp_avg, exp_avg_sq, mu;
  std::vector<at::Tensor> scales;  // 8-bit state: the blocks' scales of m, v, mu; else empty
  int32_t state_dtype;             // sg::Dtype of the state (Q8 for 8-bit codes)
};

// How many blocks of 8-bit state a piece of `numel` elements from element `start` touches.
int64_t blocks_of(int64_t start, int64_t numel) {
  return numel == 0 ? 0 : (start + numel - 1) / sg::QBLOCK - start / sg::QBLOCK + 1;
}

class Plan {
 public:
  Plan(int64_t n_tensors, std::vector<at::Tensor> sources, at::Tensor segments,
       std::vector<at::Tensor> params, std::vector<at::Tensor> exp_avgs,
       std::vector<at::Tensor> exp_avg_sqs, std::vector<at::Tensor> mus,
       std::vector<at::Tensor> steps, at::Tensor slot_of_tensor,
       std::vector<std::vector<at::Tensor>> scales)
      : n_tensors_(n_tensors), sources_(std::move(sources)),
        device_(sources_.empty() ? at::Device(at::kCPU) : sources_[0].device()),
        steps_(std::move(steps)) {
    TORCH_CHECK(segments.dim() == 2 && segments.size(1) == 5 &&
                    segments.scalar_type() == at::kLong,
                "segments must be an int64 [S, 5] table (tensor, source, offset, numel, start)");
    const int64_t n = segments.size(0);
    TORCH_CHECK((int64_t)params.size() == n && (int64_t)exp_avgs.size() == n &&
                    (int64_t)exp_avg_sqs.size() == n && (int64_t)mus.size() == n,
                "one parameter and state view per segment");
    TORCH_CHECK(scales.empty() || (int64_t)scales.size() == n,
                "scales: none, or one list per segment (empty unless its state is 8-bit)");
    TORCH_CHECK(slot_of_tensor.scalar_type() == at::kLong && slot_of_tensor.numel() == n_tensors,
                "slot_of_tensor must be int64 [n_tensors]");
    slot_of_tensor_ = slot_of_tensor.contiguous();
    const int64_t* slots = slot_of_tensor_.data_ptr<int64_t>();
    for (int64_t i = 0; i < n_tensors; ++i)
      TORCH_CHECK(slots[i] >= 0 && slots[i] < (int64_t)steps_.size(), "slot out of range");
    for (const at::Tensor& s : steps_)
      TORCH_CHECK(s.numel() == 1 && s.device().is_cpu(), "a step counter is a 1-element CPU tensor");
    auto table = segments.contiguous();
    const int64_t* row = table.data_ptr<int64_t>();
    for (int64_t i = 0; i < n; ++i, row += 5) {
      PlanSegment s{row[1], row[2], row[3], row[4], (int32_t)row[0], params[i], exp_avgs[i],
                    exp_avg_sqs[i], mus[i], scales.empty() ? std::vector<at::Tensor>{} : scales[i],
                    sg::F32};
      TORCH_CHECK(s.start >= 0, "segment ", i, ": its start in its tensor is negative");
      TORCH_CHECK(s.tensor >= 0 && s.tensor < n_tensors, "segment ", i, ": tensor index out of range");
      TORCH_CHECK(s.source >= 0 && s.source < (int64_t)sources_.size(), "segment ", i, ": source out of range");
      const at::Tensor* views[4] = {&s.param, &s.exp_avg, &s.exp_avg_sq, &s.mu};
      const char* names[4] = {"parameter", "exp_avg", "exp_avg_sq", "mu"};
      const bool q8 = !s.scales.empty();
      for (int k = 0; k < 4; ++k) {
        const at::Tensor& t = *views[k];
        TORCH_CHECK(t.device() == device_, "segment ", i, ": the ", names[k], " is on ",
                    t.device().str(), " and the parameters on ", device_.str(),
                    " (one plan, one device)");
        TORCH_CHECK(t.is_contiguous() && t.numel() == s.numel, "segment ", i, ": the ", names[k],
                    " view must be contiguous with ", s.numel, " elements, got ", describe(t));
        if (k == 0 || !q8)
          TORCH_CHECK(dtype_code(t) >= 0, "segment ", i, ": the kernel takes fp32, bf16 and fp16 ",
                      names[k], "s, got ", describe(t));
      }
      if (q8) {  // 8-bit state: int8 m and mu, uint8 v, three fp32 scale vectors
        TORCH_CHECK(s.exp_avg.scalar_type() == at::kChar && s.exp_avg_sq.scalar_type() == at::kByte &&
                        s.mu.scalar_type() == at::kChar,
                    "segment ", i, ": 8-bit state is int8 exp_avg and mu and uint8 exp_avg_sq, got ",
                    describe(s.exp_avg), ", ", describe(s.exp_avg_sq), ", ", describe(s.mu));
        TORCH_CHECK(s.scales.size() == 3, "segment ", i, ": 8-bit state needs the scales of "
                    "exp_avg, exp_avg_sq and mu");
        const int64_t nb = blocks_of(s.start, s.numel);
        for (const at::Tensor& t : s.scales)
          TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous() && t.device() == device_ &&
                          t.numel() == nb,
                      "segment ", i, ": a scale vector must be contiguous fp32 on ", device_.str(),
                      " with ", nb, " entries (the blocks of elements ", s.start, "..",
                      s.start + s.numel, "), got ", describe(t));
        s.state_dtype = sg::Q8;
      } else {
        TORCH_CHECK(s.exp_avg.scalar_type() == s.exp_avg_sq.scalar_type() &&
                        s.exp_avg.scalar_type() == s.mu.scalar_type(),
                    "segment ", i, ": exp_avg, exp_avg_sq and mu must share a dtype");
        TORCH_CHECK(dtype_code(s.mu) >= 0, "segment ", i, ": the kernel takes fp32, bf16, fp16 "
                    "and 8-bit state");
        s.state_dtype = dtype_code(s.mu);
      }
      TORCH_CHECK(s.offset >= 0 && s.offset + s.numel <= sources_[s.source].numel(), "segment ", i,
                  ": its range lies outside its source");
      segs_.push_back(std::move(s));
    }
    std::vector<int64_t> numels, leads;
    for (const PlanSegment& s : segs_) {
      numels.push_back(s.numel);
      leads.push_back(s.state_dtype == sg::Q8 ? s.start % sg::QBLOCK : 0);
    }
    chunks_ = sg::cut_chunks(numels, leads);
    for (const at::Tensor& t : sources_)
      TORCH_CHECK(t.device() == device_, "every source must be on ", device_.str(), ", got ",
                  describe(t));
    grads_.resize(sources_.size());
    for (const at::Tensor& t : sources_) source_ptrs_.push_back(t.data_ptr());
    for (const PlanSegment& s : segs_) {
      const at::Tensor& src = sources_[s.source];
      if (s.numel == 0) continue;  // an empty view has no data pointer, and nothing to update
      TORCH_CHECK(s.param.data_ptr() == static_cast<char*>(src.data_ptr()) + s.offset * src.element_size(),
                  "a segment's parameter view must lie in its source at its offset");
    }
  }

  int64_t n_segments() const { return (int64_t)segs_.size(); }
  std::string device() const { return device_.str(); }
  int64_t n_chunks() const { return (int64_t)chunks_.size(); }

  // ---------------------------------------------------------------- tables for the GPU
  // The chunk table (sg::Chunk records, as bytes): fixed for the plan's life.
  at::Tensor chunk_table() const { return bytes_of(chunks_.data(), chunks_.size() * sizeof(Chunk), false); }

  // Every tensor's chunks in chunk order (job.h's chunks_by_tensor): int64 offsets [n + 1] and
  // int32 chunk indices [n_chunks].
  std::tuple<at::Tensor, at::Tensor> chunks_by_tensor() const {
    std::vector<int32_t> tensor_of;
    for (const PlanSegment& s : segs_) tensor_of.push_back(s.tensor);
    const sg::ChunksByTensor c = sg::chunks_by_tensor(chunks_, tensor_of, n_tensors_);
    auto offsets = at::empty({(int64_t)c.offsets.size()}, at::kLong);
    auto index = at::empty({(int64_t)c.index.size()}, at::kInt);
    std::copy(c.offsets.begin(), c.offsets.end(), offsets.data_ptr<int64_t>());
    std::copy(c.index.begin(), c.index.end(), index.data_ptr<int32_t>());
    return {offsets, index};
  }

  // This step's segment records (sg::Segment, as bytes; pinned when ``pinned`` so the copy to
  // the GPU is asynchronous) and present flags [n_tensors] (1.0: the tensor has a gradient).
  std::tuple<at::Tensor, at::Tensor> segment_table(
      const c10::optional<std::vector<c10::optional<at::Tensor>>>& hs, bool pinned) {
    fill_segments(hs.has_value(), hs);
    auto present = at::zeros({n_tensors_}, at::TensorOptions(at::kDouble).pinned_memory(pinned));
    double* pr = present.data_ptr<double>();
    for (const PlanSegment& s : segs_)
      if (grads_[s.source].defined()) pr[s.tensor] = 1.0;
    return {bytes_of(job_segs_.data(), job_segs_.size() * sizeof(Segment), pinned), present};
  }

  // Re-read every source's gradient (``grads`` given: the local gradients, in source order,
  // for engines whose parameters are wrappers, FSDP2's DTensors) and check it.
  // False, touching nothing, when a source's storage moved since the plan was built (``p.data =
  // ...``): the plan's views would update the old storage, so the caller builds a new plan.
  bool resolve(const c10::optional<std::vector<c10::optional<at::Tensor>>>& grads) {
    for (size_t i = 0; i < sources_.size(); ++i)
      if (sources_[i].data_ptr() != source_ptrs_[i]) return false;
    if (grads.has_value())
      TORCH_CHECK(grads->size() == sources_.size(), "expected ", sources_.size(),
                  " gradients, got ", grads->size());
    for (size_t i = 0; i < sources_.size(); ++i) {
      at::Tensor g;
      if (grads.has_value()) {
        if ((*grads)[i].has_value()) g = *(*grads)[i];
      } else {
        g = sources_[i].grad();
      }
      if (g.defined()) {
        TORCH_CHECK(g.layout() == at::kStrided, "does not support sparse gradients; use a dense "
                    "gradient (e.g. nn.Embedding(sparse=False))");
        TORCH_CHECK(!g.is_complex(), "does not support complex gradients; view complex "
                    "parameters as real with torch.view_as_real");
        TORCH_CHECK(g.numel() == sources_[i].numel() &&
                        (grads.has_value() || g.sizes() == sources_[i].sizes()),
                    "gradient ", describe(g), " does not match parameter ", describe(sources_[i]));
        TORCH_CHECK(g.device() == device_, "a gradient is on ", g.device().str(),
                    " and its parameter on ", device_.str());
        TORCH_CHECK(dtype_code(g) >= 0, "the kernel takes fp32, bf16 and fp16 gradients, got ",
                    describe(g));
        if (!g.is_contiguous()) g = g.contiguous();
      }
      grads_[i] = g;
    }
    resolved_ = true;
    return true;
  }

  // The gradient of each segment after resolve() (None where its source has none).
  std::vector<c10::optional<at::Tensor>> grad_views() const {
    TORCH_CHECK(resolved_, "resolve() first");
    std::vector<c10::optional<at::Tensor>> out;
    for (const PlanSegment& s : segs_) {
      const at::Tensor& g = grads_[s.source];
      if (g.defined()) out.emplace_back(g.reshape(-1).narrow(0, s.offset, s.numel));
      else out.emplace_back(c10::nullopt);
    }
    return out;
  }

  // Phase 1: per-tensor partial sums of this rank's pieces and which tensors have a gradient.
  // With ``out`` (the step's reduction buffer) they are written straight into its first
  // n * K + n entries: stats [n, K] then present [n]; the views are returned either way.
  std::tuple<at::Tensor, at::Tensor> phase1(int64_t kind, const c10::optional<std::vector<c10::optional<at::Tensor>>>& hs,
                                            const c10::optional<at::Tensor>& bp,
                                            const c10::optional<at::Tensor>& slopes,
                                            const c10::optional<at::Tensor>& intercepts,
                                            int64_t table_size, const c10::optional<at::Tensor>& out) {
    Job job = prepare(kind, hs, bp, slopes, intercepts, table_size);
    const int64_t k = kind == sg::GROKADAMW ? 1 : sg::N_STATS;
    at::Tensor buf = out.has_value() ? *out : at::empty({n_tensors_ * (k + 1)}, at::kDouble);
    TORCH_CHECK(buf.scalar_type() == at::kDouble && buf.dim() == 1 && buf.is_contiguous() &&
                    buf.device().is_cpu() && buf.numel() >= n_tensors_ * (k + 1),
                "out must be a contiguous float64 CPU vector of at least ", n_tensors_ * (k + 1),
                " entries");
    std::vector<double> partials((size_t)active_.size() * sg::N_STATS);
    job.partials = partials.data();
    run(active_kernels().phase1, job);
    auto stats = buf.narrow(0, 0, n_tensors_ * k).view({n_tensors_, k});
    auto present = buf.narrow(0, n_tensors_ * k, n_tensors_);
    stats.zero_();
    present.zero_();
    double* st = stats.data_ptr<double>();
    double* pr = present.data_ptr<double>();
    for (size_t i = 0; i < segs_.size(); ++i)
      if (grads_[segs_[i].source].defined()) pr[segs_[i].tensor] = 1.0;
    for (size_t c = 0; c < active_.size(); ++c) {  // chunk order: deterministic
      const int32_t t = job_segs_[active_[c].segment].tensor;
      for (int64_t q = 0; q < k; ++q) st[t * k + q] += partials[c * sg::N_STATS + q];
    }
    return {stats, present};
  }

  // Count a step for every optimizer parameter (slot) one of whose tensors has a gradient
  // somewhere (``present``, reduced); return every tensor's step count after it.
  at::Tensor bump_steps(const at::Tensor& present) {
    TORCH_CHECK(present.numel() == n_tensors_, "present must have one entry per tensor");
    auto p = present.to(at::kDouble).contiguous();
    const double* pr = p.data_ptr<double>();
    const int64_t* slot = slot_of_tensor_.data_ptr<int64_t>();
    std::vector<char> hit(steps_.size(), 0);
    for (int64_t i = 0; i < n_tensors_; ++i)
      if (pr[i] != 0.0) hit[slot[i]] = 1;
    std::vector<double> value(steps_.size());
    for (size_t s = 0; s < steps_.size(); ++s) {
      at::Tensor& t = steps_[s];
      if (t.scalar_type() == at::kFloat && t.is_contiguous()) {
        float* v = t.data_ptr<float>();
        if (hit[s]) *v += 1.0f;
        value[s] = *v;
      } else if (t.scalar_type() == at::kDouble && t.is_contiguous()) {
        double* v = t.data_ptr<double>();
        if (hit[s]) *v += 1.0;
        value[s] = *v;
      } else {
        if (hit[s]) t.add_(1);
        value[s] = t.item<double>();
      }
    }
    auto out = at::empty({n_tensors_}, at::kDouble);
    double* o = out.data_ptr<double>();
    for (int64_t i = 0; i < n_tensors_; ++i) o[i] = value[slot[i]];
    return out;
  }

  // Phase 2: the update of every piece with a gradient, from the per-tensor scalar table.
  void phase2(int64_t kind, const at::Tensor& scalars,
              const c10::optional<std::vector<c10::optional<at::Tensor>>>& hs,
              const c10::optional<at::Tensor>& bp, const c10::optional<at::Tensor>& slopes,
              const c10::optional<at::Tensor>& intercepts, int64_t table_size) {
    TORCH_CHECK(scalars.scalar_type() == at::kDouble && scalars.is_contiguous() &&
                    scalars.dim() == 2 && scalars.size(0) == n_tensors_ &&
                    scalars.size(1) == sg::N_COLUMNS,
                "scalars must be a contiguous float64 [", n_tensors_, ", ", (int)sg::N_COLUMNS, "] table");
    Job job = prepare(kind, hs, bp, slopes, intercepts, table_size);
    job.scalars = scalars.data_ptr<double>();
    run(active_kernels().phase2, job);
    release();
  }

  // Drop this step's gradients: held past the step they would keep every old gradient alive
  // while backward allocates the next ones (zero_grad(set_to_none=True)).
  void release() {
    for (at::Tensor& g : grads_) g.reset();
    resolved_ = false;  // the next step re-reads the gradients
  }

 private:
  Job prepare(int64_t kind, const c10::optional<std::vector<c10::optional<at::Tensor>>>& hs,
              const c10::optional<at::Tensor>& bp, const c10::optional<at::Tensor>& slopes,
              const c10::optional<at::Tensor>& intercepts, int64_t table_size) {
    TORCH_CHECK(device_.is_cpu(), "this plan's tensors are on ", device_.str(),
                ": the CPU kernel cannot run it (the CUDA backend reads its segment_table)");
    TORCH_CHECK(kind == sg::GROKADAMW || kind == sg::SUPERGROK, "unknown kind ", kind);
    Job job{};
    job.kind = (int32_t)kind;
    const bool super = kind == sg::SUPERGROK;
    if (super) {
      job.has_table = bp.has_value();
      TORCH_CHECK(job.has_table != hs.has_value(), "SuperGrok needs either the meta-net's table "
                  "or the masked gradients h, not both");
      if (job.has_table) {
        TORCH_CHECK(slopes.has_value() && intercepts.has_value(), "table: slopes and intercepts");
        TORCH_CHECK(table_size >= 1 && (table_size & (table_size - 1)) == 0,
                    "table size must be a power of two, got ", table_size);
        for (const at::Tensor* t : {&*bp, &*slopes, &*intercepts})
          TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->device().is_cpu(),
                      "table arrays must be contiguous fp32 CPU tensors");
        TORCH_CHECK(bp->numel() >= table_size - 1 && slopes->numel() >= table_size &&
                        intercepts->numel() >= table_size,
                    "table arrays shorter than its size ", table_size);
        job.table = {bp->data_ptr<float>(), slopes->data_ptr<float>(),
                     intercepts->data_ptr<float>(), (int32_t)table_size};
      }
    }
    fill_segments(super && !job.has_table, hs);
    active_.clear();
    for (const Chunk& c : chunks_)
      if (grads_[segs_[c.segment].source].defined()) active_.push_back(c);
    job.segments = job_segs_.data();
    job.chunks = active_.data();
    return job;
  }

  // job_segs_ from this step's gradients (null pointers where a source has none) and, with
  // ``with_h``, the masked gradients of a user's meta-net.
  void fill_segments(bool with_h, const c10::optional<std::vector<c10::optional<at::Tensor>>>& hs) {
    TORCH_CHECK(resolved_, "resolve() the gradients before a phase");
    if (with_h) TORCH_CHECK(hs.has_value() && hs->size() == segs_.size(), "one h per segment");
    job_segs_.resize(segs_.size());
    for (size_t i = 0; i < segs_.size(); ++i) {
      const PlanSegment& s = segs_[i];
      const at::Tensor& g = grads_[s.source];
      Segment& out = job_segs_[i];
      out = Segment{};
      out.numel = s.numel;
      out.offset = s.start;
      out.tensor = s.tensor;
      if (!g.defined()) continue;
      out.param = s.param.data_ptr();
      out.grad = static_cast<const char*>(g.data_ptr()) + s.offset * g.element_size();
      out.exp_avg = s.exp_avg.data_ptr();
      out.exp_avg_sq = s.exp_avg_sq.data_ptr();
      out.mu = s.mu.data_ptr();
      out.param_dtype = dtype_code(s.param);
      out.grad_dtype = dtype_code(g);
      out.state_dtype = s.state_dtype;
      if (s.state_dtype == sg::Q8) {
        out.exp_avg_scale = s.scales[0].data_ptr<float>();
        out.exp_avg_sq_scale = s.scales[1].data_ptr<float>();
        out.mu_scale = s.scales[2].data_ptr<float>();
      }
      if (with_h) {
        const auto& h = (*hs)[i];
        TORCH_CHECK(h.has_value() && h->scalar_type() == at::kFloat && h->is_contiguous() &&
                        h->numel() == s.numel && h->device() == device_,
                    "segment ", i, ": h must be a contiguous fp32 tensor of ", s.numel,
                    " elements on ", device_.str());
        out.h = h->data_ptr<float>();
      }
    }
  }

  static at::Tensor bytes_of(const void* data, size_t n, bool pinned) {
    auto out = at::empty({(int64_t)n}, at::TensorOptions(at::kByte).pinned_memory(pinned));
    if (n) std::memcpy(out.data_ptr(), data, n);
    return out;
  }

  void run(sg::cpu::ChunkFn fn, const Job& job) {
    at::parallel_for(0, (int64_t)active_.size(), 1,
                     [&](int64_t first, int64_t last) { fn(job, first, last); });
  }

  int64_t n_tensors_;
  std::vector<at::Tensor> sources_;
  at::Device device_;
  std::vector<void*> source_ptrs_;
  std::vector<at::Tensor> steps_;
  at::Tensor slot_of_tensor_;
  std::vector<PlanSegment> segs_;
  std::vector<Chunk> chunks_;
  std::vector<at::Tensor> grads_;
  bool resolved_ = false;
  std::vector<Segment> job_segs_;
  std::vector<Chunk> active_;
};

}  // namespace

void sg::bind_plan(py::module_& m) {
  py::class_<Plan>(m, "Plan")
      .def(py::init<int64_t, std::vector<at::Tensor>, at::Tensor, std::vector<at::Tensor>,
                    std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>,
                    std::vector<at::Tensor>, at::Tensor, std::vector<std::vector<at::Tensor>>>(),
           py::arg("n_tensors"), py::arg("sources"), py::arg("segments"), py::arg("params"),
           py::arg("exp_avgs"), py::arg("exp_avg_sqs"), py::arg("mus"), py::arg("steps"),
           py::arg("slot_of_tensor"), py::arg("scales") = std::vector<std::vector<at::Tensor>>{})
      .def_property_readonly("n_segments", &Plan::n_segments)
      .def_property_readonly("n_chunks", &Plan::n_chunks)
      .def_property_readonly("device", &Plan::device)
      .def("chunk_table", &Plan::chunk_table)
      .def("chunks_by_tensor", &Plan::chunks_by_tensor)
      .def("segment_table", &Plan::segment_table, py::arg("hs") = py::none(),
           py::arg("pinned") = false)
      .def("resolve", &Plan::resolve, py::arg("grads") = py::none())
      .def("grad_views", &Plan::grad_views)
      .def("phase1", &Plan::phase1, py::arg("kind"), py::arg("hs") = py::none(),
           py::arg("breakpoints") = py::none(), py::arg("slopes") = py::none(),
           py::arg("intercepts") = py::none(), py::arg("table_size") = 0,
           py::arg("out") = py::none())
      .def("bump_steps", &Plan::bump_steps)
      .def("release", &Plan::release)
      .def("phase2", &Plan::phase2, py::arg("kind"), py::arg("scalars"),
           py::arg("hs") = py::none(), py::arg("breakpoints") = py::none(),
           py::arg("slopes") = py::none(), py::arg("intercepts") = py::none(),
           py::arg("table_size") = 0);
}
