"""DeepSpeed's config ``"optimizer"`` entry.

DeepSpeed builds a config optimizer ``{"type": "X"}`` only if X is one of its own names or an
attribute of ``torch.optim``, and ZeRO refuses an optimizer whose exact type is not in its
tested list unless the config sets ``zero_allow_untested_optimizer``. :func:`register` puts
``GrokAdamW`` and ``SuperGrok`` in both places; ``import shardgrok`` runs it, and building
either optimizer once DeepSpeed is imported adds it to ZeRO's list too
(:func:`shardgrok.layouts.select.on_build`), so a config entry works with no other change to
the config.

How the optimizer then follows DeepSpeed's engine (the flat partitions of ZeRO 1-3, its
clipping, its checkpoints) is the DeepSpeed layout's business: :mod:`shardgrok.layouts.deepspeed`.
"""
from __future__ import annotations

import sys

import torch

from ..layouts.deepspeed import accept_in_zero
from ..optim import GrokAdamW, GrokOptimizerBase, SuperGrok

def register() -> None:
    """Make ``"type": "GrokAdamW"`` / ``"SuperGrok"`` valid in a DeepSpeed config and, when
    DeepSpeed is imported, let ZeRO accept both optimizers without
    ``zero_allow_untested_optimizer``. Idempotent."""
    for cls in (GrokAdamW, SuperGrok):
        if getattr(torch.optim, cls.__name__, None) is not cls:
            setattr(torch.optim, cls.__name__, cls)
        if "deepspeed" in sys.modules:
            accept_in_zero(cls)


def optimizer_of(obj):
    """The GrokAdamW / SuperGrok inside the wrappers frameworks put around it, following
    ``.optimizer``: a DeepSpeed engine or ZeRO optimizer (``engine``, ``engine.optimizer``),
    accelerate's ``AcceleratedOptimizer`` (what ``accelerator.prepare`` and Hugging Face
    Trainer hold), or the optimizer itself; e.g. to call ``set_losses``,
    ``consolidate_state_dict`` or ``get_state_summary``."""
    seen = obj
    for _ in range(8):
        if isinstance(seen, GrokOptimizerBase):
            return seen
        seen = getattr(seen, "optimizer", None)
        if seen is None:
            break
    raise TypeError(f"no GrokAdamW or SuperGrok inside {type(obj).__name__}")
