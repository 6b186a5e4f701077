from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Sequence

import torch

from .. import _validation as V
from .. import reference as R
from ..kernels.header import KERNEL_KINDS
from ..placement import to_device
from .base import GrokOptimizerBase
from .step import StepInputs, scatter_stats

SignalFn = Callable[[], Any]

GROKADAMW_SPECS: dict[str, V.Check] = {
    "lr": V.real(0.0),
    "betas": V.betas,
    "eps": V.real(0.0),
    "weight_decay": V.real(0.0),
    "alpha_init": V.real(0.0, 1.0, hi_open=True),
    "lamb": V.real(0.0),
    "gamma": V.real(0.0, 1.0, hi_open=True),
    "grokking_signal_decay_rate": V.real(0.0),
    "gradient_clipping": V.real(0.0),
    "layer_index": V.optional(V.integer(0)),
}


def _signal_fns(fns: SignalFn | Sequence[SignalFn] | None, fn: SignalFn | None) -> list[SignalFn]:
    if fns is not None and fn is not None:
        raise ValueError("pass either grokking_signal_fns (a list) or grokking_signal_fn (one "
                         "function), not both")
    if fn is not None:
        fns = [fn]
    if fns is None:
        return []
    if callable(fns):
        fns = [fns]
    fns = list(fns)
    for i, f in enumerate(fns):
        if not callable(f):
            raise TypeError(f"grokking_signal_fns[{i}] must be a callable taking no arguments and "
                            f"returning a number or None, got {type(f).__name__}")
    return fns


class GrokAdamW(GrokOptimizerBase):
    r"""AdamW with Grokfast's slow-gradient amplification (docs/algorithms.md).

    Per step, with GS the mean of the grokking signals (averaged over ranks)::

        alpha  = clamp(alpha_init * exp(-grokking_signal_decay_rate * GS), 0, 1 - 1e-8)
        g      = g * min(1, gradient_clipping / (||g_all||_2 + 1e-6))     # global norm
        mu     = alpha * mu + (1 - alpha) * g                              # mu starts at 0
        g_hat  = g + lamb * mu
        m      = beta1_l * m + (1 - beta1_l) * g_hat,  beta1_l = beta1 * (1 - gamma)^l
        v      = beta2 * v + (1 - beta2) * g_hat^2
        theta -= lr * (m / (1 - beta1^t) / (sqrt(v / (1 - beta2^t)) + eps) + weight_decay * theta)

    ``l`` is the tensor's index over all param groups in construction order, unless its group
    sets ``layer_index``. ``p.grad`` is read, never modified. Where this differs from the
    ``grokadamw`` 0.1.2 package, see docs/algorithms.md.

    Args:
        grokking_signal_fns: callables taking no arguments and returning a number (or None to
            abstain); their mean is GS. ``grokking_signal_fn=`` accepts a single one.
        nonfinite: ``"skip"`` (default) or ``"raise"``: what a step does when a gradient is
            NaN/Inf or a signal function raises or returns NaN/Inf. Either way no parameter or
            state is changed.
        shard: ``None`` (default) shards m, v, mu over the ranks of ``process_group`` when
            torch.distributed is initialised with more than one rank (ZeRO-1: each rank keeps
            and updates 1/N of the flattened parameters, then all-gathers them); ``False``
            keeps everything on this process; ``True`` requires a process group.
        process_group: the group to shard over (default: the default group). Every rank of it
            must build the optimizer over the same parameters and call every ``step()``.
        backend: ``"auto"`` (default; also set by ``SHARDGROK_BACKEND``), ``"kernel"`` or
            ``"reference"``: the compiled two-call step or the per-tensor PyTorch one (the rule
            is in :mod:`shardgrok.kernels`).
        state_dtype: dtype of m, v and mu. ``None`` (default): float32 for bfloat16/float16
            parameters, the parameter's own dtype otherwise (float32, float64). bf16 state
            cannot follow ``v = 0.999 v + ...`` (the product rounds back to v), so low-precision
            parameters trained without fp32 master weights get fp32 state (12 bytes per
            parameter for the three states instead of 6). ``torch.float32``,
            ``torch.float64``, ``torch.bfloat16`` or ``torch.float16`` applies to every
            tensor (``torch.bfloat16`` on bf16 parameters: torch.optim's behaviour, half the
            state memory). The math is fp32 (fp64 when a parameter or its state is fp64); the
            parameter is rounded to its dtype once per update. See docs/algorithms.md.
        state_rounding: ``"stochastic"`` (default) or ``"nearest"``: how bfloat16 m, v and mu
            are written. Stochastic rounding rounds up with probability (the dropped bits) /
            2^16, so a bf16 v decays as an fp32 one does on average, where round-to-nearest
            keeps ``0.999 v`` at v; ``"nearest"`` is torch.optim's behaviour. Other state
            dtypes always round to nearest.
        param_rounding: ``"nearest"`` (default) or ``"stochastic"``: the same for bfloat16
            parameters trained without fp32 master weights (other dtypes: nearest).
        rounding_seed: an integer in [0, 2^32): with each tensor's step count, its index and
            the element's index in the whole tensor it determines every stochastic rounding's
            draw, so the bits do not depend on the world size, layout, thread count,
            instruction set or backend. Saved in ``state_dict()``.
    """

    SPECS = GROKADAMW_SPECS
    STATS = R.GROKADAMW_STATS
    KERNEL_KIND = KERNEL_KINDS["grokadamw"]
    N_VALUES = 2  # signal sum, number of ranks with a signal

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, alpha_init: float = 0.98,
                 lamb: float = 2.0, gamma: float = 0.1,
                 grokking_signal_fns: Sequence[SignalFn] | None = None,
                 grokking_signal_decay_rate: float = 0.1, gradient_clipping: float = 1.0, *,
                 grokking_signal_fn: SignalFn | None = None, nonfinite: str = "skip",
                 shard: bool | None = None, process_group=None, backend: str | None = None,
                 state_dtype: torch.dtype | None = None, state_rounding: str = "stochastic",
                 param_rounding: str = "nearest", rounding_seed: int = 0):
        self.grokking_signal_fns = _signal_fns(grokking_signal_fns, grokking_signal_fn)
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        alpha_init=alpha_init, lamb=lamb, gamma=gamma,
                        grokking_signal_decay_rate=grokking_signal_decay_rate,
                        gradient_clipping=gradient_clipping, layer_index=None)
        super().__init__(params, defaults, nonfinite=nonfinite, shard=shard,
                         process_group=process_group, backend=backend, state_dtype=state_dtype,
                         state_rounding=state_rounding, param_rounding=param_rounding,
                         rounding_seed=rounding_seed)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None):
        """One optimizer step; returns ``closure()``'s value when a closure is given."""
        return self._step(closure, self._signal_inputs)

    def _signal_inputs(self) -> StepInputs:
        values = []
        for i, fn in enumerate(self.grokking_signal_fns):
            try:
                v = fn()
                if v is None:
                    continue
                v = float(v)
            except Exception as e:  # the policy decides: skip the step or raise
                return StepInputs([0.0, 0.0], f"grokking_signal_fns[{i}] raised {e!r}", e)
            if not math.isfinite(v):
                return StepInputs([0.0, 0.0], f"grokking_signal_fns[{i}] returned {v}")
            values.append(v)
        if not values:
            return StepInputs([0.0, 0.0])
        return StepInputs([sum(values) / len(values), 1.0])

    def _phase1(self, segs, n):
        return scatter_stats(segs, [R.grokadamw_partial_stats(s.grad) for s in segs], n, 1), None

    def _kernel_phase1(self, plan, buf):
        plan.phase1(self.KERNEL_KIND, len(self.STATS), buf)

    def _decide(self, info, stats, present, values, steps, present_on_device):
        signal_sum, signal_ranks = values
        signal = signal_sum / signal_ranks if signal_ranks else None
        dev = stats.device
        norm_sq = stats[:, 0].sum()
        groups = self._groups()
        alphas = [R.alpha_from_signal(g["alpha_init"], g["grokking_signal_decay_rate"], signal)
                  for g in groups]
        per_group = R.group_values(groups, R.ADAM_KEYS + ("lamb", "gradient_clipping"))
        hyper = per_group[info.group_of]
        # what does not depend on the sums is decided on the host and sent over once
        table = torch.zeros(info.n, len(R.COLUMNS), dtype=R.ACC)
        R.adam_columns(table, hyper[:, :6], info.layer, steps, layerwise_bias_correction=False)
        table[:, R.COL["amp"]] = hyper[:, 6]
        alpha_g = torch.tensor([[a, 1.0 - a] for a in alphas], dtype=R.ACC)
        table[:, [R.COL["alpha"], R.COL["one_minus_alpha"]]] = alpha_g[info.group_of]
        table[:, R.COL["grad_scale"]] = 1.0
        self._rounding_columns(table, steps)
        table = to_device(table, dev)
        # Under DeepSpeed the engine has clipped already (same formula, global): report its
        # coefficient, apply none.
        if self._layout.engine_clips:
            coefs = self._layout.clip_coefficient() * torch.ones(len(groups), dtype=R.ACC, device=dev)
        else:
            coefs = R.clip_coefficients(to_device(per_group[:, 7].contiguous(), dev), norm_sq)
            table[:, R.COL["grad_scale"]] = coefs[info.on("group_of", dev)]
        report = {"grokking_signal": signal, "alpha": alphas[0], "alphas": alphas,
                  "grad_norm": norm_sq.clamp_min(0).sqrt(), "last_clip_coef": coefs.min(),
                  "last_clip_coefs": coefs}
        return table, report

    def _phase2(self, segs, table, aux) -> None:
        for s in segs:
            k = R.StepScalars.from_row(table[s.index])
            rounding = R.Rounding.of(k, s.index, s.start)
            with R.state_values(s.state, s.start, rounding) as (m, v, mu):
                R.grokadamw_update_(s.param, s.grad, m, v, mu, k=k, rounding=rounding)

    def _kernel_phase2(self, plan, table, aux) -> None:
        plan.phase2(self.KERNEL_KIND, table)

    def get_alpha(self) -> float:
        """alpha used at the last step (first param group); alpha_init before any step."""
        return self._last_report.get("alpha", R.alpha_from_signal(self.param_groups[0]["alpha_init"], 0.0, None))
