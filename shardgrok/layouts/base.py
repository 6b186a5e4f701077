from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass
class Segment:
    """One local piece of one parameter tensor.

    ``index`` is the tensor's global position in optimizer order (all groups, construction
    order), identical on every rank; ``layer`` is its layer index for the layer-wise beta1;
    ``group`` the index of its param group. ``param``/``grad`` and the tensors in ``state`` are
    the local storage this rank owns for that tensor (the whole tensor on one process).
    ``tensor`` is the parameter object the piece lives in and ``span`` the piece's range of
    ``tensor.view(-1)`` (None: the whole tensor).
    """

    index: int
    layer: int
    group: int
    param: torch.Tensor
    grad: torch.Tensor
    state: dict
    tensor: torch.Tensor
    span: tuple[int, int] | None = None

    def local(self, full: torch.Tensor) -> torch.Tensor:
        """This segment's piece of a tensor shaped like the whole parameter (e.g. a gradient)."""
        return full if self.span is None else full.reshape(-1)[self.span[0]:self.span[1]]


class Layout(Protocol):
    def add_group(self, optimizer: torch.optim.Optimizer, group_index: int) -> None:
        """Place a newly added param group's tensors (before their state is created)."""

    def verify(self, optimizer: torch.optim.Optimizer, groups: range | None = None) -> None:
        """Collective check that every rank holds the same groups (all, or those in ``groups``);
        raises ValueError on every rank when they differ."""

    def state_like(self, p: torch.Tensor) -> torch.Tensor:
        """The local storage this rank keeps optimizer state for (m, v, mu are zeros_like it)."""

    def span(self, p: torch.Tensor) -> tuple[int, int]:
        """The range of ``p.view(-1)`` this rank owns."""

    def segments(self, optimizer: torch.optim.Optimizer) -> list[Segment]:
        """Segments of every tensor that has a gradient this step."""

    def num_tensors(self, optimizer: torch.optim.Optimizer) -> int:
        """Number of parameter tensors in the whole (unsharded) model."""

    def post_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Make the updated parameters whole where the engine does not (ZeRO-1 all-gather)."""

    def grad_tensors(self, optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
        """Every parameter object with a gradient, in optimizer order (the look-ahead's leaves)."""
