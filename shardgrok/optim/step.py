"""The per-step driver: one optimizer step, from ``step()`` to the kernels and back.

::

    plan    = the cached kernel plan of this rank's pieces, or None (the reference path)
    phase 1   per-tensor partial sums of this rank's pieces, writes nothing
              (kernel: one call over every segment of the plan; reference: per segment)
    buf     = [stats | present | flags | scalars]   # losses / signals / failure / bad input
    reducer.all_reduce_(buf)                         # the one collective (identity on one process)
    if a rank failed: raise everywhere; if non-finite: skip or raise  # nothing written yet
    table   = per-tensor scalars [n, len(COLUMNS)] decided from the reduced sums, as tensors
    phase 2   the update in place from that table (kernel: one call; reference: per segment)
    layout.post_step(opt)                            # ZeRO-1 all-gather where needed

The optimizer classes supply the math around it (``GrokAdamW``/``SuperGrok``: ``STATS``,
``N_VALUES``, ``_phase1``/``_kernel_phase1``, ``_decide``, ``_phase2``/``_kernel_phase2``); the
layout supplies the pieces and the reduction; this module owns the order, the plan cache, the
reduction buffer, the one host sync and the non-finite policy. The backend rule is in
:mod:`shardgrok.kernels`.
"""
from __future__ import annotations

import pathlib
import sys
import warnings
from typing import Any, Callable

import torch

from .. import _validation as V
from .. import kernels as K
from ..kernels.plan import FusedPlan, KernelUnsupported, TensorInfo
from ..layouts import Segment, TensorRef
from ..layouts.select import groups_key
from ..placement import to_device
from ..reference import ACC

#: where a warning's frames are ours or torch's (torch.optim wraps step() in a hook and
#: no_grad in another), not the user's
_INSIDE = (str(pathlib.Path(__file__).resolve().parents[1]), str(pathlib.Path(torch.__file__).resolve().parent))

#: plans kept per optimizer: DeepSpeed alternates a few keys (one per param group); more is churn
MAX_PLANS = 16


class StepInputs:
    """Scalars a rank contributes to the reduction, and why its own inputs were rejected."""

    def __init__(self, values: list[float], bad: str | None = None, cause: BaseException | None = None):
        self.values = values
        self.bad = bad
        self.cause = cause


class StepDriver:
    """Runs an optimizer's steps and caches the kernel plans they use. One per optimizer; a
    copy or an unpickled optimizer gets a fresh one (the plans hold its tensors)."""

    def __init__(self):
        self.plans: dict[tuple, Any] = {}  # plan key -> FusedPlan, or the reason for none
        self._stepping: FusedPlan | None = None
        self._warned_fallback = False

    def clear(self) -> None:
        """Forget every plan (the layout, the groups or the state tensors changed)."""
        self.plans.clear()

    # ------------------------------------------------------------------ the plan
    def plan(self, opt) -> FusedPlan | None:
        """This step's kernel plan, or None for the reference path (the rule in
        :mod:`shardgrok.kernels`). Plans are cached by what they depend on."""
        if opt.backend == "reference":
            return None
        key = (opt._layout.plan_key(opt), groups_key(opt),
               tuple(g.get("layer_index") for g in opt.param_groups))
        plan = self.plans.get(key)
        if plan is None:
            opt._follow_devices()
            ext = K.cpu_extension()
            try:
                if ext is None:
                    raise KernelUnsupported(f"the CPU kernel is unavailable: {K.unavailable_reason()}")
                plan = FusedPlan(ext, opt, opt._layout, emulated=opt.backend == "cuda-emulated")
            except KernelUnsupported as e:
                plan = str(e)
            if len(self.plans) > MAX_PLANS:
                self.plans.clear()
            self.plans[key] = plan
        if isinstance(plan, str):
            if opt.backend in ("kernel", "cuda-emulated"):
                raise RuntimeError(f"{type(opt).__name__}(backend={opt.backend!r}): {plan}")
            if not self._warned_fallback:
                self._warned_fallback = True
                K.warn_fallback(type(opt).__name__, plan, stacklevel=user_stacklevel() + 1)
            return None
        return plan

    def _resolved_plan(self, opt) -> FusedPlan | None:
        plan = self.plan(opt)
        if plan is not None and not plan.resolve():  # the gradients, checked
            self.plans.clear()  # a parameter's storage moved (p.data = ...)
            plan = self.plan(opt)
            if plan is not None and not plan.resolve():
                raise RuntimeError("a parameter's storage moved while building the plan")
        return plan

    # ------------------------------------------------------------------ the step
    def run(self, opt, closure: Callable[[], Any] | None, inputs: Callable[[], StepInputs]):
        """One step of ``opt``; ``inputs()`` gives this rank's scalar inputs (losses, signals).
        Returns ``closure()``'s value."""
        try:
            return self._run(opt, closure, inputs)
        finally:
            plan, self._stepping = self._stepping, None
            if plan is not None:  # however the step ended: the plan lets go of the gradients
                plan.plan.release()

    def _run(self, opt, closure, inputs):
        opt._consolidated = None  # it would describe the state before this step
        opt._follow_engine(stepping=True)
        layout = opt._layout
        new_round = layout.new_round(opt)
        opt._step_number = opt._global_step + 1 if new_round else opt._global_step
        red = layout.reducer
        k = len(opt.STATS)
        loss, failure, plan, segs, refs = None, None, None, [], []
        try:
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            for group in opt.param_groups:
                V.validate(opt.SPECS, group)
            plan = self._stepping = self._resolved_plan(opt)
            if plan is not None:
                info = plan.info
                local_in = inputs()
                # phase 1 writes its sums and the present flags straight into the buffer
                buf = reduction_buffer(info.n, k, None, local_in, plan.device)
                aux = opt._kernel_phase1(plan, buf)
            else:
                opt._follow_devices()  # the kernel's path does it when it (re)builds a plan
                refs = layout.tensors(opt)
                info = TensorInfo(refs)
                segs = layout.pieces(opt)
                local_in = inputs()
                stats, aux = opt._phase1(segs, info.n)
                buf = reduction_buffer(info.n, k, None, local_in, opt._step_device())
                buf[: info.n * k] = stats.reshape(-1)
                buf[info.n * k: info.n * (k + 1)] = 0.0
                buf[[info.n * k + s.index for s in segs]] = 1.0
        except Exception as e:
            if red.world_size == 1:
                raise
            # Still join the reduction, so the other ranks learn of the failure and raise too
            # instead of waiting in the next collective.
            failure, segs, aux, plan = e, [], None, None
            info = TensorInfo(layout.tensors(opt))
            local_in = StepInputs([0.0] * opt.N_VALUES)
            buf = reduction_buffer(info.n, k, failure, local_in, opt._step_device())
            buf[: info.n * (k + 1)] = 0.0
        n = info.n
        try:
            red.all_reduce_(buf, scalars=2 + opt.N_VALUES)
        except Exception as e:
            raise collective_failed(
                opt, red, "the all-reduce of the step's sums", e,
                "Nothing was changed on this rank by this step: its parameters and optimizer "
                f"state are as after step {opt._global_step}, and a checkpoint saved before "
                "loads as usual.") from e
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
            raise RuntimeError(f"{type(opt).__name__}.step() failed on {int(n_failed)} other "
                               "rank(s) (their own errors say why); no parameter or state was "
                               "changed on this rank")
        if n_bad or not finite:
            shapes = plan.shapes if plan is not None else {s.index: tuple(s.param.shape) for s in segs}
            reject(opt, describe_bad(opt, local_in, stats, shapes), local_in.cause)
            return loss
        steps = plan.plan.bump_steps(present) if plan is not None else bump_steps(opt, refs, present)
        if new_round:  # DeepSpeed calls step() once per param group: count the first call
            opt._global_step += 1
        table, opt._last_report = opt._decide(info, stats, present, values, steps,
                                              buf[n * k: n * k + n] > 0)
        opt._last_report["backend"] = ("reference" if plan is None else
                                       "cuda-emulated" if opt.backend == "cuda-emulated" else "kernel")
        if plan is not None:
            opt._kernel_phase2(plan, table, aux)
        else:
            opt._phase2(segs, table, aux)
        try:
            layout.post_step(opt)
        except Exception as e:
            if red.world_size == 1:
                raise
            raise collective_failed(
                opt, red, "the all-gather of the updated parameters", e,
                "This rank's part of the state and parameters was updated, other ranks' may not "
                "be: resume every rank from the last checkpoint.") from e
        return loss


def collective_failed(opt, red, what: str, cause: BaseException, state: str) -> RuntimeError:
    """The error a rank raises when one of the step's collectives does not complete: a rank
    stopped answering (suspended, swapping, stuck in its own code) past the process group's
    timeout, or left. gloo and NCCL say only which operation timed out, not that it was the
    optimizer's, nor what became of the state."""
    return RuntimeError(
        f"{type(opt).__name__}.step() (optimizer step {opt._step_number}): {what} across "
        f"{red.world_size} ranks did not complete, most often because another rank stopped "
        "answering within the process group's timeout (init_distributed(timeout=...) or "
        f"init_process_group's) or left the job. {state} ({type(cause).__name__}: "
        f"{str(cause)[:300]})")


def reduction_buffer(n: int, k: int, failure, local_in: StepInputs,
                     device: torch.device) -> torch.Tensor:
    """The step's one reduction buffer, ``[stats n*k | present n | failed, bad, values]``, on
    the parameters' device (NCCL reduces it there), with the tail filled (phase 1 fills the
    rest). The tail comes from the host by an asynchronous copy."""
    tail = [1.0 if failure is not None else 0.0, 1.0 if local_in.bad else 0.0, *local_in.values]
    buf = torch.empty(n * (k + 1) + len(tail), dtype=ACC, device=device)
    buf[n * (k + 1):].copy_(to_device(torch.tensor(tail, dtype=ACC), device))
    return buf


def bump_steps(opt, refs: list[TensorRef], present: torch.Tensor) -> torch.Tensor:
    """Count this step for each optimizer parameter with a gradient somewhere (an FSDP1
    FlatParameter holds several tensors, one counter); every tensor's count after it."""
    stepped = {}
    for ref in refs:
        if present[ref.index]:
            stepped[id(ref.param)] = ref.param
    for p in stepped.values():
        opt.state[p]["step"] += 1
    return torch.tensor([float(opt.state[r.param]["step"]) for r in refs], dtype=ACC)


def scatter_stats(segs: list[Segment], partials: list[torch.Tensor], n: int, k: int) -> torch.Tensor:
    """The reference path's per-segment partial sums added into per-tensor rows [n, k]."""
    stats = torch.zeros(n, k, dtype=torch.float64)
    if segs:
        idx = torch.tensor([s.index for s in segs])
        stats.index_put_((idx,), torch.stack(partials).cpu(), accumulate=True)
    return stats


# ---------------------------------------------------------------------- non-finite policy
def describe_bad(opt, local_in: StepInputs, stats: torch.Tensor, shapes: dict) -> str:
    if local_in.bad:
        return local_in.bad
    rows = (~torch.isfinite(stats)).any(1).nonzero().flatten().tolist()
    if rows:
        where = ", ".join(f"#{i} {shapes.get(i, '')}".strip() for i in rows[:8])
        return f"non-finite gradient in parameter tensor(s) {where}{opt.NONFINITE_NOTE}"
    return "a non-finite input on another rank"


def reject(opt, reason: str, cause: BaseException | None) -> None:
    """The optimizer's ``nonfinite`` policy for a step (or meta-step) whose inputs are bad:
    raise, or count the step as skipped and warn. Nothing was changed either way."""
    name = type(opt).__name__
    if opt.nonfinite == "raise":
        raise FloatingPointError(f"{name}: {reason}; no parameter or state was changed") from cause
    opt._skipped_steps += 1
    warnings.warn(f"{name}: {reason}; step skipped, parameters and state unchanged "
                  f"({opt._skipped_steps} skipped so far)", RuntimeWarning, stacklevel=user_stacklevel())


def user_stacklevel() -> int:
    """The ``stacklevel`` that makes a ``warnings.warn`` in the calling function point at the
    user's line: the first frame outside shardgrok and torch, however many wrappers lie
    between."""
    level, frame = 1, sys._getframe(1)
    while frame is not None and frame.f_code.co_filename.startswith(_INSIDE):
        level += 1
        frame = frame.f_back
    return level
