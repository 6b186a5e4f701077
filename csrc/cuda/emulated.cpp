// The emulated CUDA target's kernels: kernels.cu itself, compiled by the host compiler with
// SG_CUDA_EMULATED defined (launch.h then takes cuda/emulated.h for CUDA), never a copy of it.
// shardgrok/kernels/build.py builds it with cuda/bindings.cpp into the backend
// "cuda-emulated"; tests/kernels/cuda_driver.cpp links it into the sanitizer builds.
#ifndef SG_CUDA_EMULATED
#define SG_CUDA_EMULATED 1
#endif
#include "kernels.cu"
