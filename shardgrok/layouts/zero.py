"""ZeRO-1 over replicated parameters (a torchrun / DDP job): each rank owns an even share of
every param group's flattened parameters and keeps m, v and mu only for that share.

Placement. A bucket is one param group's tensors of one (dtype, device), flattened in optimizer
order into ``T`` elements; with ``N`` ranks the share is ``S = ceil(T / N)`` and rank ``r`` owns
elements ``[r*S, min((r+1)*S, T))``. A tensor may straddle shares; each owner gets a segment
for its part. Buckets are per group so ``add_param_group`` never moves existing state, and per
dtype so the parameter all-gather moves one dtype per buffer. State per rank is at most
``ceil(T / N)`` elements per bucket: total / N plus less than one element per rank of padding.

After the update, one all-gather per (dtype, device) makes every rank's parameters whole again:
each rank sends its shares of all buckets of that key back to back, padded to ``S``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..checkpoint import STATE_KEYS, check_full_state
from .base import Segment, verify_same_on_every_rank
from .local import LocalLayout


@dataclass
class _Bucket:
    group: int
    key: tuple[torch.dtype, torch.device]
    params: list[torch.Tensor] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    total: int = 0
    share: int = 0


def _describe(group_index: int, params: list[torch.Tensor]) -> list[tuple]:
    return [(group_index, tuple(p.shape), str(p.dtype)) for p in params]


class ZeroLayout(LocalLayout):
    """ZeRO-1 shares of replicated parameters; the meta-step's validation gradients are
    computed like one process's and averaged over the group (LocalLayout's)."""

    sharded = True

    def __init__(self, reducer):
        super().__init__(reducer)
        self.world_size = reducer.world_size
        self.rank = reducer.rank
        self._buckets: list[_Bucket] = []
        self._spans: dict[torch.Tensor, tuple[int, int] | None] = {}

    # ------------------------------------------------------------------ placement
    def add_group(self, optimizer, group_index: int) -> None:
        params = optimizer.param_groups[group_index]["params"]
        name = type(optimizer).__name__
        for j, p in enumerate(params):
            if not p.is_contiguous():
                raise ValueError(f"{name} with shard=True needs contiguous parameters; param "
                                 f"{j} of group {group_index} (shape {tuple(p.shape)}) is not. "
                                 "Make it contiguous before building the optimizer, or pass "
                                 "shard=False")
        buckets: dict[tuple, _Bucket] = {}
        for p in params:
            key = (p.dtype, p.device)
            b = buckets.setdefault(key, _Bucket(group_index, key))
            b.params.append(p)
            b.offsets.append(b.total)
            b.total += p.numel()
        n, r = self.world_size, self.rank
        for b in buckets.values():
            b.share = -(-b.total // n)
            lo, hi = r * b.share, min((r + 1) * b.share, b.total)
            for p, off in zip(b.params, b.offsets):
                if p.numel():
                    a, e = max(lo - off, 0), min(hi - off, p.numel())
                    self._spans[p] = (a, e) if a < e else None
                else:  # an empty tensor belongs to the rank whose share holds its offset
                    owner = min(off // b.share, n - 1) if b.share else 0
                    self._spans[p] = (0, 0) if owner == r else None
            self._buckets.append(b)

    def verify(self, optimizer, groups: range | None = None) -> None:
        verify_same_on_every_rank(self.reducer, optimizer, groups, _describe)

    def owns(self, p: torch.Tensor) -> bool:
        return self._spans[p] is not None

    def span(self, p: torch.Tensor) -> tuple[int, int]:
        return self._spans[p] or (0, 0)

    def state_like(self, p: torch.Tensor) -> torch.Tensor:
        a, e = self.span(p)
        return p.detach().view(-1)[a:e]

    # ------------------------------------------------------------------ the step
    def pieces(self, optimizer, with_grad: bool = True) -> list[Segment]:
        segs = []
        for ref, p in self._with_grad(optimizer, with_grad):
            if not self.owns(p):
                continue
            a, e = self.span(p)
            grad = None if p.grad is None else p.grad.reshape(-1)[a:e]
            segs.append(Segment(ref.index, ref.layer, ref.group, p.detach().view(-1)[a:e], grad,
                                optimizer.state[p], p, lambda x, a=a, e=e: x.reshape(-1)[a:e]))
        return segs

    @torch.no_grad()
    def gather(self, local_of) -> dict[torch.Tensor, torch.Tensor]:
        """Whole flat tensors from every rank's part: ``local_of(p)`` is this rank's part of
        (something shaped like) parameter ``p``; returns ``{p: flat whole}`` on every rank, with
        one all-gather per (dtype, device)."""
        by_key: dict[tuple, list[_Bucket]] = {}
        for b in self._buckets:
            by_key.setdefault(b.key, []).append(b)
        whole = {}
        for (dtype, device), buckets in by_key.items():
            width = sum(b.share for b in buckets)
            send = torch.zeros(width, dtype=dtype, device=device)
            at = 0
            for b in buckets:
                pieces = [local_of(p).reshape(-1) for p in b.params if self.owns(p)]
                if pieces:
                    local = torch.cat(pieces)
                    send[at:at + local.numel()] = local
                at += b.share
            out = torch.empty(self.world_size * width, dtype=dtype, device=device)
            self.reducer.all_gather_into_(out, send)
            rows = out.view(self.world_size, width)
            at = 0
            for b in buckets:
                flat = rows[:, at:at + b.share].reshape(-1)[:b.total]
                for p, off in zip(b.params, b.offsets):
                    whole[p] = flat[off:off + p.numel()]
                at += b.share
        return whole

    @torch.no_grad()
    def post_step(self, optimizer) -> None:
        whole = self.gather(lambda p: p.detach().view(-1)[slice(*self.span(p))])
        for p, flat in whole.items():
            p.detach().view(-1).copy_(flat)

    # ------------------------------------------------------------------ checkpoints
    def _sharding(self, optimizer) -> dict:
        params = [ref.param for ref in self.tensors(optimizer)]
        return {"world_size": self.world_size, "rank": self.rank,
                "spans": [list(self.span(p)) for p in params],
                "shapes": [list(p.shape) for p in params]}

    def export_state(self, optimizer, sd, extra) -> None:
        extra["sharding"] = self._sharding(optimizer)

    def import_state(self, optimizer, sd, extra) -> dict:
        theirs = extra.get("sharding")
        if theirs is not None:
            mine = self._sharding(optimizer)
            if any(theirs[k] != mine[k] for k in ("world_size", "rank", "spans")):
                raise ValueError(
                    f"state_dict is rank {theirs['rank']}'s shard of a checkpoint saved at world "
                    f"size {theirs['world_size']} and this optimizer is rank {mine['rank']} of "
                    f"{mine['world_size']}; merge all ranks' shards with "
                    "shardgrok.consolidate_state_dict(shards) (or save full_state_dict()) and "
                    "load the result")
            return sd
        params = [ref.param for ref in self.tensors(optimizer)]
        check_full_state(sd, params)
        state = {}
        for i, st in sd["state"].items():
            a, e = self.span(params[i])
            state[i] = {k: (v.reshape(-1)[a:e].clone() if k in STATE_KEYS[1:] else v)
                        for k, v in st.items()}
        return {**sd, "state": state}

    def full_state(self, optimizer, sd, to):
        from ..checkpoint import extra_of
        extra_of(sd).pop("sharding", None)
        sd["state"] = {i: dict(st) for i, st in sd["state"].items()}  # not the live dicts
        index = {ref.param: ref.index for ref in self.tensors(optimizer)}
        for key in STATE_KEYS[1:]:
            whole = self.gather(lambda p: optimizer.state[p][key])
            if to is None or self.rank == to:
                for p, flat in whole.items():
                    sd["state"][index[p]][key] = flat.view(p.shape)
        return sd if to is None or self.rank == to else None
