"""Building the compiled step (csrc/) and finding it again.

Just in time (the default): the first process that needs the kernel compiles it with
``torch.utils.cpp_extension.load`` and ninja into ``TORCH_EXTENSIONS_DIR`` (default
``~/.cache/torch_extensions``); later processes load the cached library. torchrun ranks that
start together are safe: cpp_extension takes a lock file in the build directory, one rank builds
and the others wait for it, then load the same library. The module name carries a digest of the
sources, the flags and the torch version, so an edit or a torch upgrade builds afresh instead of
loading a stale library.

Ahead of time (opt-in): ``SHARDGROK_BUILD_KERNELS=1 pip install --no-build-isolation .`` (see
setup.py) compiles ``shardgrok._C_cpu`` into the package; it is used when present.

Compiler flags (the same for both): ``-O3``; ``-ffp-contract=off`` so no compiler fuses a
multiply-add the reference does not, and every instruction-set path gives the same bits;
``-fno-math-errno`` so sqrt vectorises; ``-fno-trapping-math`` so
the clamp's selects vectorise for AVX2 and SSE2 (no value changes: nothing here traps); ``-fopenmp`` for ``at::parallel_for`` (the library
then binds to the OpenMP runtime torch has loaded). Never ``-march=native``: the AVX2 and
AVX-512 paths are compiled by ``#pragma GCC target`` in their own files and chosen at run time.
"""
from __future__ import annotations

import hashlib
import os
import pathlib

import torch

#: where the C++ sources are in a source checkout (an editable install)
CSRC = pathlib.Path(__file__).resolve().parents[2] / "csrc"
CPU_SOURCES = ("bindings.cpp", "cpu/dispatch.cpp", "cpu/isa_avx512.cpp", "cpu/isa_avx2.cpp",
               "cpu/isa_generic.cpp")
HEADERS = ("grok_math.h", "job.h", "cpu/kernel.h", "cpu/loops.h", "cpu/dispatch.h", "cuda/order.h")
CFLAGS = ("-O3", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math", "-fopenmp")
LDFLAGS = ("-fopenmp",)  # tuples: cpp_extension appends to the lists it is given


def sources_present() -> bool:
    return all((CSRC / f).is_file() for f in CPU_SOURCES + HEADERS)


def _digest(files: tuple[str, ...], flags: tuple[str, ...], *extra: str) -> str:
    """A short hash of the sources, the flags, the torch version and ``extra``."""
    h = hashlib.sha256()
    for f in files:
        h.update(f.encode())
        h.update((CSRC / f).read_bytes())
    h.update(" ".join(flags).encode())
    h.update(torch.__version__.encode())
    for e in extra:
        h.update(e.encode())
    return h.hexdigest()[:12]


def digest() -> str:
    return _digest(CPU_SOURCES + HEADERS, CFLAGS + LDFLAGS)


def digest_flag(d: str) -> str:
    """Baked into the library, so a stale ahead-of-time build is recognised (not part of the
    digest itself)."""
    return f"-DSHARDGROK_DIGEST={d}"


def build_cpu(verbose: bool = False):
    """Compile (or load the cached) CPU extension; raises on any failure."""
    from torch.utils import cpp_extension

    d = digest()
    return cpp_extension.load(
        name=f"shardgrok_cpu_{d}",
        sources=[str(CSRC / f) for f in CPU_SOURCES],
        extra_cflags=[*CFLAGS, digest_flag(d)],
        extra_ldflags=list(LDFLAGS),
        extra_include_paths=[str(CSRC)],
        verbose=verbose or bool(os.environ.get("SHARDGROK_VERBOSE_BUILD")),
    )


# ---------------------------------------------------------------------------- CUDA
#: the CUDA extension: glue without torch (pybind11 and the CUDA runtime) and the kernels
CUDA_SOURCES = ("cuda/bindings.cpp", "cuda/kernels.cu")
CUDA_HEADERS = ("grok_math.h", "job.h", "cuda/launch.h", "cuda/order.h")
#: nvcc flags, the same for the JIT build and CI's compile check. ``--fmad=false``: no
#: multiply-add the reference does not have (as -ffp-contract=off on the CPU); IEEE division
#: and square root are nvcc's defaults and are kept (never --use_fast_math).
CUDA_FLAGS = ("-O3", "-std=c++17", "--fmad=false", "-prec-div=true", "-prec-sqrt=true",
              "-ftz=false")
#: the architectures CI compiles for (the JIT build targets the GPUs present)
CI_ARCHS = ("80", "90")


def cuda_sources_present() -> bool:
    return all((CSRC / f).is_file() for f in CUDA_SOURCES + CUDA_HEADERS)


def cuda_digest() -> str:
    return _digest(CUDA_SOURCES + CUDA_HEADERS, CUDA_FLAGS, os.environ.get("TORCH_CUDA_ARCH_LIST") or "")


def build_cuda(verbose: bool = False):
    """Compile (or load the cached) CUDA extension for the architectures of the GPUs present
    (``TORCH_CUDA_ARCH_LIST`` overrides, as for any torch extension); raises on any failure."""
    from torch.utils import cpp_extension

    d = cuda_digest()
    return cpp_extension.load(
        name=f"shardgrok_cuda_{d}",
        sources=[str(CSRC / f) for f in CUDA_SOURCES],
        extra_cflags=["-O3", digest_flag(d)],
        extra_cuda_cflags=[*CUDA_FLAGS, digest_flag(d)],
        extra_include_paths=[str(CSRC)],
        verbose=verbose or bool(os.environ.get("SHARDGROK_VERBOSE_BUILD")),
    )


def nvcc_check_command(source: str, arch: str, out: str) -> list[str]:
    """The nvcc command CI runs on ``source`` (relative to csrc/) for ``sm_<arch>``: warnings are
    errors, and ptxas reports every kernel's registers and spills (``-Xptxas -v``)."""
    return ["nvcc", "-c", str(CSRC / source), "-o", out, *CUDA_FLAGS,
            f"-gencode=arch=compute_{arch},code=sm_{arch}", "-Werror", "all-warnings",
            "-Xcompiler", "-Wall,-Wextra,-Werror", "-Xptxas", "-v,-warn-spills",
            f"-I{CSRC}"]
