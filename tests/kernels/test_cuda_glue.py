"""The CUDA backend's Python glue (shardgrok/kernels/cuda.py) end to end, without a GPU: the
launches go to an emulated extension that reads, through the addresses the glue passes, the
very records and buffers the CUDA kernel would read (csrc/job.h's segment and chunk records,
the per-tensor chunk index, the reduction buffer, the scalar table, the meta-net's table),
sums in csrc/cuda/order.h's order and updates through the reference. A wrong address, argument
order, record layout or buffer offset in the glue changes the results, which are compared
with the reference backend.

What the CUDA kernel itself computes is tested on a GPU (tests/kernels/test_cuda.py)."""
from __future__ import annotations

import ctypes
import struct

import pytest
import torch
from torch import nn

import shardgrok.reference as R
from shardgrok.kernels.cuda import CudaLaunches
from tests.kernels.test_kernel import MIX, assert_fp32_close, make_opt, make_params, normal_grads

SEG = struct.Struct("<6Qq4i")
CHUNK = struct.Struct("<i4xqq")
DTYPES = {0: torch.float32, 1: torch.bfloat16, 2: torch.float16}


def view(addr: int, n: int, dtype: torch.dtype) -> torch.Tensor:
    """``n`` elements of ``dtype`` at ``addr``, sharing the memory."""
    if n == 0:
        return torch.empty(0, dtype=dtype)
    size = n * dtype.itemsize
    return torch.frombuffer((ctypes.c_byte * size).from_address(addr), dtype=dtype, count=n)


def raw(addr: int, size: int) -> bytes:
    return ctypes.string_at(addr, size) if size else b""


class EmulatedCuda:
    """The CUDA extension's interface, run on the host over the addresses it is given."""

    SEGMENT_BYTES, CHUNK_BYTES = SEG.size, CHUNK.size

    def __init__(self, cpu_ext):
        self.cpu = cpu_ext
        self.CHUNK = cpu_ext.CHUNK
        self.launches = []

    def _chunks(self, segments, chunks, n_chunks):
        for c in range(n_chunks):
            seg_index, begin, size = CHUNK.unpack(raw(chunks + c * CHUNK.size, CHUNK.size))
            rec = SEG.unpack(raw(segments + seg_index * SEG.size, SEG.size))
            yield c, dict(zip(("param", "grad", "m", "v", "mu", "h", "numel", "tensor", "pd", "gd",
                               "sd"), rec)), begin, size

    def _h(self, s, g, begin, size, table):
        if s["h"]:
            return view(s["h"] + begin * 4, size, torch.float32)
        bp, sl, ic, n = table
        assert bp, "SuperGrok needs the table or h"
        arrays = [view(a, n, torch.float32) for a in (bp, sl, ic)]
        g32 = g.float()
        return self.cpu.header_exp(self.cpu.header_table(g32, *arrays, n)) * g32

    def phase1(self, kind, segments, chunks, n_chunks, tensor_offsets, tensor_chunks, n_tensors,
               partials, stats, breakpoints=0, slopes=0, intercepts=0, table_size=0, stream=0):
        self.launches.append("phase1")
        k = 1 if kind == 0 else self.cpu.N_STATS
        part = view(partials, max(n_chunks, 1) * self.cpu.N_STATS, torch.float64)
        for c, s, begin, size in self._chunks(segments, chunks, n_chunks):
            out = part[c * self.cpu.N_STATS:(c + 1) * self.cpu.N_STATS]
            out.zero_()
            if not s["grad"]:
                continue
            g = view(s["grad"] + begin * DTYPES[s["gd"]].itemsize, size, DTYPES[s["gd"]]).double()
            if kind == 0:
                out[0] = self.cpu.cuda_order_sum(g * g, 8)
                continue
            u = view(s["mu"] + begin * DTYPES[s["sd"]].itemsize, size, DTYPES[s["sd"]]).double()
            h = self._h(s, g, begin, size, (breakpoints, slopes, intercepts, table_size)).double()
            for q, terms in enumerate((g * g, h * h, h * u, h * g, u * u, u * g)):
                out[q] = self.cpu.cuda_order_sum(terms, 8)
        offsets = view(tensor_offsets, n_tensors + 1, torch.int64)
        index = view(tensor_chunks, max(n_chunks, 0), torch.int32)
        st = view(stats, n_tensors * k, torch.float64)
        for t in range(n_tensors):
            mine = index[offsets[t]:offsets[t + 1]].long()
            for q in range(k):
                st[t * k + q] = self.cpu.cuda_order_sum(part.view(-1, self.cpu.N_STATS)[mine, q], 1)

    def phase2(self, kind, segments, chunks, n_chunks, n_tensors, scalars, breakpoints=0, slopes=0,
               intercepts=0, table_size=0, stream=0):
        self.launches.append("phase2")
        table = view(scalars, n_tensors * self.cpu.N_COLUMNS, torch.float64).view(n_tensors, -1)
        for c, s, begin, size in self._chunks(segments, chunks, n_chunks):
            if not s["grad"]:
                continue
            pd, gd, sd = DTYPES[s["pd"]], DTYPES[s["gd"]], DTYPES[s["sd"]]
            p = view(s["param"] + begin * pd.itemsize, size, pd)
            g = view(s["grad"] + begin * gd.itemsize, size, gd)
            m, v, mu = (view(s[x] + begin * sd.itemsize, size, sd) for x in ("m", "v", "mu"))
            k = R.StepScalars.from_row(table[s["tensor"]])
            if kind == 0:
                R.grokadamw_update_(p, g, m, v, mu, k=k)
            else:
                h = self._h(s, g, begin, size, (breakpoints, slopes, intercepts, table_size))
                R.supergrok_update_(p, g, h, m, v, mu, k=k)


def run_glue(ext, name, sizes, steps, **kw):
    """Steps through FusedPlan -> CudaLaunches -> the emulated extension, on CPU tensors."""
    params = make_params(sizes)
    opt = make_opt(name, params, "kernel", **kw)
    emulated = EmulatedCuda(ext)
    for t in range(steps):
        for p, g in zip(params, normal_grads(params, t)):
            p.grad = g
        plan = opt._driver.plan(opt)
        if plan.cuda is None:  # route this plan's phases through the glue
            plan.cuda = CudaLaunches(emulated, ext, plan.plan, plan.n_tensors, plan.device)
        opt.step()
    assert emulated.launches == ["phase1", "phase2"] * steps
    return params, opt


def run_reference(name, sizes, steps, **kw):
    params = make_params(sizes)
    opt = make_opt(name, params, "reference", **kw)
    for t in range(steps):
        for p, g in zip(params, normal_grads(params, t)):
            p.grad = g
        opt.step()
    return params, opt


@pytest.mark.parametrize("name", ["grokadamw", "supergrok"])
def test_glue_drives_the_kernel_interface_like_the_reference(ext, name):
    sizes = MIX + [ext.CHUNK * 2 + 3]  # empty, tiny and multi-chunk tensors
    kw = dict(warmup_steps=1) if name == "supergrok" else {}
    assert_fp32_close(run_glue(ext, name, sizes, 4, **kw), run_reference(name, sizes, 4, **kw))


def test_glue_passes_a_users_meta_net_h(ext):
    """A meta-net that is not a SimpleMetaNet: PyTorch computes h, the records carry its address."""
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1))
    a = run_glue(ext, "supergrok", MIX, 3, net=net)
    assert_fp32_close(a, run_reference("supergrok", MIX, 3, net=net))


def test_glue_with_tensors_without_gradients(ext):
    """Segments without a gradient have null records: skipped, their tensors' present flag 0."""
    sizes = [5, 300, 7]
    params = make_params(sizes)
    opt = make_opt("grokadamw", params, "kernel")
    emulated = EmulatedCuda(ext)
    before = params[1].detach().clone()
    for t in range(2):
        grads = normal_grads(params, t)
        params[0].grad, params[1].grad, params[2].grad = grads[0], None, grads[2]
        plan = opt._driver.plan(opt)
        if plan.cuda is None:
            plan.cuda = CudaLaunches(emulated, ext, plan.plan, plan.n_tensors, plan.device)
        opt.step()
    assert torch.equal(params[1].detach(), before)
    assert float(opt.state[params[1]]["step"]) == 0 and float(opt.state[params[0]]["step"]) == 2
