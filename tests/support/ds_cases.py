"""DeepSpeed scenarios for tests/support/dist_worker.py: the config's "optimizer" entry (and an
instance or a callable) at ZeRO stages 0-3, against the single-process run of
tests/distributed/test_deepspeed.py.

Every rank trains on the same batch (DeepSpeed averages equal gradients exactly); SuperGrok's
losses differ per rank and average to the single-process ones (``set_losses``).
"""
from __future__ import annotations

import os

import torch

import shardgrok
from tests.support import scenarios as S
from tests.support.helpers import backward, batch, toy
from tests.support.worker_registry import Ctx, error_of, scenario


def _deepspeed():
    """DeepSpeed, with its comm layer over the process group the worker made (imported on
    use: the single-process oracle in the pytest process needs none of it)."""
    import deepspeed
    deepspeed.init_distributed(dist_backend="gloo")
    return deepspeed

NAME = {"grokadamw": "GrokAdamW", "supergrok": "SuperGrok"}
CLS = {"grokadamw": shardgrok.GrokAdamW, "supergrok": shardgrok.SuperGrok}
PARAMS = {"grokadamw": {"lr": 1e-2, "gradient_clipping": 0.5},
          "supergrok": {"lr": 1e-2, "gradient_clipping": 0.5, "warmup_steps": 5,
                        "meta_hidden_dim": 8}}
# GrokAdamW: DeepSpeed clips (same formula, same 0.5). SuperGrok: its own clipping only.
DS_CLIP = {"grokadamw": 0.5, "supergrok": 0.0}
STAGES = (0, 1, 2, 3)


def config(kind: str, stage: int, how: str = "config", backend: str | None = None,
           **extra) -> dict:
    cfg = {"train_micro_batch_size_per_gpu": 12, "gradient_clipping": DS_CLIP[kind],
           "zero_optimization": {"stage": stage}, "steps_per_print": 10 ** 9, **extra}
    if how == "config":
        params = PARAMS[kind] if backend is None else {**PARAMS[kind], "backend": backend}
        cfg["optimizer"] = {"type": NAME[kind], "params": params}
    return cfg


def engine_for(kind: str, stage: int, how: str = "config", seed: int = 0,
               backend: str | None = None, **extra):
    """``backend``: the config entry's (``how="config"`` only)."""
    deepspeed = _deepspeed()
    model = toy(S.DTYPE, seed=seed, dead=False)
    groups = S.default_groups(model)
    cfg = config(kind, stage, how, backend, **extra)
    torch.manual_seed(7)  # the meta-net's initial weights, as in the single-process run
    if how == "config":
        engine, *_ = deepspeed.initialize(model=model, model_parameters=groups, config=cfg)
    elif how == "instance":
        opt = CLS[kind](groups, **PARAMS[kind])
        engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
    else:  # a callable that builds the optimizer from the parameters DeepSpeed passes
        engine, *_ = deepspeed.initialize(model=model, model_parameters=groups, config=cfg,
                                          optimizer=lambda ps: CLS[kind](ps, **PARAMS[kind]))
    return model, engine


def train(kind, engine, steps, rank=0, world=1, meta=True):
    """SuperGrok also takes a meta-step every 3 steps (ZeRO 0-2; the same validation batch on
    every rank, as in scenarios.train)."""
    opt = shardgrok.optimizer_of(engine)
    meta = meta and kind == "supergrok"
    record = []
    for t in steps:
        x, y = batch(t, S.DTYPE)
        loss = ((engine(x) - y) ** 2).mean() * 20
        engine.backward(loss)
        if meta and t % 3 == 0:
            opt.meta_step(S.val_closure(engine.module, 0, 1))
        if kind == "supergrok" and t % 4 == 0:
            d = 0.01 * S.rank_offset(rank, world)
            tl = loss.item()
            opt.set_losses(train_loss=tl + d, val_loss=(1.2 + 0.02 * t) * tl - d)
        engine.step()
        rep = opt.get_state_summary()
        record.append({k: rep.get(k) for k in ("backend", "last_clip_coefs", "gate_engaged", "alpha",
                                                "cached_alpha", "global_step")})
    return record


def full_params(model, stage):
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param
    out = []
    for p in model.parameters():
        if stage != 3:
            out.append(p.detach().clone())
        elif p.requires_grad:  # the fp32 master
            out.append(safe_get_full_fp32_param(p).detach().clone())
        else:  # frozen: no master; gather the model's own partitions
            with deepspeed.zero.GatheredParameters([p]):
                out.append(p.data.detach().clone())
    return out


def oracle(kind: str, meta: bool = True, steps=range(S.STEPS)) -> dict:
    """The same run on one process, without DeepSpeed."""
    model = toy(S.DTYPE, dead=False)
    torch.manual_seed(7)
    opt = CLS[kind](S.default_groups(model), **PARAMS[kind])
    record = []
    for t in steps:
        tl = backward(model, t)
        if meta and kind == "supergrok" and t % 3 == 0:
            opt.meta_step(S.val_closure(model, 0, 1))
        if kind == "supergrok" and t % 4 == 0:
            opt.step(train_loss=tl, val_loss=(1.2 + 0.02 * t) * tl)
        else:
            opt.step()
        rep = opt.get_state_summary()
        record.append({k: rep.get(k) for k in ("backend", "last_clip_coefs", "gate_engaged", "alpha",
                                                "cached_alpha", "global_step")})
    return {"params": [p.detach().clone() for p in model.parameters()], "record": record}


def train_bf16(engine, steps) -> list[float]:
    """Train a bf16 engine on the exactness batches; the losses."""
    losses = []
    for t in steps:
        x, y = batch(t, S.DTYPE)
        loss = ((engine(x.to(torch.bfloat16)).float() - y) ** 2).mean() * 20
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses


@scenario
def ds_exact(args):
    out = {}
    stages = STAGES if Ctx.world == 2 else (2, 3)
    for stage in stages:
        for kind in S.KINDS:
            model, engine = engine_for(kind, stage)
            record = train(kind, engine, range(S.STEPS), Ctx.rank, Ctx.world)
            out[f"{kind}.{stage}"] = {"params": full_params(model, stage), "record": record,
                                      "sharded_state": _state_elements(engine)}
    return out


@scenario
def ds_emulated(args):
    """ZeRO 2's flat fp32 partitions through the CUDA kernels and their glue, built for the
    host (backend="cuda-emulated" in the config entry)."""
    out = {}
    for kind in S.KINDS:
        model, engine = engine_for(kind, 2, backend="cuda-emulated")
        record = train(kind, engine, range(S.STEPS), Ctx.rank, Ctx.world)
        out[kind] = {"params": full_params(model, 2), "record": record}
    return out


@scenario
def ds_nometa(args):
    """SuperGrok without meta-steps (tests/support/oracle.py has none), for the oracle
    comparison."""
    out = {}
    for stage in (2, 3):
        model, engine = engine_for("supergrok", stage)
        record = train("supergrok", engine, range(S.STEPS), Ctx.rank, Ctx.world, meta=False)
        out[stage] = {"params": full_params(model, stage), "record": record}
    return out


def _state_elements(engine):
    opt = shardgrok.optimizer_of(engine)
    return sum(st["exp_avg"].numel() for st in opt.state.values())


@scenario
def ds_ways(args):
    """An optimizer instance and a callable instead of the config entry (ZeRO 2)."""
    out = {}
    for how in ("instance", "callable"):
        for kind in S.KINDS:
            model, engine = engine_for(kind, 2, how)
            train(kind, engine, range(S.STEPS), Ctx.rank, Ctx.world)
            out[f"{kind}.{how}"] = {"params": full_params(model, 2)}
    return out


@scenario
def ds_bad_config(args):
    deepspeed = _deepspeed()
    out = {}
    for name, params in (("unknown", {"lr": 1e-2, "bogus": 1}), ("range", {"lr": -1.0}),
                         ("betas", {"betas": [0.9, 1.5]})):
        model = toy(S.DTYPE, dead=False)
        cfg = config("supergrok", 2)
        cfg["optimizer"]["params"] = params
        try:
            deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
            out[name] = None
        except (TypeError, ValueError) as e:
            out[name] = f"{type(e).__name__}: {e}"
    # shard= / process_group= cannot apply under ZeRO: refused at the first step
    model = toy(S.DTYPE, dead=False)
    opt = shardgrok.SuperGrok(model.parameters(), process_group=torch.distributed.group.WORLD)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt,
                                      config=config("supergrok", 2, how="instance"))
    out["process_group"] = error_of(lambda: _one_step(engine), ValueError)
    # GrokAdamW's clipping must agree with DeepSpeed's
    model = toy(S.DTYPE, dead=False)
    cfg = config("grokadamw", 2)
    cfg["optimizer"]["params"] = {"lr": 1e-2, "gradient_clipping": 0.3}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    out["clip_mismatch"] = error_of(lambda: _one_step(engine), ValueError)
    return out


def _one_step(engine):
    x, y = batch(0, S.DTYPE)
    engine.backward(((engine(x) - y) ** 2).mean())
    engine.step()


@scenario
def ds_checkpoint(args):
    """engine.save_checkpoint after SPLIT steps, load into a fresh engine, train on."""
    out = {}
    for stage in (0, 1, 2, 3):
        for kind in S.KINDS:
            tag = f"{kind}-{stage}"
            model, engine = engine_for(kind, stage)
            train(kind, engine, range(S.SPLIT), Ctx.rank, Ctx.world)
            saved = shardgrok.optimizer_of(engine)
            before = {"global_step": saved.get_global_step(),
                      "alpha": saved.get_cached_alpha() if kind == "supergrok" else None}
            engine.save_checkpoint(os.path.join(args.ckpt, "ds"), tag=tag)
            model, engine = engine_for(kind, stage, seed=123)
            engine.load_checkpoint(os.path.join(args.ckpt, "ds"), tag=tag)
            opt = shardgrok.optimizer_of(engine)
            after = {"global_step": opt.get_global_step(),
                     "alpha": opt.get_cached_alpha() if kind == "supergrok" else None}
            record = train(kind, engine, range(S.SPLIT, S.STEPS), Ctx.rank, Ctx.world)
            out[tag] = {"params": full_params(model, stage), "record": record,
                        "before": before, "after": after}
    return out


@scenario
def ds_bf16(args):
    """bf16 configs: DeepSpeed keeps fp32 master partitions (ZeRO 1-3); without ZeRO, a clear
    error. fp16 is not available on DeepSpeed's CPU accelerator."""
    out = {}
    for stage in (0, 1, 2, 3):
        for kind in S.KINDS:
            try:
                model, engine = engine_for(kind, stage, bf16={"enabled": True})
                losses = train_bf16(engine, range(S.STEPS))
                out[f"{kind}.{stage}"] = {"losses": losses, "params": full_params(model, stage),
                                          "global_step": shardgrok.optimizer_of(engine).get_global_step()}
            except NotImplementedError as e:
                out[f"{kind}.{stage}"] = {"error": str(e)}
    return out


def meta_setup(model):
    torch.manual_seed(1)
    net = shardgrok.SimpleMetaNet(hidden_dim=6)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return shardgrok.SuperGrok(S.default_groups(model), lr=0.05, meta_net=net, meta_lr=3e-2,
                               gradient_clipping=0.5)


def meta_oracle() -> dict:
    model = toy(S.DTYPE, dead=False)
    opt = meta_setup(model)
    backward(model, 0)
    loss = opt.meta_gradient(S.val_closure(model, 0, 1))
    grads = [p.grad.clone() for p in opt.meta_net.parameters()]
    opt.meta_optimizer.step()
    opt.step()
    return {"loss": loss, "grads": grads, "params": [p.detach().clone() for p in model.parameters()]}


@scenario
def ds_meta(args):
    """meta_step between engine.backward and engine.step, validation batch split over ranks."""
    deepspeed = _deepspeed()
    out = {}
    for stage in (0, 1, 2, 3, "3p"):
        model = toy(S.DTYPE, dead=False)
        opt = meta_setup(model)
        if stage == "3p":  # ZeRO 3 with every parameter partitioned (none kept whole)
            cfg = config("supergrok", 3, how="instance",
                         zero_optimization={"stage": 3, "stage3_param_persistence_threshold": 0})
        else:
            cfg = config("supergrok", stage, how="instance")
        engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
        x, y = batch(0, S.DTYPE)
        engine.backward(((engine(x) - y) ** 2).mean() * 20)
        try:
            loss = opt.meta_gradient(S.val_closure(model, Ctx.rank, Ctx.world))
        except NotImplementedError as e:
            out[stage] = {"error": str(e)}
            continue
        grads = [p.grad.clone() for p in opt.meta_net.parameters()]
        opt.meta_optimizer.step()
        engine.step()  # from the restored parameters, with the updated meta-net
        out[stage] = {"loss": loss, "grads": grads, "global_step": opt.get_global_step(),
                      "net": [p.detach().clone() for p in opt.meta_net.parameters()],
                      "params": full_params(model, 3 if stage == "3p" else stage)}
    return out


@scenario
def ds_frozen(args):
    """A frozen parameter passed to the optimizer (DeepSpeed leaves it out of its partitions)."""
    out = {}
    for stage in (0, 1, 2, 3):
        model = toy(S.DTYPE, dead=False)
        model.a.bias.requires_grad_(False)
        frozen = model.a.bias.detach().clone()
        engine, *_ = _deepspeed().initialize(model=model, model_parameters=model.parameters(),
                                             config={**config("supergrok", stage)})
        train("supergrok", engine, range(4), Ctx.rank, Ctx.world)
        summary = shardgrok.optimizer_of(engine).get_state_summary()
        params = full_params(model, stage)
        out[stage] = {"global_step": summary["global_step"], "tensors": summary["total_params"],
                      "frozen_kept": bool(torch.equal(params[2], frozen))}
    return out
