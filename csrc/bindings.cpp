// The CPU extension's module: the instruction-set control, the constants the Python side reads
// at run time, and the parts registered by plan.cpp and test_hooks.cpp. pybind11 alone, no
// torch header: the tensors are the other files' business.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <string>
#include <vector>

#include "bindings.h"
#include "cpu/dispatch.h"
#include "grok_math.h"
#include "job.h"

namespace py = pybind11;

namespace {

using sg::cpu::Isa;

bool usable(Isa isa) {
  return sg::cpu::isa_supported(isa) && sg::cpu::kernels_for(isa).phase1 != nullptr;
}

std::string current_isa() { return sg::cpu::isa_name(sg::cpu::active_isa()); }

std::vector<std::string> supported_isas() {
  std::vector<std::string> out;
  for (int i = sg::cpu::ISA_AVX512; i <= sg::cpu::ISA_GENERIC; ++i)
    if (usable((Isa)i)) out.push_back(sg::cpu::isa_name((Isa)i));
  return out;
}

// std::runtime_error: Python sees a RuntimeError, as for the plan's own checks.
void set_isa(const std::string& name) {
  Isa isa;
  if (!sg::cpu::isa_from_name(name.c_str(), &isa))
    throw std::runtime_error("unknown instruction set '" + name + "' (avx512, avx2 or generic)");
  if (!usable(isa)) {
    std::string list;
    for (const std::string& s : supported_isas()) list += (list.empty() ? "" : ", ") + s;
    throw std::runtime_error("this CPU does not support " + name + " (supported: " + list + ")");
  }
  sg::cpu::set_active_isa(isa);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "shardgrok's fused CPU step (csrc/)";
  sg::bind_plan(m);
#ifdef SHARDGROK_DIGEST  // of the sources it was built from (build.py), unquoted on the command line
#define SG_STRINGIFY2(x) #x
#define SG_STRINGIFY(x) SG_STRINGIFY2(x)
  m.attr("digest") = SG_STRINGIFY(SHARDGROK_DIGEST);
#else
  m.attr("digest") = "";
#endif
  m.attr("N_COLUMNS") = (int)sg::N_COLUMNS;
  m.attr("N_STATS") = (int)sg::N_STATS;
  m.attr("CHUNK") = sg::CHUNK;
  m.attr("GROKADAMW") = (int)sg::GROKADAMW;
  m.attr("SUPERGROK") = (int)sg::SUPERGROK;
  // the records the plan writes and the CUDA extension reads: shardgrok/kernels/cuda.py checks
  // that both extensions agree
  m.attr("SEGMENT_BYTES") = (int)sizeof(sg::Segment);
  m.attr("CHUNK_BYTES") = (int)sizeof(sg::Chunk);
  m.def("isa", &current_isa, "the instruction set the kernel runs with");
  m.def("supported_isas", &supported_isas, "instruction sets this CPU and build support");
  m.def("set_isa", &set_isa, "run with another supported instruction set (tests, benchmarks)");
  sg::bind_test_hooks(m);
}
