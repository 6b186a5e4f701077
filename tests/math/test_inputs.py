"""Bad input: range checks name the argument; non-finite inputs never touch state."""

import pytest
import torch
from torch import nn

import shardgrok
from tests.support.helpers import backward, toy

BAD_COMMON = [
    ("lr", -1e-3), ("lr", float("nan")), ("lr", "0.1"), ("eps", -1.0), ("weight_decay", -0.1),
    ("weight_decay", float("inf")), ("alpha_init", 1.0), ("alpha_init", -0.1), ("lamb", -2.0),
    ("gamma", 1.0), ("gamma", -0.5), ("gradient_clipping", -1.0), ("betas", (0.9,)),
    ("betas", (1.0, 0.999)), ("betas", (0.9, -0.1)),
]


def _param():
    return [nn.Parameter(torch.ones(3))]


@pytest.mark.parametrize("name,value", BAD_COMMON + [("grokking_signal_decay_rate", -0.1)])
def test_grokadamw_rejects(name, value):
    with pytest.raises(ValueError, match=name.split("[")[0]) as e:
        shardgrok.GrokAdamW(_param(), **{name: value})
    assert "[" in str(e.value) or "(" in str(e.value)  # states the allowed range


@pytest.mark.parametrize("name,value", BAD_COMMON + [
    ("kappa", -1.0), ("warmup_steps", -1), ("warmup_steps", 2.5), ("meta_hidden_dim", 0),
    ("meta_lr", 0.0), ("nonfinite", "ignore")])
def test_supergrok_rejects(name, value):
    with pytest.raises(ValueError, match=name):
        shardgrok.SuperGrok(_param(), **{name: value})


def test_group_and_later_edits_are_checked():
    with pytest.raises(ValueError, match="lamb"):
        shardgrok.GrokAdamW([{"params": _param(), "lamb": -1.0}])
    with pytest.raises(ValueError, match="layer_index"):
        shardgrok.GrokAdamW([{"params": _param(), "layer_index": -1}])
    p = nn.Parameter(torch.ones(3))
    opt = shardgrok.SuperGrok([p])
    opt.param_groups[0]["betas"] = (0.9, 1.5)  # e.g. a buggy schedule
    p.grad = torch.ones(3)
    with pytest.raises(ValueError, match=r"betas\[1\]"):
        opt.step()
    assert int(opt.state[p]["step"]) == 0 and torch.equal(p, torch.ones(3))


def test_signal_fn_arguments():
    with pytest.raises(ValueError, match="not both"):
        shardgrok.GrokAdamW(_param(), grokking_signal_fns=[lambda: 0.0], grokking_signal_fn=lambda: 0.0)
    with pytest.raises(TypeError, match=r"grokking_signal_fns\[1\]"):
        shardgrok.GrokAdamW(_param(), grokking_signal_fns=[lambda: 0.0, 3.0])


class _NotElementwise(nn.Module):
    def forward(self, g):
        return torch.softmax(g, 0)


@pytest.mark.parametrize("net", [_NotElementwise(), nn.Linear(1, 2), nn.BatchNorm1d(1)])
def test_meta_net_must_be_elementwise(net):
    with pytest.raises(ValueError, match="each gradient element independently"):
        shardgrok.SuperGrok(_param(), meta_net=net)


def _snapshot(model, opt):
    out = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        out += [t.clone() for t in opt.state[p].values()]
    return out


def _make(kind, model, **kw):
    if kind == "grokadamw":
        return shardgrok.GrokAdamW(model.parameters(), **kw)
    return shardgrok.SuperGrok(model.parameters(), warmup_steps=0, **kw)


BAD_INPUTS = {
    "nan_grad": lambda m: m.a.weight.grad.__setitem__((0, 0), float("nan")),
    "inf_grad": lambda m: m.b.bias.grad.__setitem__(1, float("inf")),
}


def _step(kind, opt, fail_signal=None):
    if kind == "grokadamw":
        opt.step()
    else:
        opt.step(train_loss=1.0, val_loss=fail_signal if fail_signal is not None else 1.5)


@pytest.mark.parametrize("kind", ["grokadamw", "supergrok"])
@pytest.mark.parametrize("bad", ["nan_grad", "inf_grad", "signal_nan", "signal_raises"])
def test_nonfinite_skip_policy(kind, bad):
    model = toy()
    state = {"fail": None}

    def signal():
        if state["fail"] == "signal_raises":
            raise RuntimeError("boom")
        return float("nan") if state["fail"] == "signal_nan" else 0.5

    kw = {"grokking_signal_fn": signal} if kind == "grokadamw" else {}
    opt = _make(kind, model, **kw)
    for t in range(3):
        backward(model, t)
        _step(kind, opt)
    backward(model, 3)
    if bad in BAD_INPUTS:
        BAD_INPUTS[bad](model)
    state["fail"] = bad
    before = _snapshot(model, opt)
    alpha = opt.get_state_summary().get("cached_alpha")
    with pytest.warns(RuntimeWarning, match="step skipped"):
        if kind == "supergrok" and bad == "signal_nan":
            opt.step(train_loss=1.0, val_loss=float("nan"))
        elif kind == "supergrok" and bad == "signal_raises":
            opt.step(train_loss=object(), val_loss=1.0)
        else:
            _step(kind, opt)
    after = _snapshot(model, opt)
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert opt.get_global_step() == 3 and opt.get_state_summary()["skipped_steps"] == 1
    assert opt.get_state_summary().get("cached_alpha") == alpha
    # the next clean step proceeds normally
    state["fail"] = None
    backward(model, 4)
    _step(kind, opt)
    assert opt.get_global_step() == 4
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("kind", ["grokadamw", "supergrok"])
def test_nonfinite_raise_policy(kind):
    model = toy()
    opt = _make(kind, model, nonfinite="raise")
    backward(model, 0)
    model.a.bias.grad[0] = float("nan")
    before = _snapshot(model, opt)
    with pytest.raises(FloatingPointError, match=r"non-finite gradient in parameter tensor\(s\) #2 \(7,\)"):
        _step(kind, opt)
    assert all(torch.equal(a, b) for a, b in zip(before, _snapshot(model, opt), strict=True))


def test_signal_exception_is_chained_in_raise_mode():
    p = nn.Parameter(torch.ones(3))

    def bad():
        raise KeyError("val_loss")

    opt = shardgrok.GrokAdamW([p], grokking_signal_fn=bad, nonfinite="raise")
    p.grad = torch.ones(3)
    with pytest.raises(FloatingPointError, match="grokking_signal_fns\\[0\\] raised") as e:
        opt.step()
    assert isinstance(e.value.__cause__, KeyError)
