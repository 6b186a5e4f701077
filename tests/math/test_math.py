"""Both optimizers against the naive oracle (tests/support/oracle.py) and against hand-worked
numbers."""
import math

import pytest
import torch
from torch import nn

import shardgrok
from tests.support.helpers import backward, clone, max_abs_diff, toy, two_groups
from tests.support.oracle import NaiveGrokAdamW, NaiveSuperGrok


def _two_scalars(g0=3.0, g1=4.0):
    p0 = nn.Parameter(torch.tensor([1.0], dtype=torch.float64))
    p1 = nn.Parameter(torch.tensor([2.0], dtype=torch.float64))
    p0.grad = torch.tensor([g0], dtype=torch.float64)
    p1.grad = torch.tensor([g1], dtype=torch.float64)
    return p0, p1


def test_grokadamw_hand_worked_first_step():
    # norm 5 -> clip to 1: g = (0.6, 0.8); alpha 0.5: mu = (0.3, 0.4); g_hat = (1.2, 1.6)
    # tensor 0: beta1 0.9, m_hat/sqrt(v_hat) = 1           -> 1 - 0.1 * (1 + 0.5 * 1) = 0.85
    # tensor 1: beta1_l 0.81 but bias-corrected with 0.9: m_hat = 0.19*1.6/0.1 = 3.04,
    #           sqrt(v_hat) = 1.6 -> ratio 1.9             -> 2 - 0.1 * (1.9 + 0.5 * 2) = 1.71
    p0, p1 = _two_scalars()
    opt = shardgrok.GrokAdamW([p0, p1], lr=0.1, eps=0.0, weight_decay=0.5, alpha_init=0.5)
    opt.step()
    assert p0.item() == pytest.approx(0.85, abs=1e-12)
    assert p1.item() == pytest.approx(1.71, abs=1e-12)
    assert opt.state[p1]["mu"].item() == pytest.approx(0.4 * 5 / (5 + 1e-6), abs=1e-12)
    assert p0.grad.item() == 3.0  # the optimizer never writes p.grad


def test_supergrok_hand_worked_first_step():
    class Flat(nn.Module):  # f = 0: h = g, smart = g (no rescale attribute -> 1)
        def forward(self, g):
            return torch.zeros_like(g)

    # mu = g (first step), cos(g, g) = 1 > 0 with warmup 0: final = 3g = (9, 12), norm 15
    # clip 1.5 -> (0.9, 1.2); layer-wise bias correction makes m_hat/sqrt(v_hat) = 1 for both:
    # p0 = 1 * (1 - 0.05) - 0.1 = 0.85,  p1 = 2 * 0.95 - 0.1 = 1.8
    p0, p1 = _two_scalars()
    opt = shardgrok.SuperGrok([p0, p1], lr=0.1, eps=0.0, weight_decay=0.5, warmup_steps=0,
                              gradient_clipping=1.5, meta_net=Flat())
    opt.step()
    assert p0.item() == pytest.approx(0.85, abs=1e-12)
    assert p1.item() == pytest.approx(1.8, abs=1e-12)
    s = opt.get_state_summary()
    assert s["gate_engaged_fraction"] == 1.0
    assert s["last_clip_coef"] == pytest.approx(1.5 / (15 + 1e-6), rel=1e-12)
    assert opt.state[p0]["mu"].item() == 3.0


def test_supergrok_gate_disengages_on_opposite_direction():
    class Negate(nn.Module):  # smart = -g: opposite to mu = g, so the gate must stay off
        def __init__(self):
            super().__init__()
            self.rescale = nn.Parameter(torch.tensor(-1.0, dtype=torch.float64))

        def forward(self, g):
            return torch.zeros_like(g)

    p0, p1 = _two_scalars()
    opt = shardgrok.SuperGrok([p0, p1], lr=0.1, eps=0.0, weight_decay=0.0, warmup_steps=0,
                              gradient_clipping=0.0, meta_net=Negate())
    opt.step()
    assert opt.get_state_summary()["gate_engaged_fraction"] == 0.0
    assert p0.item() == pytest.approx(1.1, abs=1e-12)  # moved up: final = -g
    assert p1.item() == pytest.approx(2.1, abs=1e-12)


@pytest.mark.parametrize("layer_index", [None, 5])
def test_grokadamw_matches_oracle(layer_index):
    model = toy()
    ref = clone(model)
    signals = iter([None, 0.3, -0.2, 1.5] * 10)
    current = {}

    def sig():
        return current["s"]

    kw = dict(lr=3e-3, weight_decay=0.05, alpha_init=0.9, lamb=1.5, gamma=0.2,
              grokking_signal_decay_rate=0.4, gradient_clipping=1.0)
    opt = shardgrok.GrokAdamW(two_groups(model, lr=1e-2, layer_index=layer_index),
                              grokking_signal_fn=sig, **kw)
    oracle = NaiveGrokAdamW(two_groups(ref, lr=1e-2, layer_index=layer_index),
                            kappa=kw.pop("grokking_signal_decay_rate"), **kw)
    clipped = 0
    for t in range(30):
        current["s"] = next(signals)
        backward(model, t)
        backward(ref, t)
        opt.step()
        oracle.step(signal=current["s"])
        clipped += opt.get_state_summary()["last_clip_coef"] < 1
    assert clipped > 5, "test must exercise clipping"
    assert max_abs_diff(model, ref) < 1e-12
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        if q in oracle.state:
            assert torch.allclose(opt.state[p]["mu"], oracle.state[q]["mu"], atol=1e-12, rtol=0)
            assert torch.allclose(opt.state[p]["exp_avg_sq"], oracle.state[q]["v"], atol=1e-12, rtol=0)
        else:  # the dead layer: no gradient, never touched
            assert int(opt.state[p]["step"]) == 0


def test_supergrok_matches_oracle():
    model = toy()
    ref = clone(model)
    net = shardgrok.SimpleMetaNet(hidden_dim=8).double()
    with torch.no_grad():  # a visibly non-uniform mask
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    kw = dict(lr=3e-3, weight_decay=0.05, alpha_init=0.9, lamb=1.5, gamma=0.2, kappa=0.3,
              warmup_steps=4, gradient_clipping=2.0)
    opt = shardgrok.SuperGrok(two_groups(model, lr=1e-2, gradient_clipping=0.5),
                              meta_net=clone(net), **kw)
    oracle = NaiveSuperGrok(two_groups(ref, lr=1e-2, gradient_clipping=0.5), clone(net), **kw)
    gates, clips = [], []
    for t in range(30):
        tl = backward(model, t)
        backward(ref, t)
        vl = tl * 1.3 if t % 5 == 0 else None
        opt.step(train_loss=tl, val_loss=vl)
        oracle.step(train_loss=tl, val_loss=vl)
        s = opt.get_state_summary()
        assert s["gate_engaged"] == oracle.gates
        assert s["last_clip_coefs"] == pytest.approx(oracle.clips, rel=1e-10)
        gates += oracle.gates
        clips += oracle.clips
    assert any(gates) and not all(gates), "test must see the gate both engaged and not"
    assert any(c < 1 for c in clips), "test must exercise clipping"
    assert max_abs_diff(model, ref) < 1e-12
    assert opt.get_global_step() == 30
    assert opt.get_cached_alpha() == pytest.approx(0.9 * math.exp(-0.3 * 0.3), rel=1e-12)


def test_supergrok_alpha_rules():
    p = nn.Parameter(torch.ones(3))
    opt = shardgrok.SuperGrok([p], alpha_init=0.98, kappa=0.1)
    p.grad = torch.ones(3)
    opt.step(train_loss=1.0)  # no val loss: alpha stays cached (alpha_init)
    assert opt.get_cached_alpha() == pytest.approx(0.98)
    opt.step(train_loss=1.0, val_loss=3.0)  # signal 2
    assert opt.get_cached_alpha() == pytest.approx(0.98 * math.exp(-0.2))
    opt.step(train_loss=2.0)  # cached
    assert opt.get_cached_alpha() == pytest.approx(0.98 * math.exp(-0.2))
    opt.step(train_loss=1e-7, val_loss=5.0)  # zero-loss fix: signal 10
    assert opt.get_cached_alpha() == pytest.approx(0.98 * math.exp(-1.0))
    opt.step(train_loss=1.0, val_loss=-1e6)  # huge negative signal: clamped below 1
    # exactly the bound: within approx's rel=1e-6, 1.0 (no clamp, mu frozen forever) would pass
    assert opt.get_cached_alpha() == 1 - 1e-8


def test_grokadamw_signal_mean_and_alpha():
    p = nn.Parameter(torch.ones(3))
    opt = shardgrok.GrokAdamW([p], grokking_signal_fns=[lambda: 1.0, lambda: None, lambda: 3.0],
                              grokking_signal_decay_rate=0.5)
    p.grad = torch.ones(3)
    opt.step()
    assert opt.get_state_summary()["grokking_signal"] == 2.0
    assert opt.get_alpha() == pytest.approx(0.98 * math.exp(-1.0))


def test_grokadamw_low_precision_params_update_in_fp32():
    """bf16 parameters with bf16 state (state_dtype=torch.bfloat16; the default fp32 state is
    tested in tests/math/test_state_dtype.py), rounded to nearest: fp32 math, everything rounded
    to bf16 after a step (stochastic rounding: tests/math/test_stochastic_rounding.py)."""
    p = nn.Parameter(torch.linspace(-1, 1, 64).to(torch.bfloat16))
    q = nn.Parameter(p.detach().float())
    a = shardgrok.GrokAdamW([p], lr=1e-2, state_dtype=torch.bfloat16, state_rounding="nearest")
    b = shardgrok.GrokAdamW([q], lr=1e-2)
    for t in range(3):
        g = torch.sin(torch.arange(64.0) + t)
        p.grad, q.grad = g.to(torch.bfloat16), g.to(torch.bfloat16).float()
        a.step()
        b.step()
        q.data = q.data.to(torch.bfloat16).float()
        for k in ("exp_avg", "exp_avg_sq", "mu"):
            b.state[q][k].copy_(b.state[q][k].to(torch.bfloat16).float())
    assert p.dtype == torch.bfloat16 and a.state[p]["mu"].dtype == torch.bfloat16
    assert torch.equal(p.float(), q.detach())


def test_supergrok_state_summary_values():
    model = toy()
    opt = shardgrok.SuperGrok(model.parameters(), warmup_steps=0, gradient_clipping=0.01)
    for t in range(3):
        backward(model, t)
        opt.step(train_loss=1.0, val_loss=2.0)
    s = opt.get_state_summary()
    stepped = [p for p in model.parameters() if p.grad is not None]
    assert s["global_step"] == 3 and s["total_params"] == len(list(model.parameters()))
    assert s["cached_alpha"] == pytest.approx(0.98 * math.exp(-0.1))
    assert s["avg_mu_norm"] == pytest.approx(
        sum(float(opt.state[p]["mu"].norm()) for p in stepped) / len(stepped))
    assert s["avg_exp_avg_norm"] == pytest.approx(
        sum(float(opt.state[p]["exp_avg"].norm()) for p in stepped) / len(stepped))
    assert 0.0 <= s["gate_engaged_fraction"] <= 1.0
    assert s["gate_engaged_fraction"] == sum(s["gate_engaged"]) / len(stepped)
    assert s["last_clip_coef"] < 1.0  # max norm 0.01 clips
