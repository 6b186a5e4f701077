"""Hugging Face Trainer: :class:`GrokCallback` gives GrokAdamW and SuperGrok what Trainer does not.

``Trainer(..., optimizers=(GrokAdamW(...), None), callbacks=[GrokCallback()])`` (or
``optimizer_cls_and_kwargs``, or a DeepSpeed config whose ``"optimizer"`` is ``"GrokAdamW"`` /
``"SuperGrok"``). The callback:

- **checkpoints a sharded optimizer whole.** Under torchrun/DDP the optimizer keeps only this
  rank's share of m, v, mu (ZeRO-1), and Trainer saves ``optimizer.state_dict()`` on rank 0
  alone. When Trainer is about to save, the callback calls
  :meth:`~shardgrok.optim.base.GrokOptimizerBase.consolidate_state_dict` on every rank, so
  rank 0's ``optimizer.pt`` is the full, world-size-independent state, which every rank then
  slices on ``resume_from_checkpoint``. Without the callback rank 0's file is its shard and the
  other ranks refuse it at resume (a clear error, never a silent load). DeepSpeed and FSDP save
  every rank themselves: nothing to do there.
- **feeds SuperGrok its losses**: the training loss of each optimizer step (read from the
  model's output in a forward hook, so before the step even where DeepSpeed steps inside
  ``backward``) and the latest evaluation loss (``metrics["eval_loss"]``, recovered from
  ``state.log_history`` on resume). With ``grokadamw_signal=True`` GrokAdamW gets SuperGrok's
  signal ``(val - train) / train`` from the same losses as a grokking signal function.
- **warns about double clipping**: Trainer clips the gradients to ``max_grad_norm`` (default
  1.0) before the optimizer clips its filtered gradient to ``gradient_clipping`` again. Under
  DeepSpeed ``max_grad_norm`` is the engine's ``"gradient_clipping"`` (``"auto"``): GrokAdamW
  then requires its own ``gradient_clipping`` to equal it and leaves clipping to DeepSpeed,
  and SuperGrok warns itself (docs/deepspeed.md).

The training loss is the quantity Trainer logs as ``loss``: the mean over the step's
micro-batches, or, when Trainer passes ``num_items_in_batch`` (token-averaged losses), their
sum, times the world size when the token count is averaged over devices; the optimizer
averages it over ranks. A model whose output has no ``loss`` (a custom ``compute_loss``) gives
none: call ``optimizer_of(trainer.optimizer).set_losses(...)`` yourself then.
"""
from __future__ import annotations

import warnings
from typing import Any

import torch
from transformers import TrainerCallback

from ..optim import GrokAdamW, SuperGrok
from ..optim.supergrok import loss_signal
from .clipping import warn_double_clipping
from .deepspeed import optimizer_of

__all__ = ["GrokCallback"]


def _loss_of(output: Any) -> torch.Tensor | None:
    loss = output.get("loss") if isinstance(output, dict) else getattr(output, "loss", None)
    return loss if isinstance(loss, torch.Tensor) and loss.numel() == 1 else None


class GrokCallback(TrainerCallback):
    """Trainer callback for GrokAdamW and SuperGrok (see the module docstring).

    Args:
        eval_loss_key: the evaluation metric fed to SuperGrok as ``val_loss`` (with several
            evaluation datasets Trainer names them ``eval_<name>_loss``).
        grokadamw_signal: give GrokAdamW SuperGrok's ``(val - train) / train`` as a grokking
            signal function (off by default: GrokAdamW's signal is whatever you pass it).
        feed_losses: feed the losses at all (SuperGrok; GrokAdamW with ``grokadamw_signal``).
    """

    def __init__(self, *, eval_loss_key: str = "eval_loss", grokadamw_signal: bool = False,
                 feed_losses: bool = True):
        if not isinstance(eval_loss_key, str) or not eval_loss_key:
            raise ValueError(f"eval_loss_key must be a non-empty metric name, got {eval_loss_key!r}")
        self.eval_loss_key = eval_loss_key
        self.grokadamw_signal = bool(grokadamw_signal)
        self.feed_losses = bool(feed_losses)
        self.optimizer = None          # the GrokAdamW / SuperGrok inside Trainer's wrappers
        self.val_loss: float | None = None
        self._sum: torch.Tensor | None = None  # this step's training losses, on the device
        self._count = 0
        self._scale = 1.0              # world size when Trainer averages tokens over devices
        self._by_tokens = False        # the model was given num_items_in_batch
        self._hook = None
        self._warned_no_loss = False
        self._warned_no_eval = False

    # ------------------------------------------------------------------ the losses
    @property
    def train_loss(self) -> torch.Tensor | None:
        """This optimizer step's training loss so far, as Trainer logs it (a 0-dim tensor)."""
        if self._sum is None:
            return None
        return self._sum * self._scale if self._by_tokens else self._sum / self._count

    def _on_forward(self, module, args, kwargs, output) -> None:
        if not module.training:
            return
        loss = _loss_of(output)
        if loss is None:
            if not self._warned_no_loss:
                self._warned_no_loss = True
                warnings.warn("GrokCallback: the model's output has no 'loss' (a custom "
                              "compute_loss?), so no training loss reaches the optimizer; call "
                              "shardgrok.optimizer_of(trainer.optimizer).set_losses(...) "
                              "yourself", RuntimeWarning, stacklevel=2)
            return
        # a copy: Trainer scales the model's loss in place after the forward
        loss = loss.detach().float().reshape(()).clone()
        self._by_tokens = kwargs.get("num_items_in_batch") is not None
        self._sum = loss if self._sum is None else self._sum + loss
        self._count += 1
        if isinstance(self.optimizer, SuperGrok):
            # set before the step even where DeepSpeed steps inside the last backward
            self.optimizer.set_losses(train_loss=self.train_loss, val_loss=self.val_loss)

    def _signal(self) -> float | None:
        train = self.train_loss
        if train is None or self.val_loss is None:
            return None
        return loss_signal(float(train), self.val_loss)

    # ------------------------------------------------------------------ Trainer events
    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        try:
            self.optimizer = optimizer_of(optimizer)
        except TypeError:
            raise TypeError(f"GrokCallback drives GrokAdamW or SuperGrok; Trainer's optimizer is "
                            f"{type(optimizer).__name__}") from None
        opt = self.optimizer
        # Under DeepSpeed max_grad_norm becomes the engine's clipping, which GrokAdamW takes as
        # its own and SuperGrok warns about (shardgrok.integrations.deepspeed)
        deepspeed = bool(getattr(args, "deepspeed", None)) or getattr(
            args, "deepspeed_plugin", None) is not None
        if args.max_grad_norm and args.max_grad_norm > 0 and not deepspeed:
            warn_double_clipping(
                opt, f"Trainer clips the gradients to norm {args.max_grad_norm} "
                     "(TrainingArguments.max_grad_norm, 1.0 unless set)",
                "pass max_grad_norm=0", "Trainer")
        # the latest evaluation loss survives a resume in Trainer's own log
        for entry in reversed(state.log_history or []):
            if self.eval_loss_key in entry:
                self.val_loss = float(entry[self.eval_loss_key])
                break
        self._scale = float(args.world_size) if getattr(
            args, "average_tokens_across_devices", False) and args.world_size > 1 else 1.0
        wants = isinstance(opt, SuperGrok) or (isinstance(opt, GrokAdamW) and self.grokadamw_signal)
        if self.feed_losses and wants and self._hook is None and model is not None:
            self._hook = model.register_forward_hook(self._on_forward, with_kwargs=True)
        if (self.feed_losses and self.grokadamw_signal and isinstance(opt, GrokAdamW)
                and self._signal not in opt.grokking_signal_fns):
            opt.grokking_signal_fns.append(self._signal)

    def on_step_begin(self, args, state, control, **kwargs):
        self._sum, self._count = None, 0

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        metrics = metrics or {}
        if self.eval_loss_key in metrics:
            self.val_loss = float(metrics[self.eval_loss_key])
        elif self.feed_losses and not self._warned_no_eval:
            self._warned_no_eval = True
            warnings.warn(f"GrokCallback: no {self.eval_loss_key!r} among the evaluation "
                          f"metrics {sorted(metrics)}; pass eval_loss_key=", RuntimeWarning,
                          stacklevel=2)
        if str(getattr(args.save_strategy, "value", args.save_strategy)) == "best":
            # Trainer decides whether this evaluation is a new best only after the callbacks
            self._consolidate(args)

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_save:
            self._consolidate(args)

    def on_epoch_end(self, args, state, control, **kwargs):
        if control.should_save:
            self._consolidate(args)

    def on_train_end(self, args, state, control, **kwargs):
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def _consolidate(self, args) -> None:
        if self.optimizer is not None:
            # save_on_each_node: every node's local rank 0 saves, so every rank gathers
            self.optimizer.consolidate_state_dict(to=None if args.save_on_each_node else 0)
