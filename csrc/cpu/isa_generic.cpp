// The portable CPU kernel: the compiler's baseline for the target (SSE2 on x86-64, NEON on
// aarch64). Always built; the reference for the wider paths, which must give the same bits.
#include "kernel.h"
#include "loops.h"

sg::cpu::Kernels sg::cpu::kernels_generic() { return {run_phase1, run_phase2}; }
