"""Shared test fixtures: a small model with a dead layer and a scalar parameter, and a driver
that steps an optimizer and the naive oracle side by side."""
from __future__ import annotations

import copy
import math

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


def max_diff(a, b) -> float:
    """Largest |x - y| over two lists of tensors, pairwise. The lists must be equally long and the
    pairs equally shaped (a short list or a broadcast would compare only part of a run). Any NaN
    or Inf, on either side, gives inf: nothing these tests compare may be non-finite, and a run
    and its reference that broke the same way have not agreed."""
    a, b = list(a), list(b)
    assert len(a) == len(b), f"comparing {len(a)} tensors with {len(b)}"
    assert a, "nothing to compare"
    worst = 0.0
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        x, y = x.detach(), y.detach()
        assert x.shape == y.shape, f"tensor {i}: shape {tuple(x.shape)} vs {tuple(y.shape)}"
        if not (bool(x.isfinite().all()) and bool(y.isfinite().all())):
            return math.inf
        if x.numel():
            worst = max(worst, float((x - y).abs().max()))
    return worst


def max_abs_diff(m1, m2) -> float:
    """max_diff over two modules' parameters, which must have the same names in the same order."""
    n1, n2 = dict(m1.named_parameters()), dict(m2.named_parameters())
    assert list(n1) == list(n2), f"parameter names differ: {list(n1)} vs {list(n2)}"
    return max_diff(n1.values(), n2.values())


def meta_net(kind: str = "random", seed: int = 0, hidden: int = 32):
    """SimpleMetaNets whose tables differ in kind. ``random``: nn.Linear's default init (~60
    breakpoints within a few units of 0, where N(0, 1) gradients are); ``trained``: weights and
    biases N(0, 1); ``dead``: no layer-1 unit ever active (f constant, a one-piece table);
    ``far``: layer-1 biases -1e3 (kinks far out, f constant on every gradient here); ``init``:
    as SimpleMetaNet constructs it (zero biases: one kink, at 0)."""
    from shardgrok import SimpleMetaNet
    torch.manual_seed(seed)
    net = SimpleMetaNet(hidden)
    l1, l2, l3 = net.net[0], net.net[2], net.net[4]
    with torch.no_grad():
        for lin in (l1, l2, l3):
            if kind in ("random", "dead", "far"):
                lin.reset_parameters()
            elif kind == "trained":
                lin.weight.normal_()
                lin.bias.normal_()
        if kind == "dead":
            l1.weight.zero_()
            l1.bias.fill_(-1.0)
        elif kind == "far":
            l1.bias.fill_(-1e3)
    return net


def clone(model):
    return copy.deepcopy(model)


def assert_bitwise_across_threads_and_isas(ext, outputs) -> None:
    """``outputs()`` (the tensors one run ends with) with one and two torch threads and on every
    instruction set the CPU extension supports: the same bits everywhere. The extension's
    instruction set and torch's thread count are put back."""
    before_threads, before_isa = torch.get_num_threads(), ext.isa()
    runs = {}
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            runs[f"{threads} threads"] = outputs()
        torch.set_num_threads(before_threads)
        for isa in ext.supported_isas():
            ext.set_isa(isa)
            runs[isa] = outputs()
    finally:
        torch.set_num_threads(before_threads)
        ext.set_isa(before_isa)
    first, *rest = runs
    for other in rest:
        for j, (a, b) in enumerate(zip(runs[first], runs[other], strict=True)):
            assert torch.equal(a, b), f"{other} differs from {first} in output {j}"


def assert_same_tree(a, b, where="state_dict"):
    """``a`` equals ``b`` exactly, leaf by leaf through dicts, lists and tuples: tensors of the
    same dtype and values, everything else by ``==``; the failing leaf named by its path."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), (where, set(a) ^ set(b))
        for k in a:
            assert_same_tree(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tree(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)
