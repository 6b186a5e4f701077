// The CPU kernel for x86-64 with AVX2. Chosen at run time (dispatch.cpp); the target applies to
// this file only.
#include "kernel.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#pragma GCC target("avx2,f16c,bmi2")
#define SG_ISA_AVX2
#include "loops.h"
sg::cpu::Kernels sg::cpu::kernels_avx2() { return {run_phase1, run_phase2}; }
#else
sg::cpu::Kernels sg::cpu::kernels_avx2() { return {nullptr, nullptr}; }
#endif
