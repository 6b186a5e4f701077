"""ZeRO-1 over replicated parameters (a torchrun / DDP job): each rank owns an even share of
every param group's flattened parameters and keeps m, v and mu only for that share.

Placement. A bucket is one param group's tensors of one (dtype, device), flattened in optimizer
order into ``T`` elements; with ``N`` ranks the share is ``S = ceil(T / N)`` and rank ``r`` owns
elements ``[r*S, min((r+1)*S, T))``. A tensor may straddle shares; each owner gets a segment
for its part. Buckets are per group so ``add_param_group`` never moves existing state, and per
dtype so the parameter all-gather moves one dtype per buffer. State per rank is at most
``ceil(T / N)`` elements per bucket: total / N plus less than one element per rank of padding.

After the update, all-gathers per (dtype, device) make every rank's parameters whole again: each
rank sends its shares of all buckets of that key back to back, padded to ``S``, at most
``gather_bucket_bytes`` of output per collective (so one collective while a dtype's parameters
fit in 256 MiB), and each collective's result is written into the parameters before the next.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field

import torch

from .. import reference as R
from ..checkpoint import STATE_KEYS, check_full_state
from ..comm import bucket_bytes
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
    #: bytes of one all-gather's output; None: :func:`shardgrok.comm.bucket_bytes` (256 MiB,
    #: or ``SHARDGROK_GATHER_BUCKET_MB``)
    gather_bucket_bytes: int | None = None

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
        group = optimizer.param_groups[group_index]
        aligned = set()
        for p in params:
            key = (p.dtype, p.device)
            b = buckets.setdefault(key, _Bucket(group_index, key))
            if optimizer.state_format_for(p, group) == "int8":
                # 8-bit state: the tensor starts on a whole block of the bucket, and the shares
                # are whole blocks, so every cut falls between blocks of the tensor (the gap
                # before it is padding no tensor owns, as the last share's tail)
                b.total += -b.total % R.QBLOCK
                aligned.add(key)
            b.params.append(p)
            b.offsets.append(b.total)
            b.total += p.numel()
        n, r = self.world_size, self.rank
        for key, b in buckets.items():
            b.share = -(-b.total // n)
            if key in aligned:
                b.share += -b.share % R.QBLOCK
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

    def state_start(self, p: torch.Tensor) -> int:
        return self.span(p)[0]

    # ------------------------------------------------------------------ the step
    def pieces(self, optimizer, with_grad: bool = True) -> list[Segment]:
        segs = []
        for ref, p in self._with_grad(optimizer, with_grad):
            if not self.owns(p):
                continue
            a, e = self.span(p)
            grad = None if p.grad is None else p.grad.reshape(-1)[a:e]
            segs.append(Segment(ref.index, ref.layer, ref.group, p.detach().view(-1)[a:e], grad,
                                optimizer.state[p], p, lambda x, a=a, e=e: x.reshape(-1)[a:e], a))
        return segs

    def _bucket_bytes(self) -> int:
        return self.gather_bucket_bytes or bucket_bytes()

    @torch.no_grad()
    def gather_into(self, local_of, sink, dtype_of=None, buffers: dict | None = None,
                    on_host: bool = False) -> None:
        """Stream every tensor's whole flat values from every rank's part: ``local_of(p)`` is
        this rank's part of (something shaped like) parameter ``p``, ``dtype_of(p)`` its dtype
        when not ``p``'s (the optimizer state's), and ``sink(p, a, e, values)`` receives
        elements ``[a, e)`` of ``p``'s flat whole (``values`` is valid only during the call;
        ``sink=None``: this rank only takes part). ``on_host``: ``values`` are on the CPU, each
        bucket brought there by one copy.

        Per (dtype, device) the shares are all-gathered a contiguous range of columns at a
        time, each collective's output at most :meth:`_bucket_bytes` (at least one column per
        rank), so the temporaries are one bucket plus this rank's 1/N of it whatever the
        model's size (and, ``on_host``, one bucket on the host). A tensor straddling two
        collectives reaches ``sink`` in pieces. Calls that pass the same ``buffers`` dict share
        those buffers."""
        by_key: dict[tuple, list[_Bucket]] = {}
        for b in self._buckets:
            by_key.setdefault(b.key, []).append(b)
        n, r = self.world_size, self.rank
        limit = self._bucket_bytes()
        for (dtype, device), buckets in by_key.items():
            dtype = dtype if dtype_of is None else dtype_of(buckets[0].params[0])
            # Column c of the rank-major [N, width] gather holds, for every rank q, element
            # q * share + c - at of the bucket whose shares start at column ``at``.
            ats, width = [], 0
            for b in buckets:
                ats.append(width)
                width += b.share
            if not width:  # only empty tensors: nothing to move (the same on every rank)
                continue
            esize = dtype.itemsize
            cols = min(width, max(1, limit // (n * esize)))
            # Two buffers per key, reused by every collective: a backend may hold on to a
            # finished collective's buffers for a while (gloo's worker thread does), and fresh
            # ones each time would then pile up.
            cache = {} if buffers is None else buffers
            send_buf, out_buf = cache.get((dtype, device), (None, None))
            if send_buf is None or send_buf.numel() < cols:
                cache.pop((dtype, device), None)
                del send_buf, out_buf
                send_buf = torch.empty(cols, dtype=dtype, device=device)
                out_buf = torch.empty(n * cols, dtype=dtype, device=device)
                cache[(dtype, device)] = (send_buf, out_buf)
            # one copy per bucket to the host rather than one per piece (each would sync)
            stage = (torch.empty(n * cols, dtype=dtype, device="cpu")
                     if on_host and sink is not None and out_buf.device.type != "cpu" else None)
            rows = None
            for c0 in range(0, width, cols):
                c1 = min(c0 + cols, width)
                send = send_buf[:c1 - c0]
                for b, at in zip(buckets, ats):
                    lo, hi = max(c0, at), min(c1, at + b.share)
                    if lo < hi:
                        base = r * b.share - at
                        self._fill(b, base + lo, base + hi, local_of, send[lo - c0:hi - c0])
                out = out_buf[:n * (c1 - c0)]
                self.reducer.all_gather_into_(out, send)
                if sink is None:
                    continue
                rows = (out if stage is None else stage[:out.numel()].copy_(out)).view(n, c1 - c0)
                for b, at in zip(buckets, ats):
                    lo, hi = max(c0, at), min(c1, at + b.share)
                    for q in range(n) if lo < hi else ():
                        start = q * b.share + lo - at
                        stop = min(q * b.share + hi - at, b.total)  # past total: padding
                        if start < stop:
                            self._emit(b, start, stop, rows[q, lo - c0:lo - c0 + stop - start],
                                       sink)
            del send_buf, out_buf, send, out, stage, rows, cache  # no view outlives its key

    def _fill(self, b: _Bucket, start: int, stop: int, local_of, dest: torch.Tensor) -> None:
        """Copy elements ``[start, stop)`` of bucket ``b``, all in this rank's share, into
        ``dest``; what lies past the bucket's end is the last share's padding, never read."""
        stop = min(stop, b.total)
        j = max(0, bisect.bisect_right(b.offsets, start) - 1)
        while j < len(b.params) and b.offsets[j] < stop:
            p, off = b.params[j], b.offsets[j]
            a, e = max(start, off), min(stop, off + p.numel())
            if a < e:
                at = off + self.span(p)[0]  # bucket position of local_of(p)'s first element
                dest[a - start:e - start].copy_(local_of(p).reshape(-1)[a - at:e - at])
            j += 1

    @staticmethod
    def _emit(b: _Bucket, start: int, stop: int, values: torch.Tensor, sink) -> None:
        """Hand elements ``[start, stop)`` of bucket ``b`` to ``sink``, tensor by tensor."""
        j = max(0, bisect.bisect_right(b.offsets, start) - 1)
        while j < len(b.params) and b.offsets[j] < stop:
            p, off = b.params[j], b.offsets[j]
            a, e = max(start, off), min(stop, off + p.numel())
            if a < e:
                sink(p, a - off, e - off, values[a - start:e - start])
            j += 1

    @torch.no_grad()
    def gather(self, local_of, dtype_of=None) -> dict[torch.Tensor, torch.Tensor]:
        """``{p: flat whole}`` on every rank, new tensors assembled from :meth:`gather_into`
        (so whole-model memory: the step and ``full_state`` stream instead)."""
        whole: dict[torch.Tensor, torch.Tensor] = {}
        for b in self._buckets:
            dtype = b.key[0] if dtype_of is None else dtype_of(b.params[0])
            for p in b.params:
                whole[p] = torch.empty(p.numel(), dtype=dtype, device=b.key[1])

        def keep(p, a, e, values):
            whole[p][a:e] = values
        self.gather_into(local_of, keep, dtype_of)
        return whole

    @torch.no_grad()
    def post_step(self, optimizer) -> None:
        # Each bucket is written into the parameters before the next is gathered: a rank's own
        # part comes back bit for bit, so what later buckets send is still this step's result.
        self.gather_into(lambda p: p.detach().view(-1)[slice(*self.span(p))],
                         lambda p, a, e, values: p.detach().view(-1)[a:e].copy_(values))

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
                    "load the result. A saver that keeps only rank 0's state_dict() (Hugging "
                    "Face Trainer, accelerate's save_state) needs optimizer."
                    "consolidate_state_dict() on every rank before it saves; "
                    "shardgrok.integrations.transformers.GrokCallback does that for Trainer")
            return sd
        params = [ref.param for ref in self.tensors(optimizer)]
        check_full_state(sd, params)
        state = {}
        for i, st in sd["state"].items():
            a, e = self.span(params[i])
            b0, b1 = a // R.QBLOCK, a // R.QBLOCK + R.n_blocks(a, e - a)  # 8-bit state's blocks
            state[i] = {k: (v.reshape(-1)[a:e].clone() if k in STATE_KEYS[1:] else
                            v[b0:b1].clone() if k in R.SCALE_KEYS.values() else v)
                        for k, v in st.items()}
        return {**sd, "state": state}

    def full_state(self, optimizer, sd, to):
        """The full state dict on rank ``to`` (``None``: every rank; None is returned
        elsewhere). m, v, mu are assembled on the CPU as each gather bucket arrives: the device
        holds one bucket beyond the shards, the destination's host the whole state (what it
        returns), the other ranks nothing."""
        from ..checkpoint import extra_of
        extra_of(sd).pop("sharding", None)
        sd["state"] = {i: dict(st) for i, st in sd["state"].items()}  # not the live dicts
        index = {ref.param: ref.index for ref in self.tensors(optimizer)}
        mine = to is None or self.rank == to
        buffers: dict = {}  # one set of gather buffers for m, v and mu
        for key in STATE_KEYS[1:]:
            # One dtype travels per key: the state's own, or where tensors differ (8-bit codes
            # beside the fp32 state of small tensors) one every value fits exactly (fp32, fp64)
            dtypes = {optimizer.state[p][key].dtype for p in index}
            carrier = (dtypes.pop() if len(dtypes) == 1 else
                       torch.float64 if torch.float64 in dtypes else torch.float32)

            def dtype_of(p, carrier=carrier):
                return carrier
            dest = {p: torch.empty(p.shape, dtype=optimizer.state[p][key].dtype, device="cpu")
                    for p in index} if mine else {}

            def to_host(p, a, e, values, dest=dest):
                dest[p].view(-1)[a:e].copy_(values)
            self.gather_into(lambda p, key=key: optimizer.state[p][key],
                             to_host if mine else None, dtype_of, buffers, on_host=True)
            for p, t in dest.items():
                sd["state"][index[p]][key] = t
        for p, scales in self._gather_scales(optimizer, list(index)).items():
            if mine:
                sd["state"][index[p]].update(scales)
        return sd if mine else None

    def _gather_scales(self, optimizer, params) -> dict:
        """Every 8-bit tensor's whole scale vectors on every rank: each rank's blocks are its
        own (the shares are whole blocks), so one sum over the group of vectors that are zero
        outside a rank's blocks assembles them."""
        quantized = [p for p in params if R.is_quantized(optimizer.state[p])]
        if not quantized:
            return {}
        keys = list(R.SCALE_KEYS.values())
        sizes = [R.n_blocks(0, p.numel()) for p in quantized]
        device = optimizer.state[quantized[0]][keys[0]].device
        buf = torch.zeros(len(keys) * sum(sizes), dtype=torch.float64, device=device)
        at = 0
        for p, size in zip(quantized, sizes):
            first = self.span(p)[0] // R.QBLOCK
            for k in keys:
                local = optimizer.state[p][k]
                buf[at + first:at + first + local.numel()] = local.double()
                at += size
        self.reducer.all_reduce_(buf)
        out, at = {}, 0
        for p, size in zip(quantized, sizes):
            out[p] = {}
            for k in keys:
                out[p][k] = buf[at:at + size].float().cpu()
                at += size
        return out
