"""Grokfast's gradient filters, for use with any optimizer (Lee et al., 2024).

Call between ``loss.backward()`` and ``optimizer.step()``; each call adds ``lamb`` times the
filtered (slow) gradient to every ``p.grad`` and returns the filter state to pass to the next call::

    grads = None
    for batch in data:
        loss = model(batch).backward()
        grads = gradfilter_ema(model, grads, alpha=0.98, lamb=2.0)
        optimizer.step(); optimizer.zero_grad()

Same semantics as the paper's code: the EMA starts at the first gradient; the moving average
is over the last ``window_size`` gradients and, with ``warmup=True``, is applied only once the
window is full (and not while ``trigger`` is set).
"""
from __future__ import annotations

from collections import deque

import torch
from torch import nn

from . import _validation as V


def _grads(m: nn.Module):
    for name, p in m.named_parameters():
        if p.requires_grad and p.grad is not None:
            yield name, p


def gradfilter_ema(m: nn.Module, grads: dict[str, torch.Tensor] | None = None,
                   alpha: float = 0.98, lamb: float = 2.0) -> dict[str, torch.Tensor]:
    """``ema = alpha * ema + (1 - alpha) * g`` (ema starts at the first g), then ``g += lamb * ema``."""
    V.real(0.0, 1.0)("alpha", alpha)
    V.real()("lamb", lamb)
    grads = {} if grads is None else grads
    for name, p in _grads(m):
        g = p.grad.detach()
        ema = grads.get(name)
        ema = g.clone() if ema is None else ema.mul_(alpha).add_(g, alpha=1.0 - alpha)
        grads[name] = ema
        p.grad = g + lamb * ema
    return grads


def gradfilter_ma(m: nn.Module, grads: dict[str, deque] | None = None, window_size: int = 100,
                  lamb: float = 5.0, filter_type: str = "mean", warmup: bool = True,
                  trigger: bool = False) -> dict[str, deque]:
    """Keep the last ``window_size`` gradients per parameter and add ``lamb`` times their mean
    (``filter_type="mean"``) or sum (``"sum"``) to ``p.grad``: always when ``warmup=False``,
    else once the window is full and ``trigger`` is False."""
    V.integer(1)("window_size", window_size)
    V.real()("lamb", lamb)
    V.choice("mean", "sum")("filter_type", filter_type)
    grads = {} if grads is None else grads
    for name, p in _grads(m):
        window = grads.get(name)
        if window is None or window.maxlen != window_size:
            window = grads[name] = deque(window or (), maxlen=window_size)
        g = p.grad.detach()
        window.append(g.clone())
        if not warmup or (len(window) == window_size and not trigger):
            filtered = torch.stack(tuple(window)).sum(0)
            if filter_type == "mean":
                filtered /= len(window)
            p.grad = g + lamb * filtered
    return grads
