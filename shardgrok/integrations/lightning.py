"""PyTorch Lightning: :class:`GrokCallback` gives GrokAdamW and SuperGrok what Lightning does not.

``Trainer(..., callbacks=[GrokCallback()])``, the optimizer returned by the module's
``configure_optimizers``. Checkpoints need nothing from it: Lightning's strategies call the
optimizer's ``consolidate_state_dict()`` before they save, so under ``strategy="ddp"`` rank 0's
checkpoint holds the full, world-size-independent state, which ``trainer.fit(ckpt_path=...)``
gives every rank to slice (Fabric's ``fabric.save`` and ``fabric.load`` do the same). The
callback:

- **feeds SuperGrok its losses**: before each optimizer step, the training loss of that step
  (what Lightning backpropagates, summed over the step's accumulated micro-batches, each of
  which Lightning has divided by ``accumulate_grad_batches``: their mean) and the latest
  validation loss (``trainer.callback_metrics[val_loss_key]``, what the module logs with
  ``self.log("val_loss", ...)`` in its validation step). The validation loss is kept in the
  callback's own checkpoint state, so a resumed run has it before its first validation. The
  optimizer averages the training loss over the ranks itself.
- **warns about double clipping**: ``Trainer(gradient_clip_val=...)`` clips the gradients, then
  the optimizer clips its filtered gradient to ``gradient_clipping`` again.

GrokAdamW takes no losses; for it the callback only checks the clipping.
"""
from __future__ import annotations

import warnings
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback

from ..optim import SuperGrok
from ..optim.base import GrokOptimizerBase
from .clipping import warn_double_clipping
from .deepspeed import optimizer_of

__all__ = ["GrokCallback"]


def _ours(optimizer) -> GrokOptimizerBase | None:
    try:
        return optimizer_of(optimizer)
    except TypeError:
        return None


class GrokCallback(Callback):
    """Lightning callback for GrokAdamW and SuperGrok (see the module docstring).

    Args:
        val_loss_key: the logged metric fed to SuperGrok as ``val_loss``.
        feed_losses: feed SuperGrok the losses at all (off: call its ``set_losses`` yourself).
    """

    def __init__(self, *, val_loss_key: str = "val_loss", feed_losses: bool = True):
        if not isinstance(val_loss_key, str) or not val_loss_key:
            raise ValueError(f"val_loss_key must be a non-empty metric name, got {val_loss_key!r}")
        self.val_loss_key = val_loss_key
        self.feed_losses = bool(feed_losses)
        self.val_loss: float | None = None
        self._sum: torch.Tensor | None = None   # this optimizer step's training loss so far
        self._warned_no_val = False

    def on_train_start(self, trainer, pl_module) -> None:
        ours = [o for o in map(_ours, trainer.optimizers) if o is not None]
        if not ours:
            raise TypeError("GrokCallback drives GrokAdamW or SuperGrok; configure_optimizers "
                            "returned " + (", ".join(type(o).__name__ for o in trainer.optimizers)
                                           or "no optimizer"))
        clip = trainer.gradient_clip_val
        if clip and clip > 0:
            for opt in ours:
                warn_double_clipping(
                    opt, f"Lightning clips the gradients (Trainer(gradient_clip_val={clip}))",
                    "leave gradient_clip_val unset", "Lightning")

    def on_before_backward(self, trainer, pl_module, loss: torch.Tensor) -> None:
        if self.feed_losses:
            loss = loss.detach().float().reshape(()).clone()
            self._sum = loss if self._sum is None else self._sum + loss

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        opt = _ours(optimizer)
        if self.feed_losses and isinstance(opt, SuperGrok):
            # read inside the step, after Lightning's closure has run the backward passes
            opt.set_losses(train_loss=self._sum, val_loss=self.val_loss)
        self._sum = None

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        metrics = trainer.callback_metrics
        if self.val_loss_key in metrics:
            self.val_loss = float(metrics[self.val_loss_key])
        elif self.feed_losses and not self._warned_no_val:
            self._warned_no_val = True
            warnings.warn(f"GrokCallback: no {self.val_loss_key!r} among the logged metrics "
                          f"{sorted(metrics)}; log it in validation_step or pass val_loss_key=",
                          RuntimeWarning, stacklevel=2)

    def state_dict(self) -> dict[str, Any]:
        return {"val_loss": self.val_loss}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.val_loss = state_dict.get("val_loss")
