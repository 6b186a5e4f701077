"""The memory bounds of docs/distributed.md ("Memory on GPUs"): the ZeRO-1 parameter all-gather
and full_state_dict stream through buckets of a fixed size, and the meta-step keeps its copy
of the parameters on the host.

The gather runs in real multi-rank jobs (torchrun, gloo, world sizes 2 and 4) with a bucket a
fifth of the model, so every gather takes several collectives and tensors straddle them; the
runs must still match one process, and what a gather allocates is measured by watching every
tensor op (tests/support/dist_worker.py, AllocationTracker), against the bound's formula.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

import shardgrok
import shardgrok.metanet.bilevel
import shardgrok.comm as C
from tests.support import scenarios as S
from tests.support.dist_worker import AllocationTracker
from tests.support.helpers import batch, toy, two_groups
from tests.support.multirank import assert_same_run, launch, max_diff, ok


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    out = {}
    for world in (2, 4):
        _, res = launch(world, tmp_path_factory.mktemp(f"buckets{world}"), ["small_buckets"],
                        tmp_path_factory.mktemp(f"unused{world}"))
        out[world] = ok(res, "small_buckets")
    return out


def gather_bound(bucket: int, world: int, itemsize: int) -> tuple[int, int]:
    """(columns per all-gather, bytes of one all-gather's output plus this rank's input)."""
    cols = max(1, bucket // (world * itemsize))
    return cols, (world + 1) * cols * itemsize


# ---------------------------------------------------------------- ZeRO-1 gather
@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("kind", S.KINDS)
def test_small_buckets_match_single_process(jobs, oracle, world, kind):
    runs = jobs[world]
    for res in runs:
        assert_same_run(res[kind], oracle[kind])
        assert max_diff(res[kind]["params"], runs[0][kind]["params"]) == 0.0


@pytest.mark.parametrize("world", [2, 4])
def test_post_step_gather_is_bounded_by_the_bucket(jobs, world):
    for res in jobs[world]:
        got, bucket = res["post_step"], res["bucket"]
        cols, bound = gather_bound(bucket, world, got["itemsize"])
        # what one whole-model gather would allocate exceeds the bound, so it is a real limit
        assert res["model_bytes"] > bound
        gathers = sum(math.ceil(w / cols) for w in got["widths"])
        assert got["gathers"] == gathers > len(got["widths"])  # more than one per dtype
        assert 0 < got["largest"] <= bucket
        assert got["peak"] <= bound
        assert got["unchanged"]  # post_step after a step changes nothing


@pytest.mark.parametrize("world", [2, 4])
def test_full_state_streams_to_the_host(jobs, world):
    for rank, res in enumerate(jobs[world]):
        got, bucket = res["full_state"], res["bucket"]
        _, bound = gather_bound(bucket, world, res["post_step"]["itemsize"])
        assert got["returned"] == (rank == 0) and got["on_cpu"]
        assert 0 < got["largest"] <= bucket  # beyond the CPU tensors it returns
        assert got["peak"] <= bound
        small, default = res["full_small"], res["full_default"]
        assert small["state"].keys() == default["state"].keys()
        for i, st in default["state"].items():
            for key, v in st.items():
                assert torch.equal(small["state"][i][key], v), (i, key)


def test_bucket_size_knob(monkeypatch):
    monkeypatch.delenv(C.BUCKET_ENV, raising=False)
    assert C.bucket_bytes() == C.BUCKET_BYTES
    monkeypatch.setenv(C.BUCKET_ENV, "0.5")
    assert C.bucket_bytes() == (1 << 20) // 2
    for bad in ("0", "-1", "lots"):
        monkeypatch.setenv(C.BUCKET_ENV, bad)
        with pytest.raises(ValueError, match=C.BUCKET_ENV):
            C.bucket_bytes()


# ---------------------------------------------------------------- one process, in a 1-rank group
@pytest.fixture
def one_rank_group(tmp_path):
    assert not dist.is_initialized()
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0,
                            world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _wide_model(device="cpu"):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(37, 29), torch.nn.Tanh(),
                               torch.nn.Linear(29, 11)).to(device)


def _wide_step(model, opt):
    x = torch.randn(16, 37, device=next(model.parameters()).device)
    model.zero_grad(set_to_none=True)
    model(x).square().mean().backward()
    opt.step()


def test_validation_gradient_mean_is_bucketed(one_rank_group, monkeypatch):
    """The meta-step's averaging of validation gradients packs them into buckets, not into one
    model-sized flat copy."""
    model = _wide_model()
    grads = [torch.randn_like(p) for p in model.parameters()]
    want = [g.clone() for g in grads]
    total = sum(g.numel() * g.element_size() for g in grads)
    monkeypatch.setenv(C.BUCKET_ENV, str(total / 7 / (1 << 20)))
    with AllocationTracker() as track:
        C.GroupReducer().mean_(grads)
    got = track.measure()
    assert 0 < got["largest"] <= C.bucket_bytes() < total
    for g, w in zip(grads, want, strict=True):
        assert torch.equal(g, w)  # one rank: the mean is the tensor itself


# ---------------------------------------------------------------- meta-step
def _meta_setup(shard=False, device="cpu"):
    model = toy().to(device)
    torch.manual_seed(1)
    net = shardgrok.SimpleMetaNet(hidden_dim=6).double().to(device)
    opt = shardgrok.SuperGrok(two_groups(model, lr=0.2), lr=0.05, meta_net=net, shard=shard)
    x, y = (t.to(device) for t in batch(0))
    model.zero_grad(set_to_none=True)
    ((model(x) - y) ** 2).mean().backward()
    x, y = (t.to(device) for t in batch(99))
    return model, opt, lambda: ((model(x) - y) ** 2).mean()


@pytest.mark.parametrize("shard", [False, True])
def test_meta_step_keeps_its_copy_on_the_host_and_restores_exactly(shard, request, monkeypatch):
    if shard:
        request.getfixturevalue("one_rank_group")
    model, opt, val = _meta_setup(shard)
    params = [p for g in opt.param_groups for p in g["params"]]
    before = [p.detach().clone() for p in params]
    copies = []
    original = shardgrok.metanet.bilevel.host_copy

    def recording(t):
        c = original(t)
        copies.append((t, c))
        return c
    monkeypatch.setattr(shardgrok.metanet.bilevel, "host_copy", recording)
    moved = []

    def closure():
        # during the look-ahead: the parameters moved, their saved copies did not
        moved.append(any(not torch.equal(t, c) for t, c in copies))
        return val()
    opt.meta_step(closure)
    assert moved == [True]
    assert len(copies) == len(params)
    for (t, c), p, p0 in zip(copies, params, before, strict=True):
        assert t.untyped_storage().data_ptr() == p.untyped_storage().data_ptr()
        assert c.device.type == "cpu"
        assert c.untyped_storage().data_ptr() != p.untyped_storage().data_ptr()
        assert torch.equal(c, p0)
        assert torch.equal(p, p0)  # restored bit for bit


# ---------------------------------------------------------------- on a GPU
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _round_block(n: int) -> int:
    return -(-n // 512) * 512  # the CUDA caching allocator's block size


@cuda
def test_cuda_post_step_and_full_state_device_peak(one_rank_group):
    from shardgrok.layouts.zero import ZeroLayout
    model = _wide_model("cuda")
    opt = shardgrok.GrokAdamW(model.parameters(), lr=1e-3, shard=True)
    _wide_step(model, opt)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    bucket = model_bytes // 6
    cols, _ = gather_bound(bucket, 1, 4)
    bound = 2 * _round_block(cols * 4)  # one rank: the output and the input of one gather
    ZeroLayout.gather_bucket_bytes = bucket
    try:
        for run in (lambda: opt._layout.post_step(opt), lambda: opt.full_state_dict(to=0)):
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            result = run()
            torch.cuda.synchronize()
            assert torch.cuda.max_memory_allocated() - base <= bound < model_bytes
        assert all(v.device.type == "cpu" for st in result["state"].values() for v in st.values())
    finally:
        ZeroLayout.gather_bucket_bytes = None


@cuda
def test_cuda_meta_step_saves_to_pinned_host_memory(monkeypatch):
    model, opt, val = _meta_setup(device="cuda")
    before = [p.detach().clone() for p in model.parameters()]
    copies = []
    original = shardgrok.metanet.bilevel.host_copy
    monkeypatch.setattr(shardgrok.metanet.bilevel, "host_copy",
                        lambda t: copies.append(original(t)) or copies[-1])
    opt.meta_step(val)
    assert copies and all(c.device.type == "cpu" and c.is_pinned() for c in copies)
    assert all(torch.equal(p, p0) for p, p0 in zip(model.parameters(), before, strict=True))
