from __future__ import annotations

import torch

from ..comm import LocalReducer
from .base import Segment


def tensor_layers(optimizer: torch.optim.Optimizer):
    """Yield ``(index, layer, group_index, group, param)`` in optimizer order.

    The index is the position among all groups' params; a group's ``layer_index`` (if set)
    overrides the layer for all its tensors.
    """
    i = 0
    for gi, group in enumerate(optimizer.param_groups):
        fixed = group.get("layer_index")
        for p in group["params"]:
            yield i, (i if fixed is None else fixed), gi, group, p
            i += 1


def check_grad(p: torch.Tensor, name: str) -> None:
    g = p.grad
    if g.is_sparse:
        raise RuntimeError(f"{name} does not support sparse gradients; use a dense gradient "
                           "(e.g. nn.Embedding(sparse=False))")
    if g.is_complex():
        raise RuntimeError(f"{name} does not support complex gradients; view complex parameters "
                           "as real with torch.view_as_real")
    if g.shape != p.shape:
        raise RuntimeError(f"{name}: gradient shape {tuple(g.shape)} does not match parameter "
                           f"shape {tuple(p.shape)}")


class LocalLayout:
    """Every tensor whole on this process: the single-process path and the oracle."""

    sharded = False

    def __init__(self, reducer=None):
        self.reducer = reducer or LocalReducer()

    def add_group(self, optimizer, group_index: int) -> None:
        pass

    def verify(self, optimizer, groups: range | None = None) -> None:
        pass

    def state_like(self, p: torch.Tensor) -> torch.Tensor:
        return p

    def span(self, p: torch.Tensor) -> tuple[int, int]:
        return 0, p.numel()

    def segments(self, optimizer) -> list[Segment]:
        name = type(optimizer).__name__
        segs = []
        for i, layer, gi, _, p in tensor_layers(optimizer):
            if p.grad is None:
                continue
            check_grad(p, name)
            segs.append(Segment(i, layer, gi, p, p.grad, optimizer.state[p], p))
        return segs

    def num_tensors(self, optimizer) -> int:
        return sum(len(g["params"]) for g in optimizer.param_groups)

    def post_step(self, optimizer) -> None:
        pass

    def grad_tensors(self, optimizer) -> list[torch.Tensor]:
        return [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
