// The CPU kernel for x86-64 with AVX-512 (F, BW, VL, DQ). Chosen at run time (dispatch.cpp);
// the target applies to this file only, so the library still loads on any x86-64.
#include "kernel.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,f16c,bmi2,prefer-vector-width=512")
// GCC 12's avx512fintrin.h builds _mm512_undefined_* from self-initialised locals, which
// -Wmaybe-uninitialized reports at every inlined permute and shift
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#define SG_ISA_AVX512
// lambdas do not inherit the target pragma: give the in-register table lookup its own
#define SG_LOOKUP_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq")))
#include "loops.h"
sg::cpu::Kernels sg::cpu::kernels_avx512() { return {run_phase1, run_phase2}; }
#else
sg::cpu::Kernels sg::cpu::kernels_avx512() { return {nullptr, nullptr}; }
#endif
