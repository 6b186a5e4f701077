"""8-bit state under ZeRO-1: scenarios for tests/distributed/test_int8_ranks.py.

One schedule (``int8_run``) on fp32 parameters with 8-bit state, tensors big enough for codes
and some too small (fp32 state), run by ZeRO-1 and by one process. What comes back is whole
(``full_state_dict``), so the pytest side compares them bit for bit; each rank's shard comes
back too, for ``consolidate_state_dict`` offline.
"""
from __future__ import annotations

import torch
from torch import nn

import shardgrok
from tests.support.helpers import meta_net
from tests.support.worker_registry import scenario

# 8-bit: the first four (two of them not whole blocks, one not a multiple of the world size);
# fp32: the small ones. World sizes 2 and 4 cut the flat bucket inside several of them.
SHAPES = [(37, 130), (5,), (4096,), (9001,), (3, 11), (64, 71)]
STEPS = 6
SPLIT = 3


def _opt(kind, params, backend, shard):
    kw = dict(lr=1e-3, state_dtype="int8", backend=backend, shard=shard, rounding_seed=7)
    if kind == "grokadamw":
        return shardgrok.GrokAdamW(params, **kw)
    return shardgrok.SuperGrok(params, warmup_steps=0, meta_net=meta_net("random"), **kw)


def _params():
    g = torch.Generator().manual_seed(0)
    return [nn.Parameter(torch.randn(s, generator=g)) for s in SHAPES]


def _steps(kind, params, opt, steps):
    for t in steps:
        gg = torch.Generator().manual_seed(100 + t)
        for p in params:
            p.grad = torch.randn(p.shape, generator=gg) * (1 + t % 3)
        opt.step(**({"train_loss": 1.0, "val_loss": 1.2 + 0.1 * t} if kind == "supergrok" else {}))


def int8_run(kind: str, shard: bool, backend: str = "kernel", resume_from: dict | None = None) -> dict:
    """The schedule (``resume_from``: a full state dict and parameters after SPLIT steps, then
    the rest); whole parameters and the full state back, and this rank's shard."""
    params = _params()
    opt = _opt(kind, params, backend, shard)
    steps = range(STEPS)
    if resume_from is not None:
        for p, q in zip(params, resume_from["params"]):
            p.data.copy_(q)
        opt.load_state_dict(resume_from["state"])
        steps = range(SPLIT, STEPS)
    _steps(kind, params, opt, steps)
    full = opt.full_state_dict(to=None) if shard else opt.state_dict()
    return {"params": [p.detach().clone() for p in params], "state": full["state"],
            "shard": opt.state_dict() if shard else None,
            "backend": opt.get_state_summary()["backend"], "sharded": opt.is_sharded}


def one_process_checkpoint(kind: str, backend: str = "kernel") -> dict:
    """One process's parameters and full state dict after SPLIT steps."""
    params = _params()
    opt = _opt(kind, params, backend, False)
    _steps(kind, params, opt, range(SPLIT))
    return {"params": [p.detach().clone() for p in params], "state": opt.state_dict()}


for _kind in ("grokadamw", "supergrok"):
    for _backend in ("kernel", "reference"):
        def _make(kind=_kind, backend=_backend):
            def run(args):
                return {"whole": int8_run(kind, True, backend),
                        "resumed": int8_run(kind, True, backend,
                                            resume_from=one_process_checkpoint(kind, backend))}
            run.__name__ = f"int8_zero1_{kind}_{backend}"
            return run
        scenario(_make())


@scenario
def int8_refused_fsdp2(args):
    """FSDP2 does not take 8-bit state in this version: refused at construction and by
    add_param_group, before anything changed."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from tests.support.worker_registry import Ctx
    mesh = init_device_mesh("cpu", (Ctx.world,))
    params = [nn.Parameter(distribute_tensor(torch.randn(64, 80), mesh, [Shard(0)])) for _ in range(2)]
    out = {}
    try:
        shardgrok.GrokAdamW(params, state_dtype="int8")
        out["construction"] = None
    except ValueError as e:
        out["construction"] = str(e)
    opt = shardgrok.GrokAdamW(params[:1])
    try:
        opt.add_param_group({"params": params[1:], "state_dtype": "int8"})
        out["add_param_group"] = None
    except ValueError as e:
        out["add_param_group"] = str(e)
    out["groups_after"] = len(opt.param_groups)
    out["state_after"] = len(opt.state)
    return out
