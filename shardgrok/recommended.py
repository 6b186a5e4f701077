"""Settings measured to grok fast, as constructor keyword arguments.

    from shardgrok import GrokAdamW, recommended
    opt = GrokAdamW(model.parameters(), **recommended("grokadamw"))

A task's settings are the choices of the study in docs/grokking.md: each optimizer family's grid
run on a tuning set of operations and seeds, one point picked per family by the rule committed
in benchmarks/grokking_plan.toml (tests/grokking/test_grokking_study.py checks that these values
are what that rule picks from the committed tuning runs). How they fare on operations and seeds
never used in choosing is that page's held-out result, not a property of these values.
"""
from __future__ import annotations

from typing import Any

# task -> optimizer -> constructor keywords (the rest at the optimizer's defaults)
_SETTINGS: dict[str, dict[str, dict[str, Any]]] = {
    "modular-arithmetic": {
        "adamw": dict(lr=2e-3, betas=(0.9, 0.98), weight_decay=2.0),
        "grokadamw": dict(lr=2e-3, betas=(0.9, 0.98), weight_decay=3.0, alpha_init=0.9),
        "supergrok": dict(lr=1e-3, betas=(0.9, 0.98), weight_decay=3.0, alpha_init=0.9,
                          kappa=0.0),
    },
}
# task -> how often SuperGrok's bilevel meta-step runs (a training-loop schedule, not a
# constructor argument)
_META_SCHEDULE: dict[str, dict[str, Any]] = {
    "modular-arithmetic": {"every": 20, "batch": "the first training-batch-sized slice of the "
                           "validation split"},
}
TASKS = tuple(_SETTINGS)
NAMES = ("adamw", "grokadamw", "supergrok")


def _task(task: str) -> str:
    if task not in _SETTINGS:
        raise ValueError(f"recommended: task {task!r} has not been measured; the tasks measured "
                         f"are {', '.join(map(repr, TASKS))}")
    return task


def recommended(name: str, task: str = "modular-arithmetic") -> dict[str, Any]:
    """Constructor keyword arguments for ``name`` (``"adamw"`` for ``torch.optim.AdamW``,
    ``"grokadamw"``, ``"supergrok"``) on ``task``, as a new dict.

    Scope: ``"modular-arithmetic"`` is the grokking benchmark of docs/grokking.md (a 2-layer
    transformer learning ``op(x, y) mod 97`` from half the pairs, batch 512, a 10-step
    learning-rate warm-up). Its strong decoupled weight decay (2 to 3, where AdamW's usual
    is 0.01-0.1) is what makes that small task grok early; it is not a setting for
    fine-tuning a language model or any task it was not measured on. SuperGrok's meta-step
    schedule is not a constructor argument: see :func:`recommended_meta_schedule`.
    Raises ValueError for an unknown name or task, naming the known ones.
    """
    settings = _SETTINGS[_task(task)]
    if name not in settings:
        raise ValueError(f"recommended: no settings for optimizer {name!r}; choose from "
                         f"{', '.join(map(repr, settings))}")
    return dict(settings[name])


def recommended_meta_schedule(task: str = "modular-arithmetic") -> dict[str, Any]:
    """How often the study ran SuperGrok's ``meta_step`` (``every`` N optimizer steps) and on
    what batch, for ``task``."""
    return dict(_META_SCHEDULE[_task(task)])
