"""An independent, deliberately naive oracle: docs/algorithms.md's math written out per tensor, whole tensors,
no phases, no reductions, no shared code with shardgrok.reference. Tests run it in float64."""
from __future__ import annotations

import math

import torch


def _alpha(alpha_init, kappa, signal):
    a = alpha_init if signal is None else alpha_init * math.exp(-kappa * signal)
    return min(max(a, 0.0), 1.0 - 1e-8)


class NaiveGrokAdamW:
    def __init__(self, groups, *, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 alpha_init=0.98, lamb=2.0, gamma=0.1, kappa=0.1, gradient_clipping=1.0):
        d = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, alpha_init=alpha_init,
                 lamb=lamb, gamma=gamma, kappa=kappa, gradient_clipping=gradient_clipping,
                 layer_index=None)
        self.groups = [{**d, **g} for g in groups]
        self.state = {}

    def step(self, signal=None):
        params = [(g, p) for g in self.groups for p in g["params"]]
        with_grad = [(g, p) for g, p in params if p.grad is not None]
        norm = math.sqrt(sum(float((p.grad.double() ** 2).sum()) for _, p in with_grad))
        for i, (g, p) in enumerate(params):
            if p.grad is None:
                continue
            st = self.state.setdefault(p, dict(t=0, m=torch.zeros_like(p), v=torch.zeros_like(p),
                                               mu=torch.zeros_like(p)))
            st["t"] += 1
            t = st["t"]
            coef = 1.0
            if g["gradient_clipping"] > 0:
                coef = min(1.0, g["gradient_clipping"] / (norm + 1e-6))
            grad = p.grad * coef
            a = _alpha(g["alpha_init"], g["kappa"], signal)
            st["mu"] = a * st["mu"] + (1 - a) * grad
            g_hat = grad + g["lamb"] * st["mu"]
            beta1, beta2 = g["betas"]
            layer = i if g["layer_index"] is None else g["layer_index"]
            b1 = beta1 * (1 - g["gamma"]) ** layer
            st["m"] = b1 * st["m"] + (1 - b1) * g_hat
            st["v"] = beta2 * st["v"] + (1 - beta2) * g_hat ** 2
            m_hat = st["m"] / (1 - beta1 ** t)
            v_hat = st["v"] / (1 - beta2 ** t)
            with torch.no_grad():
                p.copy_(p - g["lr"] * (m_hat / (v_hat.sqrt() + g["eps"]) + g["weight_decay"] * p))


class NaiveSuperGrok:
    def __init__(self, groups, meta_net, *, lr=1e-3, betas=(0.9, 0.999), eps=1e-8,
                 weight_decay=0.01, alpha_init=0.98, lamb=2.0, gamma=0.1, kappa=0.1,
                 warmup_steps=100, gradient_clipping=1.0):
        d = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, alpha_init=alpha_init,
                 lamb=lamb, gamma=gamma, kappa=kappa, warmup_steps=warmup_steps,
                 gradient_clipping=gradient_clipping, layer_index=None)
        self.groups = [{**d, **g} for g in groups]
        self.net = meta_net
        self.state = {}
        self.signal = None
        self.global_step = 0
        self.gates = []
        self.clips = []

    def smart(self, g):
        with torch.no_grad():
            f = self.net(g.reshape(-1, 1).to(next(self.net.parameters()).dtype)).reshape(-1)
            h = (torch.exp(f.clamp(-20, 20)) * g.reshape(-1)).reshape(g.shape).to(g.dtype)
            rescale = float(getattr(self.net, "rescale", 1.0))
            if float(h.norm()) == 0:
                return torch.zeros_like(g)
            return rescale * g.norm() * h / h.norm()

    def step(self, train_loss=None, val_loss=None):
        if train_loss is not None and val_loss is not None:
            self.signal = 10.0 if train_loss < 1e-6 else (val_loss - train_loss) / train_loss
        self.global_step += 1
        self.gates, self.clips = [], []
        i = 0
        for g in self.groups:
            a = _alpha(g["alpha_init"], g["kappa"], self.signal)
            finals = []
            for p in g["params"]:
                layer = i if g["layer_index"] is None else g["layer_index"]
                i += 1
                if p.grad is None:
                    continue
                grad = p.grad
                st = self.state.get(p)
                if st is None:
                    st = self.state[p] = dict(t=0, m=torch.zeros_like(p), v=torch.zeros_like(p),
                                              mu=grad.clone())
                st["t"] += 1
                st["mu"] = a * st["mu"] + (1 - a) * grad
                smart = self.smart(grad)
                final = smart
                gate = False
                if self.global_step > g["warmup_steps"]:
                    ns, nm = float(smart.norm()), float(st["mu"].norm())
                    cos = 0.0 if ns < 1e-8 or nm < 1e-8 else float((smart * st["mu"]).sum()) / (ns * nm)
                    if cos > 0:
                        final = smart + g["lamb"] * st["mu"]
                        gate = True
                self.gates.append(gate)
                finals.append((p, final, layer))
            coef = 1.0
            if g["gradient_clipping"] > 0 and finals:
                norm = math.sqrt(sum(float((f ** 2).sum()) for _, f, _ in finals))
                c = g["gradient_clipping"] / (norm + 1e-6)
                coef = c if c < 1 else 1.0
            self.clips.append(coef)
            beta1, beta2 = g["betas"]
            for p, final, layer in finals:
                st = self.state[p]
                final = final * coef
                b1 = beta1 * (1 - g["gamma"]) ** layer
                t = st["t"]
                st["m"] = b1 * st["m"] + (1 - b1) * final
                st["v"] = beta2 * st["v"] + (1 - beta2) * final ** 2
                m_hat = st["m"] / (1 - b1 ** t)
                v_hat = st["v"] / (1 - beta2 ** t)
                with torch.no_grad():
                    p.copy_(p * (1 - g["lr"] * g["weight_decay"])
                            - g["lr"] * m_hat / (v_hat.sqrt() + g["eps"]))
