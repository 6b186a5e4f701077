"""The CUDA backend: the extension (csrc/cuda/) and the per-step launches of a plan on the GPU.

The plan itself is the same C++ object as on the CPU (csrc/plan.cpp): it holds the views,
re-reads the gradients and hands out the tables the kernels read. What this module adds:

- the chunk table and the per-tensor chunk index, copied to the GPU once per plan;
- per step, the segment table (the gradients' addresses) and the present flags, written into
  pinned host memory by the plan and copied asynchronously on the current stream; the
  breakpoint table of SuperGrok's meta-net, put in the kernel's level order and copied when it
  changes;
- the two launches (phase 1 is a per-chunk launch plus a per-tensor reduction), on the current
  stream, reading and writing the step's reduction buffer in device memory.

Nothing here reads a value back to the host: the step's one host sync is the step driver's read
of the reduced flags. The same glue drives the emulated CUDA target (``backend="cuda-emulated"``:
:func:`emulated_extension`), where the "device" is the host and the tensors are CPU tensors.
"""
from __future__ import annotations

import contextlib
import os
from typing import Any

import torch

from ..metanet.table import level_order
from ..placement import to_device
from . import build
from .header import KERNEL_KINDS

SUPERGROK = KERNEL_KINDS["supergrok"]


def cuda_extension():
    """The CUDA extension, built (just in time, for the architectures of the GPUs present or
    ``TORCH_CUDA_ARCH_LIST``) or loaded on first use; None when it cannot be had
    (:func:`unavailable_reason` says why)."""
    return build.load(build.CUDA).ext


def unavailable_reason() -> str | None:
    return build.load(build.CUDA).reason


def emulated_extension():
    """The emulated CUDA target's extension (the same kernels and glue built for the host:
    ``backend="cuda-emulated"``), built just in time on first use; None when it cannot be had."""
    return build.load(build.CUDA_EMULATED).ext


def emulated_unavailable_reason() -> str | None:
    return build.load(build.CUDA_EMULATED).reason


def emulated_status(build_it: bool = True) -> dict:
    """The emulated target's report; without ``build_it``, one not yet loaded in this process is
    reported as such instead of being compiled (about a minute) for a report."""
    if not build_it and not build.is_loaded(build.CUDA_EMULATED):
        return {"available": None, "origin": None,
                "reason": "not loaded in this process (built on first use of "
                          "backend='cuda-emulated'; python -m shardgrok.kernels builds it)"}
    loaded = build.load(build.CUDA_EMULATED)
    return {"available": loaded.ext is not None, "origin": loaded.origin, "reason": loaded.reason}


def status() -> dict:
    loaded = build.load(build.CUDA)
    info: dict[str, Any] = {"available": loaded.ext is not None, "origin": loaded.origin,
                            "reason": loaded.reason}
    if loaded.ext is not None:
        info["devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        info["arch_list"] = os.environ.get("TORCH_CUDA_ARCH_LIST") or "the GPUs present"
    return info


class CudaLaunches:
    """A plan's device-side tables and its two launches."""

    def __init__(self, ext, cpu_ext, plan, n_tensors: int, device: torch.device):
        # the plan (CPU extension) writes the records the kernels (CUDA extension) read
        if (ext.SEGMENT_BYTES, ext.CHUNK_BYTES, ext.CHUNK) != (
                cpu_ext.SEGMENT_BYTES, cpu_ext.CHUNK_BYTES, cpu_ext.CHUNK):
            raise RuntimeError("the CPU and CUDA extensions disagree on the job layout "
                               "(csrc/job.h): they were built from different sources")
        self.ext, self.plan, self.n, self.device = ext, plan, n_tensors, device
        self.n_stats, self.n_columns = cpu_ext.N_STATS, cpu_ext.N_COLUMNS
        self.n_chunks = plan.n_chunks
        self._chunks_host = plan.chunk_table()  # checked against the segments at phase 1
        self.chunks = to_device(self._chunks_host, device)
        offsets, index = plan.chunks_by_tensor()
        self.offsets, self.index = to_device(offsets, device), to_device(index, device)
        # the sorted host arrays and the size the device table was made from, held: their
        # identity is the key, and a held object's id cannot be reused
        self._table_src = None
        self._table = None  # [nodes, pieces] in level order, on the device
        self._segments = None  # this step's segment table on the device (phase 2 reuses it)
        self._has_q8 = False  # a segment of this step has 8-bit state (phase 1 finds out)

    # A plan on the CPU goes through here on the emulated target (backend="cuda-emulated"): host
    # memory is its device memory, and it has no stream and no device to switch to.
    def _stream(self) -> int:
        return torch.cuda.current_stream(self.device).cuda_stream if self.device.type == "cuda" else 0

    def _on_device(self):
        return torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext()

    def _device_table(self, arrays: dict) -> tuple[int, int, int]:
        """The device addresses of the kernel's level-order table (nodes, pieces) and its size.

        Takes the sorted arrays the CPU plan takes; a table not seen before is reordered
        (metanet.table.level_order) and copied once, then reused while the optimizer hands in
        the same arrays (it keeps them until the weights change), so a step costs nothing."""
        bp = arrays.get("breakpoints")
        if bp is None:
            return 0, 0, 0
        src = (bp, arrays["slopes"], arrays["intercepts"])
        size = int(arrays.get("table_size", 0))
        # the CPU plan's checks (csrc/plan.cpp), here where the arrays are tensors
        if size < 1 or size & (size - 1):
            raise RuntimeError(f"table size must be a power of two, got {size}")
        for name, t, need in zip(("breakpoints", "slopes", "intercepts"), src,
                                 (size - 1, size, size)):
            if not isinstance(t, torch.Tensor) or t.dtype != torch.float32 or t.dim() != 1:
                raise RuntimeError(f"table {name} must be a 1-D float32 tensor")
            if t.numel() < need:
                raise RuntimeError(f"table {name} has {t.numel()} entries; a table of size "
                                   f"{size} needs {need}")
        if (self._table_src is None or self._table_src[1] != size
                or any(a is not b for a, b in zip(src, self._table_src[0]))):
            # the search of a size-P table reads bp[0..P-2] only: order the first P entries
            nodes, pieces = level_order((bp[:size], src[1][:size], src[2][:size]))
            self._table = [to_device(t, self.device) for t in (nodes, pieces)]  # copied once
            self._table_src = (src, size)
        nodes, pieces = self._table
        if pieces.data_ptr() % 8:  # one 8-byte load a piece (a fresh tensor always is)
            raise RuntimeError("the table's pieces are not 8-byte aligned")
        return nodes.data_ptr(), pieces.data_ptr(), size

    def phase1(self, kind: int, k: int, out: torch.Tensor, hs=None, **table) -> None:
        """Stats [n, k] then present [n] into ``out`` (the step's reduction buffer, on the GPU)."""
        if out.device != self.device or out.dtype != torch.float64 or not out.is_contiguous():
            raise RuntimeError(f"the reduction buffer must be contiguous float64 on {self.device}")
        has_table = table.get("breakpoints") is not None
        if kind == SUPERGROK and has_table == (hs is not None):
            raise RuntimeError("SuperGrok needs either the meta-net's table or the masked "
                               "gradients h, not both" if has_table else "SuperGrok needs either "
                               "the meta-net's table or the masked gradients h, and has neither")
        if kind != SUPERGROK and (has_table or hs is not None):
            raise RuntimeError("a meta-net table or h is SuperGrok's only")
        if out.numel() < self.n * (k + 1):
            raise RuntimeError(f"the reduction buffer holds {out.numel()} values; {self.n} "
                               f"tensors need {self.n * (k + 1)}")
        seg_host, present = self.plan.segment_table(hs, pinned=self.device.type == "cuda")
        # the records the kernels will follow, checked where they are built (host memory)
        n_segments = seg_host.numel() // self.ext.SEGMENT_BYTES
        self._has_q8 = self.ext.check_segments(seg_host.data_ptr(), n_segments, kind, has_table,
                                               self.n)
        if self._chunks_host is not None:  # once per plan
            self.ext.check_chunks(self._chunks_host.data_ptr(), self.n_chunks, seg_host.data_ptr(),
                                  n_segments)
            self._chunks_host = None
        self._segments = seg_host.to(self.device, non_blocking=True)
        self._has_table = has_table
        n = self.n
        out[n * k: n * k + n].copy_(present, non_blocking=True)
        partials = torch.empty(max(self.n_chunks, 1) * self.n_stats, dtype=torch.float64,
                               device=self.device)
        stream = self._stream()
        nodes, pieces, size = self._device_table(table)
        with self._on_device():  # the launch goes to the current device
            self.ext.phase1(kind, self._segments.data_ptr(), self.chunks.data_ptr(),
                            self.n_chunks, self.offsets.data_ptr(), self.index.data_ptr(), n,
                            partials.data_ptr(), out.data_ptr(), nodes, pieces, size, stream)

    def phase2(self, kind: int, scalars: torch.Tensor, hs=None, **table) -> None:
        if (scalars.device != self.device or scalars.dtype != torch.float64
                or not scalars.is_contiguous() or tuple(scalars.shape) != (self.n, self.n_columns)):
            raise RuntimeError(f"scalars must be a contiguous float64 [{self.n}, {self.n_columns}] "
                               f"table on {self.device}")
        if self._segments is None:
            raise RuntimeError("phase2 before phase1")
        if (table.get("breakpoints") is not None) != self._has_table:
            raise RuntimeError("phase 2 must get the same meta-net table (or h) as phase 1")
        stream = self._stream()
        nodes, pieces, size = self._device_table(table)
        with self._on_device():
            self.ext.phase2(kind, self._segments.data_ptr(), self.chunks.data_ptr(),
                            self.n_chunks, self.n, scalars.data_ptr(), nodes, pieces, size, stream,
                            self._has_q8)
        self._segments = None
