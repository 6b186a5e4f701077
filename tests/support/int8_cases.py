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


def _opt(kind, params, backend, shard, state_dtype="int8"):
    kw = dict(lr=1e-3, state_dtype=state_dtype, backend=backend, rounding_seed=7,
              **({} if shard is None else {"shard": shard}))
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


# ---------------------------------------------------------------- FSDP2
# Rows of whole blocks (no block is cut by a rank boundary: equal to one process bit for bit)
# and rows that are not (blocks cut by the boundaries get one scale per rank).
ALIGNED = [(40, 256), (17, 512)]
CUT = [(37, 130), (9001,), (64, 71)]
FSDP2_SHAPES = ALIGNED + CUT + [(3, 11)]


def _fsdp2_model(hsdp: bool = False):
    """The tensors, fully_shard-ed (``hsdp``: replicated over 2, sharded over world / 2)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from tests.support.worker_registry import Ctx
    g = torch.Generator().manual_seed(0)
    model = nn.Module()
    model.w = nn.ParameterList([nn.Parameter(torch.randn(s, generator=g)) for s in FSDP2_SHAPES])
    mesh = (init_device_mesh("cpu", (2, Ctx.world // 2), mesh_dim_names=("replicate", "shard"))
            if hsdp else init_device_mesh("cpu", (Ctx.world,)))
    fully_shard(model, mesh=mesh)
    return model


def _fsdp2_steps(kind, opt, params, steps):
    from torch.distributed.tensor import distribute_tensor
    for t in steps:
        gg = torch.Generator().manual_seed(100 + t)
        for p in params:
            full = torch.randn(p.shape, generator=gg) * (1 + t % 3)
            p.grad = distribute_tensor(full, p.device_mesh, p.placements) if hasattr(p, "device_mesh") else full
        opt.step(**({"train_loss": 1.0, "val_loss": 1.2 + 0.1 * t} if kind == "supergrok" else {}))


def _local_view(opt, params) -> list[dict]:
    """Per tensor: whole parameter and codes, and this rank's start and scales."""
    from shardgrok.placement import local_start
    out = []
    for p in params:
        st = opt.state[p]
        whole = (lambda t: t.full_tensor()) if hasattr(p, "full_tensor") else (lambda t: t.detach().clone())
        entry = {"param": whole(p.detach()), "start": local_start(p),
                 "numel": p.to_local().numel() if hasattr(p, "to_local") else p.numel()}
        for k in R_KEYS:
            entry[k] = whole(st[k])
            if k + "_scale" in st:
                entry[k + "_scale"] = st[k + "_scale"].clone()
        out.append(entry)
    return out


R_KEYS = ("exp_avg", "exp_avg_sq", "mu")


def fsdp2_int8_run(kind: str, backend: str, state_dtype="int8", steps=STEPS, one=False,
                   hsdp=False) -> list[dict]:
    """The schedule on FSDP2 (``one``: the same tensors whole, in this process alone)."""
    if one:
        g = torch.Generator().manual_seed(0)
        params = [nn.Parameter(torch.randn(s, generator=g)) for s in FSDP2_SHAPES]
    else:
        params = list(_fsdp2_model(hsdp).parameters())
    # two groups: SuperGrok clips over a group, so the cut tensors' differences stay in theirs
    groups = [{"params": params[:len(ALIGNED)]}, {"params": params[len(ALIGNED):]}]
    opt = _opt(kind, groups, backend, None, state_dtype)
    _fsdp2_steps(kind, opt, params, range(steps))
    return _local_view(opt, params)


for _kind in ("grokadamw", "supergrok"):
    for _backend in ("kernel", "reference"):
        def _make2(kind=_kind, backend=_backend):
            def run(args):
                return {"run": fsdp2_int8_run(kind, backend),
                        "first_int8": fsdp2_int8_run(kind, backend, steps=1),
                        "first_fp32": fsdp2_int8_run(kind, backend, torch.float32, steps=1)}
            run.__name__ = f"int8_fsdp2_{kind}_{backend}"
            return run
        scenario(_make2())


@scenario
def int8_hsdp(args):
    """HSDP (2 replicas of world / 2 shards): the FSDP2 schedule, both optimizers, kernel."""
    return {kind: {"run": fsdp2_int8_run(kind, "kernel", hsdp=True),
                   "first_int8": fsdp2_int8_run(kind, "kernel", steps=1, hsdp=True),
                   "first_fp32": fsdp2_int8_run(kind, "kernel", torch.float32, steps=1, hsdp=True)}
            for kind in ("grokadamw", "supergrok")}


@scenario
def int8_refused_fsdp1(args):
    """FSDP1 does not take 8-bit state: refused at construction, and by add_param_group before
    the group is added."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    wrap = lambda: FSDP(nn.Linear(128, 160), device_id=torch.device("cpu"))  # noqa: E731
    out = {}
    try:
        shardgrok.GrokAdamW(wrap().parameters(), state_dtype="int8")
        out["construction"] = None
    except ValueError as e:
        out["construction"] = str(e)
    opt = shardgrok.GrokAdamW(wrap().parameters())
    try:
        opt.add_param_group({"params": list(wrap().parameters()), "state_dtype": "int8"})
        out["add_param_group"] = None
    except ValueError as e:
        out["add_param_group"] = str(e)
    out["groups_after"] = len(opt.param_groups)
    out["state_after"] = len(opt.state)
    return out


# ---------------------------------------------------------------- FSDP2 checkpoints (DCP)
def _fsdp2_opt(kind, model):
    params = list(model.parameters())
    groups = [{"params": params[:len(ALIGNED)]}, {"params": params[len(ALIGNED):]}]
    return _opt(kind, groups, "kernel", None)


def _dcp_path(args, kind, world):
    import os
    return os.path.join(args.ckpt, f"int8-dcp-{kind}-w{world}")


@scenario
def int8_fsdp2_dcp_save(args):
    """SPLIT steps, a DCP checkpoint (and the whole state gathered by
    get_optimizer_state_dict(full_state_dict=True), saved by rank 0), then the rest: the
    state at the save and the uninterrupted run back."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    from tests.support.worker_registry import Ctx
    out = {}
    for kind in ("grokadamw", "supergrok"):
        model = _fsdp2_model()
        opt = _fsdp2_opt(kind, model)
        params = list(model.parameters())
        _fsdp2_steps(kind, opt, params, range(SPLIT))
        saved = _local_view(opt, params)
        dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
                 checkpoint_id=_dcp_path(args, kind, Ctx.world))
        full = get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True,
                                                                             cpu_offload=True))
        if Ctx.rank == 0:
            torch.save(full, _dcp_path(args, kind, Ctx.world) + ".full.pt")
        _fsdp2_steps(kind, opt, params, range(SPLIT, STEPS))
        out[kind] = {"saved": saved, "run": _local_view(opt, params)}
    return out


@scenario
def int8_fsdp2_dcp_resume(args):
    """Load the DCP checkpoint saved at world size ``--resume-from`` into a fresh model and
    optimizer, then the rest of the schedule: the loaded state and the run back."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict,
                                                         get_optimizer_state_dict,
                                                         set_model_state_dict,
                                                         set_optimizer_state_dict)
    out = {}
    for kind in ("grokadamw", "supergrok"):
        model = _fsdp2_model()
        with torch.no_grad():
            for p in model.parameters():
                p.zero_()  # every value must come from the files
        opt = _fsdp2_opt(kind, model)
        params = list(model.parameters())
        sd = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
        dcp.load(sd, checkpoint_id=_dcp_path(args, kind, int(args.resume_from)))
        set_model_state_dict(model, sd["model"])
        set_optimizer_state_dict(model, opt, sd["optim"])
        loaded = _local_view(opt, params)
        _fsdp2_steps(kind, opt, params, range(SPLIT, STEPS))
        out[kind] = {"loaded": loaded, "run": _local_view(opt, params),
                     "global_step": opt.get_global_step()}
    return out
