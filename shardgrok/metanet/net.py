"""SuperGrok's meta-net: a per-element MLP that turns a gradient into a log-mask.

The reference SuperGrok v1.0 computes ``smart = rescale * ||g|| * m * g / ||m * g||`` with
``m = softmax(MLP(g))`` taken over all elements of the tensor. The softmax normaliser cancels in
the norm correction, so with ``h = exp(f) * g`` and ``f = MLP(g)``::

    smart = rescale * ||g|| * h / ||h||

Here the module only maps each gradient element to its log-mask ``f``; the optimizer does the
normalisation. Because ``f`` depends on one element at a time, a shard of a gradient can be
transformed without the rest of the tensor, and the two per-tensor norms become sums that one
all-reduce completes (docs/algorithms.md, SuperGrok).

``f`` is clamped to ``[-LOG_MASK_LIMIT, LOG_MASK_LIMIT]``: a fixed, rank-independent shift that keeps
``exp(f)`` and ``(exp(f) * g)^2`` finite in fp32 without a max-reduction across shards.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

LOG_MASK_LIMIT = 20.0
# Elements per MLP call: bounds the (chunk, hidden_dim) activations, not the result.
CHUNK = 1 << 16


class SimpleMetaNet(nn.Module):
    """Per-element MLP ``1 -> hidden_dim -> hidden_dim -> 1`` (ReLU) giving the log-mask ``f``,
    plus a learned scalar ``rescale`` applied to the norm-preserving smart gradient.

    ``forward`` takes an ``(N, 1)`` tensor of gradient elements and returns ``(N, 1)``.
    """

    def __init__(self, hidden_dim: int = 32):
        super().__init__()
        if isinstance(hidden_dim, bool) or not isinstance(hidden_dim, int) or hidden_dim < 1:
            raise ValueError(f"hidden_dim must be an integer >= 1, got {hidden_dim!r}")
        self.hidden_dim = hidden_dim
        self.net = nn.Sequential(
            nn.Linear(1, hidden_dim), nn.ReLU(),
            nn.Linear(hidden_dim, hidden_dim), nn.ReLU(),
            nn.Linear(hidden_dim, 1),
        )
        self.rescale = nn.Parameter(torch.tensor(1.0))
        # Small weights: the mask starts close to uniform, so SuperGrok starts close to
        # "AdamW on g + gated lamb * mu" and the meta-step moves it from there.
        for m in self.net:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight, gain=0.1)
                nn.init.zeros_(m.bias)

    def forward(self, g: torch.Tensor) -> torch.Tensor:
        return self.net(g)

    def extra_repr(self) -> str:
        return f"hidden_dim={self.hidden_dim}"


def rescale_of(net: nn.Module) -> torch.Tensor | float:
    """The module's ``rescale`` parameter if it has one, else 1 (a user's MLP need not learn it)."""
    r = getattr(net, "rescale", None)
    return 1.0 if r is None else r


def net_device_dtype(net: nn.Module) -> tuple[torch.device | None, torch.dtype]:
    """Where and in what dtype the meta-net computes (None: a parameter-free module)."""
    for t in net.parameters():
        return t.device, t.dtype
    return None, torch.float32


def log_mask(net: nn.Module, g: torch.Tensor) -> torch.Tensor:
    """Clamped log-mask ``f`` for a flat chunk of gradient elements (differentiable)."""
    f = net(g.reshape(-1, 1))
    return f.reshape(-1).clamp(-LOG_MASK_LIMIT, LOG_MASK_LIMIT)


def masked_grad(net: nn.Module, grad: torch.Tensor) -> torch.Tensor:
    """``h = exp(f(g)) * g`` for a whole (local) gradient, flat, at least fp32, without autograd."""
    device, dtype = net_device_dtype(net)
    flat = grad.reshape(-1)
    out = torch.empty(flat.numel(), dtype=torch.promote_types(dtype, torch.float32),
                      device=grad.device)
    with torch.no_grad():
        for s in range(0, flat.numel(), CHUNK):
            g = flat[s:s + CHUNK].to(device=device or grad.device, dtype=dtype)
            h = torch.exp(log_mask(net, g)) * g
            out[s:s + CHUNK].copy_(h)
    return out


def check_elementwise(net: nn.Module) -> None:
    """Reject a module that is not a per-element map ``(N, 1) -> (N, 1)``.

    Sharding relies on it: a shard is transformed without the rest of its tensor. The probe
    checks the output shape, that a slice of the input gives the same slice of the output, and
    that permuting the input permutes the output.
    """
    rule = ("meta_net must act on each gradient element independently: it is called on an (N, 1) "
            "tensor of gradient elements and must return an (N, 1) log-mask whose row i depends only "
            "on input row i (no softmax, normalisation or mixing across elements; the optimizer "
            "applies the normalisation itself)")
    net = copy.deepcopy(net)  # probe a copy: a module with buffers must not see test inputs
    device, dtype = net_device_dtype(net)
    gen = torch.Generator().manual_seed(1234)
    x = (torch.randn(16, 1, generator=gen) * 1e-2).to(device=device, dtype=dtype)
    perm = torch.randperm(16, generator=gen).to(device or "cpu")
    with torch.no_grad():
        try:
            y = net(x)
        except Exception as e:  # a module with the wrong call signature
            raise ValueError(f"{rule}; calling it on an (16, 1) tensor raised {e!r}") from e
        if not isinstance(y, torch.Tensor) or tuple(y.shape) != (16, 1):
            got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
            raise ValueError(f"{rule}; for an input of shape (16, 1) it returned {got}")
        y_part = net(x[:5])
        y_perm = net(x[perm])
        tol = 1e-5 * (1.0 + float(y.abs().max()))
        if (y_part - y[:5]).abs().max() > tol or (y_perm - y[perm]).abs().max() > tol:
            raise ValueError(f"{rule}; its output for some elements changed when the other "
                             "elements changed")
