"""Building the compiled step (csrc/) and finding it again: one description per extension (an
:class:`Op`: its sources, headers, flags, ahead-of-time module and what this machine needs to
have it, after DeepSpeed's op_builder) and one :func:`load` that every backend goes through.

Just in time (the default): the first process that needs an extension compiles it with
``torch.utils.cpp_extension.load`` and ninja into ``TORCH_EXTENSIONS_DIR`` (default
``~/.cache/torch_extensions``); later processes load the cached library. torchrun ranks that
start together are safe: cpp_extension takes a lock file in the build directory, one rank builds
and the others wait for it, then load the same library. The module name carries a digest of the
sources, the flags and the torch version, so an edit or a torch upgrade builds afresh instead of
loading a stale library. Every install carries the sources (a wheel or an sdist install in
``shardgrok/_csrc``, a checkout in ``csrc/``: :func:`shardgrok.kernels.header.find_csrc`), so
this works from any of them.

Ahead of time (opt-in): ``SHARDGROK_BUILD_KERNELS=1 pip install --no-build-isolation .`` (see
setup.py) compiles ``shardgrok._C_cpu`` (and ``shardgrok._C_cuda`` where torch has CUDA and nvcc
is found) into the package; used when present and built from the sources next to it.

CPU compiler flags: ``-O3``; ``-ffp-contract=off`` so no compiler fuses a multiply-add the
reference does not, and every instruction-set path gives the same bits; ``-fno-math-errno`` so
sqrt vectorises; ``-fno-trapping-math`` so the clamp's selects vectorise for AVX2 and SSE2 (no
value changes: nothing here traps); ``-fopenmp`` for ``at::parallel_for`` (the library then binds
to the OpenMP runtime torch has loaded). Never ``-march=native``: the AVX2 and AVX-512 paths are
compiled by ``#pragma GCC target`` in their own files and chosen at run time.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib
import os
import warnings
from typing import Any, Callable

import torch

from .header import CHECKOUT_CSRC, PACKAGED_CSRC, find_csrc

#: the directory of the C++ sources (None: this install has none)
CSRC = find_csrc()
ENV_ISA = "SHARDGROK_CPU_ISA"

#: set to 1: the CPU kernels also carry debug information (-g; the same code otherwise), for a
#: profile by source line (benchmarks/profile_formats.py)
ENV_DEBUG_INFO = "SHARDGROK_DEBUG_INFO"

CPU_SOURCES = ("bindings.cpp", "plan.cpp", "test_hooks.cpp", "cpu/dispatch.cpp",
               "cpu/isa_avx512.cpp", "cpu/isa_avx2.cpp", "cpu/isa_generic.cpp")
HEADERS = ("bindings.h", "grok_math.h", "job.h", "cpu/kernel.h", "cpu/loops.h", "cpu/dispatch.h",
           "cuda/order.h")
CFLAGS = ("-O3", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math", "-fopenmp")
LDFLAGS = ("-fopenmp",)

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


def _no_cuda_here() -> str | None:
    if torch.version.cuda is None:
        return (f"this torch ({torch.__version__}) is built without CUDA; CUDA tensors take "
                "the reference path")
    if not torch.cuda.is_available():
        return "torch sees no CUDA device"
    return None


def _isa_from_env(ext) -> str | None:
    """``SHARDGROK_CPU_ISA``: run a lower instruction set than the best one the CPU has."""
    isa = os.environ.get(ENV_ISA)
    if isa:
        try:
            ext.set_isa(isa)
        except RuntimeError as e:
            return f"{ENV_ISA}={isa}: {str(e).splitlines()[0]}"
    return None


@dataclasses.dataclass(frozen=True)
class Op:
    """One compiled extension. File names are relative to csrc/."""

    name: str                     # the JIT module is shardgrok_<name>_<digest>
    sources: tuple[str, ...]
    headers: tuple[str, ...]
    aot_module: str               # where setup.py's ahead-of-time build puts it
    cflags: tuple[str, ...]       # the C++ compiler's
    ldflags: tuple[str, ...] = ()
    cuda_flags: tuple[str, ...] = ()  # nvcc's, for the .cu sources; none: a C++-only extension
    digest_env: tuple[str, ...] = ()  # environment variables the build depends on
    unavailable_here: Callable[[], str | None] = lambda: None  # why this machine cannot have it
    configure: Callable[[Any], str | None] = lambda ext: None  # after loading: why it is unusable

    def missing(self) -> list[str]:
        """The sources and headers this install lacks (all of them when it has no csrc/)."""
        files = self.sources + self.headers
        return list(files) if CSRC is None else [f for f in files if not (CSRC / f).is_file()]

    def sources_present(self) -> bool:
        return not self.missing()

    def digest(self) -> str:
        """A short hash of the sources, the flags, the torch version and :attr:`digest_env`."""
        h = hashlib.sha256()
        for f in self.sources + self.headers:
            h.update(f.encode())
            h.update((CSRC / f).read_bytes())
        h.update(" ".join(self.cflags + self.ldflags + self.cuda_flags).encode())
        h.update(torch.__version__.encode())
        for var in self.digest_env:
            h.update((os.environ.get(var) or "").encode())
        return h.hexdigest()[:12]

    def _args(self, digest: str) -> dict:
        """Compiler arguments with the digest baked in (as ``ext.digest``), so that a stale
        ahead-of-time build is recognised."""
        flag = f"-DSHARDGROK_DIGEST={digest}"
        debug = (["-g"] if ENV_DEBUG_INFO in self.digest_env
                 and os.environ.get(ENV_DEBUG_INFO) == "1" else [])
        args: dict[str, Any] = {"cxx": [*self.cflags, *debug, flag], "ld": list(self.ldflags)}
        if self.cuda_flags:
            args["nvcc"] = [*self.cuda_flags, flag]
        return args

    def jit_build(self, verbose: bool = False):
        """Compile (or load the cached) extension; raises on any failure. A CUDA extension is
        built for the GPUs present (``TORCH_CUDA_ARCH_LIST`` overrides, as for any torch
        extension)."""
        from torch.utils import cpp_extension

        digest = self.digest()
        args = self._args(digest)
        return cpp_extension.load(
            name=f"shardgrok_{self.name}_{digest}",
            sources=[str(CSRC / f) for f in self.sources],
            extra_cflags=args["cxx"], extra_ldflags=args["ld"],
            extra_cuda_cflags=args.get("nvcc"), extra_include_paths=[str(CSRC)],
            verbose=verbose or bool(os.environ.get("SHARDGROK_VERBOSE_BUILD")))

    def setup_extension(self, csrc: str):
        """The setuptools extension of the ahead-of-time build (``csrc``: the sources' directory
        relative to setup.py)."""
        from torch.utils.cpp_extension import CppExtension, CUDAExtension

        args = self._args(self.digest())
        sources = [f"{csrc}/{f}" for f in self.sources]
        if self.cuda_flags:
            return CUDAExtension(self.aot_module, sources, include_dirs=[str(CSRC)],
                                 extra_compile_args={"cxx": args["cxx"], "nvcc": args["nvcc"]},
                                 extra_link_args=args["ld"])
        return CppExtension(self.aot_module, sources, include_dirs=[str(CSRC)],
                            extra_compile_args=args["cxx"], extra_link_args=args["ld"])


CPU = Op("cpu", CPU_SOURCES, HEADERS, "shardgrok._C_cpu", CFLAGS, LDFLAGS,
         digest_env=(ENV_DEBUG_INFO,), configure=_isa_from_env)
CUDA = Op("cuda", CUDA_SOURCES, CUDA_HEADERS, "shardgrok._C_cuda", ("-O3",),
          cuda_flags=CUDA_FLAGS, digest_env=("TORCH_CUDA_ARCH_LIST",),
          unavailable_here=_no_cuda_here)

#: the emulated CUDA target (a testing backend): the same kernels.cu and glue, compiled by the
#: host C++ compiler against cuda/emulated.h, so the device code runs on CPU tensors. No
#: contraction into multiply-adds (as ``--fmad=false``); OpenMP spreads the blocks.
EMULATED_SOURCES = ("cuda/emulated.cpp", "cuda/bindings.cpp")
EMULATED_HEADERS = CUDA_HEADERS + ("cuda/emulated.h", "cuda/kernels.cu")
EMULATED_FLAGS = ("-O2", "-ffp-contract=off", "-fopenmp", "-DSG_CUDA_EMULATED")
CUDA_EMULATED = Op("cuda_emulated", EMULATED_SOURCES, EMULATED_HEADERS,
                   "shardgrok._C_cuda_emulated", EMULATED_FLAGS, ("-fopenmp",))
cuda_sources_present = CUDA.sources_present


@dataclasses.dataclass(frozen=True)
class Loaded:
    ext: Any              # the module, or None
    origin: str | None    # which build it came from
    reason: str | None    # why it is unavailable (None when it is available)


_loaded: dict[str, Loaded] = {}


def load(op: Op) -> Loaded:
    """``op``'s extension: the ahead-of-time build when it is there and was built from these
    sources, else built just in time. Tried once per process; the outcome, with the reason when
    it is unavailable, is remembered."""
    if op.name not in _loaded:
        _loaded[op.name] = _load(op)
    return _loaded[op.name]


def is_loaded(op: Op) -> bool:
    """Whether this process has tried ``op`` already (built, loaded or found unavailable)."""
    return op.name in _loaded


def _ahead_of_time(op: Op):
    try:
        ext = importlib.import_module(op.aot_module)
    except ImportError as e:
        if isinstance(e, ModuleNotFoundError) and e.name == op.aot_module:
            return None  # not built ahead of time: the default
        # present but unloadable: built against another torch, say
        warnings.warn(f"{op.aot_module} does not import ({type(e).__name__}: {e}); building "
                      "just in time instead", UserWarning)
        return None
    if op.sources_present() and ext.digest != op.digest():
        warnings.warn(f"{op.aot_module} was built from other sources, flags, torch or "
                      f"{' or '.join(op.digest_env) or 'settings'} than those at {CSRC}; "
                      "building just in time instead", UserWarning)
        return None
    return ext


def _load(op: Op) -> Loaded:
    reason = op.unavailable_here()
    if reason is not None:
        return Loaded(None, None, reason)
    ext = _ahead_of_time(op)
    origin = f"ahead-of-time build ({op.aot_module})"
    if ext is None:
        missing = op.missing()
        if missing:
            where = (f"neither {PACKAGED_CSRC} nor {CHECKOUT_CSRC} holds them" if CSRC is None
                     else f"{CSRC} lacks {', '.join(missing)}")
            return Loaded(None, None, f"no ahead-of-time build ({op.aot_module}) and no sources "
                          f"to build it from: {where} (reinstall shardgrok: its wheel and sdist "
                          "carry them)")
        try:
            ext = op.jit_build()
        except Exception as e:  # no compiler, no ninja or nvcc, a compile error
            lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
            return Loaded(None, None, f"building it failed: {type(e).__name__}: "
                                      f"{lines[-1] if lines else e}")
        tool = "torch.utils.cpp_extension, nvcc" if op.cuda_flags else "torch.utils.cpp_extension"
        origin = f"just-in-time build ({tool})"
    reason = op.configure(ext)
    return Loaded(None if reason else ext, origin, reason)


def nvcc_check_command(source: str, arch: str, out: str) -> list[str]:
    """The nvcc command CI runs on ``source`` (relative to csrc/) for ``sm_<arch>``: warnings are
    errors, and ptxas reports every kernel's registers and spills (``-Xptxas -v``)."""
    return ["nvcc", "-c", str(CSRC / source), "-o", out, *CUDA_FLAGS,
            f"-gencode=arch=compute_{arch},code=sm_{arch}", "-Werror", "all-warnings",
            "-Xcompiler", "-Wall,-Wextra,-Werror", "-Xptxas", "-v,-warn-spills",
            f"-I{CSRC}"]
