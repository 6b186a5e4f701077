"""Parity with the reference package grokadamw==0.1.2 wherever the two are meant to agree.

They differ by design (docs/algorithms.md) in: clipping (ours: one global norm; theirs: each
tensor separately), eps placement (ours: sqrt(v_hat) + eps, the seed's formula; theirs:
(sqrt(v) + eps) / sqrt(1 - beta2^t)), the layer index of tensors after a gradient-less one, and
alpha clamping. So the comparison runs with eps=0 and either clipping off or a single tensor.
"""
import copy
import math
import warnings

import pytest
import torch
from torch import nn

import shardgrok
from tests.support.helpers import max_abs_diff

grokadamw = pytest.importorskip("grokadamw")


def _ref_optimizer(params, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return grokadamw.GrokAdamW(params, **kw)


def _ref_step(opt):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its torch.cuda.amp.autocast is deprecated / CPU-less
        opt.step()


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 2))


def _data(t):
    g = torch.Generator().manual_seed(t)
    return torch.randn(32, 6, generator=g), torch.randn(32, 2, generator=g)


def _run(model, opt, t, step):
    x, y = _data(t)
    opt.zero_grad()
    loss = ((model(x) - y) ** 2).mean()
    loss.backward()
    step(opt)
    return loss.item()


def test_matches_reference_without_clipping_over_60_steps():
    ours_m = _mlp()
    ref_m = copy.deepcopy(ours_m)
    signals = {"v": 0.0}
    fns = [lambda: signals["v"], lambda: 2 * signals["v"]]
    kw = dict(lr=3e-3, betas=(0.9, 0.98), eps=0.0, weight_decay=0.1, alpha_init=0.95, lamb=2.0,
              gamma=0.1, grokking_signal_fns=fns, grokking_signal_decay_rate=0.3,
              gradient_clipping=0.0)
    ours = shardgrok.GrokAdamW(ours_m.parameters(), **kw)
    ref = _ref_optimizer(ref_m.parameters(), **kw)
    for t in range(60):
        signals["v"] = 0.1 * math.sin(t)
        _run(ours_m, ours, t, lambda o: o.step())
        _run(ref_m, ref, t, _ref_step)
    worst = max_abs_diff(ours_m, ref_m)
    moved = max_abs_diff(ours_m, _mlp())
    assert moved > 0.05, "the run must move the parameters"
    print(f"max |ours - grokadamw 0.1.2| after 60 steps: {worst:.3g}")
    assert worst < 2e-6, worst
    for p, q in zip(ours_m.parameters(), ref_m.parameters(), strict=True):
        ref_mu = ref.param_groups[0]["state"][q]["grok_ema"]
        assert torch.allclose(ours.state[p]["mu"], ref_mu, atol=1e-6, rtol=1e-4)


def test_matches_reference_with_clipping_on_a_single_tensor():
    # one tensor: the global norm is the per-tensor norm, so clipping agrees too
    torch.manual_seed(1)
    w0 = torch.randn(8, 8)
    target = torch.randn(8, 8)
    ours_p, ref_p = nn.Parameter(w0.clone()), nn.Parameter(w0.clone())
    kw = dict(lr=1e-2, eps=0.0, weight_decay=0.01, gradient_clipping=0.5)
    ours = shardgrok.GrokAdamW([ours_p], **kw)
    ref = _ref_optimizer([ref_p], **kw)
    clipped = 0
    for t in range(50):
        for p, o, s in ((ours_p, ours, lambda o: o.step()), (ref_p, ref, _ref_step)):
            o.zero_grad()
            (((p - target) ** 2).sum() * (1 + t % 3)).backward()
            s(o)
        clipped += ours.get_state_summary()["last_clip_coef"] < 1
    assert clipped == 50
    assert float((ours_p - ref_p).detach().abs().max()) < 2e-6


def test_documented_eps_difference():
    """One step on one element, by hand: the two eps placements give different, predicted results."""
    lr, eps, g = 0.1, 1e-3, 1e-3
    results = {}
    for name, cls in (("ours", shardgrok.GrokAdamW), ("ref", _ref_optimizer)):
        p = nn.Parameter(torch.tensor([1.0], dtype=torch.float64))
        o = cls([p], lr=lr, eps=eps, weight_decay=0.0, gradient_clipping=0.0, alpha_init=0.5)
        p.grad = torch.tensor([g], dtype=torch.float64)
        o.step() if name == "ours" else _ref_step(o)
        results[name] = p.item()
    g_hat = g + 2.0 * 0.5 * g                       # mu = 0.5 g, lamb = 2
    m_hat, sqrt_v_hat, bc2 = g_hat, abs(g_hat), 1 - 0.999
    assert results["ours"] == pytest.approx(1 - lr * m_hat / (sqrt_v_hat + eps), rel=1e-12)
    assert results["ref"] == pytest.approx(1 - lr * m_hat / (sqrt_v_hat + eps / math.sqrt(bc2)), rel=1e-6)
