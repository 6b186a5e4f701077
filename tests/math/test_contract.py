"""The torch.optim contract: checkpoints, copies, param groups, schedulers, grads."""
import copy
import io

import pytest
import torch
from torch import nn
from torch.optim import lr_scheduler as S

import shardgrok
from tests.support.helpers import backward, clone, max_abs_diff, toy, two_groups
from tests.support.oracle import NaiveGrokAdamW


def _make(kind, model):
    if kind == "grokadamw":
        return shardgrok.GrokAdamW(two_groups(model, lr=2e-3), lr=1e-2,
                                   grokking_signal_fn=lambda: 0.25)
    torch.manual_seed(7)  # the default meta-net's initial weights
    return shardgrok.SuperGrok(two_groups(model, lr=2e-3), lr=1e-2, warmup_steps=3,
                               meta_lr=1e-2)


def _train(kind, model, opt, steps):
    for t in steps:
        tl = backward(model, t)
        if kind == "supergrok":
            if t % 3 == 0:  # the meta-step changes the meta-net and its Adam state
                opt.meta_step(lambda: torch.nn.functional.mse_loss(
                    model(torch.ones(4, 5, dtype=torch.float64)),
                    torch.zeros(4, 3, dtype=torch.float64)))
            opt.step(train_loss=tl, val_loss=tl * 1.2 if t % 4 == 0 else None)
        else:
            opt.step()


@pytest.mark.parametrize("kind", ["grokadamw", "supergrok"])
def test_resume_is_exact(kind):
    m1 = toy()
    m2 = clone(m1)
    o1 = _make(kind, m1)
    _train(kind, m1, o1, range(12))

    o2 = _make(kind, m2)
    _train(kind, m2, o2, range(6))
    buf = io.BytesIO()
    torch.save({"model": m2.state_dict(), "opt": o2.state_dict()}, buf)
    buf.seek(0)
    ck = torch.load(buf, weights_only=True)  # plain tensors and numbers: safe loading works

    m3 = toy(seed=123)  # different weights, fresh optimizer: everything must come from ck
    o3 = _make(kind, m3)
    m3.load_state_dict(ck["model"])
    o3.load_state_dict(ck["opt"])
    assert o3.get_global_step() == 6
    if kind == "supergrok":
        assert o3.get_cached_alpha() == o2.get_cached_alpha() != o3.param_groups[0]["alpha_init"]
        for a, b in zip(o3.meta_net.parameters(), o2.meta_net.parameters(), strict=True):
            assert torch.equal(a, b)
    _train(kind, m3, o3, range(6, 12))
    assert max_abs_diff(m1, m3) == 0.0
    if kind == "supergrok":
        for a, b in zip(o1.meta_net.parameters(), o3.meta_net.parameters(), strict=True):
            assert torch.equal(a, b)


def test_load_rejects_foreign_state_dict():
    p = nn.Parameter(torch.ones(2))
    sd = torch.optim.AdamW([p]).state_dict()
    with pytest.raises(ValueError, match="shardgrok"):
        shardgrok.GrokAdamW([p]).load_state_dict(sd)


@pytest.mark.parametrize("kind", ["grokadamw", "supergrok"])
def test_deepcopy_is_independent_and_equal(kind):
    m1 = toy()
    o1 = _make(kind, m1)
    _train(kind, m1, o1, range(3))
    o2 = copy.deepcopy(o1)
    assert o2.get_global_step() == 3
    # the copy's state lives on the copy's parameters
    p2 = o2.param_groups[0]["params"][0]
    assert p2 is not o1.param_groups[0]["params"][0]
    assert torch.equal(o2.state[p2]["mu"], o1.state[o1.param_groups[0]["params"][0]]["mu"])
    o2.state[p2]["mu"].add_(1.0)
    assert not torch.equal(o2.state[p2]["mu"], o1.state[o1.param_groups[0]["params"][0]]["mu"])
    if kind == "supergrok":
        assert o2.meta_net is not o1.meta_net
        assert o2.meta_optimizer.param_groups[0]["params"][0] is next(o2.meta_net.parameters())


def test_add_param_group_indices_follow_existing():
    a, b = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(2))
    c = nn.Parameter(torch.ones(2))
    opt = shardgrok.GrokAdamW([a, b], lr=0.1, gamma=0.5, eps=0.0, gradient_clipping=0.0,
                              weight_decay=0.0)
    opt.add_param_group({"params": [c], "lr": 0.1})
    assert opt.state[c]["mu"].shape == (2,)
    for p in (a, b, c):
        p.grad = torch.full((2,), 0.1)
    opt.step()
    # layer 2: beta1_l = 0.9 * 0.25, bias-corrected with 0.9 -> ratio (1 - 0.225) / 0.1
    ratio = (1 - 0.9 * 0.25) / 0.1
    assert torch.allclose(c, torch.full((2,), 1 - 0.1 * ratio))
    with pytest.raises(ValueError, match="lr"):
        opt.add_param_group({"params": [nn.Parameter(torch.ones(1))], "lr": -1.0})
    assert len(opt.param_groups) == 2  # the rejected group was not added


@pytest.mark.parametrize("kind", ["grokadamw", "supergrok"])
def test_params_without_grad_are_skipped(kind):
    model = toy()
    opt = _make(kind, model)
    dead = [model.dead.weight.detach().clone(), model.dead.bias.detach().clone()]
    _train(kind, model, opt, range(4))
    assert torch.equal(model.dead.weight, dead[0]) and torch.equal(model.dead.bias, dead[1])
    assert int(opt.state[model.dead.weight]["step"]) == 0
    assert int(opt.state[model.a.weight]["step"]) == 4


def test_zero_grad():
    model = toy()
    opt = shardgrok.GrokAdamW(model.parameters())
    backward(model, 0)
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    backward(model, 0)
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())


def test_sparse_and_complex_are_rejected():
    emb = nn.Embedding(10, 3, sparse=True)
    opt = shardgrok.GrokAdamW(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    with pytest.raises(ValueError, match="complex|floating"):
        shardgrok.SuperGrok([nn.Parameter(torch.ones(2, dtype=torch.complex64))])


def test_step_returns_closure_loss():
    model = toy()
    for opt in (shardgrok.GrokAdamW(model.parameters()), shardgrok.SuperGrok(model.parameters())):
        def closure():
            opt.zero_grad()
            loss = ((model(torch.ones(2, 5, dtype=torch.float64))) ** 2).sum()
            loss.backward()
            return loss
        before = model.a.weight.detach().clone()
        out = opt.step(closure)
        assert isinstance(out, torch.Tensor) and out.ndim == 0
        assert not torch.equal(before, model.a.weight)


SCHEDULERS = {
    "LambdaLR": lambda o: S.LambdaLR(o, lambda e: 0.9 ** e),
    "MultiplicativeLR": lambda o: S.MultiplicativeLR(o, lambda e: 0.95),
    "StepLR": lambda o: S.StepLR(o, 2, 0.5),
    "MultiStepLR": lambda o: S.MultiStepLR(o, [2, 5], 0.3),
    "ConstantLR": lambda o: S.ConstantLR(o, 0.5, total_iters=3),
    "LinearLR": lambda o: S.LinearLR(o, 0.2, 1.0, total_iters=4),
    "ExponentialLR": lambda o: S.ExponentialLR(o, 0.8),
    "PolynomialLR": lambda o: S.PolynomialLR(o, total_iters=6, power=2.0),
    "CosineAnnealingLR": lambda o: S.CosineAnnealingLR(o, T_max=5),
    "CosineAnnealingWarmRestarts": lambda o: S.CosineAnnealingWarmRestarts(o, T_0=3),
    "CyclicLR": lambda o: S.CyclicLR(o, 1e-4, 1e-2, step_size_up=2),  # cycles beta1 too
    "OneCycleLR": lambda o: S.OneCycleLR(o, max_lr=1e-2, total_steps=10),  # cycles betas
    "SequentialLR": lambda o: S.SequentialLR(
        o, [S.ConstantLR(o, 0.5, total_iters=2), S.ExponentialLR(o, 0.9)], milestones=[2]),
    "ChainedScheduler": lambda o: S.ChainedScheduler(
        [S.ConstantLR(o, 0.5, total_iters=2), S.ExponentialLR(o, 0.9)]),
    "ReduceLROnPlateau": lambda o: S.ReduceLROnPlateau(o, factor=0.5, patience=0),
}


def test_every_scheduler_is_covered():
    public = {n for n in dir(S) if isinstance(getattr(S, n), type)
              and issubclass(getattr(S, n), S.LRScheduler) and not n.endswith("LRScheduler")}
    public.add("ReduceLROnPlateau")
    assert public <= set(SCHEDULERS), f"untested schedulers: {public - set(SCHEDULERS)}"


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_lr_schedulers_drive_the_update(name):
    """The schedule seen by our optimizer equals torch AdamW's under the same scheduler, and the
    parameters match the oracle fed that schedule (lr and cycled betas)."""
    model, ref = toy(), toy()
    kw = dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=0.01, alpha_init=0.9, gradient_clipping=1.0)
    opt = shardgrok.GrokAdamW(model.parameters(), **kw)
    oracle = NaiveGrokAdamW([{"params": list(ref.parameters())}], **kw)
    twin = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=1e-2, betas=(0.9, 0.99))
    sched, twin_sched = SCHEDULERS[name](opt), SCHEDULERS[name](twin)
    seen = []
    for t in range(8):
        backward(model, t)
        backward(ref, t)
        g = opt.param_groups[0]
        assert g["lr"] == pytest.approx(twin.param_groups[0]["lr"], rel=1e-12)
        assert tuple(g["betas"]) == pytest.approx(tuple(twin.param_groups[0]["betas"]))
        oracle.groups[0].update(lr=g["lr"], betas=tuple(g["betas"]))
        seen.append(g["lr"])
        opt.step()
        oracle.step()
        twin.step()
        if name == "ReduceLROnPlateau":
            sched.step(1.0)
            twin_sched.step(1.0)
        else:
            sched.step()
            twin_sched.step()
    assert len(set(seen)) > 1, "the schedule must change lr within the test"
    assert max_abs_diff(model, ref) < 1e-12


def test_meta_optimizer_state_exists_before_the_first_meta_step():
    """Eager meta-Adam state (for torch.distributed.checkpoint) has torch Adam's own keys and
    gives bit-identical updates to Adam's lazy initialisation."""
    torch.manual_seed(3)
    net = shardgrok.SimpleMetaNet(hidden_dim=4)
    opt = shardgrok.SuperGrok([nn.Parameter(torch.ones(3))], meta_net=net, meta_lr=1e-2)
    lazy_net = copy.deepcopy(net)
    lazy = torch.optim.Adam(lazy_net.parameters(), lr=1e-2)
    assert all(len(opt.meta_optimizer.state[p]) == 3 for p in net.parameters())
    for _ in range(3):
        for p, q in zip(net.parameters(), lazy_net.parameters(), strict=True):
            p.grad = torch.full_like(p, 0.5)
            q.grad = torch.full_like(q, 0.5)
        opt.meta_optimizer.step()
        lazy.step()
    for p, q in zip(net.parameters(), lazy_net.parameters(), strict=True):
        assert torch.equal(p, q)
        assert opt.meta_optimizer.state[p].keys() == lazy.state[q].keys()
