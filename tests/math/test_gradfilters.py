"""Grokfast filters against sequences worked by hand."""
import pytest
import torch
from torch import nn

import shardgrok


class One(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(2))
        self.frozen = nn.Parameter(torch.zeros(1), requires_grad=False)


def _feed(m, g):
    m.w.grad = torch.tensor(g)


def test_ema_starts_at_first_gradient():
    m = One()
    grads = None
    out = []
    for g in ([1.0, 2.0], [3.0, 0.0], [0.0, 0.0]):
        _feed(m, g)
        grads = shardgrok.gradfilter_ema(m, grads, alpha=0.5, lamb=2.0)
        out.append(m.w.grad.tolist())
    # ema: (1,2) -> (2,1) -> (1,0.5); grad + 2 * ema
    assert out == [[3.0, 6.0], [7.0, 2.0], [2.0, 1.0]]
    assert set(grads) == {"w"}  # frozen and gradient-less parameters are ignored


def test_ma_window_and_warmup():
    m = One()
    grads, out = None, []
    for g in (1.0, 2.0, 3.0, 4.0):
        _feed(m, [g, -g])
        grads = shardgrok.gradfilter_ma(m, grads, window_size=3, lamb=1.0)
        out.append(m.w.grad[0].item())
    # warmup: unchanged until the window holds 3; then g + mean(last 3)
    assert out == [1.0, 2.0, 3.0 + 2.0, 4.0 + 3.0]


def test_ma_sum_no_warmup_and_trigger():
    m = One()
    grads = None
    _feed(m, [1.0, 1.0])
    grads = shardgrok.gradfilter_ma(m, grads, window_size=5, lamb=0.5, filter_type="sum", warmup=False)
    assert m.w.grad.tolist() == [1.5, 1.5]
    _feed(m, [2.0, 2.0])
    grads = shardgrok.gradfilter_ma(m, grads, window_size=5, lamb=0.5, filter_type="sum", warmup=False)
    assert m.w.grad.tolist() == [3.5, 3.5]  # 2 + 0.5 * (1 + 2)
    for _ in range(3):
        _feed(m, [1.0, 1.0])
        grads = shardgrok.gradfilter_ma(m, grads, window_size=5, trigger=True)
    assert m.w.grad.tolist() == [1.0, 1.0]  # window full but triggered: not applied


@pytest.mark.parametrize("kw,name", [({"alpha": 1.5}, "alpha"), ({"lamb": float("nan")}, "lamb")])
def test_ema_rejects(kw, name):
    with pytest.raises(ValueError, match=name):
        shardgrok.gradfilter_ema(One(), **kw)


@pytest.mark.parametrize("kw,name", [({"window_size": 0}, "window_size"),
                                     ({"filter_type": "median"}, "filter_type")])
def test_ma_rejects(kw, name):
    with pytest.raises(ValueError, match=name):
        shardgrok.gradfilter_ma(One(), **kw)
