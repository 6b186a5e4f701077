"""Whole tensors on this process (:class:`LocalLayout`, the single-process path and the oracle),
what the per-tensor layouts share, and the meta-step's validation gradients by autograd."""
from __future__ import annotations

import torch

from ..checkpoint import check_full_state
from ..comm import LocalReducer
from .base import Layout, Segment, TensorRef


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


def whole(x: torch.Tensor) -> torch.Tensor:
    return x


class PerTensorLayout(Layout):
    """Shared by the layouts where each optimizer parameter is one original tensor."""

    def tensors(self, optimizer) -> list[TensorRef]:
        return [TensorRef(i, layer, gi, p) for i, layer, gi, _, p in tensor_layers(optimizer)]

    def _with_grad(self, optimizer, with_grad: bool):
        name = type(optimizer).__name__
        for ref in self.tensors(optimizer):
            p = ref.param
            if with_grad:
                if p.grad is None:
                    continue
                check_grad(p, name)
            yield ref, p


class LocalLayout(PerTensorLayout):
    """Every tensor whole on this process: the single-process path and the oracle."""

    sharded = False
    takes_int8 = True

    def __init__(self, reducer=None):
        self.reducer = reducer or LocalReducer()

    def pieces(self, optimizer, with_grad: bool = True) -> list[Segment]:
        return [Segment(ref.index, ref.layer, ref.group, p, p.grad, optimizer.state[p], p, whole, 0)
                for ref, p in self._with_grad(optimizer, with_grad)]

    # ------------------------------------------------------------------ meta-step
    def validation_grads(self, optimizer, val_closure):
        tensors = [p for p in self.meta_params(optimizer) if p.grad is not None]
        return autograd_validation_grads(tensors, val_closure)

    def finish_validation_grads(self, optimizer, raw, segs):
        return averaged_validation_grads(self.reducer, raw, segs)

    # ------------------------------------------------------------------ checkpoints
    def import_state(self, optimizer, sd, extra) -> dict:
        if extra.get("sharding") is not None:
            s = extra["sharding"]
            raise ValueError(
                f"state_dict is rank {s['rank']}'s shard of a checkpoint saved at world size "
                f"{s['world_size']} and this optimizer is not sharded; merge all ranks' shards "
                "with shardgrok.consolidate_state_dict(shards) and load the result")
        check_full_state(sd, [ref.param for ref in self.tensors(optimizer)])
        return sd


def autograd_validation_grads(tensors, val_closure):
    """``val_closure()`` and its gradient w.r.t. ``tensors`` by ``torch.autograd.grad``
    (``p.grad`` is not touched). No collective."""
    with torch.enable_grad():
        val_loss = val_closure()
        check_val_loss(val_loss)
        vs = torch.autograd.grad(val_loss, tensors, allow_unused=True)
    vs = [torch.zeros_like(t) if v is None else v for t, v in zip(tensors, vs)]
    return val_loss, (tensors, vs)


def averaged_validation_grads(reducer, raw, segs) -> list[torch.Tensor]:
    """``autograd_validation_grads``' gradients averaged over the ranks (the objective is the
    mean of the ranks' validation losses), cut to each segment."""
    tensors, vs = raw
    reducer.mean_(vs)
    v_of = {id(t): v for t, v in zip(tensors, vs)}
    return [s.take(v_of[id(s.tensor)]) for s in segs]


def check_val_loss(val_loss) -> None:
    if not isinstance(val_loss, torch.Tensor) or not val_loss.requires_grad:
        raise TypeError("val_closure must return the validation loss as a tensor that requires "
                        "grad (do not call backward or .item() on it)")
