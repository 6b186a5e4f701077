"""Argument checks shared by the optimizers.

Every check names the argument and the allowed range, so a bad value fails at construction
(or at the next ``step()`` when a scheduler or a user edits a param group) instead of silently
producing NaNs later.
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Callable

Check = Callable[[str, Any], None]


def _fmt(lo: float | None, hi: float | None, lo_open: bool, hi_open: bool) -> str:
    left = "(" if lo_open or lo is None else "["
    right = ")" if hi_open or hi is None else "]"
    lo_s = "-inf" if lo is None else f"{lo:g}"
    hi_s = "inf" if hi is None else f"{hi:g}"
    return f"{left}{lo_s}, {hi_s}{right}"


def real(lo: float | None = None, hi: float | None = None, *,
         lo_open: bool = False, hi_open: bool = False) -> Check:
    """A finite real number in the given interval (bounds inclusive unless marked open)."""
    span = _fmt(lo, hi, lo_open, hi_open)

    def check(name: str, value: Any) -> None:
        ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
        if ok:
            v = float(value)
            ok = math.isfinite(v)
            ok = ok and (lo is None or (v > lo if lo_open else v >= lo))
            ok = ok and (hi is None or (v < hi if hi_open else v <= hi))
        if not ok:
            raise ValueError(f"{name} must be a finite number in {span}, got {value!r}")

    return check


def integer(lo: int, hi: int | None = None) -> Check:
    def check(name: str, value: Any) -> None:
        if (not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < lo
                or (hi is not None and value > hi)):
            allowed = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
            raise ValueError(f"{name} must be an integer {allowed}, got {value!r}")

    return check


def optional(inner: Check) -> Check:
    def check(name: str, value: Any) -> None:
        if value is not None:
            inner(name, value)

    return check


def betas(name: str, value: Any) -> None:
    unit = real(0.0, 1.0, hi_open=True)
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise ValueError(f"{name} must be a pair (beta1, beta2), each in [0, 1), got {value!r}")
    unit(f"{name}[0]", value[0])
    unit(f"{name}[1]", value[1])


def choice(*allowed: str) -> Check:
    def check(name: str, value: Any) -> None:
        if value not in allowed:
            raise ValueError(f"{name} must be one of {allowed}, got {value!r}")

    return check


def validate(specs: dict[str, Check], values: dict[str, Any]) -> None:
    for name, check in specs.items():
        if name in values:
            check(name, values[name])
