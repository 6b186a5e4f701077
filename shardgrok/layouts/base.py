from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol

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
    """

    index: int
    layer: int
    group: int
    param: torch.Tensor
    grad: torch.Tensor | None
    state: dict
    tensor: torch.Tensor
    take: Callable[[torch.Tensor], torch.Tensor]


class Layout(Protocol):
    sharded: bool
    reducer: Any
    engine: Any  # the engine object that drives the optimizer, if any (DeepSpeed)

    def groups(self, optimizer: torch.optim.Optimizer) -> list[dict]:
        """All param groups (an engine may show the optimizer only some of them per call)."""

    def new_round(self, optimizer: torch.optim.Optimizer) -> bool:
        """Whether this step() call begins a new optimizer step (False for an engine's second
        and later per-group calls of the same step)."""

    def add_group(self, optimizer: torch.optim.Optimizer, group_index: int) -> None:
        """Place a newly added param group's tensors (before their state is created)."""

    def verify(self, optimizer: torch.optim.Optimizer, groups: range | None = None) -> None:
        """Collective check that every rank holds the same groups (all, or those in ``groups``);
        raises ValueError on every rank when they differ."""

    def state_like(self, p: torch.Tensor) -> torch.Tensor:
        """What m, v, mu of optimizer parameter ``p`` are ``zeros_like``."""

    def tensors(self, optimizer: torch.optim.Optimizer) -> list[TensorRef]:
        """Every original tensor, in global index order."""

    def pieces(self, optimizer: torch.optim.Optimizer, with_grad: bool = True) -> list[Segment]:
        """This rank's pieces of the tensors (only those with a gradient, checked, when
        ``with_grad``)."""

    def post_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Make the updated parameters whole where the engine does not (ZeRO-1 all-gather)."""

    def validation_grads(self, optimizer, val_closure) -> tuple[torch.Tensor, Any]:
        """Run ``val_closure`` and compute its gradient w.r.t. the parameters (meta-step)."""

    def finish_validation_grads(self, optimizer, raw: Any, segs: list[Segment]) -> list[torch.Tensor]:
        """The rank-averaged validation gradient, cut to each segment."""

    def export_state(self, optimizer, sd: dict, extra: dict) -> None:
        """Adjust a ``state_dict()`` for this layout (e.g. record the sharding)."""

    def import_state(self, optimizer, sd: dict, extra: dict) -> dict:
        """Check (and cut to this rank) a state dict before torch.optim loads it."""

    def full_state(self, optimizer, sd: dict, to: int | None) -> dict | None:
        """The world-size-independent state (collective where sharded)."""


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
