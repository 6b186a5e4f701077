#ifndef SHARDGROK_CPU_DISPATCH_H
#define SHARDGROK_CPU_DISPATCH_H

#include "kernel.h"

namespace sg {
namespace cpu {

bool isa_supported(Isa isa);
const char* isa_name(Isa isa);
bool isa_from_name(const char* name, Isa* out);
Isa best_isa();
Kernels kernels_for(Isa isa);

// The instruction set the kernel runs with: best_isa() until set_active_isa (the module's
// set_isa) picks another. One per process, like the library.
Isa active_isa();
void set_active_isa(Isa isa);

}  // namespace cpu
}  // namespace sg

#endif  // SHARDGROK_CPU_DISPATCH_H
