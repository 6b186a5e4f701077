"""Collectives the optimizers issue, in one place.

A step's only collective before the update is ``all_reduce_`` of one buffer: the per-tensor
partial sums plus the scalar inputs (losses, signals, failure and bad-input flags). On a single
process it is the identity. Everything else here (parameter all-gather, meta-gradient sum,
checkpoint gathers) runs outside that critical path.
"""
from __future__ import annotations

import pickle
from typing import Any

import torch
import torch.distributed as dist


class LocalReducer:
    """One process: every collective is the identity."""

    world_size = 1
    dp_world_size = 1
    rank = 0
    group = None

    def all_reduce_(self, buf: torch.Tensor, scalars: int = 0) -> torch.Tensor:
        return buf

    def all_reduce_grads_(self, module: torch.nn.Module) -> None:
        """Sum a module's gradients over the group (the meta-net's meta-gradient)."""

    def mean_(self, tensors: list[torch.Tensor]) -> None:
        """Average tensors over the group in place."""

    def all_gather_object(self, obj: Any) -> list[Any]:
        return [obj]

    def broadcast_module_(self, module: torch.nn.Module) -> None:
        """Make a module's parameters and buffers equal to rank 0's."""


class GroupReducer:
    """Collectives over a ``torch.distributed`` process group (None: the default group).

    Buffers travel on the device the backend needs (CUDA for NCCL, CPU for gloo) and are copied
    back in place, so callers never care which backend runs.
    """

    def __init__(self, group: dist.ProcessGroup | None = None):
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.dp_world_size = self.world_size  # ranks whose losses are averaged
        self.rank = dist.get_rank(group)
        backend = dist.get_backend(group)
        self.device = (torch.device("cuda", torch.cuda.current_device())
                       if backend == "nccl" else torch.device("cpu"))

    def _on_device(self, t: torch.Tensor) -> torch.Tensor:
        return t if t.device == self.device else t.to(self.device)

    def all_reduce_(self, buf: torch.Tensor, scalars: int = 0) -> torch.Tensor:
        """Sum ``buf`` over the group. Its last ``scalars`` entries are per-rank inputs (losses,
        signals, flags) that must be summed over every data-parallel rank; the rest are
        per-tensor sums over the shard group. Here the two groups are the same."""
        work = self._on_device(buf)
        dist.all_reduce(work, group=self.group)
        if work is not buf:
            buf.copy_(work)
        return buf

    def _sum_tail_(self, buf: torch.Tensor, scalars: int, group) -> torch.Tensor:
        """Sum only the last ``scalars`` entries of ``buf`` over ``group``."""
        if scalars:
            tail = self._on_device(buf[buf.numel() - scalars:].clone())
            dist.all_reduce(tail, group=group)
            buf[buf.numel() - scalars:] = tail.to(buf.device)
        return buf

    def _flat_all_reduce_(self, tensors: list[torch.Tensor], scale: float) -> None:
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for t in tensors:
            by_dtype.setdefault(t.dtype, []).append(t)
        for ts in by_dtype.values():
            flat = self._on_device(torch.cat([t.reshape(-1) for t in ts]))
            dist.all_reduce(flat, group=self.group)
            if scale != 1.0:
                flat.mul_(scale)
            offset = 0
            for t in ts:
                t.copy_(flat[offset:offset + t.numel()].view_as(t))
                offset += t.numel()

    def all_reduce_grads_(self, module: torch.nn.Module) -> None:
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        if grads:
            self._flat_all_reduce_(grads, 1.0)

    def mean_(self, tensors: list[torch.Tensor]) -> None:
        if tensors:
            self._flat_all_reduce_(tensors, 1.0 / self.world_size)

    def all_gather_into_(self, out: torch.Tensor, send: torch.Tensor) -> None:
        """``out`` (world_size * len(send), rank-major) receives every rank's ``send``."""
        o, s = self._on_device(out), self._on_device(send)
        dist.all_gather(list(o.chunk(self.world_size)), s, group=self.group)
        if o is not out:
            out.copy_(o)

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's (small, picklable) ``obj``. Pickled bytes travel as a uint8 tensor:
        torch's own ``all_gather_object`` needs NumPy, which torch does not require."""
        data = list(pickle.dumps(obj))
        size = torch.tensor([len(data)], dtype=torch.int64, device=self.device)
        sizes = [torch.zeros_like(size) for _ in range(self.world_size)]
        dist.all_gather(sizes, size, group=self.group)
        width = int(max(sizes))
        buf = torch.zeros(width, dtype=torch.uint8, device=self.device)
        buf[:len(data)] = torch.tensor(data, dtype=torch.uint8)
        bufs = [torch.empty_like(buf) for _ in range(self.world_size)]
        dist.all_gather(bufs, buf, group=self.group)
        return [pickle.loads(bytes(b[:int(n)].tolist())) for b, n in zip(bufs, sizes)]

    def _global(self, group_rank: int) -> int:
        return group_rank if self.group is None else dist.get_global_rank(self.group, group_rank)

    def broadcast_module_(self, module: torch.nn.Module) -> None:
        src = self._global(0)
        tensors = list(module.parameters()) + list(module.buffers())
        if tensors:
            with torch.no_grad():
                for t in tensors:
                    work = self._on_device(t.data)
                    dist.broadcast(work, src=src, group=self.group)
                    if work is not t.data:
                        t.data.copy_(work)


class MeshReducer(GroupReducer):
    """FSDP2 and HSDP: per-tensor sums over the mesh's shard dimension only (the replicas of
    HSDP hold identical shards, so summing over them would over-count), per-rank inputs (losses,
    signals, failure flags) over every data-parallel rank: first over the replicate dimension,
    then, with the sums, over the shard dimension."""

    def __init__(self, shard_group: dist.ProcessGroup, replicate_group: dist.ProcessGroup | None):
        super().__init__(shard_group)
        self.replicate_group = replicate_group
        self.replicas = 1 if replicate_group is None else dist.get_world_size(replicate_group)
        self.dp_world_size = self.world_size * self.replicas

    def all_reduce_(self, buf: torch.Tensor, scalars: int = 0) -> torch.Tensor:
        if self.replicate_group is not None:
            self._sum_tail_(buf, scalars, self.replicate_group)
        return super().all_reduce_(buf)


class ReplicatedReducer(GroupReducer):
    """Every rank holds the whole model and the whole optimizer (DeepSpeed without ZeRO): the
    per-tensor sums are complete on each rank and are not reduced; only the per-rank inputs
    (losses, signals, flags) are summed over the group, and validation gradients averaged."""

    def all_reduce_(self, buf: torch.Tensor, scalars: int = 0) -> torch.Tensor:
        return self._sum_tail_(buf, scalars, self.group)

    def all_reduce_grads_(self, module: torch.nn.Module) -> None:
        pass  # each rank computed the whole meta-gradient from the same averaged inputs


def default_reducer(process_group: dist.ProcessGroup | None, shard: bool | None):
    """The reducer for an optimizer's ``shard``/``process_group`` arguments.

    ``shard=None`` (default) shards when torch.distributed is initialised with more than one rank
    in the group; ``shard=True`` requires that; ``shard=False`` keeps everything on this process.
    """
    if shard is not None and not isinstance(shard, bool):
        raise TypeError(f"shard must be True, False or None (automatic), got {shard!r}")
    if shard is False:
        if process_group is not None:
            raise ValueError("process_group is given but shard=False: a process group is only "
                             "used when sharding; drop one of the two")
        return LocalReducer()
    initialised = dist.is_available() and dist.is_initialized()
    if not initialised:
        if shard or process_group is not None:
            raise RuntimeError("shard=True / process_group need torch.distributed to be "
                               "initialised first (dist.init_process_group or "
                               "shardgrok.init_distributed())")
        return LocalReducer()
    reducer = GroupReducer(process_group)
    if reducer.world_size == 1 and not shard:
        return LocalReducer()
    return reducer
