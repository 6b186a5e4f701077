"""The one reduction of a step: per-tensor partial sums plus the scalar inputs, summed over the
shard group. On a single process it is the identity."""
from __future__ import annotations

import torch


class LocalReducer:
    world_size = 1

    def all_reduce_(self, buf: torch.Tensor) -> torch.Tensor:
        return buf

    def all_reduce_grads_(self, module: torch.nn.Module) -> None:
        """Sum a module's gradients over the group (the meta-net's meta-gradient)."""
