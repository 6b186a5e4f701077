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
    """

    index: int
    layer: int
    group: int
    param: torch.Tensor
    grad: torch.Tensor
    state: dict


class Layout(Protocol):
    def segments(self, optimizer: torch.optim.Optimizer) -> list[Segment]:
        """Segments of every tensor that has a gradient this step."""

    def num_tensors(self, optimizer: torch.optim.Optimizer) -> int:
        """Number of parameter tensors in the whole (unsharded) model."""

    def post_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Make the updated parameters whole where the engine does not (ZeRO-1 all-gather)."""
