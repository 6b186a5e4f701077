"""Which layout an optimizer's parameters get, and when to switch: the one place that looks at
what drives the optimizer.

At construction (:func:`select_layout`), from the first param group's tensors:

| parameters                                   | layout          | who makes them whole |
|----------------------------------------------|-----------------|----------------------|
| plain tensors, one process or ``shard=False`` | LocalLayout     | (already whole)      |
| plain tensors in a torchrun/DDP job           | ZeroLayout      | our all-gather       |
| DTensors (FSDP2 ``fully_shard``, HSDP)        | FSDP2Layout     | FSDP2                |
| FlatParameters / FSDP1 original params        | FSDP1Layout     | FSDP1                |

Later (:class:`EngineWatch`, asked at every step, ``state_dict``, ``load_state_dict`` and
meta-step), an engine that took the optimizer over after it was built:

- DeepSpeed ZeRO 1-3 replaced the parameters by flat fp32 partitions: :class:`DeepSpeedLayout`;
- accelerate's FSDP2 plugin put the DTensor parameters it sharded into the groups one for one:
  the FSDP2 layout over them;
- a DeepSpeed engine without ZeRO drives a ZeRO-1-sharded optimizer: it checkpoints the
  optimizer as one replicated object, so the state stops being sharded (the ranks' losses and
  signals are still averaged).

Each switch happens before the first step, with fresh state; after a step it is an error.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from ..comm import LocalReducer, ReplicatedReducer, default_reducer
from ..placement import is_dtensor
from .base import Layout
from .fsdp import FSDP1Layout, FSDP2Layout, is_fsdp1
from .local import LocalLayout
from .zero import ZeroLayout


def select_layout(params, shard: bool | None, process_group) -> Layout:
    """The layout for an optimizer whose first param group holds ``params``."""
    params = list(params)
    engine_sharded = [p for p in params if is_dtensor(p) or is_fsdp1(p)]
    if engine_sharded:
        if shard is False:
            raise ValueError("shard=False cannot apply to FSDP-sharded parameters (they are "
                             "already split across ranks); drop shard=False")
        if is_dtensor(engine_sharded[0]):
            return FSDP2Layout(engine_sharded[0], process_group)
        return FSDP1Layout(process_group)
    reducer = default_reducer(process_group, shard)
    if isinstance(reducer, LocalReducer):
        return LocalLayout(reducer)
    return ZeroLayout(reducer)


def on_build(optimizer) -> None:
    """At construction: let DeepSpeed's ZeRO accept this optimizer's type, however DeepSpeed
    gets it (a config entry or a built optimizer), when DeepSpeed is imported."""
    if "deepspeed" in sys.modules:
        from .deepspeed import accept_in_zero
        accept_in_zero(type(optimizer))


@dataclass
class LayoutSwitch:
    """A new layout for the optimizer, before its first step: ``params`` the parameters per
    group it now steps when they changed (placed by the layout's ``add_group``), ``owners`` the
    tensors that get fresh state (the parameters, or DeepSpeed's flat partitions)."""

    layout: Layout
    owners: list[torch.Tensor]
    params: list[list[torch.Tensor]] | None = None
    #: why a switch after a step is refused (``{name}``: the optimizer's class)
    too_late: str = "{name} took steps before its engine took it over"


class EngineWatch:
    """Notices an engine taking the optimizer over (the table in this module's docstring).
    The full check is per tensor: it runs only when a group's list looks different from the
    last one that passed (an engine puts new lists in; ZeRO 3 empties them between its
    steps). The search for a driving DeepSpeed engine is settled by the first step."""

    def __init__(self, optimizer):
        self.forget(optimizer)

    def forget(self, optimizer) -> None:
        """Start again from the optimizer's given parameters (built, adopted or unpickled)."""
        self._own = {id(p) for ps in optimizer.given_params for p in ps}
        self._groups_key = None  # groups_key() when the groups last held our own tensors
        self._engine_checked = False

    def check(self, optimizer, layout: Layout, stepping: bool = False) -> LayoutSwitch | None:
        """The switch ``optimizer`` (now on ``layout``) must make, or None; ``stepping``: a
        step() call (which settles the search for a DeepSpeed engine)."""
        if layout.engine is not None:
            return None
        seen = groups_key(optimizer)
        if seen != self._groups_key:
            current = [p for g in optimizer.param_groups for p in g["params"]]
            if len(current) != len(self._own) or not all(id(p) in self._own for p in current):
                return self._replaced(optimizer)
            self._groups_key = seen
        if self._engine_checked or "deepspeed" not in sys.modules or not layout.sharded:
            return None
        from .deepspeed import engine_driving
        if engine_driving(optimizer) is not None:
            self._engine_checked = True
            return LayoutSwitch(LocalLayout(ReplicatedReducer(layout.reducer.group)),
                                owners=[p for ps in optimizer.given_params for p in ps])
        if stepping:
            self._engine_checked = True
        return None

    def _replaced(self, optimizer) -> LayoutSwitch:
        groups = [g["params"] for g in optimizer.param_groups]
        # accelerate's FSDP2 path (``fsdp2_switch_optimizer_parameters``): DTensors one for one
        if (all(ps and all(is_dtensor(p) for p in ps) for ps in groups)
                and [len(ps) for ps in groups] == [len(ps) for ps in optimizer.given_params]):
            params = [list(ps) for ps in groups]
            return LayoutSwitch(select_layout(params[0], *optimizer.shard_args),
                                owners=[p for ps in params for p in ps], params=params,
                                too_late="{name}'s parameters were replaced by sharded ones "
                                         "after it took steps; shard the model before training")
        from .deepspeed import layout_for
        layout = layout_for(optimizer)
        return LayoutSwitch(layout, owners=list(layout.flats))


def groups_key(optimizer) -> tuple:
    """What identifies the param groups' lists, cheaply: per group the list object, its length
    and its first and last tensor (a list edited in place elsewhere goes unseen)."""
    return tuple((id(ps), len(ps), id(ps[0]) if ps else 0, id(ps[-1]) if ps else 0)
                 for ps in (g["params"] for g in optimizer.param_groups))
