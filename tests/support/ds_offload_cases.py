"""DeepSpeed ZeRO-Offload scenarios for tests/support/dist_worker.py
(tests/distributed/test_deepspeed_offload.py): ``"offload_optimizer": {"device": "cpu"}`` at ZeRO 2
and 3 with GrokAdamW and SuperGrok, against the same run without offload (in the same job) and the
single-process run of tests/support/ds_cases.py.

The model, batches, schedule and param groups are those of tests/support/ds_cases.py (every rank
trains on the same batch; SuperGrok takes a meta-step every 3 steps and gets rank-averaged losses).
"""
from __future__ import annotations

import copy
import json
import os

import torch

import shardgrok
from tests.support import ds_cases as D
from tests.support import scenarios as S
from tests.support.helpers import batch, toy
from tests.support.paths import ROOT
from tests.support.worker_registry import Ctx, error_of, scenario

EXAMPLE = ROOT / "examples" / "zero_offload.json"
STAGES = (2, 3)


def offload_extra(stage: int, offload: bool = True, force: bool | None = False) -> dict:
    """The config keys that differ from tests/support/ds_cases.config: ZeRO-Offload of the optimizer
    and (unless ``force`` is None) ``zero_force_ds_cpu_optimizer``."""
    zero = {"stage": stage}
    if offload:
        zero["offload_optimizer"] = {"device": "cpu"}
    extra = {"zero_optimization": zero}
    if force is not None:
        extra["zero_force_ds_cpu_optimizer"] = force
    return extra


def zero_of(engine):
    """DeepSpeed's ZeRO optimizer inside the engine."""
    return engine.optimizer


def offloaded(engine) -> bool:
    """Whether DeepSpeed's ZeRO optimizer runs with the optimizer offloaded to the CPU."""
    zero = zero_of(engine)
    return bool(getattr(zero, "cpu_offload", False) or getattr(zero, "offload_optimizer", False))


def state_report(engine) -> dict:
    """Where the optimizer's state lives and what it is keyed by: DeepSpeed's fp32 partitions
    (``single_partition_of_fp32_groups`` at ZeRO 2, ``fp32_partitioned_groups_flat`` at ZeRO 3),
    which offload puts on the CPU."""
    opt = shardgrok.optimizer_of(engine)
    zero = zero_of(engine)
    flats = getattr(zero, "single_partition_of_fp32_groups", None)
    if flats is None:
        flats = zero.fp32_partitioned_groups_flat
    tensors = [v for st in opt.state.values() for v in st.values() if isinstance(v, torch.Tensor)
               and v.dim() > 0]
    return {"optimizer": type(opt).__name__, "offload": offloaded(engine),
            "state_devices": sorted({t.device.type for t in tensors}),
            "partition_devices": sorted({f.device.type for f in flats}),
            "keyed_by_partitions": {id(k) for k in opt.state} == {id(f) for f in flats},
            "elements": sum(st["exp_avg"].numel() for st in opt.state.values())}


@scenario
def ds_offload(args):
    """Per stage and optimizer: STEPS steps without offload (parameters kept at SPLIT too); SPLIT
    steps with offload, an engine checkpoint, SPLIT more steps on the same engine; a fresh
    offloaded engine (other initial weights) loading the checkpoint and taking the same steps."""
    out = {}
    ckpt = os.path.join(args.ckpt, "ds-offload")
    first, then = range(S.SPLIT), range(S.SPLIT, S.STEPS)
    for stage in STAGES:
        for kind in S.KINDS:
            tag = f"{kind}.{stage}"
            # the same config with the offload entry removed
            model, engine = D.engine_for(kind, stage, **offload_extra(stage, offload=False))
            plain = {"record": D.train(kind, engine, first, Ctx.rank, Ctx.world)}
            plain["params_split"] = D.full_params(model, stage)
            plain["record"] += D.train(kind, engine, then, Ctx.rank, Ctx.world)
            plain["params"] = D.full_params(model, stage)
            plain["state"] = state_report(engine)
            # with offload: SPLIT steps, a checkpoint, SPLIT more
            model, engine = D.engine_for(kind, stage, **offload_extra(stage))
            off = {"net_initial": _meta_net(engine)}
            off["record"] = D.train(kind, engine, first, Ctx.rank, Ctx.world)
            off["params_split"] = D.full_params(model, stage)
            off["state"] = state_report(engine)
            saved = shardgrok.optimizer_of(engine)
            off["before"] = {"global_step": saved.get_global_step(),
                             "alpha": saved.get_cached_alpha() if kind == "supergrok" else None}
            engine.save_checkpoint(ckpt, tag=tag)
            off["continued_record"] = D.train(kind, engine, then, Ctx.rank, Ctx.world)
            off["continued_params"] = D.full_params(model, stage)
            off["net"] = _meta_net(engine)
            # a fresh offloaded engine resumes from the checkpoint
            model, engine = D.engine_for(kind, stage, seed=123, **offload_extra(stage))
            engine.load_checkpoint(ckpt, tag=tag)
            opt = shardgrok.optimizer_of(engine)
            off["after"] = {"global_step": opt.get_global_step(),
                            "alpha": opt.get_cached_alpha() if kind == "supergrok" else None}
            off["resumed_record"] = D.train(kind, engine, then, Ctx.rank, Ctx.world)
            off["resumed_params"] = D.full_params(model, stage)
            off["resumed_state"] = state_report(engine)
            out[tag] = {"plain": plain, "offload": off}
    return out


def _meta_net(engine):
    opt = shardgrok.optimizer_of(engine)
    net = getattr(opt, "meta_net", None)
    return None if net is None else [p.detach().clone() for p in net.parameters()]


def _bf16_run(kind, stage, offload):
    model, engine = D.engine_for(kind, stage, bf16={"enabled": True},
                                 **offload_extra(stage, offload=offload))
    losses = D.train_bf16(engine, range(S.SPLIT))
    summary = shardgrok.optimizer_of(engine).get_state_summary()
    return {"params": D.full_params(model, stage), "losses": losses,
            "backend": summary["backend"], "global_step": summary["global_step"],
            "state": state_report(engine)}


@scenario
def ds_offload_ways(args):
    """Under offload, SPLIT steps each: an optimizer instance (ZeRO 3) and a callable (ZeRO 2)
    with ``zero_force_ds_cpu_optimizer: false``; what DeepSpeed does without the key, for both
    and for the config entry; bf16 with and without offload; a partial offload (``ratio``)."""
    out = {}
    for how, stage in (("instance", 3), ("callable", 2)):
        for kind in S.KINDS:
            model, engine = D.engine_for(kind, stage, how, **offload_extra(stage))
            record = D.train(kind, engine, range(S.SPLIT), Ctx.rank, Ctx.world)
            out[f"{kind}.{how}"] = {"params": D.full_params(model, stage), "record": record,
                                    "state": state_report(engine)}
    # the key left out (DeepSpeed's default, true): a client optimizer is refused at initialize
    for how in ("instance", "callable"):
        try:
            D.engine_for("grokadamw", 2, how, **offload_extra(2, force=None))
            out[f"default.{how}"] = None
        except Exception as e:  # noqa: BLE001  (the test names the type)
            out[f"default.{how}"] = {"type": type(e).__name__, "message": str(e)}
    # ... and the config entry is built as it is, without the key
    model, engine = D.engine_for("grokadamw", 2, **offload_extra(2, force=None))
    record = D.train("grokadamw", engine, range(S.SPLIT), Ctx.rank, Ctx.world)
    out["default.config"] = {"params": D.full_params(model, 2), "record": record,
                             "state": state_report(engine)}
    # bf16: fp32 master partitions offloaded, against the same bf16 run without offload
    for kind, stage in (("grokadamw", 2), ("supergrok", 3)):
        out[f"bf16.{kind}.{stage}"] = {"offload": _bf16_run(kind, stage, True),
                                       "plain": _bf16_run(kind, stage, False)}
    # a partial offload (ZeRO 3's "ratio" < 1) needs DeepSpeedCPUAdam
    zero = {"stage": 3, "offload_optimizer": {"device": "cpu", "ratio": 0.5}}
    out["ratio"] = error_of(lambda: D.engine_for("grokadamw", 3, zero_optimization=zero,
                                                 zero_force_ds_cpu_optimizer=False),
                            AssertionError)
    return out


def example_config() -> dict:
    with open(EXAMPLE) as f:
        return json.load(f)


def without_offload(cfg: dict) -> dict:
    cfg = copy.deepcopy(cfg)
    cfg["zero_optimization"].pop("offload_optimizer")
    return cfg


@scenario
def ds_offload_example(args):
    """examples/zero_offload.json as it is (and the same config without offload): the toy
    model's parameters in one group, STEPS steps."""
    deepspeed = D._deepspeed()
    out = {}
    for name, cfg in (("example", example_config()), ("plain", without_offload(example_config()))):
        model = toy(S.DTYPE, dead=False)
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                          config=cfg)
        record = []
        for t in range(S.STEPS):
            x, y = batch(t, S.DTYPE)
            engine.backward(((engine(x) - y) ** 2).mean() * 20)
            engine.step()
            rep = shardgrok.optimizer_of(engine).get_state_summary()
            record.append({k: rep.get(k) for k in ("backend", "last_clip_coefs", "global_step")})
        stage = cfg["zero_optimization"]["stage"]
        out[name] = {"params": D.full_params(model, stage), "record": record,
                     "state": state_report(engine)}
    return out


def example_oracle() -> dict:
    """examples/zero_offload.json's optimizer on one process, without DeepSpeed (GrokAdamW's own
    clipping at the config's "gradient_clipping", which DeepSpeed applies under ZeRO)."""
    from tests.support.helpers import backward
    cfg = example_config()
    params = dict(cfg["optimizer"]["params"])
    assert params.get("gradient_clipping", 1.0) == cfg["gradient_clipping"]
    model = toy(S.DTYPE, dead=False)
    opt = getattr(shardgrok, cfg["optimizer"]["type"])(model.parameters(), **params)
    record = []
    for t in range(S.STEPS):
        backward(model, t)
        opt.step()
        rep = opt.get_state_summary()
        record.append({k: rep.get(k) for k in ("backend", "last_clip_coefs", "global_step")})
    return {"params": [p.detach().clone() for p in model.parameters()], "record": record}
