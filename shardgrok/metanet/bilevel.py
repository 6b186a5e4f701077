"""SuperGrok's bilevel meta-net training: the one-step look-ahead hypergradient.

Objective (docs/algorithms.md, SuperGrok's meta-step): F(phi) = L_val(theta - lr * smart_phi(g)), with g the
training gradient and smart_phi(g) = rescale * ||g|| * h / ||h||, h = exp(f_phi(g)) * g. Since
theta' depends on phi only through smart,

    dF/dphi = -lr * sum_i  d/dphi <v_i, smart_i(phi)>,    v = grad L_val(theta')  (held fixed)

and for one tensor, with A = <v, h>, H = ||h||, G = ||g||:  <v, smart> = rescale * G * A / H.
A and H^2 are sums over elements, so each rank differentiates only its own elements:

    J_local = rescale * G * (A_local / H - A * (H2_local - stopgrad(H2_local)) / (2 H^3))

with A, H the reduced values (constants). Summed over ranks, J has the value rescale * G * A / H
and exactly its gradient. The MLP is re-run chunk by chunk under autograd and each chunk's part
is backpropagated at once, so memory stays at one chunk's activations.

In a sharded job the look-ahead model is made whole on every rank (the layout's all-gather),
L_val is the mean of the ranks' validation losses (v is averaged, as DDP averages gradients),
and the meta-gradient contributions are summed over ranks.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..placement import host_copy, local_tensor
from ..reference import ACC
from . import net as M


def meta_gradient(opt, layout, groups: list[dict], val_closure: Callable[[], torch.Tensor],
                  lookahead_lr: float | None) -> float | None:
    """Fill ``opt.meta_net``'s ``.grad`` with the look-ahead hypergradient (summed over the
    ranks) and return the look-ahead validation loss (mean over the ranks); None, with the
    meta-net's gradients untouched, when that loss or the validation gradient is not finite.

    ``layout`` is the optimizer's layout or the meta-step view it offers
    (:meth:`shardgrok.layouts.base.Layout.meta_view`); ``groups`` the optimizer's param
    groups (each piece's look-ahead ``lr``)."""
    net = opt.meta_net
    red = layout.reducer
    params = layout.meta_params(opt)
    segs = layout.pieces(opt)
    n = len(layout.tensors(opt))

    with torch.no_grad():
        hs = [M.masked_grad(net, s.grad) for s in segs]
        sums = torch.zeros(n, 2, dtype=ACC)
        for s, h in zip(segs, hs):
            g = s.grad.reshape(-1).to(ACC)
            sums[s.index, 0] += torch.dot(g, g).cpu()
            sums[s.index, 1] += torch.dot(h.to(ACC), h.to(ACC)).cpu()
        red.all_reduce_(sums)
        g_norm, h_norm = sums[:, 0].sqrt(), sums[:, 1].sqrt()
        rescale = float(M.rescale_of(net))
        lrs = [float(groups[s.group]["lr"]) if lookahead_lr is None else lookahead_lr
               for s in segs]
        # What the look-ahead overwrites is put back from host copies, tensor by tensor (not
        # undone by adding the step back: theta - d + d is not theta in floating point). A view
        # that puts its own storage back (DeepSpeed ZeRO 3) keeps nothing here.
        saved = [] if layout.restores_itself else [host_copy(local_tensor(p)) for p in params]

    failure, raw = None, None
    try:
        with torch.no_grad():
            for s, h, lr in zip(segs, hs, lrs):
                if h_norm[s.index] > 0:
                    scale = rescale * float(g_norm[s.index] / h_norm[s.index])
                    step = h.view_as(s.param).to(device=s.param.device, dtype=s.param.dtype)
                    s.param.sub_(step, alpha=lr * scale)
            layout.post_step(opt)  # ZeRO: every rank evaluates the whole look-ahead model
        try:
            val_loss, raw = layout.validation_grads(opt, val_closure)
        except Exception as e:
            if red.world_size == 1:
                raise
            failure = e
    finally:
        with torch.no_grad():
            for p, p0 in zip(params, saved):
                local_tensor(p).copy_(p0, non_blocking=p0.is_pinned())
            layout.restore(opt)  # storage the look-ahead wrote elsewhere
    if red.world_size > 1:
        # Agree on failure before the next collective, so no rank waits for one that raised.
        flag = torch.tensor([0.0 if failure is None else 1.0], dtype=ACC)
        red.all_reduce_(flag, scalars=1)
        if failure is not None:
            raise failure
        if flag.item():
            raise RuntimeError(f"SuperGrok.meta_step: val_closure failed on {int(flag.item())} "
                               "other rank(s); the meta-net was not changed")

    with torch.no_grad():
        vs = layout.finish_validation_grads(opt, raw, segs)
        buf = torch.zeros(n + 1, dtype=ACC)
        for s, v, h in zip(segs, vs, hs):
            # h may sit on the host (DeepSpeed's views keep the gathered gradients there)
            buf[s.index] += torch.dot(v.reshape(-1).to(ACC), h.to(device=v.device, dtype=ACC)).cpu()
        buf[n] = float(val_loss.detach())
        red.all_reduce_(buf, scalars=1)
        loss_value = float(buf[n]) / red.dp_world_size
    if not torch.isfinite(buf).all():
        return None  # the caller applies the non-finite policy

    device, dtype = M.net_device_dtype(net)
    dtype = torch.promote_types(dtype, torch.float32)
    for s, v, lr in zip(segs, vs, lrs):
        i = s.index
        H = float(h_norm[i])
        if H == 0.0:
            continue
        A = float(buf[i])
        k = -lr * float(g_norm[i])
        flat_g, flat_v = s.grad.reshape(-1), v.reshape(-1)
        for a in range(0, flat_g.numel(), M.CHUNK):
            g = flat_g[a:a + M.CHUNK].to(device=device, dtype=dtype)
            h = torch.exp(M.log_mask(net, g)) * g
            h2 = (h * h).sum()
            v = flat_v[a:a + M.CHUNK].to(device=device, dtype=dtype)
            part = (v * h).sum() / H - A * (h2 - h2.detach()) / (2 * H ** 3)
            j = M.rescale_of(net) * (k * part)
            if isinstance(j, torch.Tensor) and j.requires_grad:
                j.backward()
    red.all_reduce_grads_(net)
    return loss_value
