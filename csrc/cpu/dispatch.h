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

}  // namespace cpu
}  // namespace sg

#endif  // SHARDGROK_CPU_DISPATCH_H
