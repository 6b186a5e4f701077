"""Collectives the optimizers issue, in one place.

A step's only collective before the update is ``all_reduce_`` of one buffer: the per-tensor
partial sums plus the scalar inputs (losses, signals, failure and bad-input flags). On a single
process it is the identity. Everything else here (parameter all-gather, meta-gradient sum,
checkpoint gathers) runs outside that critical path.

Where a buffer travels is decided per call by :func:`collective_device` from the group's
backend and the buffer's own device, so a job may mix CPU and CUDA buffers on a combined
backend ("cpu:gloo,cuda:nccl") and may call ``torch.cuda.set_device`` after building the
optimizer.
"""
from __future__ import annotations

import os
import pickle
import time
import warnings
from typing import Any

import torch
import torch.distributed as dist

#: Default size of one collective's buffer in the streamed collectives (the ZeRO-1 parameter
#: all-gather, ``full_state_dict``'s gathers, the meta-step's averaging of validation
#: gradients): their extra device memory is bounded by this, not by the model's size.
#: ``SHARDGROK_GATHER_BUCKET_MB`` (a float, read at each call) overrides it.
BUCKET_BYTES = 256 << 20
BUCKET_ENV = "SHARDGROK_GATHER_BUCKET_MB"

# Device types each single-name backend takes buffers on. gloo and mpi count as CPU-only:
# gloo's CUDA path stages through host memory anyway (so copying ourselves costs the same and
# stays explicit), and a CUDA-aware MPI build cannot be told from the name.
_NAMED = {"nccl": ("cuda",), "gloo": ("cpu",), "mpi": ("cpu",), "ucc": ("cpu", "cuda"),
          "xccl": ("xpu",)}


def bucket_bytes() -> int:
    """The streamed collectives' buffer size in bytes (``BUCKET_BYTES`` unless the
    ``SHARDGROK_GATHER_BUCKET_MB`` environment variable says otherwise)."""
    env = os.environ.get(BUCKET_ENV)
    if env:
        try:
            mb = float(env)
        except ValueError:
            raise ValueError(f"{BUCKET_ENV}={env!r} must be a positive number of MiB") from None
        if not mb > 0:
            raise ValueError(f"{BUCKET_ENV}={env!r} must be a positive number of MiB")
        return max(1, int(mb * (1 << 20)))
    return BUCKET_BYTES


def backend_device_types(backend: str) -> tuple[str, ...] | None:
    """The device types a process group's backend takes buffers on, from the string
    ``torch.distributed`` reports for it: a single name ("nccl", "gloo", "mpi", ...) or a
    combined "device:backend,..." string ("cpu:gloo,cuda:nccl"). None when the string does not
    say ("undefined", an unknown plugin): torch then dispatches on the buffer's device."""
    s = str(backend).strip().lower()
    if ":" in s:
        return tuple(pair.split(":", 1)[0].strip() for pair in s.split(",") if pair.strip())
    return _NAMED.get(s)


def collective_device(backend: str, device: torch.device | str) -> torch.device:
    """The device a buffer that lives on ``device`` must travel on through a group whose
    backend is ``backend``: its own device when the backend takes that device type (a CUDA
    buffer on NCCL or on a "cuda:..." entry, a CPU buffer on gloo/mpi or a "cpu:..." entry, or
    any buffer when the backend string does not say), otherwise the one device type the
    backend takes, CUDA preferred, at the *current* CUDA device of this call (so a
    ``torch.cuda.set_device`` after the optimizer was built is followed)."""
    device = torch.device(device)
    types = backend_device_types(backend)
    if types is None or device.type in types:
        return device
    if "cuda" in types:
        return torch.device("cuda", torch.cuda.current_device())
    if "cpu" in types:
        return torch.device("cpu")
    return torch.device(types[0])


def group_backend(group: dist.ProcessGroup | None) -> str:
    """The backend string of ``group`` that :func:`collective_device` reads. A group made by
    ``init_process_group()`` without a backend reports "undefined"; its real device map
    ("cuda:nccl" on a CUDA machine, "cpu:gloo" without one) is in its backend config."""
    backend = str(dist.get_backend(group))
    if backend == "undefined" and hasattr(dist, "get_backend_config"):
        backend = str(dist.get_backend_config(group))
    return backend


# ------------------------------------------------------------------ letting go of our tensors
# Why every collective here waits for the backend to let go (the abort at exit:
# docs/distributed.md, "To leave").
# A CPU backend (gloo, mpi) runs each collective on a worker thread, and that thread drops the
# collective's Work, which holds the tensors it was handed (and, for a view, its root), a moment
# after the caller has returned. In torch 2.13 a C++ reference to a tensor made in Python holds
# its Python object too (checked: a view raises its root's sys.getrefcount), so the thread that
# drops it must take the GIL. If the main thread has meanwhile begun finalizing the interpreter
# (a script that just ends, as a Trainer's or an accelerate user's does), CPython ends the
# waiting thread with pthread_exit inside that destructor, which is noexcept: std::terminate,
# "terminate called without an active exception". Returning only once the backend has let go
# leaves nothing of ours for a backend thread to drop at exit. DDP's all-reduces inside
# backward() have the same exposure with any optimizer, torch AdamW included; that one is
# torch's, and shutdown_distributed() closes it (docs/distributed.md, "To leave").

#: how long a collective waits for the backend's thread to let go of its tensors before it
#: stops waiting (for that backend, for the rest of the process) with a warning
SETTLE_TIMEOUT_S = 1.0
_CAN_SETTLE = hasattr(torch.Tensor, "_use_count")
_settle_off: set[str] = set()
_yield = getattr(os, "sched_yield", lambda: time.sleep(0))


def _handed(tensors, backend: str = "") -> list[tuple[torch.Tensor, int]]:
    """The CPU tensors about to be handed to a collective, each with its root when it is a view
    (a backend's own views of it hold that), paired with their use counts now. CUDA tensors are
    left out: NCCL's watchdog thread releases its Work on its own schedule, too slow to wait
    for at every collective."""
    if not _CAN_SETTLE or backend in _settle_off:
        return []
    pairs = []
    for t in tensors:
        if t.device.type != "cpu":
            continue
        pairs.append((t, t._use_count()))
        base = t._base
        if base is not None:
            pairs.append((base, base._use_count()))
    return pairs


def _still_held(pairs) -> bool:
    return any(t._use_count() > n for t, n in pairs)


def settle(pairs, backend: str = "") -> None:
    """Return once no thread of the backend holds any tensor of ``pairs`` (from
    :func:`_handed` before the collective) any more: their use counts are back where they were.
    Usually they already are; otherwise the backend's thread is waiting for the GIL to drop them,
    and it gets it here (this releases the GIL while it waits: benchmarks/settle.py measured
    about 50 microseconds per collective on average)."""
    if not pairs or not _still_held(pairs):
        return
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    tries = 0
    while _still_held(pairs):
        if time.monotonic() > deadline:
            _settle_off.add(backend)
            warnings.warn(f"shardgrok: the {backend or 'process group'} backend still held a "
                          f"collective's tensors {SETTLE_TIMEOUT_S:g} s after it completed; no "
                          "longer waiting for it (docs/distributed.md, 'To leave')",
                          RuntimeWarning, stacklevel=3)
            return
        if tries < 200:
            _yield()  # releases the GIL; the backend's thread is usually right there to take it
        else:
            time.sleep(1e-4)
        tries += 1


def _all_gather_single(out: torch.Tensor, send: torch.Tensor, group) -> None:
    # torch 2.13 names it all_gather_single; earlier releases all_gather_into_tensor (looked up
    # per call, so a wrapper installed on torch.distributed sees it)
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    fn(out, send, group=group)


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


_OWN = object()  # "this reducer's own group" (None already means the default group)


class GroupReducer:
    """Collectives over a ``torch.distributed`` process group (None: the default group).

    Each buffer travels on the device :func:`collective_device` picks for it, decided at each
    call (CUDA buffers stay on CUDA under NCCL or a "cuda:..." backend, CPU buffers stay on the
    CPU under gloo or a "cpu:..." one, anything else is copied to the device the backend
    takes), and is copied back in place, so callers never care which backend runs.
    """

    def __init__(self, group: dist.ProcessGroup | None = None):
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.dp_world_size = self.world_size  # ranks whose losses are averaged
        self.rank = dist.get_rank(group)
        # the backend never changes for a group; the device it implies may (set_device)
        self._backends: dict[Any, str] = {}

    def _backend(self, group=_OWN) -> str:
        group = self.group if group is _OWN else group
        if group not in self._backends:
            self._backends[group] = group_backend(group)
        return self._backends[group]

    def device_for(self, device: torch.device | str, group=_OWN) -> torch.device:
        """Where a buffer living on ``device`` travels through ``group`` (this reducer's)."""
        return collective_device(self._backend(group), device)

    def _on_device(self, t: torch.Tensor, group=_OWN) -> torch.Tensor:
        dev = self.device_for(t.device, group)
        return t if t.device == dev else t.to(dev)

    def _run(self, collective, tensors, *args, group=_OWN, **kwargs) -> None:
        """``collective(*args, group=group, **kwargs)`` (this reducer's group unless given),
        returning once the backend's worker thread has let go of ``tensors`` (what it was
        handed): see :func:`settle`."""
        backend = self._backend(group)
        pairs = _handed(tensors, backend)
        collective(*args, group=self.group if group is _OWN else group, **kwargs)
        settle(pairs, backend)

    def all_reduce_(self, buf: torch.Tensor, scalars: int = 0) -> torch.Tensor:
        """Sum ``buf`` over the group. Its last ``scalars`` entries are per-rank inputs (losses,
        signals, flags) that must be summed over every data-parallel rank; the rest are
        per-tensor sums over the shard group. Here the two groups are the same."""
        work = self._on_device(buf)
        self._run(dist.all_reduce, (work,), work)
        if work is not buf:
            buf.copy_(work)
        return buf

    def _sum_tail_(self, buf: torch.Tensor, scalars: int, group) -> torch.Tensor:
        """Sum only the last ``scalars`` entries of ``buf`` over ``group``."""
        if scalars:
            tail = self._on_device(buf[buf.numel() - scalars:].clone(), group)
            self._run(dist.all_reduce, (tail,), tail, group=group)
            buf[buf.numel() - scalars:] = tail.to(buf.device)
        return buf

    def _flat_all_reduce_(self, tensors: list[torch.Tensor], scale: float) -> None:
        """Sum (times ``scale``) tensors in place, packed piece by piece into one buffer of at
        most :func:`bucket_bytes` per (dtype, device): validation gradients are model-sized,
        and one flat copy of all of them would be a second model on the device."""
        by_kind: dict[tuple, list[torch.Tensor]] = {}
        for t in tensors:
            by_kind.setdefault((t.dtype, t.device), []).append(t)
        limit = bucket_bytes()
        for (dtype, device), ts in by_kind.items():
            width = min(max(1, limit // dtype.itemsize), sum(t.numel() for t in ts))
            if not width:
                continue
            # one buffer for all of this kind's collectives: a backend may hold a finished
            # collective's buffer a while, and fresh ones would pile up
            buf = torch.empty(width, dtype=dtype, device=self.device_for(device))
            pending: list[tuple[torch.Tensor, int, int]] = []  # (flat tensor, start, stop)
            used = 0
            for t in ts:
                # a non-contiguous tensor goes through a contiguous copy of itself
                flat = t.view(-1) if t.is_contiguous() else t.reshape(-1)
                a, n = 0, flat.numel()
                while a < n:
                    e = min(n, a + width - used)
                    pending.append((flat, a, e))
                    used, a = used + e - a, e
                    if used == width:
                        self._reduce_pieces_(pending, buf[:used], scale)
                        pending, used = [], 0
                if not t.is_contiguous():
                    self._reduce_pieces_(pending, buf[:used], scale)
                    pending, used = [], 0
                    t.copy_(flat.view_as(t))
            self._reduce_pieces_(pending, buf[:used], scale)

    def _reduce_pieces_(self, pieces, buf: torch.Tensor, scale: float) -> None:
        """All-reduce the ``(flat, start, stop)`` pieces through ``buf`` (their total size)."""
        if not pieces:
            return
        at = 0
        for flat, a, e in pieces:
            buf[at:at + e - a].copy_(flat[a:e])
            at += e - a
        self._run(dist.all_reduce, (buf,), buf)
        if scale != 1.0:
            buf.mul_(scale)
        at = 0
        for flat, a, e in pieces:
            flat[a:e].copy_(buf[at:at + e - a])
            at += e - a

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
        # the single-tensor form: NCCL's list form stages through a flat buffer of its own (an
        # extra bucket and a device copy per call)
        self._run(_all_gather_single, (o, s), o, s)
        if o is not out:
            out.copy_(o)

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's (small, picklable) ``obj``. Pickled bytes travel as a uint8 tensor:
        torch's own ``all_gather_object`` needs NumPy, which torch does not require."""
        device = self.device_for("cpu")
        data = list(pickle.dumps(obj))
        size = torch.tensor([len(data)], dtype=torch.int64, device=device)
        sizes = [torch.zeros_like(size) for _ in range(self.world_size)]
        self._run(dist.all_gather, (size, *sizes), sizes, size)
        width = int(max(sizes))
        buf = torch.zeros(width, dtype=torch.uint8, device=device)
        buf[:len(data)] = torch.tensor(data, dtype=torch.uint8)
        bufs = [torch.empty_like(buf) for _ in range(self.world_size)]
        self._run(dist.all_gather, (buf, *bufs), bufs, buf)
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
                    self._run(dist.broadcast, (work,), work, src=src)
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
