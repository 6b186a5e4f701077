"""Shared test fixtures: a small model with a dead layer and a scalar parameter, and a driver
that steps an optimizer and the naive oracle side by side."""
from __future__ import annotations

import copy

import torch
from torch import nn


class Toy(nn.Module):
    """Tensors of mixed sizes, a 1-element one, and a layer that never gets a gradient."""

    def __init__(self, dead: bool = True):
        super().__init__()
        self.a = nn.Linear(5, 7)
        self.b = nn.Linear(7, 3)
        self.scale = nn.Parameter(torch.tensor([1.3]))
        if dead:
            self.dead = nn.Linear(3, 3)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x))) * self.scale


def toy(dtype=torch.float64, seed=0, dead=True):
    torch.manual_seed(seed)
    return Toy(dead).to(dtype)


def batch(step, dtype=torch.float64, n=12):
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(n, 5, generator=g, dtype=dtype)
    y = torch.randn(n, 3, generator=g, dtype=dtype)
    return x, y


def loss_fn(model, step, dtype=torch.float64):
    x, y = batch(step, dtype)
    return ((model(x) - y) ** 2).mean() * 20  # large enough that clipping engages


def two_groups(model, **second):
    dead = getattr(model, "dead", None)
    return [
        {"params": [model.a.weight, model.a.bias] + ([dead.weight] if dead else [])},
        {"params": [model.b.weight, model.b.bias, model.scale] + ([dead.bias] if dead else []),
         **second},
    ]


def backward(model, step):
    model.zero_grad(set_to_none=True)
    loss = loss_fn(model, step, next(model.parameters()).dtype)
    loss.backward()
    return loss.item()


def max_abs_diff(m1, m2):
    return max(float((p.detach() - q.detach()).abs().max()) for p, q in zip(m1.parameters(), m2.parameters()))


def clone(model):
    return copy.deepcopy(model)
