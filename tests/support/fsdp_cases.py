"""FSDP scenarios for tests/support/dist_worker.py (FSDP2, HSDP, FSDP1, mixed precision, DCP).

Each one trains the model of tests/support/scenarios.py wrapped by an engine and returns the whole
parameters; tests/distributed/test_fsdp.py compares them with the single-process run of the same
scenario.
"""
from __future__ import annotations

import copy
import os

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (get_model_state_dict,
                                                     get_optimizer_state_dict,
                                                     set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from tests.support import scenarios as S
from tests.support.helpers import backward, batch, toy
from tests.support.worker_registry import Ctx, collective_calls, error_of, scenario

BF16 = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def fsdp2(hsdp: bool = False, mp: MixedPrecisionPolicy | None = None):
    """fully_shard each linear layer and the root; HSDP on a (replicate=2, shard=world/2) mesh."""
    def wrap(model):
        if hsdp:
            mesh = init_device_mesh("cpu", (2, Ctx.world // 2), mesh_dim_names=("replicate", "shard"))
        else:
            mesh = init_device_mesh("cpu", (Ctx.world,))
        kw = {"mesh": mesh} if mp is None else {"mesh": mesh, "mp_policy": mp}
        fully_shard(model.a, **kw)
        fully_shard(model.b, **kw)
        fully_shard(model, **kw)
        return model
    return wrap


def fsdp1(orig: bool):
    def wrap(model):
        return FSDP(model, device_id=torch.device("cpu"), use_orig_params=orig)
    return wrap


def fsdp1_params(module) -> list[torch.Tensor]:
    with FSDP.summon_full_params(module, writeback=False):
        return [p.detach().clone() for p in module.module.parameters()]


def bf16_backward(model, t):
    """One process with FSDP2's casts (the oracle of the mixed-precision run): compute in a bf16
    copy of the fp32 parameters, take its gradients back to fp32."""
    low = copy.deepcopy(model).to(torch.bfloat16)
    x, y = batch(t, torch.float32)
    loss = ((low(x.to(torch.bfloat16)) - y) ** 2).mean() * 20
    loss.backward()
    for p, q in zip(model.parameters(), low.parameters(), strict=True):
        p.grad = None if q.grad is None else q.grad.float()
    return loss.item()


def _run(kind, **kw):
    return S.run(kind, Ctx.rank, Ctx.world, shard=True, **kw)


@scenario
def fsdp2_exact(args):
    return {kind: _run(kind, wrap=fsdp2()) for kind in S.KINDS}


@scenario
def fsdp2_emulated(args):
    """FSDP2's local shards (empty on some ranks) through the CUDA kernels and their glue,
    built for the host (backend="cuda-emulated")."""
    return {kind: _run(kind, wrap=fsdp2(), backend="cuda-emulated") for kind in S.KINDS}


@scenario
def hsdp_exact(args):
    return {kind: _run(kind, wrap=fsdp2(hsdp=True)) for kind in S.KINDS}


@scenario
def fsdp1_exact(args):
    return {f"{kind}.orig{orig}": _run(kind, wrap=fsdp1(orig), dead=False, groups=S.one_group,
                                       read=fsdp1_params)
            for orig in (False, True) for kind in S.KINDS}


@scenario
def fsdp2_after_the_optimizer(args):
    """accelerate's FSDP2 path, step by step (accelerate itself runs it only on accelerators):
    the optimizer is built on the plain model, its parameters are swapped for placeholders
    that remember their data_ptr, fully_shard shards the model, and accelerate's own
    fsdp2_switch_optimizer_parameters puts the DTensors in."""
    from accelerate.utils.fsdp_utils import fsdp2_switch_optimizer_parameters
    out = {}
    for kind in S.KINDS:
        model = toy(S.DTYPE)
        opt = S.make(kind, model, Ctx.rank, Ctx.world, shard=True)
        old = {name: p.data_ptr() for name, p in model.named_parameters()}
        for group in opt.param_groups:
            for i, p in enumerate(group["params"]):
                group["params"][i] = torch.empty(1, dtype=p.dtype)
                group["params"][i].data_ptr = p.data_ptr()
        del p
        fsdp2()(model)
        new = dict(model.named_parameters())
        fsdp2_switch_optimizer_parameters(opt, {old[n]: new[n] for n in old})
        record = S.train(kind, model, opt, range(S.STEPS), Ctx.rank, Ctx.world)
        out[kind] = {"params": S.params(model), "record": record,
                     "dtensor_state": type(opt.state[new["a.weight"]]["exp_avg"]).__name__}
    return out


@scenario
def fsdp2_nometa(args):
    """SuperGrok without meta-steps (tests/support/oracle.py has none), for the oracle
    comparison."""
    return _run("supergrok", wrap=fsdp2(), meta=False)


@scenario
def fsdp1_nometa(args):
    return _run("supergrok", wrap=fsdp1(False), dead=False, groups=S.one_group,
                read=fsdp1_params, meta=False)


@scenario
def fsdp2_bf16(args):
    return {kind: _run(kind, wrap=fsdp2(mp=BF16), meta=False) for kind in S.KINDS}


@scenario
def fsdp2_state(args):
    """State kept as DTensors with the parameters' placements; collectives of one step."""
    out = {}
    for name, wrap in (("fsdp2", fsdp2()), ("hsdp", fsdp2(hsdp=Ctx.world == 4))):
        model = wrap(toy(S.DTYPE))
        opt = S.make("supergrok", model, Ctx.rank, Ctx.world, shard=True)
        S.train("supergrok", model, opt, range(2), Ctx.rank, Ctx.world)
        same = all(type(st[k]).__name__ == "DTensor" and st[k].placements == p.placements
                   for p in model.parameters() for st in [opt.state[p]]
                   for k in ("exp_avg", "exp_avg_sq", "mu"))
        tl = S.backward(model, 2)
        with collective_calls() as calls:
            opt.step(train_loss=tl, val_loss=2 * tl)
        out[name] = {"dtensor_state": same, "calls": calls}
    return out


@scenario
def fsdp2_meta(args):
    return S.meta_gradient(Ctx.rank, Ctx.world, shard=True, wrap=fsdp2())


# ---------------------------------------------------------------- checkpoints (DCP)
def _dcp_dir(args, kind, world):
    return os.path.join(args.ckpt, f"dcp-{kind}-w{world}")


@scenario
def fsdp2_dcp_save(args):
    for kind in S.KINDS:
        model = fsdp2()(toy(S.DTYPE))
        opt = S.make(kind, model, Ctx.rank, Ctx.world, shard=True)
        S.train(kind, model, opt, range(S.SPLIT), Ctx.rank, Ctx.world)
        dcp.save({"model": get_model_state_dict(model),
                  "optim": get_optimizer_state_dict(model, opt)},
                 checkpoint_id=_dcp_dir(args, kind, Ctx.world))
    return {}


@scenario
def fsdp2_dcp_resume(args):
    out = {}
    for kind in S.KINDS:
        model = fsdp2()(toy(S.DTYPE, seed=123))  # other weights: all must come from the files
        opt = S.make(kind, model, Ctx.rank, Ctx.world, shard=True)
        sd = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
        dcp.load(sd, checkpoint_id=_dcp_dir(args, kind, int(args.resume_from)))
        set_model_state_dict(model, sd["model"])
        set_optimizer_state_dict(model, opt, sd["optim"])
        restored = {"global_step": opt.get_global_step(),
                    "cached_alpha": opt.get_cached_alpha() if kind == "supergrok" else None,
                    "steps": sorted({int(opt.state[p]["step"]) for p in model.parameters()})}
        record = S.train(kind, model, opt, range(S.SPLIT, S.STEPS), Ctx.rank, Ctx.world)
        out[kind] = {"params": S.params(model), "record": record, **restored}
    return out


@scenario
def fsdp_bad_args(args):
    import shardgrok
    model = fsdp2()(toy(S.DTYPE))
    out = {}

    def error(fn):
        return error_of(fn, ValueError, TypeError)
    out["shard_false"] = error(lambda: shardgrok.GrokAdamW(model.parameters(), shard=False))
    out["process_group"] = error(lambda: shardgrok.GrokAdamW(
        model.parameters(), process_group=torch.distributed.group.WORLD))
    out["full_state_dict"] = error(lambda: shardgrok.GrokAdamW(model.parameters()).full_state_dict())
    opt = shardgrok.GrokAdamW(model.parameters())
    out["mixed"] = error(lambda: opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))]}))
    return out


@scenario
def fsdp1_wrong_group(args):
    """FSDP1 sharded over pairs of ranks, the optimizer reducing over all 4: refused."""
    import shardgrok
    import torch.distributed as dist
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    pg = pairs[Ctx.rank // 2]
    model = FSDP(toy(S.DTYPE, dead=False), device_id=torch.device("cpu"), process_group=pg)
    out = {}
    try:
        shardgrok.GrokAdamW(model.parameters())
        out["default"] = None
    except ValueError as e:
        out["default"] = str(e)
    opt = shardgrok.GrokAdamW(model.parameters(), process_group=pg)  # the right group: fine
    out["right_group_tensors"] = len(opt._tensors())
    return out


# ---------------------------------------------------------------- FSDP1 checkpoints (DCP)
FSDP1_DCP_KINDS = ("adamw",) + S.KINDS  # torch's AdamW: the control


def adamw_train(model, opt, steps) -> None:
    """The control's schedule: the batches of helpers.backward, plain steps."""
    for t in steps:
        backward(model, t)
        opt.step()


def _fsdp1_make(kind, model):
    if kind == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=1e-2)
    return S.make(kind, model, Ctx.rank, Ctx.world, shard=True, groups=S.one_group)


def _fsdp1_train(kind, model, opt, steps):
    if kind == "adamw":
        adamw_train(model, opt, steps)
        return []
    return S.train(kind, model, opt, steps, Ctx.rank, Ctx.world)


def _fsdp1_sd(model, opt):
    return {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}


@scenario
def fsdp1_dcp(args):
    """FSDP1 (both use_orig_params) saved with torch.distributed.checkpoint after SPLIT steps and
    resumed into a fresh model and optimizer (other weights) at the same world size, for
    torch's AdamW and ours. First the plain ``dcp.load``: it fails for every optimizer (see
    docs/distributed.md); then the load with ``flatten_sharded_tensors=False``, and the
    remaining steps."""
    from torch.distributed.checkpoint import CheckpointException, DefaultLoadPlanner
    out = {}
    for orig in (False, True):
        for kind in FSDP1_DCP_KINDS:
            path = os.path.join(args.ckpt, f"fsdp1-dcp-{kind}-orig{orig}")
            model = fsdp1(orig)(toy(S.DTYPE, dead=False))
            opt = _fsdp1_make(kind, model)
            _fsdp1_train(kind, model, opt, range(S.SPLIT))
            saved = _fsdp1_sd(model, opt)
            # the tensors this rank holds no element of (what trips the plain load)
            none_here = [k for k, v in saved["model"].items() if not v.local_shards()]
            dcp.save(saved, checkpoint_id=path)
            del model, opt, saved

            model = fsdp1(orig)(toy(S.DTYPE, seed=123, dead=False))
            opt = _fsdp1_make(kind, model)
            try:
                dcp.load(_fsdp1_sd(model, opt), checkpoint_id=path)
                plain = None
            except CheckpointException as e:
                plain = str(e)
            sd = _fsdp1_sd(model, opt)
            dcp.load(sd, checkpoint_id=path,
                     planner=DefaultLoadPlanner(flatten_sharded_tensors=False))
            set_model_state_dict(model, sd["model"])
            set_optimizer_state_dict(model, opt, sd["optim"])
            # per optimizer parameter (original tensors with use_orig_params=True): the local
            # piece's size and what state this rank has for it after the load
            state = [(p.numel(), sorted(st), float(st["step"]) if "step" in st else None)
                     for g in opt.param_groups for p in g["params"]
                     for st in [opt.state.get(p, {})]]
            restored = {"global_step": None if kind == "adamw" else opt.get_global_step(),
                        "cached_alpha": opt.get_cached_alpha() if kind == "supergrok" else None}
            record = _fsdp1_train(kind, model, opt, range(S.SPLIT, S.STEPS))
            out[f"{kind}.orig{orig}"] = {"plain_load": plain, "none_here": none_here,
                                         "state": state,
                                         "params": fsdp1_params(model), "record": record,
                                         **restored}
    return out
