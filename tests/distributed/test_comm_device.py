"""Which device a collective's buffer travels on (shardgrok.comm.collective_device): from the
backend string torch reports for the group and the buffer's own device, resolved at every call.

The CUDA cases run on any machine: the rule is a pure function of strings and devices, and
``torch.cuda.current_device`` is replaced where it is consulted. The collectives themselves run
in 1-rank gloo groups (a FileStore), created the ways a job may create them.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import shardgrok.comm as C


def cpu():
    return torch.device("cpu")


def cuda(i):
    return torch.device("cuda", i)


@pytest.fixture
def current(monkeypatch):
    """Set the current CUDA device as torch.cuda.set_device would (only its value is read)."""
    box = {"index": 0}
    monkeypatch.setattr(torch.cuda, "current_device", lambda: box["index"])

    def set_device(i):
        box["index"] = i
    return set_device


# ---------------------------------------------------------------- the rule
@pytest.mark.parametrize("backend,device,want", [
    # a backend that takes the buffer's device keeps it there (its own CUDA index included)
    ("nccl", cuda(1), cuda(1)),
    ("gloo", cpu(), cpu()),
    ("mpi", cpu(), cpu()),
    ("cpu:gloo,cuda:nccl", cpu(), cpu()),
    ("cpu:gloo,cuda:nccl", cuda(2), cuda(2)),
    ("cuda:nccl,cpu:gloo", cuda(2), cuda(2)),
    ("CPU:GLOO,CUDA:NCCL", cpu(), cpu()),
    ("ucc", cuda(1), cuda(1)),
    ("ucc", cpu(), cpu()),
    # a backend without the buffer's device type: the one it takes, CUDA at the current device
    ("nccl", cpu(), cuda(3)),
    ("cuda:nccl", cpu(), cuda(3)),  # init_process_group() without a backend, on a GPU machine
    ("gloo", cuda(1), cpu()),
    ("mpi", cuda(1), cpu()),
    ("cpu:gloo", cuda(1), cpu()),  # init_process_group() without a backend, CPU only
    # nothing to go by: torch dispatches on the buffer's device
    ("undefined", cpu(), cpu()),
    ("undefined", cuda(1), cuda(1)),
    ("some_plugin", cuda(1), cuda(1)),
])
def test_collective_device(current, backend, device, want):
    current(3)
    assert C.collective_device(backend, device) == want


def test_the_current_device_is_read_at_each_call(current):
    current(0)
    assert C.collective_device("nccl", "cpu") == cuda(0)
    current(5)  # torch.cuda.set_device(5) after everything was built
    assert C.collective_device("nccl", "cpu") == cuda(5)
    assert C.collective_device("nccl", cuda(1)) == cuda(1)  # a CUDA buffer stays on its own


# ---------------------------------------------------------------- reducers on real groups
@pytest.fixture
def group(tmp_path):
    """``group(backend)``: a 1-rank default group made by init_process_group(backend=...)
    (``None``: no backend argument)."""
    assert not dist.is_initialized()

    def make(backend):
        kw = {} if backend is None else {"backend": backend}
        dist.init_process_group(store=dist.FileStore(str(tmp_path / "store"), 1), rank=0,
                                world_size=1, **kw)
    yield make
    if dist.is_initialized():
        dist.destroy_process_group()


def _every_collective(red):
    """Run each of the reducer's collectives once on CPU data; their results on one rank."""
    buf = torch.arange(6, dtype=torch.float64)
    red.all_reduce_(buf)
    tail = torch.arange(6, dtype=torch.float64)
    red._sum_tail_(tail, 2, red.group)
    ts = [torch.arange(6.0).view(3, 2), torch.arange(6.0).view(2, 3).t()]  # one not contiguous
    red.mean_(ts)
    net = torch.nn.Linear(2, 2)
    for p in net.parameters():
        p.grad = torch.ones_like(p)
    red.all_reduce_grads_(net)
    out = torch.empty(red.world_size * 3)
    red.all_gather_into_(out, torch.arange(3.0))
    objs = red.all_gather_object({"rank": red.rank})
    red.broadcast_module_(net)
    return {"buf": buf, "tail": tail, "ts": ts, "grads": [p.grad for p in net.parameters()],
            "out": out, "objs": objs}


@pytest.mark.parametrize("backend,reported", [
    (None, "cpu:gloo"),  # torch reports "undefined"; the config has the device map
    ("gloo", "gloo"),
    ("cpu:gloo", "cpu:gloo"),
    ("cpu:gloo,cuda:gloo", "cpu:gloo,cuda:gloo"),  # a combined string, as "cpu:gloo,cuda:nccl"
])
def test_reducer_reads_the_groups_backend_and_runs(group, backend, reported):
    group(backend)
    if backend is None:
        assert str(dist.get_backend()) == "undefined"
    assert C.group_backend(None) == reported
    red = C.GroupReducer()
    assert red.device_for("cpu") == cpu()
    got = _every_collective(red)
    # one rank: every collective gives back its input (a mean over one rank, a sum of one)
    assert torch.equal(got["buf"], torch.arange(6, dtype=torch.float64))
    assert torch.equal(got["tail"], torch.arange(6, dtype=torch.float64))
    assert torch.equal(got["ts"][0], torch.arange(6.0).view(3, 2))
    assert torch.equal(got["ts"][1], torch.arange(6.0).view(2, 3).t())
    assert all(torch.equal(g, torch.ones_like(g)) for g in got["grads"])
    assert torch.equal(got["out"], torch.arange(3.0))
    assert got["objs"] == [{"rank": 0}]


def test_every_collective_goes_through_the_rule(group, monkeypatch):
    group("gloo")
    red = C.GroupReducer()
    asked = []
    rule = C.collective_device

    def recording(backend, device):
        asked.append((backend, torch.device(device).type))
        return rule(backend, device)
    monkeypatch.setattr(C, "collective_device", recording)
    calls = {
        "all_reduce_": lambda: red.all_reduce_(torch.zeros(3)),
        "_sum_tail_": lambda: red._sum_tail_(torch.zeros(3), 1, red.group),
        "mean_": lambda: red.mean_([torch.zeros(3)]),
        "all_gather_into_": lambda: red.all_gather_into_(torch.zeros(2), torch.zeros(2)),
        "all_gather_object": lambda: red.all_gather_object(1),
        "broadcast_module_": lambda: red.broadcast_module_(torch.nn.Linear(1, 1)),
    }
    for name, call in calls.items():
        asked.clear()
        call()
        assert asked and all(b == "gloo" for b, _ in asked), name


def test_device_follows_set_device_after_the_reducer_was_built(group, monkeypatch, current):
    """A group whose backend takes only CUDA (init_process_group() without a backend on a GPU
    machine reports "undefined" and holds "cuda:nccl"): CPU buffers go to the CUDA device that
    is current at each call, not the one current when the optimizer was built."""
    group("gloo")
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "undefined")
    monkeypatch.setattr(dist, "get_backend_config", lambda group=None: "cuda:nccl")
    current(0)
    red = C.GroupReducer()
    assert red.device_for("cpu") == cuda(0)
    current(2)
    assert red.device_for("cpu") == cuda(2)
    assert red.device_for(cuda(1)) == cuda(1)


def test_combined_backend_keeps_cpu_buffers_on_the_cpu(group, monkeypatch):
    """Under "cpu:gloo,cuda:nccl" a CPU buffer goes through gloo as it is, not to CUDA (and a
    CUDA one stays on CUDA: the rule's table above)."""
    group("cpu:gloo,cuda:gloo")
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "cpu:gloo,cuda:nccl")
    red = C.GroupReducer()
    assert red.device_for("cpu") == cpu()
    sent = []
    real = dist.all_reduce

    def watching(t, *a, **k):
        sent.append(t)
        return real(t, *a, **k)
    monkeypatch.setattr(dist, "all_reduce", watching)
    buf = torch.arange(4.0)
    red.all_reduce_(buf)
    assert sent and sent[0] is buf  # reduced in place, with no copy to another device


# ---------------------------------------------------------------- init_distributed's choice
def test_default_backend_pairs_gloo_with_nccl_on_a_cuda_machine():
    from shardgrok.distributed import default_backend
    assert default_backend(cuda_available=True) == "cpu:gloo,cuda:nccl"
    assert default_backend(cuda_available=False) == "gloo"
    # the combined string is one the rule reads: CPU buffers stay, CUDA ones stay
    assert C.backend_device_types(default_backend(True)) == ("cpu", "cuda")


@pytest.mark.parametrize("backend", ["nccl", "cpu:gloo,cuda:nccl"])
def test_init_distributed_sets_and_binds_the_local_gpu_for_any_nccl_backend(monkeypatch, backend):
    import shardgrok.distributed as D
    calls = {}
    monkeypatch.setattr(D, "discover", lambda: D.DistInfo(1, 2, 1, "torchrun"))
    monkeypatch.setattr(D.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: calls.setdefault("set_device", i))
    monkeypatch.setattr(D.dist, "init_process_group",
                        lambda b, **kw: calls.update(backend=b, device_id=kw.get("device_id")))
    D.init_distributed(backend=backend)
    assert calls == {"set_device": 1, "backend": backend, "device_id": torch.device("cuda", 1)}


def test_init_distributed_refuses_a_local_rank_without_a_gpu(monkeypatch):
    import shardgrok.distributed as D
    monkeypatch.setattr(D, "discover", lambda: D.DistInfo(3, 4, 3, "torchrun"))
    monkeypatch.setattr(D.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(RuntimeError, match="local rank 3 has no GPU"):
        D.init_distributed(backend="nccl")
