"""Training runs shared by the multi-rank workers (tests/support/dist_worker.py, under torchrun) and
the single-process oracle (tests/distributed/test_distributed.py): the same model, inputs and
schedule, so a sharded run can be compared with one process.

Every rank computes the same full-batch gradient (what DDP hands the optimizer), while the
grokking signals, losses and validation batches differ per rank and average to the
single-process values, so the tests also see that ranks' inputs are averaged.
"""
from __future__ import annotations

import copy
import glob
import os
import re

import torch

import shardgrok
from tests.support.helpers import backward, batch, toy, two_groups
from tests.support.oracle import NaiveGrokAdamW, NaiveSuperGrok

DTYPE = torch.float32
STEPS = 20
SPLIT = 10          # checkpoint after this many steps
KINDS = ("grokadamw", "supergrok")


def rank_offset(rank: int, world: int) -> float:
    """Zero-mean over ranks: each rank's input differs, their mean is the single-process one."""
    return rank - (world - 1) / 2


def default_groups(model):
    return two_groups(model, layer_index=3, lr=5e-3)


def one_group(model):
    return [{"params": list(model.parameters())}]


def make(kind: str, model, rank: int = 0, world: int = 1, shard: bool = False,
         groups=default_groups, **kw):
    groups = groups(model)
    common = dict(lr=1e-2, gradient_clipping=0.5, shard=shard, **kw)
    if kind == "grokadamw":
        clock = {"t": 0}
        opt = shardgrok.GrokAdamW(
            groups, grokking_signal_fn=lambda: 0.5 + 0.1 * clock["t"] + 0.3 * rank_offset(rank, world),
            **common)
        opt.test_clock = clock
        return opt
    torch.manual_seed(7)  # the meta-net's initial weights (sharded: rank 0's are broadcast)
    return shardgrok.SuperGrok(groups, warmup_steps=5, meta_hidden_dim=8, meta_lr=1e-2, **common)


def val_closure(model, rank: int, world: int):
    x, y = batch(99, dtype=next(model.parameters()).dtype, n=24)
    n = 24 // world
    x, y = x[rank * n:(rank + 1) * n], y[rank * n:(rank + 1) * n]
    return lambda: ((model(x) - y) ** 2).mean()


def train(kind: str, model, opt, steps, rank: int = 0, world: int = 1, meta: bool = True,
          backward_fn=backward, val=val_closure) -> list[dict]:
    """``steps`` steps of ``kind``'s schedule; ``backward_fn(model, t)`` makes the gradients
    and returns the loss, ``val(model, rank, world)`` the meta-step's validation closure."""
    record = []
    for t in steps:
        tl = backward_fn(model, t)
        if kind == "grokadamw":
            opt.test_clock["t"] = t
            opt.step()
        else:
            if meta and t % 3 == 0:
                # The same validation batch on every rank: averaging equal gradients is exact,
                # so the 20-step runs compare the optimizer alone. How ranks' different
                # validation batches are averaged is checked in float64 by meta_gradient().
                opt.meta_step(val(model, 0, 1))
            if t % 4 == 0:
                d = 0.01 * rank_offset(rank, world)
                opt.step(train_loss=tl + d, val_loss=(1.2 + 0.02 * t) * tl - d)
            else:
                opt.step()
        rep = opt.get_state_summary()
        record.append({k: rep.get(k) for k in ("backend", "last_clip_coefs", "gate_engaged", "alpha",
                                                "cached_alpha", "avg_mu_norm", "global_step")})
    return record


def params(model) -> list[torch.Tensor]:
    """The whole parameters (gathered from DTensor shards), by name, in model order."""
    out = {}
    for name, p in model.named_parameters():
        p = p.full_tensor() if hasattr(p, "full_tensor") else p
        out[name.replace("_fsdp_wrapped_module.", "")] = p.detach().clone()
    return list(out.values())


def run(kind: str, rank: int = 0, world: int = 1, shard: bool = False, *, wrap=None,
        dead: bool = True, meta: bool = True, backward_fn=backward, read=params, **kw) -> dict:
    """``wrap(model)`` returns the module to train (e.g. FSDP-wrapped) and ``read(module)`` its
    whole parameters."""
    model = toy(DTYPE, dead=dead)
    module = wrap(model) if wrap else model
    opt = make(kind, module, rank, world, shard, **kw)
    record = train(kind, module, opt, range(STEPS), rank, world, meta, backward_fn)
    return {"params": read(module), "record": record}


def bf16_backward(model, step):
    """The gradient of a bfloat16 model, computed in float64 from its exact values and rounded
    to bfloat16: the same bits in every process, whatever its thread count."""
    wide = copy.deepcopy(model).double()
    x, y = (v.double() for v in batch(step, DTYPE))
    loss = ((wide(x) - y) ** 2).mean() * 20
    loss.backward()
    for p, q in zip(model.parameters(), wide.parameters(), strict=True):
        p.grad = None if q.grad is None else q.grad.to(p.dtype)
    return loss.item()


def bf16_run(kind: str, rank: int = 0, world: int = 1, shard: bool = False, **kw) -> dict:
    """``run(kind, meta=False)`` with bfloat16 parameters (no fp32 master weights) and the default
    state dtype: the parameters, each step's record and the full state (gathered under ZeRO)."""
    model = toy(DTYPE).to(torch.bfloat16)
    opt = make(kind, model, rank, world, shard, **kw)
    record = train(kind, model, opt, range(STEPS), rank, world, False, bf16_backward)
    full = opt.full_state_dict(to=None)
    state = {i: {k: v for k, v in st.items() if k != "step"} for i, st in full["state"].items()}
    return {"params": params(model), "record": record, "state": state}


def naive_run(kind: str, *, dead: bool = True, groups=default_groups, signal: bool = True,
              dtype=torch.float64) -> dict:
    """``run(kind, meta=False)`` (or, ``signal=False``, a GrokAdamW without a signal function) by
    the independent oracle of tests/support/oracle.py in ``dtype``: the same fp32 initial weights,
    fp32 batches and meta-net, cast; the rank-averaged signal and losses of ``make``/``train``."""
    model = toy(DTYPE, dead=dead).to(dtype)
    common = dict(lr=1e-2, gradient_clipping=0.5)
    if kind == "grokadamw":
        opt = NaiveGrokAdamW(groups(model), **common)
    else:
        torch.manual_seed(7)  # make()'s seed for the default meta-net
        net = shardgrok.SimpleMetaNet(hidden_dim=8).to(dtype)
        opt = NaiveSuperGrok(groups(model), net, warmup_steps=5, **common)
    gates, clips = [], []
    for t in range(STEPS):
        # batch() draws different numbers per dtype: draw the runs' fp32 ones
        x, y = (v.to(dtype) for v in batch(t, DTYPE))
        model.zero_grad(set_to_none=True)
        loss = ((model(x) - y) ** 2).mean() * 20
        loss.backward()
        tl = loss.item()
        if kind == "grokadamw":
            opt.step(signal=0.5 + 0.1 * t if signal else None)
        else:
            opt.step(**(dict(train_loss=tl, val_loss=(1.2 + 0.02 * t) * tl) if t % 4 == 0 else {}))
            gates.append(list(opt.gates))
            clips.append(list(opt.clips))
    return {"params": [p.detach().clone() for p in model.parameters()], "gates": gates,
            "clips": clips}


# ---------------------------------------------------------------- checkpoints
def save_checkpoint(kind: str, directory: str, rank: int = 0, world: int = 1,
                    shard: bool = False) -> dict:
    """Train SPLIT steps; write this rank's shard, the gathered full state, rank 0's
    ``state_dict()`` after ``consolidate_state_dict()`` and the model."""
    model = toy(DTYPE)
    opt = make(kind, model, rank, world, shard)
    train(kind, model, opt, range(SPLIT), rank, world)
    os.makedirs(directory, exist_ok=True)
    if shard:
        torch.save(opt.state_dict(), os.path.join(directory, f"{kind}.w{world}.shard{rank}.pt"))
    full = opt.full_state_dict(to=0)
    if rank == 0:
        torch.save(full, os.path.join(directory, f"{kind}.w{world}.full.pt"))
        torch.save(model.state_dict(), os.path.join(directory, f"{kind}.w{world}.model.pt"))
    if shard:  # what a rank-0-only saver (HF Trainer) gets after consolidate_state_dict()
        opt.consolidate_state_dict(to=0)
        sd = opt.state_dict()
        if rank == 0:
            torch.save(sd, os.path.join(directory, f"{kind}.w{world}.consolidated.pt"))
        return {"shard_elsewhere": "sharding" in sd["param_groups"][0]["shardgrok"]}
    return {}


def _source(source: str) -> tuple[int, str]:
    """"w4full" -> (4, "full"): a checkpoint saved at world size 4, as a gathered full state
    ("full"), as every rank's shard ("shards") or as rank 0's ``state_dict()`` after
    ``consolidate_state_dict()`` ("consolidated")."""
    m = re.fullmatch(r"w(\d+)(full|shards|consolidated)", source)
    assert m, source
    return int(m.group(1)), m.group(2)


def load_optimizer_state(kind: str, directory: str, source: str):
    world, how = _source(source)
    if how == "shards":
        files = sorted(glob.glob(os.path.join(directory, f"{kind}.w{world}.shard*.pt")))
        return shardgrok.consolidate_state_dict([torch.load(f, weights_only=True) for f in files])
    return torch.load(os.path.join(directory, f"{kind}.w{world}.{how}.pt"), weights_only=True)


def resume(kind: str, directory: str, source: str, rank: int = 0, world: int = 1,
           shard: bool = False) -> dict:
    model = toy(DTYPE, seed=123)  # different weights: everything must come from the checkpoint
    src_world, _ = _source(source)
    model.load_state_dict(torch.load(os.path.join(directory, f"{kind}.w{src_world}.model.pt"),
                                     weights_only=True))
    opt = make(kind, model, rank, world, shard)
    opt.load_state_dict(load_optimizer_state(kind, directory, source))
    assert opt.get_global_step() == SPLIT
    record = train(kind, model, opt, range(SPLIT, STEPS), rank, world)
    return {"params": params(model), "record": record}


# ---------------------------------------------------------------- meta-gradient
def meta_gradient(rank: int = 0, world: int = 1, shard: bool = False, wrap=None) -> dict:
    model = toy(torch.float64)
    if wrap:
        model = wrap(model)
    torch.manual_seed(1)
    net = shardgrok.SimpleMetaNet(hidden_dim=6).double()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    opt = shardgrok.SuperGrok(two_groups(model, lr=0.2), lr=0.05, meta_net=net, meta_lr=3e-2,
                              shard=shard)
    backward(model, 0)
    loss = opt.meta_gradient(val_closure(model, rank, world))
    grads = [p.grad.clone() for p in net.parameters()]
    for _ in range(3):
        opt.meta_step(val_closure(model, rank, world))
    return {"loss": loss, "grads": grads, "net_after": [p.detach().clone() for p in net.parameters()]}
