// Which instruction set the CPU kernel runs with: the best one this CPU and OS support, found
// once at load time by CPUID (GCC's __builtin_cpu_supports also checks that the OS saves the
// wide registers), or a lower one by request (SHARDGROK_CPU_ISA, tests).
#include <string.h>

#include "dispatch.h"

namespace sg {
namespace cpu {

static bool supported(Isa isa) {
  switch (isa) {
    case ISA_GENERIC:
      return true;
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    case ISA_AVX2:
      __builtin_cpu_init();
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c") &&
             __builtin_cpu_supports("bmi2");
    case ISA_AVX512:
      __builtin_cpu_init();
      return supported(ISA_AVX2) && __builtin_cpu_supports("avx512f") &&
             __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
             __builtin_cpu_supports("avx512dq");
#endif
    default:
      return false;
  }
}

bool isa_supported(Isa isa) { return supported(isa); }

const char* isa_name(Isa isa) {
  switch (isa) {
    case ISA_AVX512: return "avx512";
    case ISA_AVX2: return "avx2";
    default: return "generic";
  }
}

bool isa_from_name(const char* name, Isa* out) {
  for (int i = ISA_AVX512; i <= ISA_GENERIC; ++i)
    if (strcmp(name, isa_name((Isa)i)) == 0) {
      *out = (Isa)i;
      return true;
    }
  return false;
}

Isa best_isa() {
  for (int i = ISA_AVX512; i < ISA_GENERIC; ++i)
    if (supported((Isa)i)) return (Isa)i;
  return ISA_GENERIC;
}

Kernels kernels_for(Isa isa) {
  switch (isa) {
    case ISA_AVX512: return kernels_avx512();
    case ISA_AVX2: return kernels_avx2();
    default: return kernels_generic();
  }
}

// A function-local static: initialised on first use, whatever the order in which the
// translation units' statics are initialised.
static Isa& active() {
  static Isa isa = best_isa();
  return isa;
}

Isa active_isa() { return active(); }

void set_active_isa(Isa isa) { active() = isa; }

}  // namespace cpu
}  // namespace sg
