"""The CUDA kernel (csrc/cuda/) executed, on two targets:

- ``emulated``: on every run, here and in CI. csrc/cuda/emulated.h compiles the unchanged
  kernels.cu and its glue with the host compiler, every CUDA thread a fiber that meets the others
  at real barriers, per-block shared memory and the launch limits of the GPU; CPU tensors go
  through shardgrok/kernels/cuda.py's glue as on a GPU (``backend="cuda-emulated"``).
- ``gpu``: the same tests on a CUDA device with ``backend="kernel"``; skipped without one.
  benchmarks/gpu_check.sh runs them on a GPU machine.

What is compared: every result against the reference path on the same device (fp32 within the
CPU kernel's tolerance, bf16/fp16 within the storage ulp bounds test_kernel.py measured); the
phase-1 sums bit for bit against csrc/cuda/order.h's order run on the host; the phase-2 update
bit for bit against the header's operation order (test_kernel_header.py's ``_emulate``), for
every (parameter, gradient, state) dtype the kernel instantiates, at odd offsets (the scalar
path), with the meta-net's table in shared and in global memory and with a user's h.

The tests that only a GPU can answer (host syncs, allocations, streams, moving a model to the
GPU) are marked ``gpu`` only: they have not run yet (no GPU has been lent to this project).
"""
from __future__ import annotations

import itertools
import struct
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

from shardgrok import reference as R
from shardgrok.kernels import cuda as KC
from shardgrok.metanet.table import KernelArrays, build_table, kernel_arrays

from tests.kernels.test_kernel import (FP32_RTOL, MIX, assert_fp32_close,
                                       assert_within_storage_ulps, make_opt, make_params,
                                       normal_grads, rel_diff, step_rejected, tensors_of)
from tests.kernels.test_kernel_header import (DTYPES, Case, _emulate, _int8_case, _net,
                                               _scalar_table, stored)
from tests.support.helpers import meta_net

TARGETS = ["emulated", "gpu"]
SIZES = {"1": [1], "3": [3], "17": [17], "65537": [65537], "empty": [0], "mix": MIX}
SEG = struct.Struct("<9Qqq4i")  # csrc/job.h's Segment, as the plan writes it
CHUNK = struct.Struct("<i4xqq")  # csrc/job.h's Chunk


class Target:
    def __init__(self, name: str):
        self.name = name
        if name == "gpu":
            if not torch.cuda.is_available():
                pytest.skip("needs a CUDA device")
            self.ext = KC.cuda_extension()
            assert self.ext is not None, KC.unavailable_reason()
            self.device, self.backend = torch.device("cuda"), "kernel"
        else:
            self.ext = KC.emulated_extension()
            assert self.ext is not None, KC.emulated_unavailable_reason()
            assert self.ext.EMULATED
            self.device, self.backend = torch.device("cpu"), "cuda-emulated"

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()


@pytest.fixture(params=TARGETS)
def target(request, ext):
    return Target(request.param)


@pytest.fixture
def gpu(ext):
    return Target("gpu")


def params_on(target, sizes, dtype=torch.float32, seed=0):
    return [nn.Parameter(p.detach().to(target.device)) for p in make_params(sizes, dtype, seed)]


def run_on(target, name, backend, sizes, steps, dtype=torch.float32, grads=None, **kw):
    params = params_on(target, sizes, dtype)
    opt = make_opt(name, params, backend, **kw)
    for t in range(steps):
        gs = normal_grads(params, t) if grads is None else grads(params, t)
        for p, g in zip(params, gs):
            p.grad = None if g is None else g.to(target.device)
        opt.step()
    target.sync()
    return params, opt


def compare(a, b, rtol=FP32_RTOL):
    """assert_fp32_close for results on any device (the state is compared on the host)."""
    (pa, oa), (pb, ob) = a, b
    ca = [nn.Parameter(p.detach().cpu()) for p in pa]
    cb = [nn.Parameter(p.detach().cpu()) for p in pb]

    class View:
        def __init__(self, params, cpu_params, opt):
            self.state = {c: {k: (v.cpu() if isinstance(v, torch.Tensor) else v)
                              for k, v in opt.state[p].items()}
                          for p, c in zip(params, cpu_params)}
            self._opt = opt

        def get_state_summary(self):
            return self._opt.get_state_summary()

    return assert_fp32_close((ca, View(pa, ca, oa)), (cb, View(pb, cb, ob)), rtol=rtol)


# ---------------------------------------------------------------- whole steps, by optimizer
@pytest.mark.parametrize("sizes", list(SIZES.values()), ids=list(SIZES))
@pytest.mark.parametrize("name", ["grokadamw", "supergrok"])
def test_fp32_matches_the_reference_after_20_steps(target, name, sizes):
    k = run_on(target, name, target.backend, sizes, 20)
    r = run_on(target, name, "reference", sizes, 20)
    assert k[1].get_state_summary()["backend"] == target.backend
    assert r[1].get_state_summary()["backend"] == "reference"
    compare(k, r)


@pytest.mark.parametrize("clip", [100.0, 0.0], ids=["clip", "noclip"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", ["grokadamw", "supergrok"])
def test_low_precision_within_the_cpu_kernels_ulp_bounds(target, name, dtype, clip):
    """bf16/fp16 parameters and state: the bounds tests/kernels/test_kernel.py holds the CPU
    kernel to, scaled the same way (at most 2 storage ulps at the element's scale, at most 0.1%
    of the elements differing, the state within 1 ulp at the tensor's scale)."""
    sizes = [1, 3, 17, 65537, 0]
    kw = dict(dtype=dtype, gradient_clipping=clip, state_dtype=dtype)
    pk, ok = run_on(target, name, target.backend, sizes, 5, **kw)
    pr, orr = run_on(target, name, "reference", sizes, 5, **kw)
    p0 = [p.detach() for p in make_params(sizes, dtype)]
    assert_within_storage_ulps((pk, ok), (pr, orr), p0, dtype)


@pytest.mark.parametrize("name", ["grokadamw", "supergrok"])
def test_several_thousand_chunks(target, name):
    """2,000 small tensors (a chunk each) and a tensor of 40 chunks: far more blocks than one
    launch of a multi-tensor-apply kernel holds."""
    sizes = [1 + (i * 37) % 300 for i in range(2000)] + [40 * 16384 - 5]
    compare(run_on(target, name, target.backend, sizes, 2),
            run_on(target, name, "reference", sizes, 2))


@pytest.mark.parametrize("name", ["grokadamw", "supergrok"])
def test_tensors_without_gradients(target, name):
    """A tensor without a gradient is skipped (its state and step count untouched), and one
    that gets its first gradient later starts then, as on the reference path."""
    def grads(params, t):
        gs = normal_grads(params, t)
        gs[1] = None if t < 2 else gs[1]
        gs[3] = None
        return gs

    sizes = [5, 300, 16384 * 2 + 7, 40]
    k = run_on(target, name, target.backend, sizes, 4, grads=grads)
    r = run_on(target, name, "reference", sizes, 4, grads=grads)
    compare(k, r)
    params, opt = k
    assert float(opt.state[params[3]]["step"]) == 0 and float(opt.state[params[1]]["step"]) == 2
    assert torch.equal(params[3].detach().cpu(), make_params(sizes)[3].detach())


def test_a_users_meta_net_runs_in_pytorch_and_the_rest_fused(target):
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1))
    k = run_on(target, "supergrok", target.backend, MIX, 3, net=net)
    assert k[1].get_state_summary()["backend"] == target.backend
    compare(k, run_on(target, "supergrok", "reference", MIX, 3, net=net))


@pytest.mark.parametrize("name", ["grokadamw", "supergrok"])
def test_parameters_and_gradients_at_odd_offsets(target, name):
    """Parameters and gradients that are views of flat buffers at an odd element offset, as
    ZeRO and DeepSpeed hand them: no 16-byte alignment, so every group takes the scalar path."""
    sizes = [17, 16384 + 9, 8, 0, 33]

    def views(tensors, dtype=torch.float32):
        flat = torch.zeros(1 + sum(t.numel() for t in tensors), dtype=dtype, device=target.device)
        out, at = [], 1
        for t in tensors:
            v = flat[at:at + t.numel()]
            v.copy_(t.reshape(-1))
            out.append(v)
            at += t.numel()
        return out

    def run_views(backend):
        params = [nn.Parameter(v) for v in views([p.detach() for p in make_params(sizes)])]
        assert all(p.data_ptr() % 16 for p in params if p.numel())
        opt = make_opt(name, params, backend)
        for t in range(4):
            for p, g in zip(params, views(normal_grads(params, t))):
                p.grad = g
            opt.step()
        target.sync()
        return params, opt

    k = run_views(target.backend)
    assert k[1].get_state_summary()["backend"] == target.backend
    compare(k, run_views("reference"))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("policy", ["skip", "raise"])
@pytest.mark.parametrize("name", ["grokadamw", "supergrok"])
def test_nonfinite_gradient_writes_nothing(target, name, policy, bad):
    sizes = [17, 65537, 3]
    params, opt = run_on(target, name, target.backend, sizes, 2, nonfinite=policy)
    gs = normal_grads(params, 2)
    gs[1][40000] = bad
    for p, g in zip(params, gs):
        p.grad = g.to(target.device)
    before = [t.clone() for _, t in tensors_of(params, opt)]
    step_rejected(opt, policy)
    for i, ((_, a), b) in enumerate(zip(tensors_of(params, opt), before, strict=True)):
        assert torch.equal(a, b), f"tensor {i} changed"
    # the next good step carries on as if the bad one had not been
    ref = run_on(target, name, "reference", sizes, 2)
    for ps, o in ((params, opt), ref):
        for p, g in zip(ps, normal_grads(ps, 3)):
            p.grad = g.to(target.device)
        o.step()
    for (n1, a), (_, b) in zip(tensors_of(params, opt), tensors_of(*ref), strict=True):
        a, b = a.cpu(), b.cpu()
        assert (float(a) == float(b)) if n1.startswith("step") else rel_diff(a, b) <= FP32_RTOL, n1


# ---------------------------------------------------------------- the launches, driven directly
def case_on(case: Case, device: torch.device) -> Case:
    """The case's tensors on ``device``, the parameters still views of their sources."""
    if device.type == "cpu":
        return case
    case.sources = [s.to(device) for s in case.sources]
    case.params = [case.sources[s].view(-1)[o:o + n] for _, s, o, n in case.rows]
    for key in ("grads", "m", "v", "mu"):
        setattr(case, key, [t.to(device) for t in getattr(case, key)])
    return case


def synthetic_table(size: int, seed: int = 0) -> KernelArrays:
    """A valid table of ``size`` slots (size - 1 real breakpoints, strictly increasing around the
    N(0, 1) gradients, then +inf), far larger than a meta-net's when ``size`` is large."""
    g = torch.Generator().manual_seed(seed)
    k = size - 1
    bp = torch.sort(torch.randn(k, generator=g, dtype=torch.float64) * 2).values.float()
    bp = torch.unique(bp)  # strictly increasing in fp32
    bp = torch.cat([bp, torch.full((size - bp.numel(),), float("inf"))])
    slopes = (torch.randn(size + 1, generator=g) * 0.5).float()
    icpt = (torch.randn(size + 1, generator=g) * 0.5).float()
    return KernelArrays(bp, slopes, icpt)


def chunk_records(plan):
    raw = plan.chunk_table().numpy().tobytes()
    return [CHUNK.unpack_from(raw, i * CHUNK.size) for i in range(plan.n_chunks)]


def launch_case(target, ext, case, kind, arrays=None, hs=None, explicit_grads=False,
                rounding=0, seed=0):
    """One step of ``case`` through the CUDA glue on ``target``: phase 1 into a reduction buffer,
    the step counters, a scalar table, phase 2. Returns (stats [n, k], present, steps, table)."""
    plan = case.resolved_plan(explicit_grads)
    launches = KC.CudaLaunches(target.ext, ext, plan, case.n_tensors, target.device)
    code = ext.GROKADAMW if kind == "grok" else ext.SUPERGROK
    k = 1 if kind == "grok" else ext.N_STATS
    aux = {}
    if arrays is not None:
        aux = dict(breakpoints=arrays.breakpoints.to(target.device),
                   slopes=arrays.slopes.to(target.device),
                   intercepts=arrays.intercepts.to(target.device),
                   table_size=arrays.breakpoints.numel())
    elif hs is not None:
        aux = dict(hs=[h.to(target.device) for h in hs])
    n = case.n_tensors
    buf = torch.full((n * (k + 1),), float("nan"), dtype=torch.float64, device=target.device)
    launches.phase1(code, k, buf, **aux)
    target.sync()
    present = buf[n * k:].cpu()
    steps = plan.bump_steps(present > 0)
    table = _scalar_table(kind, steps, rounding, seed)
    launches.phase2(code, table.to(target.device), **aux)
    target.sync()
    plan.release()
    return buf[:n * k].view(n, k).cpu(), present, steps, table, chunk_records(plan)


def masked_by_header(ext, arrays, g):
    """h = exp(f(g)) g from the header's own (tested) functions over the sorted table."""
    f = ext.header_table(g.float().cpu(), arrays.breakpoints, arrays.slopes, arrays.intercepts,
                         arrays.breakpoints.numel())
    return ext.header_exp(f) * g.float().cpu()


def order_model_stats(ext, case, old, kind, chunks, hs):
    """Every tensor's sums as order.h adds them: per chunk, runs of 8 over 256 threads and a
    tree; per tensor, its chunks' partials in chunk order, runs of 1 and the same tree."""
    k = 1 if kind == "grok" else ext.N_STATS
    per_tensor = [[] for _ in range(case.n_tensors)]
    for seg, begin, size in chunks:
        t = case.rows[seg][0]
        g = case.grad_piece(seg).cpu().double()[begin:begin + size]
        if kind == "grok":
            terms = [g * g]
        else:
            h = hs[seg].cpu().double()[begin:begin + size]
            u = old["mu"][seg].cpu().double()[begin:begin + size]
            terms = [g * g, h * h, h * u, h * g, u * u, u * g]
        per_tensor[t].append([ext.cuda_order_sum(x.contiguous(), 8) for x in terms])
    out = torch.zeros(case.n_tensors, k, dtype=torch.float64)
    for t, parts in enumerate(per_tensor):
        for q in range(k):
            out[t, q] = ext.cuda_order_sum(torch.tensor([p[q] for p in parts],
                                                        dtype=torch.float64), 1)
    return out


def check_case(ext, case, old, kind, result, hs):
    stats, present, steps, table, chunks = result
    assert present.tolist() == [1.0] * case.n_tensors
    assert steps.tolist() == [3.0, 3.0, 3.0, 1.0, 1.0]
    want = order_model_stats(ext, case, old, kind, chunks, hs)
    assert torch.equal(stats, want), (stats - want).abs().max()
    for i, (t, s, o, n_el) in enumerate(case.rows):
        g = case.grad_piece(i).cpu()
        p0 = old["sources"][s].view(-1)[o:o + n_el]
        h = hs[i].cpu() if hs is not None else None
        want = _emulate(kind, p0, g, h if h is not None else g, old["m"][i], old["v"][i],
                        old["mu"][i], table[t])
        got = (case.params[i], case.m[i], case.v[i], case.mu[i])
        for name, a, b in zip(("param", "exp_avg", "exp_avg_sq", "mu"), got, want):
            a = a.cpu()
            assert torch.equal(a, b.to(a.dtype)), (
                f"segment {i} {name}: {int((a != b.to(a.dtype)).sum())} elements differ from the "
                "header's operation order")
    for s, src in enumerate(case.sources):  # nothing outside the segments moved
        mask = torch.ones(src.numel(), dtype=torch.bool)
        for _, si, o, n_el in case.rows:
            if si == s:
                mask[o:o + n_el] = False
        assert torch.equal(src.cpu()[mask], old["sources"][s][mask])


def snapshot_cpu(case):
    return {k: [t.detach().cpu().clone() for t in getattr(case, k)]
            for k in ("sources", "m", "v", "mu", "steps")}


DTYPE_COMBOS = list(itertools.product(DTYPES, DTYPES, DTYPES))  # (param, grad, state): all 27


@pytest.mark.parametrize("pdt,gdt,sdt", DTYPE_COMBOS, ids=["-".join(c) for c in DTYPE_COMBOS])
@pytest.mark.parametrize("kind", ["grok", "super"])
def test_every_dtype_combination_at_odd_offsets_bitwise(target, ext, kind, pdt, gdt, sdt):
    """Segments at odd offsets (one of three chunks, a ragged tail, an empty one, two pieces of
    one tensor): the sums bit for bit as order.h adds them, the update bit for bit as the header
    orders it, for each of the 27 dtype instantiations of the kernels."""
    case = case_on(Case(ext, DTYPES[pdt], DTYPES[sdt], seed=7, gdtype=DTYPES[gdt]),
                   target.device)
    old = snapshot_cpu(case)
    arrays = kernel_arrays(build_table(_net("random"))) if kind == "super" else None
    hs = ([masked_by_header(ext, arrays, case.grad_piece(i)) for i in range(len(case.rows))]
          if kind == "super" else None)
    result = launch_case(target, ext, case, kind, arrays=arrays, explicit_grads=True)
    check_case(ext, case, old, kind, result, hs)


@pytest.mark.parametrize("kind", ["grok", "super"])
@pytest.mark.parametrize("pdt,sdt,flags", [("bf16", "bf16", 3), ("f32", "bf16", 1),
                                           ("bf16", "f32", 2)])
def test_stochastic_rounding_bitwise(target, ext, kind, pdt, sdt, flags):
    """bf16 writes rounded stochastically: each stored value is the header's fp32 result rounded
    by the reference's draws for its element's index in the whole tensor, bit for bit (as the
    CPU kernel's test_plan_stochastic_rounding_bitwise checks), vectorised groups and scalar
    tails alike."""
    case = case_on(Case(ext, DTYPES[pdt], DTYPES[sdt], seed=4), target.device)
    old = snapshot_cpu(case)
    arrays = kernel_arrays(build_table(_net("random"))) if kind == "super" else None
    *_, table, _ = launch_case(target, ext, case, kind, arrays=arrays, explicit_grads=True,
                               rounding=flags, seed=77)
    for i, (t, s, o, n_el) in enumerate(case.rows):
        g = case.grad_piece(i).cpu()
        p0 = old["sources"][s].view(-1)[o:o + n_el]
        h = masked_by_header(ext, arrays, g) if kind == "super" else g
        want = _emulate(kind, p0, g, h, old["m"][i], old["v"][i], old["mu"][i], table[t])
        got = (case.params[i], case.m[i], case.v[i], case.mu[i])
        for name, a, b in zip(("param", "exp_avg", "exp_avg_sq", "mu"), got, want):
            a, b = a.cpu(), stored(b, a.dtype, table[t], t, case.starts[i], name)
            assert torch.equal(a, b), f"segment {i} {name}: {int((a != b).sum())} differ"


@pytest.mark.parametrize("kind", ["grok", "super"])
@pytest.mark.parametrize("pdt,flags", [("f32", 0), ("f32", 1), ("bf16", 3)])
def test_int8_state_bitwise(target, ext, kind, pdt, flags):
    """8-bit state through the CUDA launches: pieces starting inside blocks (a warp's 256
    elements are counted from the block's start) and past 2^32; phase 1 against the sums of the
    dequantized mu in order.h's order, phase 2's parameters, codes and scales bit for bit
    against the header's update, quantized by the reference (as the CPU kernel's
    test_plan_int8_state_bitwise checks)."""
    case = _int8_case(ext, DTYPES[pdt], seed=6)
    old = {k: [t.clone() for t in getattr(case, k)] for k in ("sources", "m", "v", "mu")}
    old_scales = [[t.clone() for t in sc] for sc in case.scales]
    if target.device.type == "cuda":
        case.sources = [t.to(target.device) for t in case.sources]
        case.params = [case.sources[s].view(-1)[o:o + n] for _, s, o, n in case.rows]
        for key in ("grads", "m", "v", "mu"):
            setattr(case, key, [t.to(target.device) for t in getattr(case, key)])
        case.scales = [[t.to(target.device) for t in sc] for sc in case.scales]
    rows = [(*r, start) for r, start in zip(case.rows, case.starts)]
    plan = ext.Plan(case.n_tensors, case.sources, torch.tensor(rows, dtype=torch.long),
                    case.params, case.m, case.v, case.mu, case.steps, case.slot_of, case.scales)
    assert plan.resolve(case.grads)
    launches = KC.CudaLaunches(target.ext, ext, plan, case.n_tensors, target.device)
    code = ext.GROKADAMW if kind == "grok" else ext.SUPERGROK
    arrays = kernel_arrays(build_table(_net("random")))
    aux = {} if kind == "grok" else dict(
        breakpoints=arrays.breakpoints.to(target.device), slopes=arrays.slopes.to(target.device),
        intercepts=arrays.intercepts.to(target.device), table_size=arrays.breakpoints.numel())
    n, k = case.n_tensors, 1 if kind == "grok" else ext.N_STATS
    buf = torch.zeros(n * (k + 1), dtype=torch.float64, device=target.device)
    launches.phase1(code, k, buf, **aux)
    target.sync()
    steps = plan.bump_steps(buf[n * k:].cpu() > 0)
    table = _scalar_table(kind, steps, flags, seed=99)
    launches.phase2(code, table.to(target.device), **aux)
    target.sync()
    plan.release()
    keys = ("exp_avg", "exp_avg_sq", "mu")
    want_stats = torch.zeros(n, k, dtype=torch.float64)
    for i, (t, s, o, n_el) in enumerate(case.rows):
        g, start = case.grad_piece(i).cpu(), case.starts[i]
        state = [R.dequantize_state(c, sc, key, start)
                 for c, sc, key in zip((old["m"][i], old["v"][i], old["mu"][i]), old_scales[i], keys)]
        h = masked_by_header(ext, arrays, g) if kind == "super" else g
        want_stats[t] += (R.grokadamw_partial_stats(g) if kind == "grok"
                          else R.supergrok_partial_stats(g, h, state[2]))
        p1, m1, v1, u1 = _emulate(kind, old["sources"][s].view(-1)[o:o + n_el], g, h, *state, table[t])
        got_p = case.params[i].cpu()
        assert torch.equal(got_p, stored(p1, got_p.dtype, table[t], t, start, "param")), f"segment {i} param"
        rounding = R.Rounding.of(R.StepScalars.from_row(table[t]), t, start)
        for key, got, got_sc, value in zip(keys, (case.m[i], case.v[i], case.mu[i]), case.scales[i],
                                           (m1, v1, u1)):
            codes, scales = torch.empty_like(got.cpu()), torch.empty_like(got_sc.cpu())
            R.quantize_state_(codes, scales, value, key, start, rounding)
            assert torch.equal(got_sc.cpu(), scales), f"segment {i} {key} scales"
            assert torch.equal(got.cpu(), codes), f"segment {i} {key}: {int((got.cpu() != codes).sum())} differ"
    torch.testing.assert_close(buf[:n * k].view(n, k).cpu(), want_stats, rtol=1e-12, atol=1e-30)


@pytest.mark.parametrize("size", [64, 2048, 4096, 16384], ids=lambda s: f"table{s}")
def test_table_in_shared_and_in_global_memory(target, ext, size):
    """Tables up to SHARED_TABLE_MAX slots are copied into each block's shared memory, larger
    ones read from global memory: both give the header's search bit for bit."""
    assert target.ext.SHARED_TABLE_MAX == 2048
    case = case_on(Case(ext, torch.float32, torch.float32, seed=8), target.device)
    old = snapshot_cpu(case)
    arrays = synthetic_table(size, seed=size)
    hs = [masked_by_header(ext, arrays, case.grad_piece(i)) for i in range(len(case.rows))]
    result = launch_case(target, ext, case, "super", arrays=arrays)
    check_case(ext, case, old, "super", result, hs)


@pytest.mark.parametrize("pdt", ["f32", "bf16"])
def test_a_users_h_is_taken_as_is(target, ext, pdt):
    case = case_on(Case(ext, DTYPES[pdt], DTYPES[pdt], seed=9), target.device)
    old = snapshot_cpu(case)
    g0 = torch.Generator().manual_seed(5)
    hs = [torch.randn(n, generator=g0) for *_, n in case.rows]
    result = launch_case(target, ext, case, "super", hs=hs)
    check_case(ext, case, old, "super", result, hs)


def test_sums_of_one_model_follow_the_host_order_bitwise(target, ext):
    """GrokAdamW's per-tensor sum of g^2 from a real step, against order.h on the host."""
    sizes = [1, 17, ext.CHUNK * 3 + 5, 100_000]
    params = params_on(target, sizes)
    opt = make_opt("grokadamw", params, target.backend)
    for p, g in zip(params, normal_grads(params, 0)):
        p.grad = g.to(target.device)
    plan = opt._driver.plan(opt)
    assert plan.resolve()
    n = len(sizes)
    buf = torch.zeros(2 * n, dtype=torch.float64, device=target.device)
    plan.phase1(0, 1, buf)
    plan.plan.release()
    got = buf[:n].cpu().tolist()
    for i, p in enumerate(params):
        terms = p.grad.detach().cpu().double().square()
        partials = [ext.cuda_order_sum(terms[b:b + ext.CHUNK], 8)
                    for b in range(0, terms.numel(), ext.CHUNK)]
        want = ext.cuda_order_sum(torch.tensor(partials, dtype=torch.float64), 1)
        assert struct.pack("<d", got[i]) == struct.pack("<d", want), i
    assert buf[n:].cpu().tolist() == [1.0] * n


# ---------------------------------------------------------------- the glue's checks
def test_glue_refuses_supergrok_without_a_table_or_h(target, ext):
    case = case_on(Case(ext, torch.float32, torch.float32), target.device)
    plan = case.plan()
    launches = KC.CudaLaunches(target.ext, ext, plan, case.n_tensors, target.device)
    for s, gr in zip(case.sources, case.grads):
        s.grad = gr
    assert plan.resolve()
    buf = torch.zeros(case.n_tensors * (ext.N_STATS + 1), dtype=torch.float64,
                      device=target.device)
    with pytest.raises(RuntimeError, match="has neither"):
        launches.phase1(ext.SUPERGROK, ext.N_STATS, buf)
    arrays = synthetic_table(64)
    short = dict(breakpoints=arrays.breakpoints[:30], slopes=arrays.slopes,
                 intercepts=arrays.intercepts, table_size=64)
    with pytest.raises(RuntimeError, match="breakpoints has 30 entries"):
        launches.phase1(ext.SUPERGROK, ext.N_STATS, buf, **short)
    with pytest.raises(RuntimeError, match="power of two"):
        launches.phase1(ext.SUPERGROK, ext.N_STATS, buf, **dict(short, table_size=48))
    with pytest.raises(RuntimeError, match="reduction buffer holds"):
        launches.phase1(ext.GROKADAMW, 1, buf[:3])
    plan.release()


def _records(param, grad, m, v, mu, numel, codes, tensor=0):
    seg = torch.frombuffer(bytearray(SEG.pack(param.data_ptr(), grad.data_ptr(), m.data_ptr(),
                                              v.data_ptr(), mu.data_ptr(), 0, 0, 0, 0, numel, 0, tensor,
                                              *codes)), dtype=torch.uint8)
    chunk = torch.frombuffer(bytearray(CHUNK.pack(0, 0, numel)), dtype=torch.uint8)
    return seg, chunk


def test_an_unknown_dtype_code_is_an_error_not_a_skip(ext):
    """The glue refuses a record with an unknown dtype code; and should one reach the kernels,
    they trap instead of skipping the segment, and the error names the launch it came from."""
    emu = Target("emulated").ext
    p, g, m, v, mu = (torch.randn(40) for _ in range(5))
    before = p.clone()
    seg, chunk = _records(p, g, m, v, mu, 40, (0, 7, 0))
    with pytest.raises(ValueError, match="unknown dtype code 7"):
        emu.check_segments(seg.data_ptr(), 1, 0, False, 1)
    offsets = torch.tensor([0, 1], dtype=torch.int64)
    index = torch.tensor([0], dtype=torch.int32)
    partials = torch.zeros(ext.N_STATS, dtype=torch.float64)
    stats = torch.zeros(1, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"phase 1 \(per chunk\): cudaErrorLaunchFailure"):
        emu.phase1(0, seg.data_ptr(), chunk.data_ptr(), 1, offsets.data_ptr(), index.data_ptr(),
                   1, partials.data_ptr(), stats.data_ptr())
    scalars = torch.zeros(1, ext.N_COLUMNS, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="phase 2: cudaErrorLaunchFailure"):
        emu.phase2(0, seg.data_ptr(), chunk.data_ptr(), 1, 1, scalars.data_ptr())
    assert torch.equal(p, before)
    # a good record through the same calls runs (the error was the code's, not the call's)
    seg, chunk = _records(p, g, m, v, mu, 40, (0, 0, 0))
    emu.check_segments(seg.data_ptr(), 1, 0, False, 1)
    emu.phase1(0, seg.data_ptr(), chunk.data_ptr(), 1, offsets.data_ptr(), index.data_ptr(), 1,
               partials.data_ptr(), stats.data_ptr())
    assert float(stats[0]) == pytest.approx(float((g.double() ** 2).sum()), rel=1e-12)


def test_glue_refuses_records_the_kernels_would_misread(ext):
    emu = Target("emulated").ext
    p, g, m, v, mu = (torch.randn(40) for _ in range(5))
    seg, chunk = _records(p, g, m, v, mu, 40, (0, 0, 0), tensor=3)
    with pytest.raises(ValueError, match=r"tensor index 3 outside \[0, 1\)"):
        emu.check_segments(seg.data_ptr(), 1, 0, False, 1)
    seg, chunk = _records(p, g, m, v, mu, 40, (0, 0, 0))
    with pytest.raises(ValueError, match="neither"):  # SuperGrok, no table, no h
        emu.check_segments(seg.data_ptr(), 1, 1, False, 1)
    bad_chunk = torch.frombuffer(bytearray(CHUNK.pack(0, 30, 20)), dtype=torch.uint8)
    with pytest.raises(ValueError, match="outside its segment"):
        emu.check_chunks(bad_chunk.data_ptr(), 1, seg.data_ptr(), 1)


def test_python_m_shardgrok_kernels_reports_the_emulated_target(ext):
    r = subprocess.run([sys.executable, "-m", "shardgrok.kernels"], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    assert "cuda-emulated (testing backend): available" in r.stdout


def test_the_environment_variable_selects_the_emulated_target(monkeypatch, ext):
    monkeypatch.setenv("SHARDGROK_BACKEND", "cuda-emulated")
    params = make_params([5, 17])
    opt = make_opt("supergrok", params, None)
    assert opt.backend == "cuda-emulated"
    for p, g in zip(params, normal_grads(params, 0)):
        p.grad = g
    opt.step()
    assert opt.get_state_summary()["backend"] == "cuda-emulated"


def test_backend_cuda_emulated_refuses_what_it_cannot_run(ext):
    params = [nn.Parameter(torch.randn(4, dtype=torch.float64))]
    opt = make_opt("grokadamw", params, "cuda-emulated")
    params[0].grad = torch.randn(4, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="backend='cuda-emulated'.*float64"):
        opt.step()


# ---------------------------------------------------------------- only a GPU can answer these
def host_syncs(fn) -> list[str]:
    """The host syncs ``fn()`` makes, as torch's sync debug mode reports them."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return [str(w.message) for w in caught if "synchroniz" in str(w.message).lower()]


@pytest.mark.parametrize("name", ["grokadamw", "supergrok"])
def test_one_host_sync_per_step(gpu, name):
    params = params_on(gpu, MIX)
    opt = make_opt(name, params, "kernel")
    grads = [g.cuda() for g in normal_grads(params, 0)]
    for p, g in zip(params, grads):
        p.grad = g
    opt.step()  # builds the plan and the table (syncs allowed there)

    def three_steps():
        for _ in range(3):
            opt.step()

    syncs = host_syncs(three_steps)
    assert len(syncs) == 3, syncs


def test_a_table_rebuild_after_a_meta_step_adds_one_host_sync(gpu):
    """The rebuild reads the meta-net's weights to the host in one copy: the step after a
    meta-step syncs twice (that copy and the step's own read), not once per weight tensor."""
    from shardgrok import SuperGrok

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1)).cuda()
    x, y = torch.randn(64, 4, device="cuda"), torch.randn(64, 1, device="cuda")
    opt = SuperGrok(model.parameters(), lr=1e-2, warmup_steps=0, meta_lr=0.05,
                    meta_net=meta_net("random"), backend="kernel")

    def backward():
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()

    backward()
    opt.step()  # the plan and the first table
    backward()
    opt.meta_step(lambda: ((model(x) - y) ** 2).mean())
    syncs = host_syncs(opt.step)
    assert len(syncs) == 2, syncs
    backward()
    assert len(host_syncs(opt.step)) == 1  # the same weights: no rebuild


@pytest.mark.parametrize("name", ["grokadamw", "supergrok"])
def test_step_allocates_no_model_sized_temporaries(gpu, name):
    sizes = [4_000_000] * 4 + [1000] * 50
    params = params_on(gpu, sizes)
    opt = make_opt(name, params, "kernel")
    for p, g in zip(params, normal_grads(params, 0)):
        p.grad = g.cuda()
    opt.step()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    opt.step()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    model = sum(p.numel() * 4 for p in params)
    # docs/kernels.md: per-chunk partials (48 B per 16384 elements), the tables, the buffer
    assert extra <= model // 100 + (1 << 20), (extra, model)


def test_model_moved_to_the_gpu_after_building_the_optimizer(gpu):
    params = make_params(MIX)
    opt = make_opt("supergrok", params, "kernel")
    for p in params:
        p.data = p.data.cuda()
    for p, g in zip(params, normal_grads(params, 0)):
        p.grad = g.cuda()
    opt.step()
    assert opt.state[params[0]]["exp_avg"].device.type == "cuda"
    assert next(opt.meta_net.parameters()).device.type == "cuda"
    assert opt.get_state_summary()["backend"] == "kernel"


def test_runs_on_the_current_stream(gpu):
    a = run_on(gpu, "supergrok", "kernel", MIX, 3)
    stream = torch.cuda.Stream()
    params = params_on(gpu, MIX)
    opt = make_opt("supergrok", params, "kernel")
    with torch.cuda.stream(stream):
        for t in range(3):
            for p, g in zip(params, normal_grads(params, t)):
                p.grad = g.cuda()
            opt.step()
    stream.synchronize()
    for x, y in zip(a[0], params):
        assert torch.equal(x.detach(), y.detach())


def test_a_device_other_than_the_first(gpu):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    params = [nn.Parameter(p.detach().to("cuda:1")) for p in make_params(MIX)]
    opt = make_opt("supergrok", params, "kernel")
    for t in range(3):
        for p, g in zip(params, normal_grads(params, t)):
            p.grad = g.to("cuda:1")
        opt.step()
    ref = run_on(gpu, "supergrok", "reference", MIX, 3)
    assert opt.get_state_summary()["backend"] == "kernel"
    assert opt.state[params[0]]["exp_avg"].device == torch.device("cuda:1")
    compare((params, opt), ref)
