"""Stochastic rounding under sharding: scenarios for tests/distributed/test_rounding_ranks.py.

One schedule (``rounding_run``) on bf16 parameters with bf16 state, both rounded stochastically,
run by every layout and by one process; what it returns is whole (gathered), so the pytest side
compares the layouts with one process bit for bit.
"""
from __future__ import annotations

import torch
from torch import nn

import shardgrok
from tests.support.helpers import meta_net
from tests.support.worker_registry import Ctx, scenario

BF16 = torch.bfloat16
# rows that split unevenly over 2 and 4 ranks, a piece crossing a ZeRO-1 cut, a scalar-like tensor
SHAPES = [(37, 11), (5,), (301,), (4109,), (1,), (3, 130)]
STEPS = 6
SEED = 5


def _opt(kind, params, backend, **kw):
    kw = dict(lr=1e-3, state_dtype=BF16, param_rounding="stochastic", rounding_seed=SEED,
              backend=backend, **kw)
    if kind == "grokadamw":
        return shardgrok.GrokAdamW(params, **kw)
    return shardgrok.SuperGrok(params, warmup_steps=0, meta_net=meta_net("random"), **kw)


def rounding_run(kind: str, layout: str, backend: str = "kernel") -> dict:
    """The schedule on ``layout`` ("one": this process alone; "zero1"; "fsdp2": DTensor
    parameters sharded by rows over the default group); whole parameters and m, v, mu back."""
    g = torch.Generator().manual_seed(0)
    full = [torch.randn(s, generator=g).to(BF16) for s in SHAPES]
    mesh = None
    if layout == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Shard, distribute_tensor
        mesh = init_device_mesh("cpu", (Ctx.world,))
        params = [nn.Parameter(distribute_tensor(f, mesh, [Shard(0)])) for f in full]
    else:
        params = [nn.Parameter(f.clone()) for f in full]
    opt = _opt(kind, params, backend, **({"shard": layout == "zero1"} if layout != "fsdp2" else {}))
    for t in range(STEPS):
        gg = torch.Generator().manual_seed(100 + t)
        grads = [torch.randn(s, generator=gg).to(BF16) for s in SHAPES]
        for p, gr in zip(params, grads):
            p.grad = distribute_tensor(gr, mesh, [Shard(0)]) if mesh is not None else gr
        opt.step(**({"train_loss": 1.0, "val_loss": 1.2 + 0.1 * t} if kind == "supergrok" else {}))
    if layout == "fsdp2":
        whole = [p.detach().full_tensor() for p in params]
        state = [[opt.state[p][k].full_tensor() for k in ("exp_avg", "exp_avg_sq", "mu")]
                 for p in params]
    elif layout == "zero1":
        whole = [p.detach().clone() for p in params]
        sd = opt.full_state_dict(to=None)["state"]
        state = [[sd[i][k].reshape(SHAPES[i]) for k in ("exp_avg", "exp_avg_sq", "mu")]
                 for i in range(len(params))]
    else:
        whole = [p.detach().clone() for p in params]
        state = [[opt.state[p][k].clone() for k in ("exp_avg", "exp_avg_sq", "mu")]
                 for p in params]
    return {"params": whole, "state": state, "backend": opt.get_state_summary()["backend"],
            "sharded": opt.is_sharded}


for _kind in ("grokadamw", "supergrok"):
    for _layout in ("zero1", "fsdp2"):
        for _backend in ("kernel", "reference"):
            def _make(kind=_kind, layout=_layout, backend=_backend):
                def run(args):
                    return rounding_run(kind, layout, backend)
                run.__name__ = f"rounding_{layout}_{kind}_{backend}"
                return run
            scenario(_make())


# ---------------------------------------------------------------- DeepSpeed
# DeepSpeed hands the optimizer flat fp32 partitions (its master weights), so here only the
# state is bf16; tensors are cut where the partitions end, anywhere inside them.
DS_KW = dict(lr=1e-2, gradient_clipping=0.0, state_dtype=BF16, rounding_seed=SEED)


def ds_rounding_oracle(steps: int = 8, one_group: bool = False) -> dict:
    """One process, no engine: the toy model's whole parameters and m, v, mu."""
    from tests.support import scenarios as S
    from tests.support.helpers import backward, toy
    model = toy(S.DTYPE, dead=False)
    groups = S.one_group(model) if one_group else S.default_groups(model)
    opt = shardgrok.GrokAdamW(groups, **DS_KW)
    for t in range(steps):
        backward(model, t)
        opt.step()
    params = list(model.parameters())
    return {"params": [p.detach().clone() for p in params],
            "state": [[opt.state[p][k].clone() for k in ("exp_avg", "exp_avg_sq", "mu")]
                      for p in params]}


@scenario
def rounding_ds(args, steps: int = 8):
    """ZeRO 1-3 with the optimizer built by a callable (bf16 state is no JSON value), the
    engine's clipping off (the oracle's too): whole fp32 parameters and m, v, mu gathered by
    DeepSpeed's own helpers."""
    from deepspeed.utils import safe_get_full_optimizer_state
    from tests.support import ds_cases as D
    from tests.support import scenarios as S
    from tests.support.helpers import batch, toy
    deepspeed = D._deepspeed()
    out = {}
    for stage in (1, 2, 3):
        model = toy(S.DTYPE, dead=False)
        cfg = {"train_micro_batch_size_per_gpu": 12, "gradient_clipping": 0.0,
               "zero_optimization": {"stage": stage}, "steps_per_print": 10 ** 9,
               "zero_allow_untested_optimizer": True}
        engine, *_ = deepspeed.initialize(
            model=model, model_parameters=S.default_groups(model), config=cfg,
            optimizer=lambda ps: shardgrok.GrokAdamW(ps, **DS_KW))
        for t in range(steps):
            x, y = batch(t, S.DTYPE)
            engine.backward(((engine(x) - y) ** 2).mean() * 20)
            engine.step()
        params = list(model.parameters())
        out[stage] = {"params": D.full_params(model, stage),
                      "state": [[safe_get_full_optimizer_state(p, k).reshape(p.ds_shape if stage == 3 else p.shape)
                                 for k in ("exp_avg", "exp_avg_sq", "mu")] for p in params]}
    return out


@scenario
def rounding_fsdp1(args, steps: int = 8):
    """FSDP1, FlatParameters and original parameters: the pieces' starts come from FSDP's shard
    metadata and from the ranks' piece sizes. The parameters after the run, whole: they follow
    m and v, so a draw taken at the wrong index shows in them."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    from tests.support import scenarios as S
    from tests.support.fsdp_cases import fsdp1_params
    from tests.support.helpers import batch, toy
    out = {}
    for orig in (False, True):
        model = FSDP(toy(S.DTYPE, dead=False), device_id=torch.device("cpu"), use_orig_params=orig)
        opt = shardgrok.GrokAdamW(model.parameters(), **DS_KW)
        for t in range(steps):
            model.zero_grad(set_to_none=True)
            x, y = batch(t, S.DTYPE)
            (((model(x) - y) ** 2).mean() * 20).backward()
            opt.step()
        out[orig] = {"params": fsdp1_params(model), "sharded": opt.is_sharded}
    return out
