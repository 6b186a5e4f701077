"""What GrokAdamW and SuperGrok share, apart from the step itself: argument checks, param groups
and their eager state, the layout they are placed by (and its switch when an engine takes the
optimizer over), inspection, checkpoints and pickling.

``step()`` hands over to :class:`shardgrok.optim.step.StepDriver`, which runs the two-phase step
with its one reduction and calls back into the subclass for the math.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch

from .. import _validation as V
from ..checkpoint import (CHECKPOINT_FORMAT, CHECKPOINT_KEY, STATE_KEYS, check_entries,
                          check_groups, check_saved_by, checked_extra, values_by_row,
                          without_extra)
from .. import kernels as K
from ..kernels.plan import FusedPlan, TensorInfo
from ..layouts import EngineWatch, LayoutSwitch, Segment, ZeroLayout, select_layout
from ..layouts.select import on_build
from ..placement import is_dtensor, like_dtensor, local_start, local_tensor, to_cpu
from .. import reference as R
from ..reference import ACC, COL, ROUNDING
from .step import StepDriver


#: the dtypes ``state_dtype=`` may name (or their names, "float32", ...), besides "int8" (the
#: 8-bit blockwise format) and None (per parameter: :meth:`state_format_for`)
STATE_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
INT8 = "int8"
_BY_NAME = {str(d).split(".")[-1]: d for d in STATE_DTYPES}
_LOW = (torch.bfloat16, torch.float16)
#: the version of the 8-bit codes (csrc/grok_math.h) a checkpoint's int8 state was written in
INT8_FORMAT = 1


def parse_state_dtype(name: str, value: Any):
    """``value`` as a state format: None, a torch dtype of :data:`STATE_DTYPES` or "int8";
    the dtypes may be given by name ("bfloat16"), as a JSON config must."""
    if value is None:
        return None
    if isinstance(value, str) and (value == INT8 or value in _BY_NAME):
        return _BY_NAME.get(value, value)
    if isinstance(value, torch.dtype) and value in STATE_DTYPES:
        return value
    allowed = ", ".join(f"torch.{n}" for n in _BY_NAME)
    raise ValueError(f"{name} must be None (float32 state for bfloat16/float16 parameters, the "
                     f"parameter's dtype otherwise), \"int8\" (8-bit blockwise state), or one "
                     f"of {allowed} (or their names, e.g. \"bfloat16\"), got {value!r}")


def state_dtype_name(value) -> str | None:
    """The JSON-friendly name a param group keeps: None, "int8" or "bfloat16", ..."""
    return value if value is None or value == INT8 else str(value).split(".")[-1]


class GrokOptimizerBase(torch.optim.Optimizer):
    """A ``torch.optim.Optimizer`` whose state may be sharded and whose step is two-phase.

    A subclass names its hyperparameter checks (``SPECS``), the per-tensor sums its phase 1
    produces (``STATS``), the scalar inputs it reduces (``N_VALUES``) and its kernel
    (``KERNEL_KIND``), and implements the math hooks :class:`~shardgrok.optim.step.StepDriver`
    calls: ``_phase1``/``_kernel_phase1``, ``_decide``, ``_phase2``/``_kernel_phase2``.
    """

    #: group hyperparameter -> check; run at construction, in add_param_group and at every step
    SPECS: dict[str, V.Check] = {}
    #: names of the per-tensor partial sums phase 1 produces
    STATS: tuple[str, ...] = ()
    #: number of scalar inputs (sums and counts) a rank adds to the reduction
    N_VALUES = 0

    #: this optimizer's kernel (csrc/job.h's enum Kind, read by shardgrok.kernels.header)
    KERNEL_KIND = -1
    #: what else than the gradient itself can make a tensor's sums non-finite
    NONFINITE_NOTE = ""

    def __init__(self, params: Iterable, defaults: dict[str, Any], *, nonfinite: str = "skip",
                 shard: bool | None = None, process_group=None, backend: str | None = None,
                 state_dtype: torch.dtype | None = None, state_rounding: str = "stochastic",
                 param_rounding: str = "nearest", rounding_seed: int = 0):
        V.choice("skip", "raise")("nonfinite", nonfinite)
        V.choice("stochastic", "nearest")("state_rounding", state_rounding)
        V.choice("nearest", "stochastic")("param_rounding", param_rounding)
        V.integer(0, 2**32 - 1)("rounding_seed", rounding_seed)
        V.validate(self.SPECS, defaults)
        self.state_dtype = parse_state_dtype("state_dtype", state_dtype)
        self.state_rounding = state_rounding
        self.param_rounding = param_rounding
        self.rounding_seed = int(rounding_seed)
        self.backend = K.choose_backend(backend)
        self._driver = StepDriver()
        on_build(self)
        self.nonfinite = nonfinite
        self._shard_args = (shard, process_group)
        self._layout = None       # chosen from the first param group's tensors
        self._reducer = None
        self._global_step = 0
        self._skipped_steps = 0
        self._last_report: dict[str, Any] = {}
        self._built = False
        # the parameters as given, per group in order, and the whole group list: an engine may
        # swap the parameters (DeepSpeed's flat partitions) and narrow the list per call
        self._group_params: list[list[torch.Tensor]] = []
        self._param_groups_full: list[dict] = []
        self._step_number = 0  # the optimizer step the current step() call belongs to
        self._consolidated = None  # whole m, v, mu for state_dict() (consolidate_state_dict)
        super().__init__(params, defaults)
        self._layout.verify(self)
        self._engine_watch = EngineWatch(self)
        self._built = True

    @property
    def is_sharded(self) -> bool:
        """True when m, v and mu are split over the ranks of a process group."""
        return self._layout.sharded

    # What a layout reads of the optimizer (shardgrok.layouts.base.Layout).
    @property
    def given_params(self) -> list[list[torch.Tensor]]:
        """The parameters per group as the optimizer was built with them (an engine may put
        others into ``param_groups``: DeepSpeed's flat partitions)."""
        return self._group_params

    @property
    def all_param_groups(self) -> list[dict]:
        """Every param group (DeepSpeed's ZeRO 1/2 narrows ``param_groups`` to the one group it
        steps during each call)."""
        return self._param_groups_full

    @property
    def shard_args(self) -> tuple:
        """``(shard, process_group)`` as given at construction."""
        return self._shard_args

    # ------------------------------------------------------------------ param groups and state
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        params = param_group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        merged = {**self.defaults, **param_group}
        V.validate(self.SPECS, merged)
        if "state_dtype" in param_group:  # a group's own state format, by name
            param_group = {**param_group, "state_dtype": state_dtype_name(
                parse_state_dtype(f"param group {len(self.param_groups)}: state_dtype",
                                  param_group["state_dtype"]))}
        name = type(self).__name__
        for p in params:
            if isinstance(p, torch.Tensor) and (p.is_complex() or not p.is_floating_point()):
                raise ValueError(f"{name} optimizes real floating-point tensors; got a parameter "
                                 f"of dtype {p.dtype} (view complex parameters as real with "
                                 "torch.view_as_real)")
        self._consolidated = None
        if self._layout is None:
            self._layout = select_layout(params, *self._shard_args)
            self._reducer = self._layout.reducer
        fmt = parse_state_dtype("state_dtype", param_group.get("state_dtype", self.state_dtype))
        if fmt == INT8 and any(p.numel() >= R.QMIN_NUMEL for p in params):
            self._check_takes_int8()  # before the group is added: nothing to undo
        super().add_param_group({**param_group, "params": params})
        self._group_params.append(list(params))
        self._param_groups_full = self.param_groups
        gi = len(self.param_groups) - 1
        try:
            if self._built:  # at construction, __init__ checks all groups at once
                self._layout.verify(self, range(gi, gi + 1))
            self._layout.add_group(self, gi)
        except Exception:
            self.param_groups.pop()  # leave the optimizer as it was
            self._group_params.pop()
            raise
        for p in self.param_groups[-1]["params"]:
            self._init_state(p, self.param_groups[-1])
        if self._built:
            self._engine_watch.forget(self)
        self._driver.clear()

    def state_format_for(self, p: torch.Tensor, group: dict | None = None):
        """The format of optimizer parameter ``p``'s m, v and mu: its group's ``state_dtype``
        or else the optimizer's; "int8" for tensors of at least 4,096 elements (smaller ones
        keep float32 state, as torchao does); None: float32 for bfloat16/float16 parameters
        and the parameter's own dtype otherwise (a bf16 v rounded to nearest cannot follow
        ``v = 0.999 v + ...``: see docs/algorithms.md). A torch dtype, or "int8"."""
        if group is None:
            group = self._group_of(p)
        fmt = parse_state_dtype("state_dtype", group.get("state_dtype", self.state_dtype))
        if fmt == INT8:
            return INT8 if p.numel() >= R.QMIN_NUMEL else torch.float32
        if fmt is not None:
            return fmt
        return torch.float32 if p.dtype in _LOW else p.dtype

    def _group_of(self, p: torch.Tensor) -> dict:
        """``p``'s param group among all of them (an engine may show only some per call: the
        flat partitions of DeepSpeed's other groups); a parameter an engine put in that no
        group lists yet takes the optimizer's own settings."""
        for g in self._param_groups_full or self.param_groups:
            if any(q is p for q in g["params"]):
                return g
        return {}

    def state_dtype_for(self, p: torch.Tensor) -> torch.dtype:
        """The dtype of ``p``'s state tensors where they are plain values (float32 for 8-bit
        state, whose fp32 values the codes hold)."""
        fmt = self.state_format_for(p)
        return torch.float32 if fmt == INT8 else fmt

    def _init_state(self, p: torch.Tensor, group: dict) -> None:
        # Eager, so every rank and every checkpoint has the same keys from the start. Under
        # sharding m, v, mu cover only this rank's part; "step" is kept for every tensor.
        st = self.state[p]
        if not st:
            st["step"] = torch.tensor(0.0)
            local = self._layout.state_like(p)
            fmt = self.state_format_for(p, group)
            if fmt == INT8:
                st.update(self._int8_state(p, local))
                return
            for key in STATE_KEYS[1:]:
                st[key] = torch.zeros_like(local, dtype=fmt, memory_format=torch.preserve_format)

    def _check_takes_int8(self) -> None:
        if not self._layout.takes_int8:
            raise ValueError(f"{type(self).__name__}: state_dtype=\"int8\" runs in one process, "
                             f"under ZeRO-1 (torchrun/DDP), FSDP2 and DeepSpeed ZeRO; the "
                             f"{type(self._layout).__name__} layout keeps float32, bfloat16 or "
                             "float16 state")

    def _int8_state(self, p: torch.Tensor, local: torch.Tensor) -> dict[str, torch.Tensor]:
        """Zero 8-bit state for ``p``: codes shaped like its local piece, one scale per block."""
        self._check_takes_int8()
        n = sum(count for _, count in R.piece_scales(self._layout.state_pieces(p)))
        st = {}
        for key, bias in R.QUANT_BIAS.items():
            # codes like the state (a DTensor under FSDP2); scales of this rank's blocks
            st[key] = torch.zeros_like(local, dtype=R.CODE_DTYPE[bias],
                                       memory_format=torch.contiguous_format)
            st[R.SCALE_KEYS[key]] = torch.zeros(n, dtype=torch.float32,
                                                device=local_tensor(local).device)
        return st

    # ------------------------------------------------------------------ engines
    def _follow_engine(self, stepping: bool = False) -> None:
        """Notice an engine driving this optimizer and switch to the layout it asks for
        (:mod:`shardgrok.layouts.select`). Checked at step, state_dict, load_state_dict and
        meta-step, which an engine calls."""
        switch = self._engine_watch.check(self, self._layout, stepping)
        if switch is not None:
            self._use_layout(switch)

    def _use_layout(self, switch: LayoutSwitch) -> None:
        """Start again on ``switch.layout``, before any step, with fresh state."""
        if self._global_step:
            raise RuntimeError(switch.too_late.format(name=type(self).__name__))
        self._layout = switch.layout
        self._reducer = switch.layout.reducer
        self.state.clear()
        self._driver.clear()
        self._consolidated = None
        if switch.params is not None:
            self._group_params = [list(ps) for ps in switch.params]
            for gi in range(len(switch.params)):
                self._layout.add_group(self, gi)
            self._layout.verify(self)
            self._param_groups_full = self.param_groups
            self._engine_watch.forget(self)
        for p in switch.owners:
            self._init_state(p, self._group_of(p))

    # ------------------------------------------------------------------ the step
    def _tensors(self) -> list:
        return self._layout.tensors(self)

    def _groups(self) -> list[dict]:
        """All param groups (the layout's view: an engine may narrow ``param_groups``)."""
        return self._layout.groups(self)

    def _step(self, closure, inputs):
        return self._driver.run(self, closure, inputs)

    def _step_device(self) -> torch.device:
        """Where this rank's step buffers live: its first parameter's device. Every path of a
        step (kernel, reference, a failed phase 1) uses it, so all ranks' buffers meet in the
        same backend of a mixed "cpu:gloo,cuda:nccl" group."""
        for g in self.param_groups:
            for p in g["params"]:
                return local_tensor(p).device
        return torch.device("cpu")

    def _follow_devices(self) -> None:
        """Move m, v and mu to their parameter's device if the model moved after the optimizer
        was built (``model.cuda()`` keeps the parameter objects and moves their storage), as
        torch.optim's load_state_dict would place them. Run whenever the step's plan is
        (re)built: a moved storage invalidates the plan."""
        for g in self.param_groups:
            for p in g["params"]:
                st = self.state.get(p)
                if not st:
                    continue
                device = local_tensor(p).device
                for key in (*STATE_KEYS[1:], *R.SCALE_KEYS.values()):
                    t = st.get(key)
                    if isinstance(t, torch.Tensor) and not is_dtensor(t) and t.device != device:
                        st[key] = t.to(device)

    def _rounding_columns(self, table: torch.Tensor, steps: torch.Tensor) -> None:
        """Fill the stochastic rounding's columns of the host ``table`` (csrc/grok_math.h):
        every tensor's step count, which bf16 writes round stochastically, the seed."""
        flags = ((ROUNDING["state"] if self.state_rounding == "stochastic" else 0)
                 | (ROUNDING["param"] if self.param_rounding == "stochastic" else 0))
        table[:, COL["step"]] = steps
        table[:, COL["rounding"]] = float(flags)
        table[:, COL["seed"]] = float(self.rounding_seed)

    def _phase1(self, segs: list[Segment], n: int) -> tuple[torch.Tensor, Any]:
        """Reference phase 1: per-tensor partial sums [n, len(STATS)] and what phase 2 reuses."""
        raise NotImplementedError

    def _kernel_phase1(self, plan: FusedPlan, buf: torch.Tensor) -> Any:
        """Kernel phase 1: the partial sums and the tensors present, written into the reduction
        buffer ``buf``; returns what phase 2 reuses."""
        raise NotImplementedError

    def _decide(self, info: TensorInfo, stats: torch.Tensor, present: torch.Tensor,
                values: list[float], steps: torch.Tensor,
                present_on_device: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        """The per-tensor scalar table [n, len(reference.COLUMNS)] on the step's device and the
        step's report, from the reduced sums ``stats`` (on the step's device), ``present``
        (host; ``present_on_device`` the same on the device), the reduced scalar inputs
        ``values`` and every tensor's step count after this step (host). Nothing in it may
        read a device value back to the host: the report keeps tensors
        (:meth:`get_state_summary` converts them)."""
        raise NotImplementedError

    def _phase2(self, segs: list[Segment], table: torch.Tensor, aux: Any) -> None:
        raise NotImplementedError

    def _kernel_phase2(self, plan: FusedPlan, table: torch.Tensor, aux: Any) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------------ inspection
    def get_global_step(self) -> int:
        """Number of steps taken (skipped steps not counted)."""
        return self._global_step

    def get_state_summary(self) -> dict[str, Any]:
        """Global step, skipped steps, tensor count, mean per-tensor norms of mu and m over the
        tensors that have stepped, and what the last step decided. Under sharding the norms are
        all-reduced: call it on every rank."""
        tensors = self._tensors()
        n = len(tensors)
        sums = torch.zeros(n, 3, dtype=ACC)
        for ref in tensors:
            sums[ref.index, 0] = float(self.state[ref.param]["step"] > 0)
        for s in self._layout.pieces(self, with_grad=False):
            for col, key in ((1, "mu"), (2, "exp_avg")):
                value = R.state_value(s.state, key, s.start)
                sums[s.index, col] += float(value.double().square().sum())
        self._reducer.all_reduce_(sums)
        stepped = sums[:, 0] > 0
        mu = sums[stepped, 1].sqrt()
        m = sums[stepped, 2].sqrt()
        summary = {
            "global_step": self._global_step,
            "skipped_steps": self._skipped_steps,
            "total_params": n,
            "avg_mu_norm": float(mu.mean()) if len(mu) else 0.0,
            "avg_exp_avg_norm": float(m.mean()) if len(m) else 0.0,
        }
        summary.update({k: K.plain(v) for k, v in self._last_report.items()})
        return summary

    # ------------------------------------------------------------------ checkpoints
    def _extra_state(self) -> dict[str, Any]:
        return {"format": CHECKPOINT_FORMAT, "optimizer": type(self).__name__,
                "global_step": self._global_step,
                "skipped_steps": self._skipped_steps, "rounding_seed": self.rounding_seed,
                "int8_format": INT8_FORMAT}

    #: entries of the ``"shardgrok"`` entry this class's checkpoints must have
    _REQUIRED_EXTRA: tuple[str, ...] = ("global_step",)

    def _check_extra_loads(self, extra: dict[str, Any]) -> None:
        """Raise if ``extra`` (the ``"shardgrok"`` entry) would fail to load; called before
        anything is loaded."""

    def _load_extra_state(self, extra: dict[str, Any]) -> None:
        self._global_step = int(extra["global_step"])
        self._skipped_steps = int(extra.get("skipped_steps", 0))
        # a checkpoint from before stochastic rounding keeps this optimizer's own seed
        self.rounding_seed = int(extra.get("rounding_seed", self.rounding_seed))

    def state_dict(self) -> dict[str, Any]:
        """torch.optim's ``state``/``param_groups``; ``param_groups[0]["shardgrok"]`` holds the
        optimizer-level state (format, global step, cached signal, meta-net and its optimizer),
        where torch.distributed.checkpoint keeps it.

        ZeRO-sharded, it is this rank's shard: m, v and mu hold only this rank's range of each
        tensor and ``["sharding"]`` in that entry says which (see :meth:`full_state_dict` and
        :func:`shardgrok.consolidate_state_dict`). Under FSDP the state is DTensors (FSDP2) or
        flat shards (FSDP1): save it with torch.distributed.checkpoint."""
        self._follow_engine()
        sd = super().state_dict()
        extra = self._extra_state()
        if self._consolidated is not None:  # the whole state, gathered since the last step
            sd["state"] = {i: {**st, **self._consolidated[i]} for i, st in sd["state"].items()}
        else:
            self._layout.export_state(self, sd, extra)
        sd["param_groups"][0][CHECKPOINT_KEY] = extra
        return sd

    def consolidate_state_dict(self, to: int | None = 0) -> None:
        """Gather the whole m, v and mu onto group rank ``to`` (``None``: every rank), so that
        the next :meth:`state_dict` there is the full, world-size-independent state dict
        instead of this rank's shard. For savers that call ``state_dict()`` on one rank only
        (Hugging Face Trainer, ``torch.save`` under ``if rank == 0``); the name and the
        protocol are torch's ``ZeroRedundancyOptimizer``'s. Collective under ZeRO sharding:
        every rank calls it. The gathered state stays on rank ``to``'s CPU (the whole optimizer
        state) until the next step, :meth:`load_state_dict` or ``add_param_group``, so a
        ``state_dict()`` taken after a step never mixes in an older one.

        Nothing to do, and nothing done, when the state is not ZeRO-sharded: one process,
        ``shard=False``, DeepSpeed (its engine saves every rank's partition) and FSDP (saved
        per rank with torch.distributed.checkpoint)."""
        self._follow_engine()
        if to is not None:
            V.integer(0, self._reducer.world_size - 1)("to", to)
        self._consolidated = None
        if not isinstance(self._layout, ZeroLayout) or self._layout.engine is not None:
            return
        full = self.full_state_dict(to=to)
        if full is not None:
            self._consolidated = {i: {k: st[k] for k in (*STATE_KEYS[1:], *R.SCALE_KEYS.values())
                                      if k in st}
                                  for i, st in full["state"].items()}

    def full_state_dict(self, to: int | None = 0) -> dict[str, Any] | None:
        """The whole optimizer state, independent of the world size (what a single process's
        :meth:`state_dict` holds), on CPU. Collective under ZeRO sharding: every rank calls it;
        it is returned on group rank ``to`` (``None``: on every rank) and None elsewhere. It
        loads with :meth:`load_state_dict` at any world size. m, v and mu are all-gathered in
        buckets (docs/distributed.md, "Memory on GPUs") and assembled on the CPU of rank ``to``
        as they arrive; the device holds one bucket beyond the shards."""
        if to is not None:
            V.integer(0, self._reducer.world_size - 1)("to", to)
        sd = self._layout.full_state(self, self.state_dict(), to)
        return None if sd is None else to_cpu(sd)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a :meth:`state_dict`: a full one (:meth:`full_state_dict`,
        :func:`shardgrok.consolidate_state_dict`, any single-process checkpoint) at any world
        size, each rank slicing its own range; this rank's own ZeRO shard; or, under FSDP, what
        torch.distributed.checkpoint restored."""
        self._follow_engine()
        # Everything is checked before anything changes: a bad checkpoint leaves the state as
        # it was.
        extra = checked_extra(state_dict)
        check_saved_by(extra, type(self).__name__, self._REQUIRED_EXTRA)
        check_groups(state_dict, [len(g["params"]) for g in self.param_groups])
        self._check_extra_loads(extra)
        quantized = any(R.is_quantized(st) for st in state_dict["state"].values())
        if quantized and extra.get("int8_format") != INT8_FORMAT:
            raise ValueError(f"state_dict holds 8-bit state in codes of version "
                             f"{extra.get('int8_format')!r}; this version reads version {INT8_FORMAT}")
        if quantized and not self._layout.takes_int8:
            raise ValueError(f"{type(self).__name__}: a checkpoint with 8-bit (int8) state loads "
                             "in one process, under ZeRO-1, FSDP2 and DeepSpeed ZeRO")
        formats = [g.get("state_dtype") for g in self.param_groups]
        rest = self._layout.import_state(self, _values_by_row(without_extra(state_dict), extra),
                                         extra)
        check_entries(rest)
        self._consolidated = None
        super().load_state_dict(rest)
        for g, fmt in zip(self.param_groups, formats):  # the state format is this optimizer's
            g.pop("state_dtype", None)
            if fmt is not None:
                g["state_dtype"] = fmt
        self._restore_state_dtype(rest)
        self._driver.clear()  # torch.optim put new state tensors in
        self._param_groups_full = self.param_groups  # torch.optim rebuilt the list
        self._load_extra_state(extra)

    def _restore_state_dtype(self, loaded: dict[str, Any]) -> None:
        """torch.optim's load casts every floating state tensor to its parameter's dtype (fp32
        m, v, mu of a bf16 parameter would come back rounded to bf16): take m, v and mu again
        from the loaded dict, in this optimizer's state format. A checkpoint with state of
        another format is converted: to values (8-bit codes dequantized), then to this
        optimizer's dtype, or quantized (rounded to nearest) where it keeps 8-bit state."""
        saved_ids = [i for g in loaded["param_groups"] for i in g["params"]]
        params = [(p, g) for g in self.param_groups for p in g["params"]]
        by_id = dict(zip(saved_ids, params))
        for i, st in loaded["state"].items():
            if i not in by_id:
                continue
            p, group = by_id[i]
            if p not in self.state or not all(isinstance(st.get(k), torch.Tensor)
                                              for k in STATE_KEYS[1:]):
                continue
            pieces = self._layout.state_pieces(p)
            values = {k: (R.dequantize_pieces(local_tensor(st[k]), st[R.SCALE_KEYS[k]], k, pieces)
                          if R.is_quantized(st) else local_tensor(st[k])) for k in STATE_KEYS[1:]}
            mine = self.state[p]
            for k in list(mine):  # this optimizer's own keys only
                if k != "step" and k not in self._fresh_state_keys(p, group):
                    del mine[k]
            fmt = self.state_format_for(p, group)
            if fmt == INT8:
                fresh = self._int8_state(p, self._layout.state_like(p))
                for k, v in values.items():
                    codes = local_tensor(fresh[k])
                    R.quantize_pieces_(codes, fresh[R.SCALE_KEYS[k]],
                                       v.to(device=codes.device, dtype=torch.float32), k, pieces)
                mine.update(fresh)
            else:
                for k, v in values.items():
                    mine[k] = v.to(device=local_tensor(p).device, dtype=fmt)
                    if is_dtensor(p):
                        mine[k] = like_dtensor(mine[k], p, tuple(p.shape))

    def _fresh_state_keys(self, p: torch.Tensor, group: dict) -> tuple[str, ...]:
        keys = STATE_KEYS[1:]
        if self.state_format_for(p, group) == INT8:
            keys += tuple(R.SCALE_KEYS.values())
        return keys

    def __getstate__(self) -> dict[str, Any]:
        # torch.optim keeps only defaults/state/param_groups; ours has more (global step,
        # layout, meta-net), so copy and pickle keep the whole object, except the step driver:
        # its kernel plans hold this object's tensors (a copy builds its own at its next step).
        state = self.__dict__.copy()
        state["_driver"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        # what an older version pickled that now lives in the driver and the engine watch
        for old in ("_plans", "_stepping_plan", "_warned_fallback", "_own_ids",
                    "_own_groups_key", "_engine_checked"):
            state.pop(old, None)
        # pickled before stochastic rounding: today's defaults (torch.optim's load_state_dict
        # calls this too, with only its own keys: what this object has stays)
        for key, default in (("state_rounding", "stochastic"), ("param_rounding", "nearest"),
                             ("rounding_seed", 0)):
            if key not in state and key not in self.__dict__:
                state[key] = default
        super().__setstate__(state)
        self._driver = StepDriver()
        # a copy's parameters are new objects: what it recognises as its own must follow
        self._engine_watch = EngineWatch(self)


def _values_by_row(sd: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint whose 8-bit scales travel by row (FSDP2's, through
    torch.distributed.checkpoint, or gathered whole from it): its codes as fp32 values, each
    read at its own row's scale, for :meth:`_restore_state_dtype` to write in this optimizer's
    format. Whatever sharding saved it, each row holds the scales its codes were written at,
    so this reads back the saved values exactly; a block that a new sharding cuts elsewhere is
    then quantized afresh (to nearest: within half a step)."""
    if extra.get("int8_scales") != "rows":
        return sd
    state = {}
    for i, st in sd["state"].items():
        if not R.is_quantized(st):
            state[i] = st
            continue
        entry = {k: v for k, v in st.items() if k not in R.SCALE_KEYS.values()}
        for key in R.QUANT_BIAS:
            codes, rows = st[key], st[R.SCALE_KEYS[key]]
            row = codes.numel() // codes.shape[0]
            local = values_by_row(local_tensor(codes), local_tensor(rows), local_start(codes), row,
                                  key)
            entry[key] = like_dtensor(local, codes, tuple(codes.shape)) if is_dtensor(codes) else local
        state[i] = entry
    return {**sd, "state": state}
