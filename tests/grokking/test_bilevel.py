"""SuperGrok's meta-step: the hypergradient against finite differences of the look-ahead
objective F(phi) = L_val(theta - lr * smart_phi(g_train)), computed independently here."""
import pytest
import torch
from torch.func import functional_call

import shardgrok
from tests.support.helpers import backward, batch, toy, two_groups
from tests.support.oracle import NaiveSuperGrok

LRS = (0.05, 0.2)  # per param group: the look-ahead uses each group's lr


def _setup(seed=0):
    model = toy(seed=seed)
    torch.manual_seed(seed + 1)
    net = shardgrok.SimpleMetaNet(hidden_dim=6).double()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    opt = shardgrok.SuperGrok(two_groups(model, lr=LRS[1]), lr=LRS[0], meta_net=net, meta_lr=3e-2)
    backward(model, 0)
    x, y = batch(99)

    def val_closure():
        return ((model(x) - y) ** 2).mean()

    def objective():
        """F(phi), by the oracle's own smart-gradient formula and a functional model call."""
        smart = NaiveSuperGrok([], opt.meta_net).smart
        params = {}
        for name, p in model.named_parameters():
            lr = LRS[0] if name.startswith("a.") or name == "dead.weight" else LRS[1]
            params[name] = p if p.grad is None else p - lr * smart(p.grad)
        with torch.no_grad():
            return float(((functional_call(model, params, (x,)) - y) ** 2).mean())

    return model, opt, val_closure, objective


def test_meta_gradient_matches_finite_differences():
    model, opt, val_closure, F = _setup()
    params0 = [p.detach().clone() for p in model.parameters()]
    grads0 = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    loss = opt.meta_gradient(val_closure)
    assert loss == pytest.approx(F(), rel=1e-12)  # it returns the look-ahead loss
    # parameters and training gradients are left exactly as they were
    for p, p0, g0 in zip(model.parameters(), params0, grads0, strict=True):
        assert torch.equal(p, p0)
        assert (p.grad is None and g0 is None) or torch.equal(p.grad, g0)

    checked = 0
    gen = torch.Generator().manual_seed(5)
    for name, w in opt.meta_net.named_parameters():
        flat, gflat = w.data.view(-1), w.grad.view(-1)
        for j in torch.randperm(flat.numel(), generator=gen)[:4].tolist():
            h = 1e-6
            orig = flat[j].item()
            flat[j] = orig + h
            up = F()
            flat[j] = orig - h
            down = F()
            flat[j] = orig
            fd = (up - down) / (2 * h)
            assert gflat[j].item() == pytest.approx(fd, rel=1e-5, abs=2e-9), (name, j)
            checked += abs(fd) > 1e-6
    assert checked >= 8, "finite differences must see non-trivial meta-gradients"


def test_meta_steps_train_the_meta_net_and_lower_the_objective():
    model, opt, val_closure, F = _setup(seed=3)
    before = F()
    w0 = [w.detach().clone() for w in opt.meta_net.parameters()]
    for _ in range(15):
        opt.meta_step(val_closure)
    after = F()
    assert any(not torch.equal(a, b) for a, b in zip(w0, opt.meta_net.parameters(), strict=True))
    assert after < before - 1e-4, (before, after)


def test_meta_step_needs_gradients_and_a_tensor_loss():
    model, opt, val_closure, _ = _setup()
    with pytest.raises(TypeError, match="val_closure"):
        opt.meta_step(lambda: val_closure().item())
    opt.zero_grad()
    with pytest.raises(RuntimeError, match="backward"):
        opt.meta_step(val_closure)
