// The emulated CUDA target: what kernels.cu and the glue need from CUDA, for the host C++
// compiler, so that the device code itself (not a model of it) runs on the CPU. launch.h
// includes this instead of <cuda_runtime.h> when SG_CUDA_EMULATED is defined.
//
// What a kernel sees:
// - threadIdx, blockIdx, blockDim, gridDim; every CUDA thread of a block really interleaves
//   with the others at each __syncthreads(), which is a real barrier;
// - shared memory per block: each SG_SHARED variable and the dynamic array are their own heap
//   allocation of the exact size (AddressSanitizer sees an overrun), filled with 0xFF bytes
//   (NaN as floats) so that a read before the block wrote it shows;
// - float2 / float4 / uint4 with CUDA's sizes and alignments (8, 16, 16 bytes), and the
//   intrinsics grok_math.h uses, with the same rounding (IEEE round to nearest; bit casts);
// - the runtime calls the glue makes and <<<...>>> (written SG_LAUNCH in kernels.cu): the
//   launch checks its configuration against the device limits the real launch assumes
//   (1,024 threads, 48 KiB of shared memory per block, static and dynamic together) and runs
//   the grid before returning; errors come back through cudaGetLastError as on a GPU.
//
// How CUDA threads are run:
// - default: each CUDA thread is a fiber with its own stack; a block's fibers run on one OS
//   thread, each until its next barrier, in thread order; blocks run one after another, or
//   spread over OpenMP threads when built with it (each with its own fibers and shared memory);
// - SG_EMU_OS_THREADS: each CUDA thread is an OS thread and __syncthreads a mutex/condition
//   barrier (for ThreadSanitizer, which sees a missing barrier as a data race); blocks run one
//   after another.
//
// Memory is the host's: a "device address" is a host address, so CPU tensors go straight to
// the kernels. There is one emulated device; streams are accepted and ignored (every launch
// completes before it returns).
#ifndef SHARDGROK_CUDA_EMULATED_H
#define SHARDGROK_CUDA_EMULATED_H

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <atomic>
#include <cmath>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__SANITIZE_THREAD__) && !defined(SG_EMU_OS_THREADS)
// ThreadSanitizer would see every fiber of a block as one thread and pass any race silently
#error "a ThreadSanitizer build of the emulated target needs SG_EMU_OS_THREADS"
#endif

// Fibers switch by a few lines of x86-64 assembly; elsewhere, or with SG_EMU_UCONTEXT (which a
// test builds, so the portable path runs too), by ucontext, whose every switch is a system call.
#if !defined(SG_EMU_OS_THREADS) && defined(__x86_64__) && !defined(SG_EMU_UCONTEXT)
#define SG_EMU_ASM_SWITCH 1
#endif
#if defined(SG_EMU_OS_THREADS)
#elif defined(SG_EMU_ASM_SWITCH)
#include <sys/mman.h>
#else
#include <sys/mman.h>
#include <ucontext.h>
#endif

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#endif

// ------------------------------------------------------------------ qualifiers
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __launch_bounds__(...)
// the device side of grok_math.h (its intrinsics are below)
#define __CUDA_ARCH__ 800

// ------------------------------------------------------------------ vector types
struct alignas(8) float2 { float x, y; };
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(16) uint4 { unsigned int x, y, z, w; };
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }

struct dim3 {
  unsigned int x, y, z;
  dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};
typedef dim3 uint3;

// ------------------------------------------------------------------ intrinsics
inline float __uint_as_float(unsigned int u) {
  float f;
  memcpy(&f, &u, 4);
  return f;
}
inline unsigned int __float_as_uint(float f) {
  unsigned int u;
  memcpy(&u, &f, 4);
  return u;
}
// IEEE square root, round to nearest: what __fsqrt_rn is on the GPU (std::sqrt of a float is
// correctly rounded; the build has no fast-math)
inline float __fsqrt_rn(float x) { return std::sqrt(x); }

// ------------------------------------------------------------------ runtime
enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchFailure = 719,
};
struct CUstream_st;
typedef CUstream_st* cudaStream_t;

namespace sg_emu {

// The device limits a launch assumes (those of every GPU from sm_70 on, without opting in to
// more dynamic shared memory with cudaFuncSetAttribute, which the glue does not do).
constexpr unsigned MAX_THREADS_PER_BLOCK = 1024;
constexpr size_t SHARED_BYTES_PER_BLOCK = 48 * 1024;
constexpr size_t FIBER_STACK_BYTES = 256 * 1024;

// The last error, per host thread as the CUDA runtime keeps it; a trap inside a kernel sets
// it from whichever OS thread ran the block, so those are collected atomically.
inline thread_local cudaError_t last_error = cudaSuccess;
inline std::atomic<int> kernel_error{0};

inline void set_error(cudaError_t e) {
  if (last_error == cudaSuccess) last_error = e;
}

// One block's shared memory: allocations in declaration order (every thread declares the same
// SG_SHARED variables in the same order; the first to reach one allocates it).
struct Block {
  std::vector<void*> shared;
  size_t shared_bytes = 0;
  void* dynamic = nullptr;
  size_t dynamic_bytes = 0;
  // OS-thread mode. The allocations take their own lock, not the barrier's: a thread taking
  // the barrier's lock acquires everything done before the barrier by the threads already
  // waiting there, so ThreadSanitizer would see their accesses ordered before its own and miss
  // a missing __syncthreads() whenever those threads happened to start first.
  std::mutex shared_lock;
  std::mutex lock;  // the barrier
  std::condition_variable cv;
  unsigned waiting = 0, alive = 0;
  uint64_t generation = 0;

  ~Block() {
    for (void* p : shared) free(p);
    free(dynamic);
  }
};

// The CUDA thread running on this OS thread (fiber mode: the current fiber's record).
struct ThreadRec {
  Block* block = nullptr;
  size_t next_shared = 0;  // ordinal of its next SG_SHARED declaration
};
inline thread_local ThreadRec* current = nullptr;

inline void* fresh(size_t bytes) {
  void* p = malloc(bytes ? bytes : 1);
  memset(p, 0xFF, bytes ? bytes : 1);
  return p;
}

inline void* block_shared(size_t bytes) {
  ThreadRec* t = current;
  Block* b = t->block;
  const size_t k = t->next_shared++;
#if defined(SG_EMU_OS_THREADS)
  std::lock_guard<std::mutex> g(b->shared_lock);
#endif
  if (k == b->shared.size()) {
    b->shared.push_back(fresh(bytes));
    b->shared_bytes += bytes;
    if (b->shared_bytes + b->dynamic_bytes > SHARED_BYTES_PER_BLOCK)
      kernel_error.store(cudaErrorInvalidValue);  // ptxas or the launch would refuse it
  }
  return b->shared[k];
}

}  // namespace sg_emu

inline thread_local uint3 threadIdx;
inline thread_local uint3 blockIdx;
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;

// __shared__ T name[...];  and  extern __shared__ T name[];  (kernels.cu writes these two)
#define SG_SHARED(T, name, dims) \
  T(&name) dims = *reinterpret_cast<T(*) dims>(::sg_emu::block_shared(sizeof(T dims)))
#define SG_DYNAMIC_SHARED(T, name) T* name = static_cast<T*>(::sg_emu::current->block->dynamic)

// the kernel aborts: on a GPU the launch fails with an unspecified launch failure
inline void __trap() { sg_emu::kernel_error.store(cudaErrorLaunchFailure); }

namespace sg_emu {

#if defined(SG_EMU_OS_THREADS)
// ------------------------------------------------------------------ OS threads
inline void barrier() {
  Block* b = current->block;
  std::unique_lock<std::mutex> g(b->lock);
  const uint64_t gen = b->generation;
  if (++b->waiting == b->alive) {
    b->waiting = 0;
    ++b->generation;
    b->cv.notify_all();
  } else {
    b->cv.wait(g, [&] { return b->generation != gen; });
  }
}

template <class F>
void run_block(Block& b, unsigned threads, const F& body) {
  b.alive = threads;
  std::vector<std::thread> pool;
  pool.reserve(threads);
  const uint3 block_index = blockIdx;
  const dim3 grid = gridDim, block = blockDim;
  for (unsigned t = 0; t < threads; ++t) {
    pool.emplace_back([&b, &body, t, block_index, grid, block] {
      ThreadRec rec;
      rec.block = &b;
      current = &rec;
      threadIdx = uint3(t, 0, 0);
      blockIdx = block_index;
      gridDim = grid;
      blockDim = block;
      body();
      // an exited thread no longer counts at the barrier (sm_70 on)
      std::lock_guard<std::mutex> g(b.lock);
      if (--b.alive == b.waiting && b.waiting > 0) {
        b.waiting = 0;
        ++b.generation;
        b.cv.notify_all();
      }
    });
  }
  for (std::thread& th : pool) th.join();
}

#else
// ------------------------------------------------------------------ fibers
// Where a switched-out fiber, or the scheduler, resumes.
struct Context {
#if defined(SG_EMU_ASM_SWITCH)
  void* sp = nullptr;
#else
  ucontext_t uc;
#endif
#if defined(__SANITIZE_ADDRESS__)
  void* fake_stack = nullptr;  // AddressSanitizer's fake frames of the switched-out stack
#endif
};

struct Fiber {
  ThreadRec rec;
  bool done = false;
  const void* body = nullptr;
  void (*call)(const void*) = nullptr;
  char* stack = nullptr;  // mmap'd, a guard page at the low end
  Context ctx;
};

struct Scheduler {  // one per OS thread
  std::vector<Fiber> fibers;
  Fiber* running = nullptr;
  Context ctx;
#if defined(__SANITIZE_ADDRESS__)
  const void* stack_bottom = nullptr;
  size_t stack_size = 0;
#endif
  ~Scheduler() {
    for (Fiber& f : fibers)
      if (f.stack) munmap(f.stack, FIBER_STACK_BYTES);
  }
};
inline thread_local Scheduler scheduler;

#if defined(SG_EMU_ASM_SWITCH)
// Saves the callee-saved registers on the current stack, stores the stack pointer in *from and
// resumes the context whose stack pointer is to. The SSE/x87 control words are not switched:
// nothing here changes them, and loading them costs more than the rest of the switch.
__attribute__((naked, noinline)) static void switch_stack(void** /*from*/, void* /*to*/) {
  asm volatile(
      "pushq %rbp\n\tpushq %rbx\n\tpushq %r12\n\tpushq %r13\n\tpushq %r14\n\tpushq %r15\n\t"
      "movq %rsp, (%rdi)\n\tmovq %rsi, %rsp\n\t"
      "popq %r15\n\tpopq %r14\n\tpopq %r13\n\tpopq %r12\n\tpopq %rbx\n\tpopq %rbp\n\tret\n\t");
}
#endif

inline void to_scheduler(Fiber* f) {
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_start_switch_fiber(f->done ? nullptr : &f->ctx.fake_stack, scheduler.stack_bottom,
                                 scheduler.stack_size);
#endif
#if defined(SG_EMU_ASM_SWITCH)
  switch_stack(&f->ctx.sp, scheduler.ctx.sp);
#else
  swapcontext(&f->ctx.uc, &scheduler.ctx.uc);
#endif
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_finish_switch_fiber(f->ctx.fake_stack, nullptr, nullptr);
#endif
}

inline void fiber_main(Fiber* f) {
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_finish_switch_fiber(nullptr, &scheduler.stack_bottom, &scheduler.stack_size);
#endif
  for (;;) {
    f->call(f->body);
    f->done = true;
    to_scheduler(f);  // never resumed until the next launch restarts it
  }
}

#if defined(SG_EMU_ASM_SWITCH)
// A new context's first return lands here with the fiber in rbx and rsp 16-byte aligned.
__attribute__((naked, noinline)) static void fiber_entry() {
  asm volatile("movq %rbx, %rdi\n\tcall *%r12\n\tud2\n\t");
}
#else
inline void fiber_entry_uc(unsigned lo, unsigned hi) {
  fiber_main(reinterpret_cast<Fiber*>(((uintptr_t)hi << 32) | (uintptr_t)lo));
}
#endif

inline void start_fiber(Fiber& f) {
  if (f.stack == nullptr) {
    void* m = mmap(nullptr, FIBER_STACK_BYTES, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) abort();
    mprotect(m, 4096, PROT_NONE);  // a stack overflow faults instead of corrupting memory
    f.stack = static_cast<char*>(m);
  }
#if defined(SG_EMU_ASM_SWITCH)
  // the frame switch_stack pops: r15, r14, r13, r12, rbx, rbp, return address
  // stacks are a power-of-two size apart, so their tops would share cache sets: stagger them
  const size_t stagger = ((size_t)(&f - scheduler.fibers.data()) % 64) * 192;
  uintptr_t top = ((uintptr_t)(f.stack + FIBER_STACK_BYTES - stagger)) & ~(uintptr_t)15;
  // the return slot A with A + 8 a multiple of 16: fiber_entry then calls with an aligned stack
  uint64_t* sp = reinterpret_cast<uint64_t*>(top) - 3;
  *sp = (uint64_t)(uintptr_t)&fiber_entry;
  uint64_t frame[6];
  frame[0] = frame[1] = frame[2] = 0;           // r15 r14 r13
  frame[3] = (uint64_t)(uintptr_t)&fiber_main;  // r12: called by fiber_entry
  frame[4] = (uint64_t)(uintptr_t)&f;           // rbx: its argument
  frame[5] = 0;                                 // rbp
  sp -= 6;
  memcpy(sp, frame, sizeof frame);
  f.ctx.sp = sp;
#else
  getcontext(&f.ctx.uc);
  f.ctx.uc.uc_stack.ss_sp = f.stack + 4096;
  f.ctx.uc.uc_stack.ss_size = FIBER_STACK_BYTES - 4096;
  f.ctx.uc.uc_link = nullptr;
  const uintptr_t p = (uintptr_t)&f;
  makecontext(&f.ctx.uc, (void (*)())fiber_entry_uc, 2, (unsigned)(p & 0xFFFFFFFFu),
              (unsigned)(p >> 32));
#endif
}

inline void resume(Fiber& f) {
  scheduler.running = &f;
  current = &f.rec;
  threadIdx = uint3((unsigned)(&f - scheduler.fibers.data()), 0, 0);
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_start_switch_fiber(&scheduler.ctx.fake_stack, f.stack + 4096,
                                 FIBER_STACK_BYTES - 4096);
#endif
#if defined(SG_EMU_ASM_SWITCH)
  switch_stack(&scheduler.ctx.sp, f.ctx.sp);
#else
  swapcontext(&scheduler.ctx.uc, &f.ctx.uc);
#endif
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_finish_switch_fiber(scheduler.ctx.fake_stack, nullptr, nullptr);
#endif
  scheduler.running = nullptr;
  current = nullptr;
}

// A barrier: the fiber yields; the scheduler resumes it once every live thread of the block
// has reached the barrier (each pass over the fibers runs each one up to its next barrier).
inline void barrier() { to_scheduler(scheduler.running); }

template <class F>
void run_block(Block& b, unsigned threads, const F& body) {
  std::vector<Fiber>& fibers = scheduler.fibers;
  if (fibers.size() < threads) {
    // fibers hold their own address (rbx, ucontext): grow only between launches, keep stacks
    std::vector<Fiber> grown(threads);
    for (size_t i = 0; i < fibers.size(); ++i) grown[i].stack = fibers[i].stack;
    for (Fiber& f : fibers) f.stack = nullptr;
    fibers.swap(grown);
  }
  for (unsigned t = 0; t < threads; ++t) {
    Fiber& f = fibers[t];
    f.rec = ThreadRec();
    f.rec.block = &b;
    f.done = false;
    f.body = &body;
    f.call = [](const void* p) { (*static_cast<const F*>(p))(); };
    start_fiber(f);
  }
  unsigned alive = threads;
  while (alive > 0) {
    for (unsigned t = 0; t < threads; ++t) {
      if (fibers[t].done) continue;
      resume(fibers[t]);
      if (fibers[t].done) --alive;
    }
  }
}
#endif

// One launch: checks the configuration as the runtime does, then runs every block.
template <class... P>
struct Launch {
  void (*kernel)(P...);
  dim3 grid, block;
  size_t dynamic_bytes;

  template <class... A>
  void operator()(A&&... a) const {
    if (block.x == 0 || block.y == 0 || block.z == 0 || grid.x == 0 || grid.y == 0 ||
        grid.z == 0 || grid.x > 0x7FFFFFFFu || grid.y > 65535 || grid.z > 65535 ||
        (size_t)block.x * block.y * block.z > MAX_THREADS_PER_BLOCK || block.y != 1 ||
        block.z != 1 || grid.y != 1 || grid.z != 1) {  // the kernels use x only
      set_error(cudaErrorInvalidConfiguration);
      return;
    }
    if (dynamic_bytes > SHARED_BYTES_PER_BLOCK) {
      set_error(cudaErrorInvalidValue);
      return;
    }
    kernel_error.store(0);
    const auto body = [this, &a...] { kernel(a...); };
    const int64_t n = grid.x;
#if defined(_OPENMP) && !defined(SG_EMU_OS_THREADS)
#pragma omp parallel for schedule(dynamic)
#endif
    for (int64_t i = 0; i < n; ++i) {
      Block b;
      b.dynamic_bytes = dynamic_bytes;
      b.dynamic = fresh(dynamic_bytes);
      blockIdx = uint3((unsigned)i, 0, 0);
      gridDim = grid;
      blockDim = block;
      run_block(b, block.x, body);
    }
    const int err = kernel_error.exchange(0);
    if (err != 0) set_error((cudaError_t)err);
  }
};

template <class... P>
Launch<P...> launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t dynamic_bytes,
                    cudaStream_t /*stream: every launch completes before it returns*/) {
  return Launch<P...>{kernel, grid, block, dynamic_bytes};
}

}  // namespace sg_emu

inline void __syncthreads() { sg_emu::barrier(); }

#define SG_LAUNCH(kernel, grid, block, shared, stream) \
  ::sg_emu::launch(kernel, grid, block, shared, stream)

inline cudaError_t cudaGetLastError() {
  const cudaError_t e = sg_emu::last_error;
  sg_emu::last_error = cudaSuccess;
  return e;
}
inline cudaError_t cudaPeekAtLastError() { return sg_emu::last_error; }
inline const char* cudaGetErrorName(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorLaunchFailure: return "cudaErrorLaunchFailure";
  }
  return "cudaErrorUnknown";
}
inline const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
  }
  return "unknown error";
}
inline cudaError_t cudaGetDeviceCount(int* n) {
  *n = 1;
  return cudaSuccess;
}
inline cudaError_t cudaRuntimeGetVersion(int* v) {
  *v = 0;  // no CUDA runtime: the emulated target
  return cudaSuccess;
}

#endif  // SHARDGROK_CUDA_EMULATED_H
