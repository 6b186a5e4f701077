"""The layout seam: :class:`Layout` (every method the optimizer, the step driver, the kernel plan
and the meta-step call on a layout), and the records it hands out, :class:`TensorRef` and
:class:`Segment`."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch


@dataclass(frozen=True)
class TensorRef:
    """One original parameter tensor of the model: its global index (optimizer order, the same
    on every rank), layer index, param group, and the optimizer parameter whose state holds it
    (the tensor itself, or an FSDP1 FlatParameter holding several)."""

    index: int
    layer: int
    group: int
    param: torch.Tensor


@dataclass
class Segment:
    """One local piece of one original tensor.

    ``param``/``grad`` and the tensors in ``state`` are the local storage this rank owns for
    that tensor (the whole tensor on one process), ``state["step"]`` the step counter of the
    optimizer parameter. ``tensor`` is the optimizer parameter the piece lives in, and
    ``take(x)`` cuts this piece out of a tensor laid out like ``tensor`` (e.g. a gradient).
    ``start`` is the index of the piece's first element in the whole original tensor (flat,
    row-major): the counter of stochastic rounding's draws, the same whatever the sharding.
    """

    index: int
    layer: int
    group: int
    param: torch.Tensor
    grad: torch.Tensor | None
    state: dict
    tensor: torch.Tensor
    take: Callable[[torch.Tensor], torch.Tensor]
    start: int


class Layout:
    """How one optimizer's tensors are split across ranks: the only code that knows it.

    A layout turns the optimizer's param groups into :class:`Segment` records (this rank's local
    views, each tagged with the global tensor it belongs to), says what the per-tensor sums are
    reduced over (``reducer``), and puts the parameters back together after the update where no
    engine does. It never does math. Every method callers use is here, with the default that
    holds for a layout whose tensors are whole on this process; each layout overrides what
    differs.

    A layout reads these members of the optimizer: ``param_groups``, ``state``,
    ``given_params`` (the parameters per group as the optimizer was built with them),
    ``all_param_groups`` (every group, where an engine shows only some per call) and
    ``state_dtype_for(p)``.
    """

    #: whether m, v and mu are split over the ranks of ``reducer``'s group
    sharded: bool = False
    #: the reduction of the step's per-tensor sums (:mod:`shardgrok.comm`)
    reducer: Any = None
    #: the engine object driving the optimizer, when one swaps its parameters (DeepSpeed)
    engine: Any = None
    #: the engine clips the gradients itself, before the optimizer sees them (DeepSpeed)
    engine_clips: bool = False
    #: a meta-step view that puts back the storage its look-ahead wrote (:meth:`restore`), so
    #: the meta-step need not save the parameters itself
    restores_itself: bool = False

    # ------------------------------------------------------------------ placement
    def groups(self, optimizer) -> list[dict]:
        """All param groups (an engine may show the optimizer only some of them per call)."""
        return optimizer.param_groups

    def add_group(self, optimizer, group_index: int) -> None:
        """Place a newly added param group's tensors (before their state is created)."""

    def verify(self, optimizer, groups: range | None = None) -> None:
        """Collective check that every rank holds the same groups (all, or those in ``groups``);
        raises ValueError on every rank when they differ."""

    def state_like(self, p: torch.Tensor) -> torch.Tensor:
        """What m, v, mu of optimizer parameter ``p`` are ``zeros_like``."""
        return p

    def state_start(self, p: torch.Tensor) -> int:
        """Where ``state_like(p)`` starts in ``p``'s elements: the first block of its 8-bit
        state's scales (blocks lie along the whole tensor's element index)."""
        return 0

    def state_pieces(self, p: torch.Tensor) -> list[tuple[int, int, int]]:
        """The pieces of original tensors in ``state_like(p)``: ``(begin, end, start)``, a range
        of its flat elements and where that range starts in its tensor. 8-bit state keeps the
        scales of each piece's blocks, piece after piece (one piece: the whole local state)."""
        from ..placement import local_tensor
        return [(0, local_tensor(self.state_like(p)).numel(), self.state_start(p))]

    #: whether this layout keeps 8-bit state
    takes_int8 = False

    # ------------------------------------------------------------------ the step
    def new_round(self, optimizer) -> bool:
        """Whether this step() call begins a new optimizer step (False for an engine's second
        and later per-group calls of the same step)."""
        return True

    def tensors(self, optimizer) -> list[TensorRef]:
        """Every original tensor, in global index order."""
        raise NotImplementedError

    def pieces(self, optimizer, with_grad: bool = True) -> list[Segment]:
        """This rank's pieces of the tensors (only those with a gradient, checked, when
        ``with_grad``)."""
        raise NotImplementedError

    def plan_pieces(self, optimizer) -> list[Segment]:
        """The pieces the kernel's cached plan covers: every local piece this call steps, with
        or without a gradient now."""
        return self.pieces(optimizer, with_grad=False)

    def plan_key(self, optimizer) -> tuple:
        """What, beyond the param groups and the state, the plan depends on."""
        return ()

    def clip_coefficient(self):
        """Where ``engine_clips``: the coefficient the engine applied this step (a float, or a
        0-dim tensor the engine keeps on the device)."""
        return 1.0

    def post_step(self, optimizer) -> None:
        """Make the updated parameters whole where the engine does not (ZeRO-1 all-gather)."""

    # ------------------------------------------------------------------ meta-step
    def meta_view(self, optimizer) -> "Layout":
        """What SuperGrok's meta-step works on: the layout itself, or a view of the whole model
        where the step's pieces do not hold the training gradients yet (DeepSpeed ZeRO)."""
        return self

    def meta_params(self, optimizer) -> list[torch.Tensor]:
        """The parameters the meta-step's look-ahead moves and restores."""
        return [p for g in optimizer.param_groups for p in g["params"]]

    def validation_grads(self, optimizer, val_closure) -> tuple[torch.Tensor, Any]:
        """Run ``val_closure`` and compute its gradient w.r.t. the parameters (meta-step)."""
        raise NotImplementedError

    def finish_validation_grads(self, optimizer, raw: Any, segs: list[Segment]) -> list[torch.Tensor]:
        """The rank-averaged validation gradient, cut to each segment."""
        raise NotImplementedError

    def restore(self, optimizer) -> None:
        """Put back the storage the look-ahead wrote outside the meta parameters."""

    # ------------------------------------------------------------------ checkpoints
    def export_state(self, optimizer, sd: dict, extra: dict) -> None:
        """Adjust a ``state_dict()`` for this layout (e.g. record the sharding)."""

    def import_state(self, optimizer, sd: dict, extra: dict) -> dict:
        """Check (and cut to this rank) a state dict before torch.optim loads it."""
        return sd

    def full_state(self, optimizer, sd: dict, to: int | None) -> dict | None:
        """The world-size-independent state (collective where sharded)."""
        return sd


def verify_same_on_every_rank(reducer, optimizer, groups: range | None,
                              describe: Callable[[int, list], list]) -> None:
    """Collective: every rank must hold the same param groups, as ``describe(group_index,
    params)`` sees them (count, shapes, dtypes); raises ValueError on every rank otherwise."""
    name = type(optimizer).__name__
    groups = groups if groups is not None else range(len(optimizer.param_groups))
    mine = [describe(gi, optimizer.param_groups[gi]["params"]) for gi in groups]
    everyone = reducer.all_gather_object(mine)
    bad = [r for r, d in enumerate(everyone) if d != everyone[0]]
    if bad:
        def show(d):
            flat = [t for g in d for t in g]
            items = ", ".join(":".join(str(x).replace("torch.", "") for x in t[1:])
                              for t in flat[:6])
            return (f"{len(d)} group(s), {len(flat)} tensors "
                    f"[{items}{', ...' if len(flat) > 6 else ''}]")
        lines = "; ".join(f"rank {r}: {show(everyone[r])}" for r in [0, *bad[:3]])
        raise ValueError(f"{name}: the parameters differ between ranks ({lines}). When "
                         "sharding, every rank must pass the same parameters (same count, "
                         "shapes and dtypes, in the same order and groups)")
