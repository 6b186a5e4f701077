from __future__ import annotations

import math
from typing import Any, Callable, Iterable

import torch
from torch import nn

from .. import _validation as V
from .. import reference as R
from ..kernels.header import KERNEL_KINDS
from ..metanet import bilevel
from ..metanet.net import SimpleMetaNet, check_elementwise, masked_grad, rescale_of
from ..metanet.table import build_table, is_tabulable, kernel_arrays
from ..placement import to_device
from .base import GrokOptimizerBase
from .step import StepInputs, reject, scatter_stats
from .grokadamw import GROKADAMW_SPECS

SUPERGROK_SPECS: dict[str, V.Check] = {
    **{k: v for k, v in GROKADAMW_SPECS.items() if k != "grokking_signal_decay_rate"},
    "kappa": V.real(0.0),
    "warmup_steps": V.integer(0),
}

ZERO_LOSS = 1e-6       # train_loss below this -> the zero-loss signal (Rule 3)
ZERO_LOSS_SIGNAL = 10.0


def loss_signal(train_loss: float, val_loss: float) -> float:
    """SuperGrok's grokking signal: (val - train) / train, or 10 once train loss is ~0."""
    if train_loss < ZERO_LOSS:
        return ZERO_LOSS_SIGNAL
    return (val_loss - train_loss) / train_loss


def _init_adam_state(opt: torch.optim.Adam) -> None:
    """Create Adam's state as its first step would (step 0, zero moments), so the meta-optimizer's
    state dict has its full structure from the start: torch.distributed.checkpoint loads only
    into keys that exist, and its own fill-in (a zero-lr step) would count a step."""
    for group in opt.param_groups:
        for p in group["params"]:
            opt.state[p] = {"step": torch.tensor(0.0),
                            "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                            "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}


class SuperGrok(GrokOptimizerBase):
    r"""GrokAdamW's AdamW base, a learned per-element gradient transform (NeuralGrok) and a
    cosine-gated Grokfast amplification (docs/algorithms.md).

    Per step, per tensor::

        alpha  = clamp(alpha_init * exp(-kappa * signal), 0, 1 - 1e-8)    # cached signal
        mu     = alpha * mu + (1 - alpha) * g           # raw g; mu starts at the first g
        h      = exp(f(g)) * g,  f = meta_net(g) per element, clamped to [-20, 20]
        smart  = rescale * ||g|| * h / ||h||
        final  = smart + lamb * mu   if step > warmup_steps and cos(smart, mu) > 0 else smart
        final *= min(1, gradient_clipping / (||final_group||_2 + 1e-6))   # per param group
        AdamW on final with beta1_l = beta1 * (1 - gamma)^l, bias-corrected with beta1_l

    ``signal`` is updated only by ``step(train_loss=..., val_loss=...)`` with both losses
    (averaged over ranks): ``(val - train) / train``, or 10 when ``train_loss < 1e-6``.

    The meta-net is trained by :meth:`meta_step` (one-step look-ahead hypergradient) with its own
    Adam optimizer, ``meta_optimizer`` (learning rate ``meta_lr``).

    Args:
        meta_net: a module mapping an ``(N, 1)`` tensor of gradient elements to an ``(N, 1)``
            log-mask, element by element; an optional ``rescale`` parameter on it scales the
            smart gradient. Default: ``SimpleMetaNet(meta_hidden_dim)``. It is moved to the
            device of the first parameter.
        meta_lr: learning rate of ``meta_optimizer``.
        nonfinite: ``"skip"`` (default) or ``"raise"``; see :class:`GrokAdamW`.
        shard, process_group: ZeRO-1 sharding of m, v, mu; see :class:`GrokAdamW`. The meta-net
            is replicated: rank 0's weights are broadcast at construction.
        backend: ``"auto"``, ``"kernel"`` or ``"reference"``; see :class:`GrokAdamW`. The
            kernel evaluates the default SimpleMetaNet by its exact piecewise-linear table; a
            meta-net of your own runs in PyTorch, the rest of the step fused.
        state_dtype: dtype of m, v and mu; ``None`` (default) is float32 for bfloat16/float16
            parameters and the parameter's dtype otherwise; see :class:`GrokAdamW`.
        state_rounding, param_rounding, rounding_seed: how bfloat16 state and parameters are
            written; see :class:`GrokAdamW`.
    """

    SPECS = SUPERGROK_SPECS
    STATS = R.SUPERGROK_STATS
    KERNEL_KIND = KERNEL_KINDS["supergrok"]
    NONFINITE_NOTE = (" (or its masked form exp(f(g)) * g, which overflows float32 once "
                      "|g| > ~7e29 where the meta-net's log-mask reaches its clamp of 20)")
    N_VALUES = 4  # train-loss sum and count, val-loss sum and count

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.01, alpha_init: float = 0.98,
                 lamb: float = 2.0, gamma: float = 0.1, kappa: float = 0.1,
                 warmup_steps: int = 100, gradient_clipping: float = 1.0,
                 meta_net: nn.Module | None = None, meta_hidden_dim: int = 32, *,
                 meta_lr: float = 1e-4, nonfinite: str = "skip", shard: bool | None = None,
                 process_group=None, backend: str | None = None,
                 state_dtype: torch.dtype | None = None, state_rounding: str = "stochastic",
                 param_rounding: str = "nearest", rounding_seed: int = 0):
        V.integer(1)("meta_hidden_dim", meta_hidden_dim)
        V.real(0.0, lo_open=True)("meta_lr", meta_lr)
        if meta_net is not None and not isinstance(meta_net, nn.Module):
            raise TypeError(f"meta_net must be a torch.nn.Module or None, got {type(meta_net).__name__}")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        alpha_init=alpha_init, lamb=lamb, gamma=gamma, kappa=kappa,
                        warmup_steps=warmup_steps, gradient_clipping=gradient_clipping,
                        layer_index=None)
        super().__init__(params, defaults, nonfinite=nonfinite, shard=shard,
                         process_group=process_group, backend=backend, state_dtype=state_dtype,
                         state_rounding=state_rounding, param_rounding=param_rounding,
                         rounding_seed=rounding_seed)
        self._table_cache = None  # (weights it was built from, kernel arrays)
        net = meta_net if meta_net is not None else SimpleMetaNet(hidden_dim=meta_hidden_dim)
        first = self.param_groups[0]["params"][0]
        self.meta_net = net.to(first.device)
        check_elementwise(self.meta_net)
        # Every rank applies the same transform; meta-gradients are summed over ranks, so the
        # copies stay identical from here on.
        self._reducer.broadcast_module_(self.meta_net)
        # A parameter-free meta-net (a fixed transform) has nothing to train.
        trainable = [p for p in self.meta_net.parameters() if p.requires_grad]
        self.meta_optimizer = torch.optim.Adam(trainable, lr=meta_lr) if trainable else None
        if self.meta_optimizer is not None:
            _init_adam_state(self.meta_optimizer)
        self._cached_signal: float | None = None
        self._pending_losses: tuple | None = None
        self._round_report: dict = {}

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None, train_loss: float | None = None,
             val_loss: float | None = None):
        """One optimizer step. ``train_loss`` and ``val_loss`` (floats or 0-dim tensors) update
        the cached alpha when both are given; otherwise the cached alpha is used."""
        return self._step(closure, lambda: self._loss_inputs(train_loss, val_loss))

    def set_losses(self, train_loss: float | None = None, val_loss: float | None = None) -> None:
        """Give the losses for the next optimizer step, for engines whose ``step()`` takes no
        arguments (DeepSpeed's ``engine.step()``): call it before that step. They count as if
        passed to ``step(train_loss=..., val_loss=...)``, for every per-group call the engine
        makes in that step, and are forgotten after it."""
        self._pending_losses = (self._global_step + 1, train_loss, val_loss)

    def _loss_inputs(self, train_loss, val_loss) -> StepInputs:
        pending = self._pending_losses
        if train_loss is None and val_loss is None and pending and pending[0] == self._step_number:
            _, train_loss, val_loss = pending
        values = []
        for name, v in (("train_loss", train_loss), ("val_loss", val_loss)):
            if v is None:
                values += [0.0, 0.0]
                continue
            try:
                v = float(v)
            except Exception as e:
                return StepInputs([0.0] * 4, f"{name} must be a number, got {type(v).__name__}", e)
            if not math.isfinite(v):
                return StepInputs([0.0] * 4, f"{name} is {v}")
            values += [v, 1.0]
        return StepInputs(values)

    def _phase1(self, segs, n):
        hs, partials = [], []
        for s in segs:
            h = masked_grad(self.meta_net, s.grad)
            hs.append(h)
            partials.append(R.supergrok_partial_stats(s.grad, h, R.state_value(s.state, "mu", s.start)))
        return scatter_stats(segs, partials, n, len(self.STATS)), hs

    def _kernel_table(self):
        """The default meta-net's exact piecewise-linear table as the kernel's fp32 arrays, rebuilt
        whenever the weights change; None for a meta-net that is not a SimpleMetaNet.

        On the CPU the weights are compared by value every step (meta_step, load_state_dict or
        a user's own edit, through ``.data`` too). On a GPU that would read them back every
        step, so there the table follows the weights' version counters and storage instead
        (meta_step, load_state_dict, any in-place op, ``p.data = ...``; an in-place edit through
        ``p.data`` bypasses the counter: docs/kernels.md)."""
        if not is_tabulable(self.meta_net):
            return None
        params = list(self.meta_net.net.parameters())
        cached = self._table_cache
        if params[0].device.type == "cpu":
            key = torch.cat([p.detach().reshape(-1).to(torch.float64) for p in params])
            same = (cached is not None and isinstance(cached[0], torch.Tensor)
                    and torch.equal(cached[0], key))
        else:
            key = tuple((p._version, p.data_ptr()) for p in params)
            same = cached is not None and isinstance(cached[0], tuple) and cached[0] == key
        if not same:
            arrays = kernel_arrays(build_table(self.meta_net))
            self._table_cache = cached = (key, arrays)
        return cached[1]

    def _follow_devices(self) -> None:
        """The meta-net (and its optimizer's state) follow the parameters too."""
        super()._follow_devices()
        device = self._step_device()
        current = next((p.device for p in self.meta_net.parameters()), device)
        if current != device:
            self.meta_net.to(device)
            self._table_cache = None
            if self.meta_optimizer is not None:
                for st in self.meta_optimizer.state.values():
                    for key, t in st.items():
                        if isinstance(t, torch.Tensor) and key != "step":
                            st[key] = t.to(device)

    def _kernel_inputs(self, plan) -> dict:
        arrays = self._kernel_table()
        if arrays is not None:
            return dict(breakpoints=arrays.breakpoints, slopes=arrays.slopes,
                        intercepts=arrays.intercepts, table_size=arrays.breakpoints.numel())
        # a user's meta-net runs in PyTorch; the rest of the step stays fused
        hs = [None if g is None else masked_grad(self.meta_net, g).float()
              for g in plan.plan.grad_views()]
        return dict(hs=hs)

    def _kernel_phase1(self, plan, buf):
        aux = self._kernel_inputs(plan)
        plan.phase1(self.KERNEL_KIND, len(self.STATS), buf, **aux)
        return aux

    def _decide(self, info, stats, present, values, steps, present_on_device):
        train_sum, train_n, val_sum, val_n = values
        if train_n and val_n:
            self._cached_signal = loss_signal(train_sum / train_n, val_sum / val_n)
        alphas = self._alphas()
        # Per-tensor scalars for every tensor, not only the local ones: a group's clip norm
        # sums over all its tensors, wherever they live.
        groups = self._groups()
        dev = stats.device
        t_now = self._global_step  # this step's number (already counted)
        per_group = R.group_values(groups, R.ADAM_KEYS + ("lamb", "gradient_clipping"))
        g_of = info.group_of
        alpha_g = torch.tensor(alphas, dtype=R.ACC)
        amplify_g = torch.tensor([t_now > g["warmup_steps"] for g in groups])
        mu_alpha = torch.where(steps == 1, 0.0, alpha_g[g_of])   # mu starts at the first g
        hyper = per_group[g_of]
        # what does not depend on the sums is decided on the host and sent over at once
        host = torch.zeros(info.n, len(R.COLUMNS) + 2, dtype=R.ACC)
        table_h = host[:, :len(R.COLUMNS)]
        R.adam_columns(table_h, hyper[:, :6], info.layer, steps, layerwise_bias_correction=True)
        table_h[:, R.COL["alpha"]] = mu_alpha
        table_h[:, R.COL["one_minus_alpha"]] = 1.0 - mu_alpha
        host[:, -2] = hyper[:, 6]                      # lamb
        host[:, -1] = amplify_g[g_of].to(R.ACC)        # past warm-up
        self._rounding_columns(table_h, steps)
        host = to_device(host, dev)
        table = host[:, :len(R.COLUMNS)].contiguous()
        g_dev = info.on("group_of", dev)
        rescale = rescale_of(self.meta_net)
        if isinstance(rescale, torch.Tensor):
            rescale = rescale.detach().to(device=dev, dtype=R.ACC)
        d = R.supergrok_decide(stats, table[:, R.COL["alpha"]], host[:, -2], rescale,
                               host[:, -1] > 0)
        # per group over its present tensors, as a dense sum: deterministic on every device
        # (an index_add_ on a GPU adds in a random order)
        member = g_dev.unsqueeze(0) == torch.arange(len(groups), device=dev).unsqueeze(1)
        group_sq = torch.where(member & present_on_device, d.final_sq, 0.0).sum(1)
        coefs = R.clip_coefficients(to_device(per_group[:, 7].contiguous(), dev), group_sq)
        table[:, R.COL["grad_scale"]] = coefs[g_dev]
        table[:, R.COL["amp"]] = d.amp
        table[:, R.COL["smart_scale"]] = d.smart_scale
        # DeepSpeed steps one group per call: the report covers the whole optimizer step
        r = self._round_report
        if self._step_number != r.get("step"):
            r.clear()
            n = len(present)
            r.update(step=self._step_number, present=torch.zeros(n, dtype=torch.bool),
                     engaged=torch.zeros(n, dtype=torch.bool, device=dev),
                     coefs=torch.ones(len(groups), dtype=R.ACC, device=dev))
        r["present"] |= present
        r["engaged"] = torch.where(present_on_device, d.engaged, r["engaged"])
        stepped = torch.zeros(len(groups), dtype=torch.bool)
        stepped[g_of[present]] = True
        r["coefs"] = torch.where(to_device(stepped, dev), coefs, r["coefs"])
        where = r["present"].nonzero().flatten()
        engaged = r["engaged"][to_device(where, dev)]
        report = {"cached_alpha": alphas[0], "gate_engaged": engaged,
                  "gate_engaged_fraction": (engaged.to(R.ACC).mean() if len(where)
                                            else 0.0),
                  "last_clip_coef": r["coefs"].min(), "last_clip_coefs": r["coefs"]}
        return table, report

    def _phase2(self, segs, table, hs) -> None:
        for s, h in zip(segs, hs):
            k = R.StepScalars.from_row(table[s.index])
            rounding = R.Rounding.of(k, s.index, s.start)
            with R.state_values(s.state, s.start, rounding) as (m, v, mu):
                R.supergrok_update_(s.param, s.grad, h, m, v, mu, k=k, rounding=rounding)

    def _kernel_phase2(self, plan, table, aux) -> None:
        plan.phase2(self.KERNEL_KIND, table, **aux)

    def _alphas(self) -> list[float]:
        return [R.alpha_from_signal(g["alpha_init"], g["kappa"], self._cached_signal)
                for g in self._groups()]

    # ------------------------------------------------------------------ bilevel
    def meta_step(self, val_closure: Callable[[], torch.Tensor], *,
                  lookahead_lr: float | None = None) -> float | None:
        """Train the meta-net one step on the one-step look-ahead validation loss.

        Call it after ``loss.backward()`` on a training batch (``p.grad`` holds the training
        gradients) and before :meth:`step`. It evaluates ``val_closure()`` (a function returning
        the validation loss as a tensor, without calling backward) at
        ``theta' = theta - lr * smart(g)``, computes d L_val(theta') / d phi for the meta-net
        parameters phi, and takes one ``meta_optimizer`` step. Parameters and ``p.grad`` are
        left as they were. ``lookahead_lr`` defaults to each group's ``lr``.

        Returns the look-ahead validation loss, or None when the non-finite policy skipped it.
        """
        loss = self.meta_gradient(val_closure, lookahead_lr=lookahead_lr)
        if loss is not None and self.meta_optimizer is not None:
            self.meta_optimizer.step()
        return loss

    def meta_gradient(self, val_closure: Callable[[], torch.Tensor], *,
                      lookahead_lr: float | None = None) -> float | None:
        """Like :meth:`meta_step` but only fills ``meta_net``'s ``.grad`` (zeroed first)."""
        if lookahead_lr is not None:
            V.real(0.0)("lookahead_lr", lookahead_lr)
        if self.meta_optimizer is None:
            raise RuntimeError("SuperGrok.meta_step: meta_net has no trainable parameters")
        self.meta_optimizer.zero_grad(set_to_none=True)
        self._follow_engine()
        # An engine may keep the training gradients where the step does not see them before
        # its step (DeepSpeed ZeRO): its layout then offers a view of the whole model.
        layout = self._layout.meta_view(self)
        if layout is self._layout and not any(p.grad is not None for p in layout.meta_params(self)):
            raise RuntimeError("SuperGrok.meta_step needs the training gradients in p.grad; no "
                               "parameter has a gradient (call loss.backward() first)")
        loss = bilevel.meta_gradient(self, layout, self._groups(), val_closure, lookahead_lr)
        if loss is None:
            reject(self, "non-finite validation loss or gradient in meta_step", None)
        return loss

    # ------------------------------------------------------------------ inspection
    def get_cached_alpha(self) -> float:
        """The alpha the next step will use (first param group's alpha_init and kappa)."""
        return self._alphas()[0]

    def get_state_summary(self) -> dict[str, Any]:
        summary = super().get_state_summary()
        summary["cached_alpha"] = self.get_cached_alpha()
        summary["cached_signal"] = self._cached_signal
        summary.setdefault("gate_engaged_fraction", 0.0)
        summary.setdefault("last_clip_coef", 1.0)
        return summary

    # ------------------------------------------------------------------ checkpoints
    def _extra_state(self) -> dict[str, Any]:
        extra = super()._extra_state()
        extra.update(cached_signal=self._cached_signal,
                     meta_net=self.meta_net.state_dict(),
                     meta_optimizer=(self.meta_optimizer.state_dict()
                                     if self.meta_optimizer is not None else None))
        return extra

    _REQUIRED_EXTRA = ("global_step", "cached_signal", "meta_net", "meta_optimizer")

    def _check_extra_loads(self, extra: dict[str, Any]) -> None:
        mine = self.meta_net.state_dict()
        theirs = extra["meta_net"]
        if set(theirs) != set(mine) or any(tuple(theirs[k].shape) != tuple(v.shape)
                                           for k, v in mine.items()):
            raise ValueError(
                "state_dict's meta-net has tensors "
                f"{ {k: tuple(v.shape) for k, v in theirs.items()} }; this SuperGrok's meta_net "
                f"has { {k: tuple(v.shape) for k, v in mine.items()} }: construct SuperGrok with "
                "the meta_net the checkpoint was saved with")
        if (extra["meta_optimizer"] is None) != (self.meta_optimizer is None):
            raise ValueError("state_dict " + ("has no" if extra["meta_optimizer"] is None else
                                              "has a") + " meta-optimizer state and this "
                             "SuperGrok " + ("has one" if extra["meta_optimizer"] is None
                                             else "has none"))

    def _load_extra_state(self, extra: dict[str, Any]) -> None:
        super()._load_extra_state(extra)
        self._cached_signal = extra["cached_signal"]
        self.meta_net.load_state_dict(extra["meta_net"])
        if self.meta_optimizer is not None:
            self.meta_optimizer.load_state_dict(extra["meta_optimizer"])
