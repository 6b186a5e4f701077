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

from .base import Segment
from .local import check_grad, tensor_layers


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


class ZeroLayout:
    sharded = True

    def __init__(self, reducer):
        self.reducer = reducer
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
        """Collective: every rank must hold the same param groups (count, shapes, dtypes)."""
        name = type(optimizer).__name__
        groups = groups if groups is not None else range(len(optimizer.param_groups))
        mine = [_describe(gi, optimizer.param_groups[gi]["params"]) for gi in groups]
        everyone = self.reducer.all_gather_object(mine)
        bad = [r for r, d in enumerate(everyone) if d != everyone[0]]
        if bad:
            def show(d):
                flat = [t for g in d for t in g]
                shapes = ", ".join(f"{s}:{t.replace('torch.', '')}" for _, s, t in flat[:6])
                return (f"{len(d)} group(s), {len(flat)} tensors "
                        f"[{shapes}{', ...' if len(flat) > 6 else ''}]")
            lines = "; ".join(f"rank {r}: {show(everyone[r])}" for r in [0, *bad[:3]])
            raise ValueError(f"{name}: the parameters differ between ranks ({lines}). When "
                             "sharding, every rank must pass the same parameters (same count, "
                             "shapes and dtypes, in the same order and groups)")

    def owns(self, p: torch.Tensor) -> bool:
        return self._spans[p] is not None

    def span(self, p: torch.Tensor) -> tuple[int, int]:
        return self._spans[p] or (0, 0)

    def state_like(self, p: torch.Tensor) -> torch.Tensor:
        a, e = self.span(p)
        return p.detach().view(-1)[a:e]

    # ------------------------------------------------------------------ the step
    def segments(self, optimizer) -> list[Segment]:
        name = type(optimizer).__name__
        segs = []
        for i, layer, gi, _, p in tensor_layers(optimizer):
            if p.grad is None:
                continue
            check_grad(p, name)
            if not self.owns(p):
                continue
            a, e = self.span(p)
            segs.append(Segment(i, layer, gi, p.detach().view(-1)[a:e],
                                p.grad.reshape(-1)[a:e], optimizer.state[p], p, (a, e)))
        return segs

    def num_tensors(self, optimizer) -> int:
        return sum(len(g["params"]) for g in optimizer.param_groups)

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

    def grad_tensors(self, optimizer) -> list[torch.Tensor]:
        return [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
