"""Where tensors live: the one module that moves them between devices and the host, and that
unwraps the local storage of an engine's sharded tensors.

- :func:`local_tensor` / :func:`is_dtensor` / :func:`local_start`: a DTensor (FSDP2) is
  stepped through its local shard; every other tensor is its own storage.
  :func:`like_dtensor` wraps a rank's rows of a tensor shaped otherwise (8-bit state's scales
  by row) as a DTensor sharded like a parameter.
- :func:`to_device`: a host tensor onto the parameters' device without a host sync (the step's
  decisions send their small tables this way).
- :func:`host_copy` / :func:`to_host` / :func:`host_ready`: device tensors copied to page-locked
  host memory, queued on the current stream (the meta-step's saved parameters, DeepSpeed's
  gathered gradients); :func:`host_ready` is the one wait before the host reads them.
- :func:`to_cpu`: a whole (nested) state dict on the CPU, for checkpoints.
"""
from __future__ import annotations

import math
from typing import Any

import torch


def is_dtensor(t: torch.Tensor) -> bool:
    """A DTensor (FSDP2 ``fully_shard``, HSDP), recognised without importing DTensor."""
    return hasattr(t, "device_mesh") and hasattr(t, "placements") and hasattr(t, "to_local")


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The storage this rank holds for ``t``: a DTensor's local shard, else ``t`` itself
    (detached, so in-place updates are not recorded by autograd)."""
    to_local = getattr(t, "to_local", None)
    return to_local() if to_local is not None else t.detach()


def local_start(t: torch.Tensor) -> int:
    """Where ``t``'s local storage begins in the whole tensor, as a flat (row-major) index: a
    DTensor sharded on rows (FSDP2's ``Shard(0)``, uneven shards included) holds whole rows
    from there; any other tensor is whole (0)."""
    if not is_dtensor(t) or t.dim() == 0:
        return 0
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    _, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    return offset[0] * (t.numel() // t.shape[0] if t.shape[0] else 0)


def like_dtensor(local: torch.Tensor, like: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """``local`` (this rank's rows of a tensor of ``shape``) as a DTensor sharded like the
    DTensor ``like``: same mesh and placements, rows cut where ``like``'s are."""
    from torch.distributed.tensor import DTensor

    stride = tuple(math.prod(shape[i + 1:]) for i in range(len(shape)))
    return DTensor.from_local(local, like.device_mesh, like.placements, run_check=False,
                              shape=torch.Size(shape), stride=stride)


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` (a host tensor) on ``device`` without a host sync: through pinned memory, copied
    on the current stream (torch's pinned allocator keeps the host block until the copy ends)."""
    if device.type == "cpu" or t.device == device:
        return t
    if not t.is_pinned():
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


def host_copy(t: torch.Tensor) -> torch.Tensor:
    """A new CPU copy of ``t``. From CUDA it is page-locked and queued on the current stream
    without a host sync: device work queued after it (the look-ahead overwriting ``t``, the
    copy back) is ordered after it, but the host must call :func:`host_ready` before reading
    it."""
    t = t.detach()
    if t.device.type == "cpu":
        return t.clone(memory_format=torch.contiguous_format)
    cuda = t.device.type == "cuda"
    out = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=cuda)
    out.copy_(t, non_blocking=cuda)
    return out


def to_host(t: torch.Tensor | None) -> torch.Tensor | None:
    """``t`` moved to the CPU as :func:`host_copy` does, or ``t`` itself if it is there already
    (for a tensor just made, whose device memory goes when it does)."""
    if t is None or t.device.type == "cpu":
        return t
    return host_copy(t)


def host_ready() -> None:
    """Wait for the copies :func:`host_copy` queued, before the host reads them."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.current_stream().synchronize()


def to_cpu(obj: Any) -> Any:
    """A copy of a (nested) state dict with every tensor on the CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj
