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


# ---------------------------------------------------------------- the cut-block bound
def local_values(entry: dict, key: str) -> torch.Tensor:
    """A rank's fp32 values of one state of a tensor (``entry``: whole codes, this rank's
    start, element count and scales), from its codes at its own scales."""
    from shardgrok import reference as R
    a, n = entry["start"], entry["numel"]
    return R.dequantize_state(entry[key].reshape(-1)[a:a + n], entry[key + "_scale"], key, a)


def step_width(x: torch.Tensor, scale: torch.Tensor, bias: int) -> torch.Tensor:
    """The width of the code interval holding each ``x`` at its block's ``scale``: 2^(e-3) of
    the normalised magnitude's binade, 2^(-bias-2) in the linear range (csrc/grok_math.h)."""
    n = (x.abs() / torch.where(scale > 0, scale, 1.0)).clamp(min=2.0 ** -60)
    width = torch.maximum(2.0 ** (torch.floor(torch.log2(n)) - 3), torch.tensor(2.0 ** (-bias - 2)))
    return width * scale


def assert_within_one_step(entry: dict, exact: dict, where: str) -> int:
    """Each value of a rank's piece (``entry``) within one step of the map at its own scale of
    the fp32 value ``exact[key]`` (whole, flat), and that step within the bound a whole block's
    values have: |x|/8, or the block's linear step below its normal range. Returns how many
    of the rank's scales are below the whole block's (cut blocks, computed alone)."""
    from shardgrok import reference as R
    a, n = entry["start"], entry["numel"]
    blocks = torch.arange(a, a + n) // R.QBLOCK - a // R.QBLOCK
    finer = 0
    for k in ("exp_avg", "exp_avg_sq", "mu"):
        x, bias = exact[k][a:a + n], R.QUANT_BIAS[k]
        mine = entry[k + "_scale"]
        whole = R.block_absmax(exact[k], 0)[a // R.QBLOCK:a // R.QBLOCK + mine.numel()]
        width = step_width(x, mine[blocks], bias)
        err = (local_values(entry, k) - x).abs()
        assert bool((err <= width).all()), (where, k, float((err - width).max()))
        bound = torch.maximum(x.abs() / 8, whole[blocks] * 2.0 ** (-bias - 2))
        assert bool((width <= bound * (1 + 2 ** -20)).all()), (where, k)
        assert bool((mine <= whole).all()), (where, k)
        finer += int((mine < whole).sum())
    return finer


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


def fsdp2_groups(params) -> list[dict]:
    """Two groups: SuperGrok clips over a group, so the cut tensors' differences stay in theirs."""
    return [{"params": params[:len(ALIGNED)]}, {"params": params[len(ALIGNED):]}]


def fsdp2_int8_run(kind: str, backend: str, state_dtype="int8", steps=STEPS, one=False,
                   hsdp=False) -> list[dict]:
    """The schedule on FSDP2 (``one``: the same tensors whole, in this process alone)."""
    if one:
        g = torch.Generator().manual_seed(0)
        params = [nn.Parameter(torch.randn(s, generator=g)) for s in FSDP2_SHAPES]
    else:
        params = list(_fsdp2_model(hsdp).parameters())
    opt = _opt(kind, fsdp2_groups(params), backend, None, state_dtype)
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
    return _opt(kind, fsdp2_groups(list(model.parameters())), "kernel", None)


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


# ---------------------------------------------------------------- DeepSpeed ZeRO 1-3 (and Offload)
DS_LR = 1e-3


def ds_model(seed: int = 0) -> nn.Module:
    """Tensors of 8,320 and 5,200 elements (codes) and two biases, one flat partition per rank
    big enough for 8-bit state at world size 2; DeepSpeed cuts tensors where it likes."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 130), nn.Tanh(), nn.Linear(130, 40))


def ds_batch(t: int):
    g = torch.Generator().manual_seed(500 + t)
    return torch.randn(16, 64, generator=g), torch.randn(16, 40, generator=g)


def ds_engine(kind: str, stage: int, state_dtype, offload: bool = False, seed: int = 0,
              elastic_checkpoint: bool = False):
    from tests.support import ds_cases as D
    deepspeed = D._deepspeed()
    model = ds_model(seed)
    params = {"lr": DS_LR, "gradient_clipping": 0.0, "rounding_seed": 7}
    if state_dtype is not None:
        params["state_dtype"] = state_dtype
    if kind == "supergrok":
        params["warmup_steps"] = 0
    zero = {"stage": stage, **({"offload_optimizer": {"device": "cpu"}} if offload else {}),
            **({"elastic_checkpoint": True} if elastic_checkpoint else {})}
    cfg = {"train_micro_batch_size_per_gpu": 16, "gradient_clipping": 0.0,
           "zero_optimization": zero, "steps_per_print": 10 ** 9,
           "zero_allow_untested_optimizer": True, "zero_force_ds_cpu_optimizer": False,
           "optimizer": {"type": {"grokadamw": "GrokAdamW", "supergrok": "SuperGrok"}[kind],
                         "params": params}}
    torch.manual_seed(7)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    return model, engine


def ds_train(kind, engine, steps):
    opt = shardgrok.optimizer_of(engine)
    for t in steps:
        x, y = ds_batch(t)
        loss = ((engine(x) - y) ** 2).mean()
        engine.backward(loss)
        if kind == "supergrok":
            opt.set_losses(train_loss=1.0, val_loss=1.2 + 0.1 * t)
        engine.step()


def ds_local_view(engine) -> list[dict]:
    """Per original tensor, this rank's piece: start, element count, codes (placed in a whole
    flat tensor, zero elsewhere) and scales, or fp32 values; from the layout's own pieces."""
    opt = shardgrok.optimizer_of(engine)
    numel = [p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in engine.module.parameters()]
    out = [{"start": 0, "numel": 0} for _ in numel]
    for s in opt._layout.pieces(opt, with_grad=False):
        n = s.param.numel()
        entry = {"start": s.start, "numel": n}
        for k in ("exp_avg", "exp_avg_sq", "mu"):
            whole = torch.zeros(numel[s.index], dtype=s.state[k].dtype)
            whole[s.start:s.start + n] = s.state[k].reshape(-1).cpu()
            entry[k] = whole
            if k + "_scale" in s.state:
                entry[k + "_scale"] = s.state[k + "_scale"].clone().cpu()
        out[s.index] = entry
    return out


@scenario
def int8_ds(args):
    """ZeRO 1-3 (and 2-3 with the optimizer offloaded) with 8-bit state from the config entry:
    the first step against the fp32-state run (whole values, gathered by DeepSpeed), and an
    engine checkpoint at step 3 resumed in a fresh engine against the uninterrupted run."""
    import os

    from deepspeed.utils import safe_get_full_optimizer_state

    from tests.support import ds_cases as D
    out = {}
    for stage, offload in ((1, False), (2, False), (3, False), (2, True), (3, True)):
        for kind in ("grokadamw", "supergrok"):
            tag = f"{kind}-{stage}{'-offload' if offload else ''}"
            model, fp32 = ds_engine(kind, stage, None, offload)
            ds_train(kind, fp32, range(1))
            exact = [{k: safe_get_full_optimizer_state(p, k).reshape(-1).float().cpu()
                      for k in ("exp_avg", "exp_avg_sq", "mu")} for p in model.parameters()]
            model, engine = ds_engine(kind, stage, "int8", offload)
            ds_train(kind, engine, range(1))
            first = ds_local_view(engine)
            ds_train(kind, engine, range(1, SPLIT))
            engine.save_checkpoint(os.path.join(args.ckpt, "int8-ds"), tag=tag)
            ds_train(kind, engine, range(SPLIT, STEPS))
            run = {"params": D.full_params(model, stage), "state": ds_local_view(engine)}
            model, engine = ds_engine(kind, stage, "int8", offload, seed=123)
            engine.load_checkpoint(os.path.join(args.ckpt, "int8-ds"), tag=tag)
            loaded_step = shardgrok.optimizer_of(engine).get_global_step()
            ds_train(kind, engine, range(SPLIT, STEPS))
            from tests.support.ds_offload_cases import offloaded
            out[tag] = {"exact": exact, "first": first, "run": run, "loaded_step": loaded_step,
                        "offloaded": offloaded(engine),
                        "resumed": {"params": D.full_params(model, stage),
                                    "state": ds_local_view(engine)}}
    out["elastic"] = error_at_first_step(lambda: ds_engine("grokadamw", 2, "int8",
                                                           elastic_checkpoint=True)[1])
    return out


def error_at_first_step(make) -> str | None:
    engine = make()
    try:
        ds_train("grokadamw", engine, range(1))
    except ValueError as e:
        return str(e)
    return None


@scenario
def int8_zero1_convert(args):
    """Checkpoints across formats under ZeRO-1: a one-process fp32-state checkpoint loaded by
    8-bit sharded optimizers, and their whole state loaded back by fp32-state sharded ones."""
    out = {}
    for kind in ("grokadamw", "supergrok"):
        params = _params()
        one = _opt(kind, params, "kernel", False, None)
        _steps(kind, params, one, range(SPLIT))
        fp32 = one.state_dict()
        int8 = _opt(kind, [nn.Parameter(p.detach().clone()) for p in params], "kernel", True)
        int8.load_state_dict(fp32)
        whole = int8.full_state_dict(to=None)
        back = _opt(kind, [nn.Parameter(p.detach().clone()) for p in params], "kernel", True, None)
        back.load_state_dict(whole)
        out[kind] = {"fp32": fp32["state"], "int8": whole["state"],
                     "back": back.full_state_dict(to=None)["state"]}
    return out
