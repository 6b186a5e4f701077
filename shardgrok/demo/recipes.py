"""Optimizers by name with keyword overrides, shared by the demo and benchmarks/grokking.py.

A spec is ``"name"`` or ``"name:key=value,key=value"`` (Python literals), for example
``"grokadamw:gamma=0,gradient_clipping=0,weight_decay=1.0"``. Every name takes ``lr``, ``betas``
and ``weight_decay`` (defaults from the run's :class:`~shardgrok.demo.task.DemoConfig`); the
other keywords go to the optimizer, except those the loop reads itself (:data:`LOOP_KEYS`):

    adamw            torch.optim.AdamW (decoupled weight decay); max_grad_norm=C clips the
                     gradients' global norm to C before the step (torch.nn.utils.clip_grad_norm_)
    adam             torch.optim.Adam (weight decay coupled into the gradient, as in Grokfast)
    adam+ema         adam with shardgrok.gradfilter_ema (alpha=0.98, lamb=2.0 unless given)
    adamw+ema        adamw with shardgrok.gradfilter_ema (alpha, lamb as adam+ema; max_grad_norm
                     as adamw, applied to the filtered gradient): GrokAdamW's ingredients
                     without its clipping, layer-wise beta1 or signal
    grokadamw        shardgrok.GrokAdamW at its own defaults; layer_groups=True gives one param
                     group per transformer layer (layer_index) instead of one per tensor;
                     signal=True passes (val - train) / train as the grokking signal
    supergrok        shardgrok.SuperGrok at its own defaults (the loop passes both losses at
                     each evaluation, the training loss every step); layer_groups as above
    supergrok+meta   supergrok with meta_step on a validation batch every meta_every steps
                     (default 100)

A bare name is the optimizer at its own defaults (the seeds'), not the recommended settings:
those are :data:`RECOMMENDED`, the specs of :func:`shardgrok.recommended` (docs/grokking.md).
"""
from __future__ import annotations

import ast
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from ..gradfilters import gradfilter_ema
from ..optim import GrokAdamW, SuperGrok

NAMES = ("adamw", "adam", "adam+ema", "adamw+ema", "grokadamw", "supergrok", "supergrok+meta")
# keywords the loop reads itself; the rest go to the optimizer
LOOP_KEYS = {"adamw": ("max_grad_norm",), "adam+ema": ("alpha", "lamb"),
             "adamw+ema": ("alpha", "lamb", "max_grad_norm"), "grokadamw": ("layer_groups", "signal"),
             "supergrok": ("layer_groups",), "supergrok+meta": ("layer_groups", "meta_every")}



def spec_of(name: str, kwargs: dict[str, Any]) -> str:
    """The spec of optimizer ``name`` with these keyword arguments (Python literals, no
    spaces): ``spec_of("adamw", {"lr": 1e-3})`` is ``"adamw:lr=0.001"``."""
    def lit(v):
        return f"({','.join(map(lit, v))})" if isinstance(v, tuple) else repr(v)
    return f"{name}:{','.join(f'{k}={lit(v)}' for k, v in kwargs.items())}" if kwargs else name


def _recommended() -> dict[str, str]:
    from ..recommended import recommended, recommended_meta_schedule
    out = {n: spec_of(n, recommended(n)) for n in ("adamw", "grokadamw", "supergrok")}
    out["supergrok+meta"] = spec_of("supergrok+meta", {
        **recommended("supergrok"), "meta_every": recommended_meta_schedule()["every"]})
    return out


# The study's recommended settings (shardgrok.recommended, task "modular-arithmetic") as specs;
# supergrok+meta adds the recommended meta-step schedule. The demo trains the first three.
RECOMMENDED = _recommended()


@dataclass
class Recipe:
    """How a run builds its optimizer and what it adds to the plain loop
    (:func:`recipe_for` makes one from a spec).

    ``make_opt(model, signal)`` returns the optimizer (``signal()`` is the latest
    ``(val - train) / train``, or None).
    ``after_backward(model)`` runs between backward and the step (a gradient filter).
    ``meta_every``: a SuperGrok ``meta_step`` on a validation batch every N steps (0: never).
    """

    make_opt: Callable[[nn.Module, Callable[[], Any]], Any]
    after_backward: Callable[[nn.Module], None] | None = None
    meta_every: int = 0


def layer_param_groups(model: nn.Module) -> list[dict[str, Any]]:
    """Param groups with ``layer_index``: embeddings 0, block i at i + 1, final LN + head last.

    GrokAdamW and SuperGrok decay beta1 per layer, ``beta1 * (1 - gamma)^l``; without groups
    ``l`` is the tensor's position (30 tensors here: beta1 ~0.05 for the head).
    """
    groups = [{"params": [model.tok.weight, model.pos.weight], "layer_index": 0}]
    for i, block in enumerate(model.blocks):
        groups.append({"params": list(block.parameters()), "layer_index": i + 1})
    groups.append({"params": [*model.ln_f.parameters(), *model.head.parameters()],
                   "layer_index": len(model.blocks) + 1})
    return groups


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``"name"`` or ``"name:key=value,key=value"`` -> (name, overrides). Raises ValueError
    naming what is wrong."""
    name, _, rest = spec.partition(":")
    name = name.strip()
    if name not in NAMES:
        raise ValueError(f"optimizer spec {spec!r}: unknown optimizer {name!r}; choose from "
                         f"{', '.join(NAMES)}")
    if not rest.strip():
        return name, {}
    try:
        call = ast.parse(f"f({rest})", mode="eval").body
    except SyntaxError:
        raise ValueError(f"optimizer spec {spec!r}: the overrides must read key=value,key=value "
                         "with Python literal values") from None
    if call.args or any(k.arg is None for k in call.keywords):
        raise ValueError(f"optimizer spec {spec!r}: every override must be key=value")
    out = {}
    for k in call.keywords:
        try:
            out[k.arg] = ast.literal_eval(k.value)
        except ValueError:
            raise ValueError(f"optimizer spec {spec!r}: the value of {k.arg} is not a Python "
                             f"literal ({ast.unparse(k.value)})") from None
    return name, out


def recipe_for(spec: str, cfg):
    """The training loop's :class:`Recipe` for one spec.

    In a job with more than one rank AdamW is torch's ZeroRedundancyOptimizer over AdamW, so its
    state is sharded like GrokAdamW's and SuperGrok's (which shard by themselves)."""

    name, overrides = parse_spec(spec)
    kw = dict(overrides)
    own = {k: kw.pop(k) for k in LOOP_KEYS.get(name, ()) if k in kw}
    common = dict(lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    common.update({k: kw.pop(k) for k in ("lr", "betas", "weight_decay") if k in kw})

    def params(model):
        return layer_param_groups(model) if own.get("layer_groups") else model.parameters()

    def torch_opt(cls, model):
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            from torch.distributed.optim import ZeroRedundancyOptimizer
            return ZeroRedundancyOptimizer(model.parameters(), optimizer_class=cls, **common, **kw)
        return cls(model.parameters(), **common, **kw)

    clip = own.get("max_grad_norm")
    if clip is not None and not (isinstance(clip, (int, float)) and clip > 0):
        raise ValueError(f"optimizer spec {spec!r}: max_grad_norm must be a number > 0, got "
                         f"{clip!r}")

    def clipped(model):
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)

    if name in ("adamw", "adam"):
        cls = torch.optim.AdamW if name == "adamw" else torch.optim.Adam
        return Recipe(make_opt=lambda m, s: torch_opt(cls, m),
                      after_backward=clipped if clip is not None else None)
    if name in ("adam+ema", "adamw+ema"):
        cls = torch.optim.AdamW if name == "adamw+ema" else torch.optim.Adam
        state: dict = {}
        alpha, lamb = own.get("alpha", 0.98), own.get("lamb", 2.0)

        def ema(model):
            gradfilter_ema(model, state, alpha=alpha, lamb=lamb)
            if clip is not None:
                clipped(model)
        return Recipe(make_opt=lambda m, s: torch_opt(cls, m), after_backward=ema)
    if name == "grokadamw":
        def make(m, s):
            return GrokAdamW(params(m), grokking_signal_fn=s if own.get("signal") else None,
                                       **common, **kw)
        return Recipe(make_opt=make)
    meta_every = int(own.get("meta_every", 100)) if name == "supergrok+meta" else 0
    return Recipe(make_opt=lambda m, s: SuperGrok(params(m), **common, **kw),
                  meta_every=meta_every)
