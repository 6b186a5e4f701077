"""Two ranks on one GPU: shardgrok's ZeRO-1 and FSDP2 at world size 2 with CUDA tensors, both
ranks on cuda:0, over gloo, both optimizers on the CUDA kernel (``backend="kernel"``), against
one process running the same schedule on the same GPU.

NCCL refuses two ranks on one GPU, so the job's collectives go through gloo, which takes CUDA
tensors for the collectives used here (``ranks_collectives`` checks that first); shardgrok's
own step buffer travels on the CPU under gloo (shardgrok.comm.collective_device). The NCCL
variant, one rank per GPU, needs two GPUs.

Variants (tests/support/device_ranks.py runs them on every rank):

- ``cuda-gloo``: the above; skipped without CUDA (CI has none; benchmarks/gpu_check.sh runs it).
- ``cuda-nccl``: NCCL, each rank on its own GPU; skipped below two GPUs.
- ``emulated-gloo``: the same jobs on CPU tensors with ``backend="cuda-emulated"`` (the CUDA
  kernels compiled for the host): the logic of the GPU variants, run where there is no GPU;
  skipped where the emulated target cannot be built.

Tolerance: the fp32 CUDA tests' (tests/kernels/test_kernel.py's FP32_RTOL, 1e-6), each
parameter's max difference over the model's largest parameter value; the gate decisions,
clip coefficients (1e-6 relative) and alpha (1e-12) step by step, as tests/distributed/ checks
them on the CPU.
"""
from __future__ import annotations

import pytest
import torch

from tests.kernels.test_kernel import FP32_RTOL
from tests.support import scenarios as S
from tests.support.multirank import launch, ok

SCENARIOS = ("ranks_collectives", "ranks_zero1", "ranks_fsdp2")
# variant -> (device, optimizer backend, process group backend)
VARIANTS = {
    "cuda-gloo": ("cuda", "kernel", "gloo"),
    "cuda-nccl": ("cuda", "kernel", "nccl"),
    "emulated-gloo": ("cpu", "cuda-emulated", "gloo"),
}
# Steps per run: scenarios.STEPS (20) on a GPU; 10 on the emulated target (every CUDA thread a
# fiber), still past SuperGrok's 5 warm-up steps, with meta-steps at 0, 3, 6, 9 and signals at
# 0, 4, 8.
STEPS = {"cuda-gloo": S.STEPS, "cuda-nccl": S.STEPS, "emulated-gloo": 10}


def skip_reason(variant: str) -> str | None:
    device, backend, dist_backend = VARIANTS[variant]
    if device == "cuda" and not torch.cuda.is_available():
        return "needs a CUDA device"
    if dist_backend == "nccl":
        if torch.cuda.device_count() < 2:
            return "NCCL refuses two ranks on one GPU: needs two GPUs"
        if not torch.distributed.is_nccl_available():
            return "this torch has no NCCL"
    if backend == "cuda-emulated":
        from shardgrok.kernels import cuda
        if cuda.emulated_extension() is None:
            return f"the emulated CUDA target is unavailable: {cuda.emulated_unavailable_reason()}"
    if backend == "kernel" and device == "cuda":
        from shardgrok.kernels import cuda
        if cuda.cuda_extension() is None:
            return f"the CUDA kernel is unavailable: {cuda.unavailable_reason()}"
    return None


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request):
    why = skip_reason(request.param)
    if why:
        pytest.skip(why)
    return request.param


@pytest.fixture(scope="module")
def job(variant, tmp_path_factory):
    """One torchrun job of world size 2 running every scenario on the variant's device."""
    device, backend, dist_backend = VARIANTS[variant]
    out = tmp_path_factory.mktemp(f"ranks-{variant}")
    _, res = launch(2, out, SCENARIOS, out, "--device", device, "--kernel-backend", backend,
                    "--dist-backend", dist_backend, "--steps", str(STEPS[variant]), timeout=300)
    return res


@pytest.fixture(scope="module")
def one_process(variant):
    """The same schedule in this process (world size 1, not sharded) on the variant's device
    (cuda:0) and backend."""
    from tests.support.device_ranks import device_run, rank_device
    device, backend, _ = VARIANTS[variant]
    dev = rank_device(device)
    return {kind: device_run(kind, dev, backend, steps=STEPS[variant]) for kind in S.KINDS}


def assert_matches_one_process(got: dict, want: dict, backend: str, device: str,
                               steps: int) -> float:
    """Parameters within FP32_RTOL of the model's largest value; every step on ``backend`` with
    the one process's gate decisions, clip coefficients and alpha; the state on ``device``."""
    assert len(got["params"]) == len(want["params"])
    scale = max(float(w.abs().max()) for w in want["params"] if w.numel())
    worst = 0.0
    for i, (g, w) in enumerate(zip(got["params"], want["params"], strict=True)):
        assert g.shape == w.shape, i
        assert bool(torch.isfinite(g).all()), i
        if g.numel():
            worst = max(worst, float((g.double() - w.double()).abs().max()) / scale)
    assert worst <= FP32_RTOL, f"parameters differ by {worst:.3g} of their scale > {FP32_RTOL:g}"
    assert [r["backend"] for r in got["record"]] == [backend] * steps
    assert [r["backend"] for r in want["record"]] == [backend] * steps
    for t, (g, w) in enumerate(zip(got["record"], want["record"], strict=True)):
        assert g["gate_engaged"] == w["gate_engaged"], t
        assert g["last_clip_coefs"] == pytest.approx(w["last_clip_coefs"], rel=1e-6, abs=0), t
        for key in ("alpha", "cached_alpha"):  # GrokAdamW reports one, SuperGrok the other
            assert (g[key] is None) == (w[key] is None), (t, key)
            assert g[key] is None or g[key] == pytest.approx(w[key], rel=1e-12), (t, key)
    want_device = "cpu" if device == "cpu" else "cuda"
    assert got["state_devices"] and all(d.startswith(want_device) for d in got["state_devices"])
    return worst


def test_the_collectives_take_this_devices_tensors(variant, job):
    """gloo (or NCCL) all-reduces, broadcasts, all-gathers and reduce-scatters the variant's
    tensors: what the engines below rely on."""
    device, _, dist_backend = VARIANTS[variant]
    for r, res in enumerate(ok(job, "ranks_collectives")):
        assert dist_backend in res["backend"], res
        assert res["device"] == ("cpu" if device == "cpu" else "cuda:0" if dist_backend == "gloo"
                                 else f"cuda:{r}"), res
        assert res["all_reduce"] == [3.0] * 4, res  # ranks hold 1 and 2
        assert res["broadcast"] == [5.0] * 3, res
        assert res["all_gather_into_tensor"] == [0.0, 0.0, 1.0, 1.0], res
        # arange(4) summed over 2 ranks, scattered in halves
        assert res["reduce_scatter_tensor"] == [[0.0, 2.0], [4.0, 6.0]][r], res


@pytest.mark.parametrize("kind", S.KINDS)
@pytest.mark.parametrize("engine", ["ranks_zero1", "ranks_fsdp2"])
def test_two_ranks_match_one_process(variant, job, one_process, engine, kind):
    device, backend, _ = VARIANTS[variant]
    runs = ok(job, engine)
    for res in runs:
        assert_matches_one_process(res[kind], one_process[kind], backend, device, STEPS[variant])
    # every rank ends with the same whole parameters
    for a, b in zip(runs[0][kind]["params"], runs[1][kind]["params"], strict=True):
        assert torch.equal(a, b)
