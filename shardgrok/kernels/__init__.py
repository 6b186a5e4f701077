"""The compiled step (csrc/) and the rule that picks a backend for each optimizer step.

The rule, in one place. ``backend=`` on GrokAdamW/SuperGrok, else the environment variable
``SHARDGROK_BACKEND``, else ``"auto"``:

- ``"reference"``: the per-tensor PyTorch path (``shardgrok/reference.py``), the oracle the
  kernel is tested against.
- ``"kernel"``: the compiled two-call step; raises, saying why, when the kernel is not built or
  cannot take one of this rank's tensors.
- ``"auto"`` (default): the kernel when it is built and takes every local tensor, else the
  reference, with one warning per optimizer saying why.
- ``"cuda-emulated"``: a testing backend. CPU tensors go through the CUDA kernels (csrc/cuda/)
  compiled for the host against ``csrc/cuda/emulated.h``, by the same glue as on a GPU
  (:mod:`shardgrok.kernels.cuda`); raises like ``"kernel"`` when it cannot run. Slow (every
  CUDA thread is a fiber): it exists so that CI executes the GPU's code without a GPU.

The kernel takes contiguous fp32, bf16 and fp16 parameters (fp32 math) on the CPU and, when
torch has CUDA, on a CUDA device (csrc/cuda/, built just in time for the GPUs present; see
:mod:`shardgrok.kernels.cuda`); fp64, other devices, non-contiguous parameters and a rank's
tensors spread over several devices go to the reference.
``SHARDGROK_CPU_ISA`` (``avx512``, ``avx2``, ``generic``) runs a lower instruction set than the
best one the CPU has. ``python -m shardgrok.kernels`` reports what is built and in use.

Both extensions are described in :mod:`shardgrok.kernels.build` (``build.CPU``, ``build.CUDA``)
and loaded by its one ``load``; the names Python shares with them (kernel kinds, scalar-table
columns) are read from the C++ headers by :mod:`shardgrok.kernels.header`, with no compiler.
"""
from __future__ import annotations

import os
import warnings

from . import build, cuda

BACKENDS = ("auto", "kernel", "reference", "cuda-emulated")
ENV_BACKEND = "SHARDGROK_BACKEND"
ENV_ISA = build.ENV_ISA


def choose_backend(backend: str | None) -> str:
    """The keyword, else the environment variable, else "auto"; checked either way."""
    source = "backend"
    if backend is None:
        backend = os.environ.get(ENV_BACKEND, "auto") or "auto"
        source = ENV_BACKEND
    if backend not in BACKENDS:
        raise ValueError(f"{source} must be one of {', '.join(map(repr, BACKENDS))}, got {backend!r}")
    return backend


def cpu_extension():
    """The CPU extension module, built or loaded on first use; None if it cannot be had (see
    :func:`unavailable_reason`)."""
    return build.load(build.CPU).ext


def unavailable_reason() -> str | None:
    """Why the CPU kernel is not available (None when it is)."""
    return build.load(build.CPU).reason


def status(emulated: bool = False) -> dict:
    """What is built and in use, for ``python -m shardgrok.kernels`` and bug reports. The CPU
    and CUDA kernels are built (or loaded) to be reported; the emulated CUDA target, a testing
    backend, only with ``emulated=True`` (``python -m shardgrok.kernels`` asks for it) or once
    this process has used it."""
    cpu = build.load(build.CPU)
    ext = cpu.ext
    return {
        "cpu": {"available": ext is not None, "origin": cpu.origin,
                "isa": ext.isa() if ext is not None else None,
                "supported_isas": ext.supported_isas() if ext is not None else [],
                "reason": cpu.reason},
        "cuda": cuda.status(),
        "cuda_emulated": cuda.emulated_status(build_it=emulated),
        "default_backend": choose_backend(None),
    }


def warn_fallback(owner: str, reason: str, stacklevel: int = 4) -> None:
    warnings.warn(f"{owner}: using the reference (PyTorch) step, not the compiled kernel: "
                  f"{reason}", UserWarning, stacklevel=stacklevel)


def plain(value):
    """A report value for people: tensors (a GPU step keeps its report on the device, so that
    it never waits for the GPU) become floats, bools or lists; the rest is returned as is."""
    import torch

    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        return value.item() if value.dim() == 0 else value.tolist()
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value
