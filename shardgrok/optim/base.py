"""What GrokAdamW and SuperGrok share: argument checks, eager state, the two-phase step with its
one reduction, the backend choice, the non-finite policy, and the checkpoint extras.

A step (DESIGN.md §2)::

    phase 1   per-tensor partial sums of this rank's pieces, writes nothing
              (kernel: one call over every segment of a cached plan; reference: per segment)
    buf     = [stats | present | flags | scalars]   # losses / signals / failure / bad input
    reducer.all_reduce_(buf)                         # the one collective (identity on one process)
    if a rank failed: raise everywhere; if non-finite: skip or raise  # nothing written yet
    table   = per-tensor scalars [n, len(COLUMNS)] decided from the reduced sums, as tensors
    phase 2   the update in place from that table (kernel: one call; reference: per segment)
    layout.post_step(opt)                            # ZeRO-1 all-gather where needed

The backend rule is in :mod:`shardgrok.kernels`.
"""
from __future__ import annotations

import sys
import warnings
from typing import Any, Callable, Iterable

import torch

from .. import _validation as V
from ..checkpoint import (CHECKPOINT_FORMAT, CHECKPOINT_KEY, STATE_KEYS, checked_extra,
                          without_extra)
from .. import kernels as K
from ..kernels.plan import FusedPlan, KernelUnsupported, TensorInfo
from ..layouts import Segment, TensorRef, select_layout
from ..placement import is_dtensor, local_tensor, to_cpu, to_device
from ..reference import ACC


#: the dtypes ``state_dtype=`` may name; None picks per parameter (:meth:`state_dtype_for`)
STATE_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_LOW = (torch.bfloat16, torch.float16)


class StepInputs:
    """Scalars a rank contributes to the reduction, and why its own inputs were rejected."""

    def __init__(self, values: list[float], bad: str | None = None, cause: BaseException | None = None):
        self.values = values
        self.bad = bad
        self.cause = cause


class GrokOptimizerBase(torch.optim.Optimizer):
    #: group hyperparameter -> check; run at construction, in add_param_group and at every step
    SPECS: dict[str, V.Check] = {}
    #: names of the per-tensor partial sums phase 1 produces
    STATS: tuple[str, ...] = ()
    #: number of scalar inputs (sums and counts) a rank adds to the reduction
    N_VALUES = 0

    #: csrc kind code of this optimizer's kernel
    KERNEL_KIND = -1
    #: what else than the gradient itself can make a tensor's sums non-finite
    NONFINITE_NOTE = ""

    def __init__(self, params: Iterable, defaults: dict[str, Any], *, nonfinite: str = "skip",
                 shard: bool | None = None, process_group=None, backend: str | None = None,
                 state_dtype: torch.dtype | None = None):
        V.choice("skip", "raise")("nonfinite", nonfinite)
        V.validate(self.SPECS, defaults)
        if state_dtype is not None and state_dtype not in STATE_DTYPES:
            allowed = ", ".join(f"torch.{str(d).split('.')[-1]}" for d in STATE_DTYPES)
            raise ValueError(f"state_dtype must be None (float32 state for bfloat16/float16 "
                             f"parameters, the parameter's dtype otherwise) or one of "
                             f"{allowed}, got {state_dtype!r}")
        self.state_dtype = state_dtype
        self.backend = K.choose_backend(backend)
        self._plans: dict[tuple, Any] = {}   # plan key -> FusedPlan, or the reason for none
        self._stepping_plan = None            # the plan of the step under way
        self._warned_fallback = False
        if "deepspeed" in sys.modules:  # let ZeRO accept us, however DeepSpeed got us
            from ..integrations.deepspeed import register
            register()
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
        self._own_ids: set[int] = set()
        self._own_groups_key: tuple | None = None  # _groups_key() when _own_ids last matched
        self._param_groups_full: list[dict] = []
        self._step_number = 0  # the optimizer step the current step() call belongs to
        self._engine_checked = False
        self._consolidated = None  # whole m, v, mu for state_dict() (consolidate_state_dict)
        super().__init__(params, defaults)
        self._layout.verify(self)
        self._built = True

    @property
    def is_sharded(self) -> bool:
        """True when m, v and mu are split over the ranks of a process group."""
        return self._layout.sharded

    # ------------------------------------------------------------------ param groups and state
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        params = param_group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        merged = {**self.defaults, **param_group}
        V.validate(self.SPECS, merged)
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
        super().add_param_group({**param_group, "params": params})
        self._group_params.append(list(params))
        self._own_ids.update(id(p) for p in params)
        self._param_groups_full = self.param_groups
        gi = len(self.param_groups) - 1
        try:
            if self._built:  # at construction, __init__ checks all groups at once
                self._layout.verify(self, range(gi, gi + 1))
            self._layout.add_group(self, gi)
        except Exception:
            self.param_groups.pop()  # leave the optimizer as it was
            self._own_ids.difference_update(id(p) for p in self._group_params.pop())
            raise
        for p in self.param_groups[-1]["params"]:
            self._init_state(p)
        self._plans.clear()

    def state_dtype_for(self, p: torch.Tensor) -> torch.dtype:
        """The dtype of optimizer parameter ``p``'s m, v and mu: ``state_dtype`` if one was
        given, else float32 for bfloat16/float16 parameters and the parameter's own dtype
        otherwise (a bf16 v cannot follow ``v = 0.999 v + ...``: see docs/algorithms.md)."""
        if self.state_dtype is not None:
            return self.state_dtype
        return torch.float32 if p.dtype in _LOW else p.dtype

    def _init_state(self, p: torch.Tensor) -> None:
        # Eager, so every rank and every checkpoint has the same keys from the start. Under
        # sharding m, v, mu cover only this rank's part; "step" is kept for every tensor.
        st = self.state[p]
        if not st:
            st["step"] = torch.tensor(0.0)
            local = self._layout.state_like(p)
            dtype = self.state_dtype_for(p)
            for key in STATE_KEYS[1:]:
                st[key] = torch.zeros_like(local, dtype=dtype, memory_format=torch.preserve_format)

    # ------------------------------------------------------------------ engines
    def _follow_engine(self, stepping: bool = False) -> None:
        """Notice an engine driving this optimizer and adapt: DeepSpeed ZeRO 1-3 replace our
        parameters with their flat partitions (switch to the layout that maps them back to the
        original tensors); DeepSpeed without ZeRO keeps and checkpoints a replicated optimizer
        (stop sharding). Checked at step, state_dict and load_state_dict, which the engine
        calls; the search for a driving engine is settled by the first step."""
        if self._layout.engine is not None:
            return
        # The full check is per tensor: run it only when a group's list looks different from
        # the last one that passed (an engine puts new lists in; ZeRO 3 empties them).
        groups_seen = self._groups_key()
        if groups_seen != self._own_groups_key:
            current = [p for g in self.param_groups for p in g["params"]]
            # ZeRO 1/2 put flat partitions in; ZeRO 3 empties the groups between its steps
            if len(current) != len(self._own_ids) or not all(id(p) in self._own_ids for p in current):
                if self._adopt_sharded_parameters():
                    return
                from ..integrations.deepspeed import attach
                attach(self)
                self._plans.clear()
                return
            self._own_groups_key = groups_seen
        if self._engine_checked or "deepspeed" not in sys.modules or not self.is_sharded:
            return
        from ..integrations.deepspeed import engine_driving
        if engine_driving(self) is not None:
            self._unshard()
            self._engine_checked = True
        elif stepping:
            self._engine_checked = True

    def _adopt_sharded_parameters(self) -> bool:
        """accelerate's FSDP2 path shards the model after the optimizer was built and puts the
        DTensor parameters into the param groups one for one (``fsdp2_switch_optimizer_
        parameters``): before any step, start again on them (the layout FSDP2's placements
        ask for, fresh state). False when the groups hold anything else."""
        groups = [g["params"] for g in self.param_groups]
        if (not all(ps and all(is_dtensor(p) for p in ps) for ps in groups)
                or [len(ps) for ps in groups] != [len(ps) for ps in self._group_params]):
            return False
        if self._global_step:
            raise RuntimeError(f"{type(self).__name__}'s parameters were replaced by sharded "
                               "ones after it took steps; shard the model before training")
        self._group_params = [list(ps) for ps in groups]
        self._own_ids = {id(p) for ps in self._group_params for p in ps}
        self._layout = select_layout(self._group_params[0], *self._shard_args)
        self._reducer = self._layout.reducer
        self.state.clear()
        self._plans.clear()
        self._consolidated = None
        for gi in range(len(groups)):
            self._layout.add_group(self, gi)
        self._layout.verify(self)
        for ps in self._group_params:
            for p in ps:
                self._init_state(p)
        self._param_groups_full = self.param_groups
        self._own_groups_key = self._groups_key()
        return True

    def _groups_key(self) -> tuple:
        """What identifies the param groups' lists, cheaply: per group the list object, its
        length and its first and last tensor (a list edited in place elsewhere goes unseen)."""
        return tuple((id(ps), len(ps), id(ps[0]) if ps else 0, id(ps[-1]) if ps else 0)
                     for ps in (g["params"] for g in self.param_groups))

    def _unshard(self) -> None:
        """Keep the whole state on every rank (before any step); the ranks' losses and signals
        are still averaged."""
        from ..comm import ReplicatedReducer
        from ..layouts import LocalLayout
        if self._global_step:
            raise RuntimeError(f"{type(self).__name__} took steps before its engine took it over")
        self._layout = LocalLayout(ReplicatedReducer(self._reducer.group))
        self._reducer = self._layout.reducer
        self.state.clear()
        self._plans.clear()
        for ps in self._group_params:
            for p in ps:
                self._init_state(p)

    # ------------------------------------------------------------------ the step
    def _tensors(self) -> list[TensorRef]:
        return self._layout.tensors(self)

    def _groups(self) -> list[dict]:
        """All param groups. Usually ``param_groups``; DeepSpeed's ZeRO 1/2 narrows that list to
        the one group it steps, so the layout keeps the whole list."""
        return self._layout.groups(self)

    def _fused_plan(self) -> FusedPlan | None:
        """This step's kernel plan, or None for the reference path (the rule in
        :mod:`shardgrok.kernels`). Plans are cached by what they depend on."""
        if self.backend == "reference":
            return None
        key = (self._layout.plan_key(self), self._groups_key(),
               tuple(g.get("layer_index") for g in self.param_groups))
        plan = self._plans.get(key)
        if plan is None:
            self._follow_devices()
            ext = K.cpu_extension()
            try:
                if ext is None:
                    raise KernelUnsupported(f"the CPU kernel is unavailable: {K.unavailable_reason()}")
                plan = FusedPlan(ext, self, self._layout)
            except KernelUnsupported as e:
                plan = str(e)
            if len(self._plans) > 16:  # DeepSpeed alternates a few keys; anything else is churn
                self._plans.clear()
            self._plans[key] = plan
        if isinstance(plan, str):
            if self.backend == "kernel":
                raise RuntimeError(f"{type(self).__name__}(backend='kernel'): {plan}")
            if not self._warned_fallback:
                self._warned_fallback = True
                K.warn_fallback(type(self).__name__, plan, stacklevel=5)
            return None
        return plan

    def _step(self, closure: Callable[[], Any] | None, inputs: Callable[[], StepInputs]):
        try:
            return self._step_once(closure, inputs)
        finally:
            plan, self._stepping_plan = self._stepping_plan, None
            if plan is not None:  # however the step ended: the plan lets go of the gradients
                plan.plan.release()

    def _step_once(self, closure, inputs):
        self._consolidated = None  # it would describe the state before this step
        self._follow_engine(stepping=True)
        new_round = self._layout.new_round(self)
        self._step_number = self._global_step + 1 if new_round else self._global_step
        red = self._reducer
        k = len(self.STATS)
        loss, failure, plan, segs = None, None, None, []
        try:
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            for group in self.param_groups:
                V.validate(self.SPECS, group)
            plan = self._fused_plan()
            if plan is not None and not plan.resolve():  # the gradients, checked
                self._plans.clear()  # a parameter's storage moved (p.data = ...)
                plan = self._fused_plan()
                if plan is not None and not plan.resolve():
                    raise RuntimeError("a parameter's storage moved while building the plan")
            self._stepping_plan = plan
            if plan is not None:
                info = plan.info
                local_in = inputs()
                # phase 1 writes its sums and the present flags straight into the buffer
                buf = self._reduction_buffer(info.n, k, None, local_in, plan.device)
                aux = self._kernel_phase1(plan, buf)
            else:
                self._follow_devices()  # the kernel's path does it when it (re)builds a plan
                refs = self._tensors()
                info = TensorInfo(refs)
                segs = self._layout.pieces(self)
                local_in = inputs()
                stats, aux = self._phase1(segs, info.n)
                buf = self._reduction_buffer(info.n, k, None, local_in, self._step_device())
                buf[: info.n * k] = stats.reshape(-1)
                buf[info.n * k: info.n * (k + 1)] = 0.0
                buf[[info.n * k + s.index for s in segs]] = 1.0
        except Exception as e:
            if red.world_size == 1:
                raise
            # Still join the reduction, so the other ranks learn of the failure and raise too
            # instead of waiting in the next collective.
            failure, segs, aux, plan = e, [], None, None
            info = TensorInfo(self._tensors())
            local_in = StepInputs([0.0] * self.N_VALUES)
            buf = self._reduction_buffer(info.n, k, failure, local_in, self._step_device())
            buf[: info.n * (k + 1)] = 0.0
        n = info.n
        red.all_reduce_(buf, scalars=2 + self.N_VALUES)
        stats = buf[: n * k].view(n, k)
        # The step's one host sync: the present flags, the failure and bad-input counts, the
        # reduced scalar inputs and whether every sum is finite, in one copy (none on the CPU).
        head = torch.cat([buf[n * k:], torch.isfinite(stats).all().to(ACC).view(1)]).cpu()
        present = head[:n] > 0
        n_failed, n_bad = float(head[n]), float(head[n + 1])
        values = head[n + 2:-1].tolist()
        finite = bool(head[-1])

        if n_failed:
            if failure is not None:
                raise failure
            raise RuntimeError(f"{type(self).__name__}.step() failed on {int(n_failed)} other "
                               "rank(s) (their own errors say why); no parameter or state was "
                               "changed on this rank")
        if n_bad or not finite:
            shapes = plan.shapes if plan is not None else {s.index: tuple(s.param.shape) for s in segs}
            self._reject(self._describe_bad(local_in, stats, shapes), local_in.cause)
            return loss
        if plan is not None:
            steps = plan.plan.bump_steps(present)
        else:
            steps = self._bump_steps(refs, present)
        if new_round:  # DeepSpeed calls step() once per param group: count the first call
            self._global_step += 1
        table, self._last_report = self._decide(info, stats, present, values, steps,
                                                buf[n * k: n * k + n] > 0)
        self._last_report["backend"] = "kernel" if plan is not None else "reference"
        if plan is not None:
            self._kernel_phase2(plan, table, aux)
        else:
            self._phase2(segs, table, aux)
        self._layout.post_step(self)
        return loss

    def _reduction_buffer(self, n: int, k: int, failure, local_in: StepInputs,
                          device: torch.device) -> torch.Tensor:
        """The step's one reduction buffer, ``[stats n*k | present n | failed, bad, values]``,
        on the parameters' device (NCCL reduces it there), with the tail filled (phase 1 fills
        the rest). The tail comes from the host by an asynchronous copy."""
        tail = [1.0 if failure is not None else 0.0, 1.0 if local_in.bad else 0.0,
                *local_in.values]
        buf = torch.empty(n * (k + 1) + len(tail), dtype=ACC, device=device)
        buf[n * (k + 1):].copy_(to_device(torch.tensor(tail, dtype=ACC), device))
        return buf

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
                for key in STATE_KEYS[1:]:
                    t = st.get(key)
                    if isinstance(t, torch.Tensor) and not is_dtensor(t) and t.device != device:
                        st[key] = t.to(device)

    def _bump_steps(self, refs: list[TensorRef], present: torch.Tensor) -> torch.Tensor:
        """Count this step for each optimizer parameter with a gradient somewhere (an FSDP1
        FlatParameter holds several tensors, one counter); every tensor's count after it."""
        stepped = {}
        for ref in refs:
            if present[ref.index]:
                stepped[id(ref.param)] = ref.param
        for p in stepped.values():
            self.state[p]["step"] += 1
        return torch.tensor([float(self.state[r.param]["step"]) for r in refs], dtype=ACC)

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

    @staticmethod
    def _scatter_stats(segs: list[Segment], partials: list[torch.Tensor], n: int,
                       k: int) -> torch.Tensor:
        stats = torch.zeros(n, k, dtype=torch.float64)
        if segs:
            idx = torch.tensor([s.index for s in segs])
            stats.index_put_((idx,), torch.stack(partials).cpu(), accumulate=True)
        return stats

    # ------------------------------------------------------------------ non-finite policy
    def _describe_bad(self, local_in: StepInputs, stats: torch.Tensor, shapes: dict) -> str:
        if local_in.bad:
            return local_in.bad
        rows = (~torch.isfinite(stats)).any(1).nonzero().flatten().tolist()
        if rows:
            where = ", ".join(f"#{i} {shapes.get(i, '')}".strip() for i in rows[:8])
            return f"non-finite gradient in parameter tensor(s) {where}{self.NONFINITE_NOTE}"
        return "a non-finite input on another rank"

    def _reject(self, reason: str, cause: BaseException | None) -> None:
        name = type(self).__name__
        if self.nonfinite == "raise":
            raise FloatingPointError(f"{name}: {reason}; no parameter or state was changed") from cause
        self._skipped_steps += 1
        warnings.warn(f"{name}: {reason}; step skipped, parameters and state unchanged "
                      f"({self._skipped_steps} skipped so far)", RuntimeWarning, stacklevel=4)

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
            sums[s.index, 1] += float(s.state["mu"].double().square().sum())
            sums[s.index, 2] += float(s.state["exp_avg"].double().square().sum())
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
        return {"format": CHECKPOINT_FORMAT, "global_step": self._global_step,
                "skipped_steps": self._skipped_steps}

    def _load_extra_state(self, extra: dict[str, Any]) -> None:
        self._global_step = int(extra["global_step"])
        self._skipped_steps = int(extra.get("skipped_steps", 0))

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
        from ..layouts import ZeroLayout
        self._follow_engine()
        if to is not None:
            V.integer(0, self._reducer.world_size - 1)("to", to)
        self._consolidated = None
        if not isinstance(self._layout, ZeroLayout) or self._layout.engine is not None:
            return
        full = self.full_state_dict(to=to)
        if full is not None:
            self._consolidated = {i: {k: st[k] for k in STATE_KEYS[1:]}
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
        self._consolidated = None
        extra = checked_extra(state_dict)
        rest = self._layout.import_state(self, without_extra(state_dict), extra)
        super().load_state_dict(rest)
        self._restore_state_dtype(rest)
        self._plans.clear()  # torch.optim put new state tensors in
        self._param_groups_full = self.param_groups  # torch.optim rebuilt the list
        self._load_extra_state(extra)

    def _restore_state_dtype(self, loaded: dict[str, Any]) -> None:
        """torch.optim's load casts every floating state tensor to its parameter's dtype (fp32
        m, v, mu of a bf16 parameter would come back rounded to bf16): take m, v and mu again
        from the loaded dict, in this optimizer's state dtype (a checkpoint with state of another
        dtype is converted)."""
        saved_ids = [i for g in loaded["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        by_id = dict(zip(saved_ids, params))
        for i, st in loaded["state"].items():
            p = by_id.get(i)
            if p is None or p not in self.state:
                continue
            mine = self.state[p]
            for key in STATE_KEYS[1:]:
                v = st.get(key)
                if isinstance(v, torch.Tensor) and v.is_floating_point():
                    mine[key] = v.to(device=p.device, dtype=self.state_dtype_for(p))

    def __getstate__(self) -> dict[str, Any]:
        # torch.optim keeps only defaults/state/param_groups; ours has more (global step,
        # layout, meta-net), so copy and pickle keep the whole object, except the kernel plans:
        # they hold this object's tensors (a copy builds its own at its next step).
        state = self.__dict__.copy()
        state["_plans"] = {}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        # a copy's parameters are new objects: what it recognises as its own must follow
        self._own_ids = {id(p) for ps in self._group_params for p in ps}
        self._own_groups_key = None
