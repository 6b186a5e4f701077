"""The cached plan of a rank's step for the compiled kernel.

Built from a layout's segments (docs/design.md) the first time a step needs it and again only when
what it depends on changes: the layout, the param groups (added, or a group's list replaced),
the state tensors (``load_state_dict``) or, under DeepSpeed, which flat partitions the current
per-group call shows. Every step in between costs one cache lookup here and C++ for the rest:
the plan re-reads each optimizer parameter's ``.grad`` itself, so a new gradient tensor after
``zero_grad(set_to_none=True)`` or a tensor without a gradient this step needs no rebuild.
"""
from __future__ import annotations

import torch

from .. import reference as R
from ..placement import is_dtensor, to_device


class KernelUnsupported(Exception):
    """The kernel cannot take one of this rank's tensors; the message says which and why."""


_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _why_not(name: str, t: torch.Tensor, where: str, device: torch.device,
             codes: bool = False) -> str | None:
    if t.device.type not in ("cpu", "cuda"):
        return f"{where}: {name} is on {t.device} (the kernels take CPU and CUDA tensors)"
    if t.device != device:
        return f"{where}: {name} is on {t.device}, other tensors on {device} (one plan, one device)"
    if codes:  # 8-bit state: the C++ plan checks the codes' dtypes and the scales
        return None if t.is_contiguous() else f"{where}: {name} is not contiguous"
    if t.dtype not in _DTYPES:
        return f"{where}: {name} is {t.dtype} (the kernel takes float32, bfloat16 and float16)"
    if not t.is_contiguous():
        return f"{where}: {name} is not contiguous"
    return None


class TensorInfo:
    """Per-tensor facts the decisions need, as tensors: group and layer of every tensor (on the
    host; :meth:`on` gives device copies, made once)."""

    def __init__(self, refs):
        self.n = len(refs)
        self.group_of = torch.tensor([r.group for r in refs], dtype=torch.long)
        self.layer = torch.tensor([float(r.layer) for r in refs], dtype=torch.float64)
        self._copies: dict = {}

    def on(self, name: str, device: torch.device) -> torch.Tensor:
        t = getattr(self, name)
        if device.type == "cpu":
            return t
        key = (name, device)
        if key not in self._copies:
            self._copies[key] = to_device(t, device)
        return self._copies[key]


class FusedPlan:
    """The C++ plan of this rank's segments plus what the decisions need per tensor."""

    def __init__(self, ext, optimizer, layout, emulated: bool = False):
        refs = layout.tensors(optimizer)
        segs = layout.plan_pieces(optimizer)
        # a rank that owns no piece still reduces on its parameters' device, as the others do
        first = next((s.param for s in segs), None)
        self.device = first.device if first is not None else optimizer._step_device()
        self.info = TensorInfo(refs)
        self.n_tensors = len(refs)
        self.shapes = {}
        sources, index = [], {}
        rows, params, m, v, mu, scales = [], [], [], [], [], []
        for s in segs:
            where = f"parameter tensor #{s.index} {tuple(s.param.shape)}"
            q8 = R.is_quantized(s.state)
            for name, t in (("the parameter", s.param), ("exp_avg", s.state["exp_avg"]),
                            ("exp_avg_sq", s.state["exp_avg_sq"]), ("mu", s.state["mu"])):
                why = _why_not(name, t, where, self.device, codes=q8 and name != "the parameter")
                if why:
                    raise KernelUnsupported(why)
            if not q8 and len({s.state[k].dtype for k in ("exp_avg", "exp_avg_sq", "mu")}) != 1:
                raise KernelUnsupported(f"{where}: exp_avg, exp_avg_sq and mu differ in dtype")
            scales.append([s.state[R.SCALE_KEYS[k]] for k in ("exp_avg", "exp_avg_sq", "mu")]
                          if q8 else [])
            key = id(s.tensor)
            if key not in index:
                index[key] = len(sources)
                sources.append(s.tensor)
            # where the piece sits in its source's flat (local) gradient: cut a meta tensor
            local = s.tensor.to_local() if is_dtensor(s.tensor) else s.tensor
            probe = s.take(torch.empty(local.shape, device="meta"))
            if not probe.is_contiguous() or probe.numel() != s.param.numel():
                raise KernelUnsupported(f"{where}: its gradient piece is not a contiguous range")
            rows.append([s.index, index[key], probe.storage_offset(), probe.numel(), s.start])
            params.append(s.param.reshape(-1))
            m.append(s.state["exp_avg"].reshape(-1))
            v.append(s.state["exp_avg_sq"].reshape(-1))
            mu.append(s.state["mu"].reshape(-1))
            self.shapes[s.index] = tuple(s.param.shape)
        # FSDP2's parameters are DTensors, whose gradients C++ cannot unwrap: those few layouts
        # hand the local gradients in every step.
        self._wrapped = [t for t in sources if is_dtensor(t)]
        if self._wrapped and len(self._wrapped) != len(sources):
            raise KernelUnsupported("a mix of DTensor and plain parameters in one optimizer")
        locals_ = [t.to_local() if is_dtensor(t) else t for t in sources]
        slots, slot_of = {}, []
        for r in refs:
            slot_of.append(slots.setdefault(id(r.param), len(slots)))
        step_of = {}
        for r in refs:
            step_of.setdefault(id(r.param), optimizer.state[r.param]["step"])
        steps = list(step_of.values())
        table = torch.tensor(rows, dtype=torch.long).reshape(len(rows), 5)
        try:
            self.plan = ext.Plan(self.n_tensors, locals_, table, params, m, v, mu, steps,
                                 torch.tensor(slot_of, dtype=torch.long), scales)
        except RuntimeError as e:  # the C++ checks name the segment and the rule
            raise KernelUnsupported(str(e).splitlines()[0]) from e
        self.n_segments = len(rows)
        self.cuda = None
        if emulated:  # the CUDA kernels on CPU tensors, by the GPU's glue (a testing backend)
            from . import cuda
            if self.device.type != "cpu":
                raise KernelUnsupported(f"backend 'cuda-emulated' runs CPU tensors; these are "
                                        f"on {self.device}")
            emu = cuda.emulated_extension()
            if emu is None:
                raise KernelUnsupported("the emulated CUDA target is unavailable: "
                                        f"{cuda.emulated_unavailable_reason()}")
            self.cuda = cuda.CudaLaunches(emu, ext, self.plan, self.n_tensors, self.device)
        elif self.device.type == "cuda":
            from . import cuda
            cuda_ext = cuda.cuda_extension()
            if cuda_ext is None:
                raise KernelUnsupported(f"the CUDA kernel is unavailable: {cuda.unavailable_reason()}")
            self.cuda = cuda.CudaLaunches(cuda_ext, ext, self.plan, self.n_tensors, self.device)

    def phase1(self, kind: int, k: int, out: torch.Tensor, **aux) -> None:
        """Phase 1 into the reduction buffer ``out``: stats [n, k], then present [n]."""
        if self.cuda is not None:
            self.cuda.phase1(kind, k, out, **aux)
        else:
            self.plan.phase1(kind, out=out, **aux)

    def phase2(self, kind: int, scalars: torch.Tensor, **aux) -> None:
        if self.cuda is not None:
            self.cuda.phase2(kind, scalars, **aux)
        else:
            self.plan.phase2(kind, scalars, **aux)

    def resolve(self) -> bool:
        """Read and check this step's gradients; False if a parameter's storage moved (``p.data
        = ...``) and the plan must be rebuilt."""
        if self._wrapped:
            # the private attribute: DTensor.to_local() goes through autograd, ~10 us a tensor
            return self.plan.resolve([None if p.grad is None else p.grad._local_tensor
                                      for p in self._wrapped])
        return self.plan.resolve()
