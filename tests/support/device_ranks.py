"""Ranks whose model lives on a chosen device, for tests/distributed/test_cuda_ranks.py: the
scenarios (``ranks_*``) that tests/support/dist_worker.py runs on every rank, and the
single-process run they are compared with.

The worker's ``--steps`` (default scenarios.STEPS) how many steps each run takes; ``--device`` says where
the model lives (``cuda``: with gloo every rank on cuda:0,
two ranks sharing one GPU; with NCCL each rank on its local GPU, as init_distributed sets it;
``cpu``: the CPU) and ``--kernel-backend`` the optimizers' ``backend`` (``kernel``: on CUDA
tensors the CUDA kernel; ``cuda-emulated``: the same kernels compiled for the host, on CPU
tensors). The model, batches and schedule are tests/support/scenarios.py's, moved to the
device.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from tests.support import scenarios as S
from tests.support.helpers import batch, toy
from tests.support.worker_registry import Ctx, scenario


def rank_device(device: str, dist_backend: str = "gloo") -> torch.device:
    """This rank's device. CUDA is initialised here, before any DeviceMesh is made: a mesh
    made on an uninitialised device would move the rank to cuda:LOCAL_RANK, which two ranks
    on one GPU do not have."""
    if device == "cpu":
        return torch.device("cpu")
    index = 0 if dist_backend == "gloo" else torch.cuda.current_device()
    torch.cuda.set_device(index)
    torch.empty(1, device=f"cuda:{index}")
    return torch.device("cuda", index)


def backward_on_device(model, step):
    """helpers.backward with the batch on the model's device."""
    model.zero_grad(set_to_none=True)
    p = next(model.parameters())
    x, y = (t.to(p.device) for t in batch(step, p.dtype))
    loss = ((model(x) - y) ** 2).mean() * 20
    loss.backward()
    return loss.item()


def val_on_device(model, rank: int, world: int):
    """scenarios.val_closure with the batch on the model's device."""
    p = next(model.parameters())
    x, y = (t.to(p.device) for t in batch(99, dtype=p.dtype, n=24))
    n = 24 // world
    x, y = x[rank * n:(rank + 1) * n], y[rank * n:(rank + 1) * n]
    return lambda: ((model(x) - y) ** 2).mean()


def fsdp2_on(device: torch.device):
    """fully_shard each linear layer and the root over a 1-D mesh of ``device``'s type."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    def wrap(model):
        mesh = init_device_mesh(device.type, (Ctx.world,))
        fully_shard(model.a, mesh=mesh)
        fully_shard(model.b, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model
    return wrap


def device_run(kind: str, device: torch.device, backend: str | None, rank: int = 0,
               world: int = 1, shard: bool = False, wrap=None, steps: int | None = None) -> dict:
    """scenarios.run (meta-steps included) with the model on ``device`` and the optimizers'
    ``backend``, for ``steps`` steps (default scenarios.STEPS): the whole parameters (on the
    CPU) and each step's record."""
    model = toy(S.DTYPE).to(device)
    module = wrap(model) if wrap else model
    opt = S.make(kind, module, rank, world, shard, backend=backend)
    record = S.train(kind, module, opt, range(steps or S.STEPS), rank, world,
                     backward_fn=backward_on_device, val=val_on_device)
    devices = set()  # where the state the steps wrote lives
    for st in opt.state.values():
        for key in ("exp_avg", "exp_avg_sq", "mu"):
            t = st.get(key)
            if isinstance(t, torch.Tensor):
                devices.add(str((t.to_local() if hasattr(t, "to_local") else t).device))
    return {"params": [p.cpu() for p in S.params(module)], "record": record,
            "state_devices": sorted(devices)}


@scenario
def ranks_collectives(args):
    """The collectives the engines issue, on this device's tensors through the job's backend
    (gloo takes CUDA tensors for these): each one's values, or its error."""
    dev = rank_device(args.device, args.dist_backend)
    r, w = Ctx.rank, Ctx.world
    out = {"backend": str(dist.get_backend()), "device": str(dev)}

    def attempt(name, fn):
        try:
            out[name] = fn()
        except Exception as e:  # reported to the test, which names it
            out[name] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"

    def all_reduce():
        x = torch.full((4,), float(r + 1), device=dev)
        dist.all_reduce(x)
        return x.cpu().tolist()

    def broadcast():
        x = torch.full((3,), float(r + 5), device=dev)
        dist.broadcast(x, src=0)
        return x.cpu().tolist()

    def all_gather_into_tensor():
        out_t = torch.empty(2 * w, device=dev)
        dist.all_gather_into_tensor(out_t, torch.full((2,), float(r), device=dev))
        return out_t.cpu().tolist()

    def reduce_scatter_tensor():
        out_t = torch.empty(2, device=dev)
        dist.reduce_scatter_tensor(out_t, torch.arange(2 * w, dtype=torch.float32, device=dev))
        return out_t.cpu().tolist()

    for name, fn in (("all_reduce", all_reduce), ("broadcast", broadcast),
                     ("all_gather_into_tensor", all_gather_into_tensor),
                     ("reduce_scatter_tensor", reduce_scatter_tensor)):
        attempt(name, fn)
    return out


@scenario
def ranks_zero1(args):
    """shardgrok's own ZeRO-1 (shard=True over replicated parameters) on this device."""
    dev = rank_device(args.device, args.dist_backend)
    return {kind: device_run(kind, dev, args.kernel_backend, Ctx.rank, Ctx.world, shard=True,
                             steps=args.steps)
            for kind in S.KINDS}


@scenario
def ranks_fsdp2(args):
    """FSDP2 (fully_shard over a mesh of this device's type) on this device."""
    dev = rank_device(args.device, args.dist_backend)
    return {kind: device_run(kind, dev, args.kernel_backend, Ctx.rank, Ctx.world, shard=True,
                             wrap=fsdp2_on(dev), steps=args.steps)
            for kind in S.KINDS}
