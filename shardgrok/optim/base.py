"""What GrokAdamW and SuperGrok share: argument checks, eager state, the two-phase step with its
one reduction, the non-finite policy, and the checkpoint extras.

A step (DESIGN.md §2)::

    segments = layout.segments(opt)            # local views + global tensor index
    stats    = phase1(segments)                # per-tensor partial sums, writes nothing
    buf      = [stats | step scalars]          # losses / signals / bad-input count
    reducer.all_reduce_(buf)                   # the one collective (identity on one process)
    if non-finite: skip or raise               # nothing has been written yet
    phase2(segments, reduced stats, scalars)   # gate, clip, Adam update in place
    layout.post_step(opt)                      # ZeRO-1 all-gather where needed
"""
from __future__ import annotations

import warnings
from typing import Any, Callable, Iterable

import torch

from .. import _validation as V
from ..comm import LocalReducer
from ..layouts import LocalLayout, Segment
from ..layouts.local import tensor_layers

STATE_KEYS = ("step", "exp_avg", "exp_avg_sq", "mu")
CHECKPOINT_KEY = "shardgrok"
CHECKPOINT_FORMAT = 1


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

    def __init__(self, params: Iterable, defaults: dict[str, Any], *, nonfinite: str = "skip"):
        V.choice("skip", "raise")("nonfinite", nonfinite)
        V.validate(self.SPECS, defaults)
        self.nonfinite = nonfinite
        self._layout = LocalLayout()
        self._reducer = LocalReducer()
        self._global_step = 0
        self._skipped_steps = 0
        self._last_report: dict[str, Any] = {}
        super().__init__(params, defaults)

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
        super().add_param_group({**param_group, "params": params})
        for p in self.param_groups[-1]["params"]:
            self._init_state(p)

    def _init_state(self, p: torch.Tensor) -> None:
        # Eager, so every rank and every checkpoint has the same keys from the start.
        st = self.state[p]
        if not st:
            st["step"] = torch.tensor(0.0)
            for key in STATE_KEYS[1:]:
                st[key] = torch.zeros_like(p, memory_format=torch.preserve_format)

    # ------------------------------------------------------------------ the step
    def _step(self, closure: Callable[[], Any] | None, inputs: Callable[[], StepInputs]):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            V.validate(self.SPECS, group)

        segs = self._layout.segments(self)
        n = self._layout.num_tensors(self)
        k = len(self.STATS)
        local_in = inputs()
        stats, aux = self._phase1(segs, n)
        buf = torch.cat([stats.reshape(-1).cpu(),
                         torch.tensor([1.0 if local_in.bad else 0.0, *local_in.values],
                                      dtype=stats.dtype)])
        self._reducer.all_reduce_(buf)
        stats = buf[: n * k].view(n, k)
        n_bad, values = buf[n * k].item(), buf[n * k + 1:].tolist()

        if n_bad or not torch.isfinite(stats).all():
            self._reject(self._describe_bad(local_in, stats, segs), local_in.cause)
            return loss
        for seg in segs:
            seg.state["step"] += 1
        self._last_report = self._phase2(segs, stats, values, aux)
        self._global_step += 1
        self._layout.post_step(self)
        return loss

    def _phase1(self, segs: list[Segment], n: int) -> tuple[torch.Tensor, Any]:
        raise NotImplementedError

    def _phase2(self, segs: list[Segment], stats: torch.Tensor, values: list[float],
                aux: Any) -> dict[str, Any]:
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
    def _describe_bad(self, local_in: StepInputs, stats: torch.Tensor, segs: list[Segment]) -> str:
        if local_in.bad:
            return local_in.bad
        rows = (~torch.isfinite(stats)).any(1).nonzero().flatten().tolist()
        if rows:
            shapes = {s.index: tuple(s.param.shape) for s in segs}
            where = ", ".join(f"#{i} {shapes.get(i, '')}".strip() for i in rows[:8])
            return f"non-finite gradient in parameter tensor(s) {where}"
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
        mu, m = [], []
        for _, _, _, _, p in tensor_layers(self):
            st = self.state.get(p, {})
            if st and float(st["step"]) > 0:
                mu.append(float(st["mu"].float().norm()))
                m.append(float(st["exp_avg"].float().norm()))
        summary = {
            "global_step": self._global_step,
            "skipped_steps": self._skipped_steps,
            "total_params": self._layout.num_tensors(self),
            "avg_mu_norm": sum(mu) / len(mu) if mu else 0.0,
            "avg_exp_avg_norm": sum(m) / len(m) if m else 0.0,
        }
        summary.update(self._last_report)
        return summary

    # ------------------------------------------------------------------ checkpoints
    def _extra_state(self) -> dict[str, Any]:
        return {"format": CHECKPOINT_FORMAT, "global_step": self._global_step,
                "skipped_steps": self._skipped_steps}

    def _load_extra_state(self, extra: dict[str, Any]) -> None:
        self._global_step = int(extra["global_step"])
        self._skipped_steps = int(extra.get("skipped_steps", 0))

    def state_dict(self) -> dict[str, Any]:
        """torch.optim's ``state``/``param_groups`` plus a ``"shardgrok"`` entry holding the
        optimizer-level state (global step, cached signal, meta-net and its optimizer)."""
        sd = super().state_dict()
        sd[CHECKPOINT_KEY] = self._extra_state()
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if CHECKPOINT_KEY not in state_dict:
            raise ValueError(f"state_dict has no {CHECKPOINT_KEY!r} entry: it was not saved by a "
                             f"shardgrok optimizer's state_dict()")
        extra = state_dict[CHECKPOINT_KEY]
        if extra.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"unsupported shardgrok checkpoint format {extra.get('format')!r}; "
                             f"this version reads format {CHECKPOINT_FORMAT}")
        rest = {k: v for k, v in state_dict.items() if k != CHECKPOINT_KEY}
        super().load_state_dict(rest)
        self._load_extra_state(extra)

    def __getstate__(self) -> dict[str, Any]:
        # torch.optim keeps only defaults/state/param_groups; ours has more (global step,
        # layout, meta-net), so copy and pickle keep the whole object.
        return self.__dict__.copy()
