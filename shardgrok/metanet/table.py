"""The default meta-net as an exact piecewise-linear table, for the compiled kernels.

``SimpleMetaNet`` maps one scalar ``x`` (a gradient element) through
``Linear(1, H) - ReLU - Linear(H, H) - ReLU - Linear(H, 1)`` to its log-mask ``f(x)``. Every layer
is affine and every ReLU is piecewise linear, so ``f`` is a continuous piecewise-linear function
of ``x`` (docs/kernels.md, "SuperGrok's meta-net in the kernel"):

- layer-1 unit ``j`` has its kink at ``x = -b1[j] / w1[j]`` (none if ``w1[j] == 0``);
- between two consecutive layer-1 kinks the set of active layer-1 units is fixed, so each
  layer-2 pre-activation is affine in ``x`` there and crosses zero at most once inside;
- between consecutive kinks of either kind both active sets are fixed and ``f`` is affine.

That gives at most ``H + H * (H + 1)`` breakpoints (random ``H = 32`` nets have about 60). A
kernel then evaluates ``f`` with a branchless binary search and one multiply-add per element
instead of ~1,100 FMAs of the MLP. This module builds the table in float64 (:func:`build_table`),
rounds it into the fp32 arrays the kernel reads (:func:`kernel_arrays`), and evaluates those
arrays exactly as the kernel does (:func:`evaluate`), which is the kernels' test oracle.

The table is ``f`` itself, before the ``[-LOG_MASK_LIMIT, LOG_MASK_LIMIT]`` clamp of
:func:`shardgrok.metanet.net.log_mask`; the kernel applies the clamp after the look-up.

Kernel contract (what :func:`kernel_arrays` returns and :func:`evaluate` computes)::

    bp[P], slope[P + 1], icpt[P + 1]   float32, P a power of two, P >= K + 1
    bp[0..K-1] strictly increasing and finite, bp[K..P-1] = +inf
    slope[i], icpt[i] for i >= K all equal piece K (the last real piece)

    idx = 0
    for (step = P / 2; step >= 1; step /= 2)      // log2(P) steps, no data-dependent branch
        idx += (x >= bp[idx + step - 1]) ? step : 0
    f = slope[idx] * x + icpt[idx]

After the loop ``idx == #{j <= P - 2 : bp[j] <= x}``: the loop is a binary lifting over the
monotone predicate ``bp[j] <= x``, whose steps sum to ``P - 1``, and it never reads ``bp[P-1]``
(which is why ``P > K`` and not ``P >= K``). Hence:

- finite ``x``: ``idx == #{j < K : bp[j] <= x}`` (padding is ``+inf``), so piece ``i`` serves
  ``bp[i-1] <= x < bp[i]``: an ``x`` exactly on a breakpoint takes the piece to its right;
- ``x == -inf``: ``idx == 0``; ``x == +inf``: ``idx == P - 1`` (a padding piece, equal to piece K);
- ``x`` NaN: every comparison is false, ``idx == 0`` and ``f`` is NaN. Any other search (e.g. a
  full ``searchsorted`` over all ``P`` entries, which may return ``P``: hence ``P + 1`` pieces)
  lands on some valid piece and also gives NaN, since ``slope * NaN + icpt`` is NaN;
- non-finite ``x`` gives a non-finite ``f`` (``0 * inf`` is NaN), as the MLP does: the step treats
  a non-finite gradient as a failure before ``f`` matters.

:func:`evaluate` rounds the product and the sum separately; a kernel computing ``fmaf`` (nvcc
contracts ``a * b + c`` by default) differs from it by at most one rounding of ``slope * x``;
``__fmul_rn`` then ``__fadd_rn`` (or ``-ffp-contract=off`` on the host) matches it bit for bit.
The comparisons must be IEEE: under flush-to-zero a subnormal ``x`` or breakpoint compares as 0,
which moves ``f`` by at most ``|slope jump| * 2**-126``.

The CUDA kernel reads the same table in level order (:func:`level_order`, built once per table
by the CUDA glue): ``nodes[P]`` (the ``P - 1`` searched breakpoints, then padding) and
``pieces[P, 2]`` (slope, intercept)::

    j = 0
    for (n = P; n > 1; n /= 2)                     // log2(P) levels
        j = 2 j + 1 + (x >= nodes[j] ? 1 : 0)
    idx = j - (P - 1)                              // the idx above, for every x
    f = pieces[idx][0] * x + pieces[idx][1]

The loop above is a walk down the complete binary tree whose in-order is ``bp[0..P-2]``; level
order stores the tree by levels (node ``j``'s children are ``2j + 1`` and ``2j + 2``), so both
searches compare ``x`` with the same breakpoints in the same order. What changes is where a
step's candidates lie: next to each other instead of ``P / 2**k`` apart, which on a GPU keeps a
warp's 32 searches out of each other's shared-memory banks (csrc/grok_math.h).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn
from torch.nn.modules import module as _module

from .net import SimpleMetaNet

# Pieces handled at once in build_table: keeps its (pieces, H) temporaries to a few MB even
# for the H + H (H + 1) worst case of a large H.
_BLOCK_ELEMS = 1 << 18


@dataclass(frozen=True, eq=False)  # eq=False: tensors have no boolean ==
class PiecewiseLinear:
    """A continuous piecewise-linear ``f`` in float64 (CPU tensors).

    ``breakpoints``: shape ``(K,)``, ``K >= 0``, finite, strictly increasing.
    ``slopes``, ``intercepts``: shape ``(K + 1,)``, finite. Piece ``i`` serves every ``x`` with
    ``#{j : breakpoints[j] <= x} == i`` (piece 0 below ``breakpoints[0]``, piece ``K`` from
    ``breakpoints[K-1]`` on) and there ``f(x) = slopes[i] * x + intercepts[i]``.
    """

    breakpoints: torch.Tensor
    slopes: torch.Tensor
    intercepts: torch.Tensor

    def __post_init__(self):
        for name in ("breakpoints", "slopes", "intercepts"):
            t = getattr(self, name)
            if not isinstance(t, torch.Tensor) or t.dtype != torch.float64 or t.dim() != 1 \
                    or t.device.type != "cpu":
                raise ValueError(f"{name} must be a 1-D float64 CPU tensor")
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"{name} must be finite")
        k = self.breakpoints.numel()
        if self.slopes.numel() != k + 1 or self.intercepts.numel() != k + 1:
            raise ValueError(f"{k} breakpoints need {k + 1} slopes and intercepts, got "
                             f"{self.slopes.numel()} and {self.intercepts.numel()}")
        if k > 1 and not bool((self.breakpoints[1:] > self.breakpoints[:-1]).all()):
            raise ValueError("breakpoints must be strictly increasing")

    @property
    def num_breakpoints(self) -> int:
        return self.breakpoints.numel()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``f(x)`` in float64 with the table's own semantics (``x`` cast to float64, CPU)."""
        x = torch.as_tensor(x).to(device="cpu", dtype=torch.float64)
        i = torch.searchsorted(self.breakpoints, x, right=True)
        return self.slopes[i] * x + self.intercepts[i]


class KernelArrays(NamedTuple):
    """The fp32 arrays a kernel reads; see the module docstring for the exact contract."""

    breakpoints: torch.Tensor  # (P,) float32, P a power of two > K, +inf padded
    slopes: torch.Tensor       # (P + 1,) float32
    intercepts: torch.Tensor   # (P + 1,) float32


class LevelArrays(NamedTuple):
    """The CUDA kernel's form of :class:`KernelArrays` (module docstring, :func:`level_order`)."""

    nodes: torch.Tensor   # (P,) float32: bp[0..P-2] in level order, then +inf (never read)
    pieces: torch.Tensor  # (P, 2) float32: (slope, intercept) of pieces 0..P-1


def level_permutation(p: int) -> torch.Tensor:
    """For ``j < P - 1``: the sorted index of level-order node ``j`` (int64, shape ``(P - 1,)``).

    Node ``j = 2**k - 1 + r`` (level ``k``, ``r`` the choices above it as a binary number) is the
    candidate of the sorted search's step ``k`` after those choices: ``bp[(2r + 1) P / 2**(k+1)
    - 1]``. Every index ``0..P-2`` appears once (``i + 1`` is an odd multiple of one power of two).
    """
    if p < 1 or p & (p - 1):
        raise ValueError(f"the table size must be a power of two, got {p}")
    j = torch.arange(1, p, dtype=torch.int64)       # j + 1, so level k holds [2**k, 2**(k+1))
    k = torch.frexp(j.to(torch.float64)).exponent.to(torch.int64) - 1  # exact: j < 2**53
    r = j - (1 << k)
    return (2 * r + 1) * (p >> (k + 1)) - 1


def level_order(arrays: KernelArrays | tuple) -> LevelArrays:
    """The level-order form of ``arrays`` (``P`` = its breakpoints' length) for the CUDA kernel.

    Reorders, never rounds: :func:`level_search` over ``nodes`` returns :func:`branchless_search`'s
    index over ``breakpoints`` for every ``x``, and ``pieces[i]`` is ``(slopes[i],
    intercepts[i])`` for ``i < P`` (piece ``P`` serves only a full search, which the kernel
    never does). ``slopes`` and ``intercepts`` need at least ``P`` entries.
    """
    bp, s, c = arrays
    p = bp.numel()
    if any(a.dtype != torch.float32 or a.dim() != 1 for a in (bp, s, c)) \
            or s.numel() < p or c.numel() < p:
        raise ValueError("expected float32 arrays of lengths P, >= P, >= P")
    bp = bp.detach().cpu()
    nodes = torch.cat([bp[level_permutation(p)], torch.full((1,), float("inf"))])
    pieces = torch.stack([s.detach().cpu()[:p], c.detach().cpu()[:p]], dim=1)
    return LevelArrays(nodes.contiguous(), pieces.contiguous())


def level_search(nodes: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The CUDA kernel's search over level-order ``nodes`` (length ``P``, a power of two):
    :func:`branchless_search`'s index, by walking the tree. Int64 indices shaped like ``x``."""
    p = nodes.numel()
    if p < 1 or p & (p - 1):
        raise ValueError(f"the node array's length must be a power of two, got {p}")
    j = torch.zeros(x.shape, dtype=torch.int64, device=x.device)
    n = p
    while n > 1:
        j = 2 * j + 1 + (x >= nodes[j]).to(torch.int64)
        n //= 2
    return j - (p - 1)


def is_tabulable(net: nn.Module) -> bool:
    """Whether ``net`` computes exactly ``SimpleMetaNet``'s MLP, so :func:`build_table` is exact.

    Checks what its output depends on, not just its class: ``forward``/``__call__`` are
    ``SimpleMetaNet``'s own (a subclass may add methods but not override them), ``net.net`` is a
    plain ``Sequential`` of plain ``Linear(1, H)``, ``ReLU``, ``Linear(H, H)``, ``ReLU``,
    ``Linear(H, 1)`` with biases and floating weights (a parametrized or subclassed layer is a
    different type), and no forward hook (module or global) can change a value.
    """
    if not isinstance(net, SimpleMetaNet):
        return False
    cls = type(net)
    if cls.forward is not SimpleMetaNet.forward or cls.__call__ is not nn.Module.__call__:
        return False
    seq = getattr(net, "net", None)
    if type(seq) is not nn.Sequential or len(seq) != 5:
        return False
    kinds = (nn.Linear, nn.ReLU, nn.Linear, nn.ReLU, nn.Linear)
    if any(type(m) is not k for m, k in zip(seq, kinds)):
        return False
    l1, l2, l3 = seq[0], seq[2], seq[4]
    h = l1.out_features
    shapes = [(l1, (h, 1)), (l2, (h, h)), (l3, (1, h))]
    for lin, shape in shapes:
        w, b = lin.weight, lin.bias
        if not isinstance(w, torch.Tensor) or not isinstance(b, torch.Tensor):
            return False
        if tuple(w.shape) != shape or tuple(b.shape) != (shape[0],):
            return False
        if not (w.is_floating_point() and b.is_floating_point()):
            return False
    for m in net.modules():
        if m._forward_hooks or m._forward_pre_hooks:
            return False
    if _module._global_forward_hooks or _module._global_forward_pre_hooks:
        return False
    return True


def host_float64(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """``tensors`` in float64 on the host (flat), read by **one** device-to-host copy.

    A rebuild of the table runs under every ``meta_step``: on a GPU, each copy to the host is a
    sync, so the weights are joined on their device (in their common dtype, which widening makes
    exact) and copied once, then split on the host. Tensors on several devices take one copy
    per device.
    """
    flat = [t.detach().reshape(-1) for t in tensors]
    out: list = [None] * len(flat)
    by_device: dict = {}
    for i, t in enumerate(flat):
        by_device.setdefault(t.device, []).append(i)
    for idx in by_device.values():
        joined = torch.cat([flat[i] for i in idx]) if len(idx) > 1 else flat[idx[0]]
        parts = joined.to(device="cpu", dtype=torch.float64).split([flat[i].numel() for i in idx])
        for i, part in zip(idx, parts):
            out[i] = part
    return out


def build_table(net: nn.Module) -> PiecewiseLinear:
    """The exact piecewise-linear form of a ``SimpleMetaNet``'s MLP, computed in float64.

    The weights are read in float64 on the CPU whatever their dtype and device (in one copy:
    :func:`host_float64`), so the table equals the MLP evaluated in float64 up to float64
    rounding of the kinks and coefficients.
    Adjacent pieces with identical (slope, intercept) are merged, so a net at its initialisation
    (zero biases: every kink at 0) gives at most one breakpoint.

    Raises ``TypeError`` if ``not is_tabulable(net)`` and ``ValueError`` for non-finite weights.
    """
    if not is_tabulable(net):
        raise TypeError(f"{type(net).__name__} is not a plain SimpleMetaNet; it cannot be "
                        "tabulated (check is_tabulable first)")
    l1, l2, l3 = net.net[0], net.net[2], net.net[4]
    w1, b1, w2, b2, w3, b3 = host_float64([l1.weight, l1.bias, l2.weight, l2.bias, l3.weight,
                                           l3.bias])
    w2, b3 = w2.reshape(l2.weight.shape), b3.reshape(())
    for t in (w1, b1, w2, b2, w3, b3):
        if not bool(torch.isfinite(t).all()):
            raise ValueError("the meta-net has non-finite weights; it cannot be tabulated")
    inf = torch.tensor([float("inf")], dtype=torch.float64)

    # Layer 1. "+ 0.0" turns -0.0 into +0.0 so that unique() sees one zero.
    nz1 = w1 != 0
    t1 = torch.where(nz1, -b1 / torch.where(nz1, w1, 1.0), 0.0) + 0.0
    # A kink that overflows float64 is beyond every x; the comparisons below still place the
    # unit right (active everywhere or nowhere), it just must not become an interval bound.
    kinks1 = torch.unique(t1[nz1 & torch.isfinite(t1)])  # sorted
    lo1 = torch.cat([-inf, kinks1])  # interval i of layer 1 is (lo1[i], hi1[i])
    hi1 = torch.cat([kinks1, inf])
    # Activity decided by comparing the interval's ends with the kink, never by evaluating the
    # unit at a sample point: it is then exactly consistent with the bounds used below.
    act1 = torch.where(w1 > 0, lo1[:, None] >= t1,
                       torch.where(w1 < 0, hi1[:, None] <= t1, b1 > 0)).to(torch.float64)

    # Layer 2 on layer-1 interval i: z2[k] = a2[i, k] * x + c2[i, k].
    a2 = act1 @ (w2 * w1).T
    c2 = b2 + act1 @ (w2 * b1).T
    nz2 = a2 != 0
    t2 = torch.where(nz2, -c2 / torch.where(nz2, a2, 1.0), float("nan")) + 0.0
    inside = nz2 & (t2 > lo1[:, None]) & (t2 < hi1[:, None])
    bps = torch.unique(torch.cat([kinks1, t2[inside]]))

    # Final piece p is [lo[p], hi[p]); it lies inside layer-1 interval seg[p] because every
    # layer-1 kink is a breakpoint and every layer-2 crossing is strictly inside its interval.
    lo = torch.cat([-inf, bps])
    hi = torch.cat([bps, inf])
    seg = torch.searchsorted(kinks1, lo, right=True)
    n = lo.numel()
    slopes = torch.empty(n, dtype=torch.float64)
    icpts = torch.empty(n, dtype=torch.float64)
    block = max(1, _BLOCK_ELEMS // w1.numel())
    for s in range(0, n, block):
        sl = slice(s, s + block)
        a, c, t = a2[seg[sl]], c2[seg[sl]], t2[seg[sl]]
        act2 = torch.where(a > 0, lo[sl, None] >= t,
                           torch.where(a < 0, hi[sl, None] <= t, c > 0)).to(torch.float64)
        slopes[sl] = (act2 * a) @ w3
        icpts[sl] = (act2 * c) @ w3 + b3
    return _merge(bps, slopes, icpts)


def _merge(bps, slopes, icpts):
    """Drop each breakpoint whose two sides are the same affine function (exact compare)."""
    keep_bp = (slopes[1:] != slopes[:-1]) | (icpts[1:] != icpts[:-1])
    keep_piece = torch.cat([torch.tensor([True]), keep_bp])
    return PiecewiseLinear(bps[keep_bp].contiguous(), slopes[keep_piece].contiguous(),
                           icpts[keep_piece].contiguous())


def kernel_arrays(table: PiecewiseLinear) -> KernelArrays:
    """Round ``table`` to the fp32 arrays of the kernel contract (module docstring).

    Rounding is monotone, so the fp32 breakpoints stay sorted; what it changes is handled so
    that evaluation stays within rounding of ``f``:

    - breakpoints that round to ``-inf`` (``+inf``) are dropped with the pieces left (right) of
      them, which no finite fp32 ``x`` can reach;
    - breakpoints that round to the same fp32 value ``v`` are kept once; ``x == v`` takes the
      piece right of the last of them, the pieces between them (reachable by no fp32 ``x``
      other than ``v``) are dropped. At ``v`` the kept piece differs from the exact one by at
      most ``|slope jump| * |v - bp|`` (``<= half an ulp of v`` per jump) since ``f`` is
      continuous; the same holds for ``x == bp32 < bp`` at a single breakpoint;
    - adjacent pieces whose fp32 (slope, intercept) are equal are merged (no change in value).

    ``P`` is the smallest power of two above the remaining ``K``. Raises ``ValueError`` if a
    reachable slope or intercept does not fit in fp32.
    """
    k = table.num_breakpoints
    bp = table.breakpoints.to(torch.float32) + 0.0
    s = table.slopes.to(torch.float32)
    c = table.intercepts.to(torch.float32)
    n_lo = int((bp == float("-inf")).sum())
    n_hi = int((bp == float("inf")).sum())
    bp, s, c = bp[n_lo:k - n_hi], s[n_lo:k + 1 - n_hi], c[n_lo:k + 1 - n_hi]
    if not (bool(torch.isfinite(s).all()) and bool(torch.isfinite(c).all())):
        raise ValueError("the table's slopes or intercepts overflow float32")

    keep_bp = torch.ones(bp.numel(), dtype=torch.bool)
    keep_bp[:-1] = bp[1:] != bp[:-1]  # the last of each run of equal values
    bp, s, c = _keep(bp, s, c, keep_bp)
    bp, s, c = _keep(bp, s, c, (s[1:] != s[:-1]) | (c[1:] != c[:-1]))

    k = bp.numel()
    p = 1 << k.bit_length()  # smallest power of two > k
    pad = p - k
    bp = torch.cat([bp, torch.full((pad,), float("inf"))])
    s = torch.cat([s, s[-1:].expand(pad)])
    c = torch.cat([c, c[-1:].expand(pad)])
    return KernelArrays(bp.contiguous(), s.contiguous(), c.contiguous())


def _keep(bp, s, c, keep_bp):
    keep_piece = torch.cat([torch.tensor([True]), keep_bp])
    return bp[keep_bp], s[keep_piece], c[keep_piece]


def branchless_search(bp: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The kernel's search: ``idx = #{j <= P - 2 : bp[j] <= x}`` by ``log2(P)`` halving steps.

    ``bp``: sorted, length ``P`` a power of two. Returns int64 indices shaped like ``x``. NaN
    ``x`` gives 0 (every comparison false).
    """
    p = bp.numel()
    if p < 1 or p & (p - 1):
        raise ValueError(f"the breakpoint array's length must be a power of two, got {p}")
    idx = torch.zeros(x.shape, dtype=torch.int64, device=x.device)
    step = p // 2
    while step:
        idx += (x >= bp[idx + (step - 1)]).to(torch.int64) * step
        step //= 2
    return idx


def evaluate(table_or_arrays: PiecewiseLinear | KernelArrays | tuple, x: torch.Tensor
             ) -> torch.Tensor:
    """What the kernel computes for each element of ``x``: fp32 ``f(x)``, shaped like ``x``.

    ``x`` is cast to float32; the search is :func:`branchless_search`; then
    ``slope[idx] * x`` and ``+ icpt[idx]`` are two separate fp32 operations (each rounded, no
    fused multiply-add). Computed on ``x``'s device.
    """
    if isinstance(table_or_arrays, PiecewiseLinear):
        table_or_arrays = kernel_arrays(table_or_arrays)
    bp, s, c = table_or_arrays
    p = bp.numel()
    if any(a.dtype != torch.float32 or a.dim() != 1 for a in (bp, s, c)) \
            or s.numel() != p + 1 or c.numel() != p + 1:
        raise ValueError("expected float32 arrays of lengths P, P + 1, P + 1")
    x = torch.as_tensor(x)
    x = x.to(torch.float32)
    bp, s, c = bp.to(x.device), s.to(x.device), c.to(x.device)
    idx = branchless_search(bp, x)
    prod = s[idx] * x
    return prod + c[idx]
