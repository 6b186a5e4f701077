"""The CUDA kernel on a GPU: against the reference path on the same GPU, its sums against the
host model of their order, its host syncs and its memory. Skipped without CUDA (CI has none);
``benchmarks/gpu_check.sh`` runs these with the benchmark on a GPU machine."""
from __future__ import annotations

import struct
import warnings

import pytest
import torch
from torch import nn

from tests.kernels.test_kernel import (FP32_RTOL, MIX, assert_fp32_close, make_opt, make_params,
                                       normal_grads, storage_ulp)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

SIZES = {"1": [1], "3": [3], "17": [17], "65537": [65537], "empty": [0], "mix": MIX}


def cuda_params(sizes, dtype=torch.float32, seed=0):
    return [nn.Parameter(p.detach().cuda()) for p in make_params(sizes, dtype, seed)]


def run_cuda(name, backend, sizes, steps, dtype=torch.float32, **kw):
    params = cuda_params(sizes, dtype)
    opt = make_opt(name, params, backend, **kw)
    for t in range(steps):
        for p, g in zip(params, normal_grads(params, t)):
            p.grad = g.cuda()
        opt.step()
    torch.cuda.synchronize()
    return params, opt


@pytest.fixture(scope="module")
def cuda_ext():
    from shardgrok.kernels import cuda
    ext = cuda.cuda_extension()
    assert ext is not None, cuda.unavailable_reason()
    return ext


@pytest.mark.parametrize("sizes", list(SIZES.values()), ids=list(SIZES))
@pytest.mark.parametrize("name", ["grokadamw", "supergrok"])
def test_fp32_matches_the_reference_after_20_steps(cuda_ext, name, sizes):
    k = run_cuda(name, "kernel", sizes, 20)
    r = run_cuda(name, "reference", sizes, 20)
    assert k[1].get_state_summary()["backend"] == "kernel"
    assert_fp32_close(k, r, rtol=FP32_RTOL)


@pytest.mark.parametrize("name", ["grokadamw", "supergrok"])
def test_bf16_within_one_ulp_of_the_references_bf16_run(cuda_ext, name):
    sizes = [1, 3, 17, 65537]
    pk, ok = run_cuda(name, "kernel", sizes, 20, dtype=torch.bfloat16)
    pr, orr = run_cuda(name, "reference", sizes, 20, dtype=torch.bfloat16)
    for a, b in zip(pk, pr):
        a, b = a.detach().double(), b.detach().double()
        scale = torch.maximum(b.abs(), torch.tensor(1e-2, dtype=torch.float64, device=b.device))
        assert float(((a - b).abs() / storage_ulp(scale, torch.bfloat16)).max()) <= 1.0


@pytest.mark.parametrize("name", ["grokadamw", "supergrok"])
def test_more_tensors_than_a_multi_tensor_apply_launch_holds(cuda_ext, name):
    sizes = [1 + (i * 37) % 300 for i in range(3000)]
    assert_fp32_close(run_cuda(name, "kernel", sizes, 3), run_cuda(name, "reference", sizes, 3))


def test_sums_follow_the_host_model_bit_for_bit(cuda_ext, ext):
    """GrokAdamW's per-tensor sum of g^2 from the GPU equals csrc/cuda/order.h's order run on
    the host: per chunk in runs of 8 over 256 threads and a tree, then per tensor."""
    sizes = [1, 17, ext.CHUNK * 3 + 5, 100_000]
    params = cuda_params(sizes)
    opt = make_opt("grokadamw", params, "kernel")
    for p, g in zip(params, normal_grads(params, 0)):
        p.grad = g.cuda()
    plan = opt._driver.plan(opt)
    assert plan.resolve()
    n = len(sizes)
    buf = torch.zeros(2 * n, dtype=torch.float64, device="cuda")
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


@pytest.mark.parametrize("name", ["grokadamw", "supergrok"])
def test_one_host_sync_per_step(cuda_ext, name):
    params = cuda_params(MIX)
    opt = make_opt(name, params, "kernel")
    grads = [g.cuda() for g in normal_grads(params, 0)]
    for p, g in zip(params, grads):
        p.grad = g
    opt.step()  # builds the plan and the table (syncs allowed there)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(3):
                opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
    assert len(syncs) == 3, [str(w.message) for w in syncs]


@pytest.mark.parametrize("name", ["grokadamw", "supergrok"])
def test_step_allocates_no_model_sized_temporaries(cuda_ext, name):
    sizes = [4_000_000] * 4 + [1000] * 50
    params = cuda_params(sizes)
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


def test_model_moved_to_the_gpu_after_building_the_optimizer(cuda_ext):
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


def test_runs_on_the_current_stream(cuda_ext):
    a = run_cuda("supergrok", "kernel", MIX, 3)
    stream = torch.cuda.Stream()
    params = cuda_params(MIX)
    opt = make_opt("supergrok", params, "kernel")
    with torch.cuda.stream(stream):
        for t in range(3):
            for p, g in zip(params, normal_grads(params, t)):
                p.grad = g.cuda()
            opt.step()
    stream.synchronize()
    for x, y in zip(a[0], params):
        assert torch.equal(x.detach(), y.detach())
