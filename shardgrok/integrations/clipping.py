"""The warning every trainer integration gives when the trainer clips the gradients and the
optimizer then clips its filtered gradient again: two clippings at two places in the step, where
a user meant one."""
from __future__ import annotations

import warnings


def warn_double_clipping(opt, trainer_clips: str, trainer_off: str, trainer: str) -> None:
    """Warn if any param group of ``opt`` clips (``gradient_clipping > 0``); the caller has
    found that the trainer clips too. ``trainer_clips`` says how the trainer clips,
    ``trainer_off`` how to turn that off, ``trainer`` names it."""
    clipping = [g["gradient_clipping"] for g in opt.param_groups if g["gradient_clipping"] > 0]
    if clipping:
        warnings.warn(
            f"{trainer_clips} and then {type(opt).__name__} clips its filtered gradient to "
            f"gradient_clipping={clipping[0]} per param group: {trainer_off} to leave clipping "
            f"to the optimizer, or pass gradient_clipping=0 to the optimizer to leave it to "
            f"{trainer}", UserWarning, stacklevel=3)
