"""The meta-net's piecewise-linear table (shardgrok/metanet/table.py) against the MLP itself.

The oracle is ``net.net`` run as a plain MLP, in float64 for the table's exactness and in float32
for the rounding level the fp32 kernel arrays are held to.
"""
import copy
import math
import time

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from shardgrok.metanet import SimpleMetaNet
from shardgrok.metanet.table import (KernelArrays, PiecewiseLinear, branchless_search,
                                     build_table, evaluate, is_tabulable, kernel_arrays)

F64 = torch.float64
FP32_TINY = torch.finfo(torch.float32).tiny
SPECIAL = [0.0, 1e-30, 1e-8, 1e-3, 1.0, 1e3, 1e6, 1e20, 1e30]


def _linears(net):
    return net.net[0], net.net[2], net.net[4]


def _net(h, kind, seed):
    """``init``: SimpleMetaNet as constructed (zero biases); ``random``: nn.Linear's default
    init (non-zero biases); ``trained``: weights and biases N(0, 1), far from the init."""
    torch.manual_seed(seed)
    net = SimpleMetaNet(h)
    with torch.no_grad():
        for lin in _linears(net):
            if kind == "random":
                lin.reset_parameters()
            elif kind == "trained":
                lin.weight.normal_()
                lin.bias.normal_()
    return net


def _mlp(net, x, dtype):
    m = copy.deepcopy(net.net).to(dtype)
    with torch.no_grad():
        return m(x.to(dtype).reshape(-1, 1)).reshape(-1)


def _scale(net, x, floor=0.0):
    """The MLP's activation scale at x: the MLP run on absolute values of weights and inputs,
    plus ``floor`` at each layer's output.

    Rounding errors of the MLP (and of any equivalent affine form of it) are bounded by a
    modest multiple of eps times this: an op's error is at most eps * |result| + eta, and
    eta (half the smallest subnormal) is eps * floor for floor = the smallest normal, so
    ``floor=FP32_TINY`` accounts for fp32 underflow (subnormal x next to a breakpoint at 0).
    """
    l1, l2, l3 = (copy.deepcopy(lin).double().requires_grad_(False) for lin in _linears(net))
    a = x.to(F64).reshape(-1, 1).abs() * l1.weight.abs().T + l1.bias.abs() + floor
    a = a @ l2.weight.abs().T + l2.bias.abs() + floor
    return (a @ l3.weight.abs().T + l3.bias.abs() + floor).reshape(-1)


def _rel(err, scale):
    """err / scale, 0 where both are 0 (x = 0 of a net with zero biases)."""
    return torch.where(err == 0, 0.0, err / scale)


def _grid(table):
    """Every breakpoint, its neighbourhood, the midpoints, both sides beyond the last ones,
    a dense range and the special magnitudes (both signs)."""
    bp = table.breakpoints
    parts = [bp, bp * (1 + 1e-9), bp * (1 - 1e-9), torch.linspace(-10, 10, 801, dtype=F64),
             torch.tensor(SPECIAL, dtype=F64), -torch.tensor(SPECIAL, dtype=F64)]
    if bp.numel():
        parts += [(bp[1:] + bp[:-1]) / 2,
                  torch.stack([bp[0] - 1 - bp[0].abs(), bp[-1] + 1 + bp[-1].abs()])]
    return torch.cat(parts)


def _ulp32(v):
    a = v.abs().float()
    return (torch.nextafter(a, torch.tensor(math.inf)) - a).double()


def _fp32_points(table, arrays):
    """The float64 grid rounded to fp32, plus every fp32 breakpoint and its fp32 neighbours."""
    bp = arrays.breakpoints[torch.isfinite(arrays.breakpoints)]
    inf = torch.tensor(math.inf)
    return torch.cat([_grid(table).float(), bp, torch.nextafter(bp, inf),
                      torch.nextafter(bp, -inf)])


def _fp32_errors(net, table, arrays):
    """Errors against the float64 MLP, in units of the activation scale: the fp32 MLP's and
    the fp32 table's, at the same fp32 points (x is exact in both)."""
    x = _fp32_points(table, arrays)
    ref = _mlp(net, x.double(), F64)
    scale = _scale(net, x, FP32_TINY)
    e_mlp = (_mlp(net, x, torch.float32).double() - ref).abs()
    e_tab = (evaluate(arrays, x).double() - ref).abs()
    return x, ref, scale, e_mlp, e_tab


def _assert_fp32_at_mlp_level(net, table, factor=4.0):
    """The fp32 table's error stays within ``factor`` times the fp32 MLP's own rounding level.

    The level is measured, not assumed: ``r`` is the fp32 MLP's largest error against the
    float64 MLP over all points, in units of the activation scale (its a-priori error is
    ``O(H eps)`` times that scale; in practice a few eps). The table's error has the same
    shape: rounding slope and intercept to fp32 and the two fp32 operations cost
    ``eps * (2 |slope x| + |intercept| + |f|)``, each term at most the scale, and a rounded
    breakpoint moves the value by ``|slope jump| * eps * |x|``, again at most the scale. So it
    is held pointwise to ``factor * r * scale(x)``, plus a few ulps of ``|f|`` because the
    final rounding of a result of size ``|f|`` is unavoidable even where the MLP is exact
    (e.g. a constant f). Measured over 200 seeds each: the ratio of the two maxima stays below
    2 for H >= 4 and under 1 for H = 32; for H <= 2 it reaches ~8 where the MLP is all but
    exact and the table is off by 1-2 ulps of f, which the ulp term admits. Returns the ratio.
    """
    arrays = kernel_arrays(table)
    x, ref, scale, e_mlp, e_tab = _fp32_errors(net, table, arrays)
    r = float(_rel(e_mlp, scale).max())
    assert r < 1e-5  # the fp32 MLP itself is sane here (a few eps at most), so r means something
    tol = factor * r * scale + 4 * _ulp32(ref)
    bad = e_tab > tol
    assert not bool(bad.any()), (
        f"fp32 table error above {factor}x the fp32 MLP level r={r:.3g} at x={x[bad][:5]}: "
        f"{e_tab[bad][:5]} > {tol[bad][:5]}")
    return float(_rel(e_tab, scale).max()) / max(r, 1e-300)


CASES = [(h, kind, seed) for h in (1, 2, 32, 64) for kind in ("init", "random", "trained")
         for seed in range(3)]


@pytest.mark.parametrize("h,kind,seed", CASES)
def test_table_is_the_mlp_in_float64(h, kind, seed):
    net = _net(h, kind, seed)
    table = build_table(net)
    assert table.num_breakpoints <= h + h * (h + 1)
    x = _grid(table)
    err = (table(x) - _mlp(net, x, F64)).abs()
    assert bool((err <= 1e-12 * _scale(net, x)).all()), float(_rel(err, _scale(net, x)).max())


@pytest.mark.parametrize("h,kind,seed", CASES)
def test_fp32_arrays_at_the_fp32_mlp_rounding_level(h, kind, seed):
    net = _net(h, kind, seed)
    _assert_fp32_at_mlp_level(net, build_table(net))


@pytest.mark.parametrize("h", [1, 2, 32, 64, 256])
def test_init_gives_a_tiny_table(h):
    # Zero biases: every kink is at 0 and f is linear on each side of it.
    table = build_table(SimpleMetaNet(h))
    assert table.num_breakpoints <= 1
    assert bool((table.breakpoints == 0).all())
    assert kernel_arrays(table).breakpoints.numel() <= 2


@pytest.mark.parametrize("h,kind,seed", [(32, "random", 0), (32, "trained", 1),
                                          (64, "trained", 2), (2, "random", 1)])
def test_both_pieces_agree_on_each_breakpoint(h, kind, seed):
    net = _net(h, kind, seed)
    table = build_table(net)
    assert table.num_breakpoints > 0
    bp, s, c = table.breakpoints, table.slopes, table.intercepts
    left, right = s[:-1] * bp + c[:-1], s[1:] * bp + c[1:]
    scale = _scale(net, bp)
    ref = _mlp(net, bp, F64)
    assert bool(((left - right).abs() <= 1e-12 * scale).all())
    assert bool(((left - ref).abs() <= 1e-12 * scale).all())

    # fp32: x exactly on a rounded breakpoint takes the right piece; the left piece, rounded
    # the same way, must give the same value to within the fp32 level.
    arrays = kernel_arrays(table)
    k = int(torch.isfinite(arrays.breakpoints).sum())
    v = arrays.breakpoints[:k]
    idx = branchless_search(arrays.breakpoints, v)
    assert torch.equal(idx, torch.arange(1, k + 1))
    left32 = (arrays.slopes[idx - 1] * v + arrays.intercepts[idx - 1]).double()
    right32 = evaluate(arrays, v).double()
    ref32 = _mlp(net, v.double(), F64)
    _, _, scale_all, e_mlp, _ = _fp32_errors(net, table, arrays)
    r = float(_rel(e_mlp, scale_all).max())
    tol = 4 * r * _scale(net, v, FP32_TINY) + 4 * _ulp32(ref32)
    assert bool(((left32 - ref32).abs() <= tol).all())
    assert bool(((right32 - ref32).abs() <= tol).all())


def _dead_net(h, seed, how):
    torch.manual_seed(seed)
    net = SimpleMetaNet(h)
    l1, l2, l3 = _linears(net)
    with torch.no_grad():
        for lin in (l1, l2, l3):
            lin.weight.normal_()
            lin.bias.normal_()
        if how == "w1_zero":  # layer 1 constant: half dead, half a constant input to layer 2
            l1.weight.zero_()
        elif how == "l1_dead":  # kinks beyond 1e8: dead for every |x| below that
            l1.weight.mul_(1e-6)
            l1.bias.copy_(-1e3 - torch.rand(h) * 10)
        elif how == "l2_dead":  # every layer-2 unit dead until |x| is huge
            l2.weight.mul_(1e-9)
            l2.bias.copy_(-1e2 - torch.rand(h))
    return net


@pytest.mark.parametrize("how", ["w1_zero", "l1_dead", "l2_dead"])
@pytest.mark.parametrize("h", [1, 32])
def test_dead_units(how, h):
    net = _dead_net(h, 3, how)
    l1, l2, l3 = (copy.deepcopy(lin).double() for lin in _linears(net))
    table = build_table(net)
    if how == "w1_zero":
        assert table.num_breakpoints == 0
        const = l3(torch.relu(l2(torch.relu(l1.bias)))).item()
    else:
        # Only kinks far out, where units wake up; below them f is the biases' constant (the
        # layer-1 kinks of "l2_dead" separate identical pieces and are merged away).
        assert bool((table.breakpoints.abs() > 1e8).all())
        const = (l3(torch.relu(l2.bias)) if how == "l1_dead" else l3.bias).item()
    x = torch.linspace(-1e7, 1e7, 101, dtype=F64)
    assert torch.allclose(table(x), torch.full_like(x, const), rtol=1e-14, atol=0)
    # And the MLP everywhere, including beyond the far kinks.
    x = _grid(table)
    err = (table(x) - _mlp(net, x, F64)).abs()
    assert bool((err <= 1e-12 * _scale(net, x)).all())
    _assert_fp32_at_mlp_level(net, table)


def test_kinks_beyond_float64_range():
    # -b1 / w1 overflows float64 for subnormal w1: the unit is then the same for every x.
    net = _net(8, "trained", 4).double()
    with torch.no_grad():
        l1 = net.net[0]
        l1.weight[:3, 0] = torch.tensor([1e-310, -1e-310, 1e-310], dtype=F64)
        l1.bias[:3] = torch.tensor([1.0, 1.0, -1.0], dtype=F64)
    table = build_table(net)
    assert bool(torch.isfinite(table.breakpoints).all())
    x = _grid(table)
    err = (table(x) - _mlp(net, x, F64)).abs()
    assert bool((err <= 1e-12 * _scale(net, x)).all())


def test_weights_read_in_float64_from_any_dtype():
    net = _net(16, "trained", 5)
    for dtype in (torch.float64, torch.bfloat16):
        other = copy.deepcopy(net).to(dtype)
        table = build_table(other)
        x = _grid(table)
        err = (table(x) - _mlp(other, x, F64)).abs()  # the module's own weights, exactly
        assert bool((err <= 1e-12 * _scale(other, x)).all())
    net.net[0].weight.requires_grad_(True)
    assert not build_table(net).slopes.requires_grad


def test_non_finite_weights_rejected():
    net = SimpleMetaNet(4)
    with torch.no_grad():
        net.net[2].bias[1] = math.nan
    with pytest.raises(ValueError, match="non-finite"):
        build_table(net)


def _random_table(k, gen, dense=False):
    """A continuous table on k distinct fp32-exact breakpoints, pieces all different."""
    if dense:  # consecutive fp32 values: the tightest spacing the kernel can see
        ulp = torch.nextafter(torch.tensor(1.5), torch.tensor(2.0)) - 1.5
        bp = 1.5 + torch.arange(k).float() * ulp
    else:
        bp = torch.unique(torch.randn(3 * k + 3, generator=gen).float())[:k]
    bp = bp.double()
    assert bp.numel() == k
    s = torch.randn(k + 1, generator=gen, dtype=F64)
    c = torch.empty(k + 1, dtype=F64)
    c[0] = torch.randn((), generator=gen, dtype=F64)
    for i in range(k):
        c[i + 1] = c[i] + (s[i] - s[i + 1]) * bp[i]
    return PiecewiseLinear(bp, s, c)


@pytest.mark.parametrize("k", [0, 1, 2, 3, 7, 8, 9, 15, 16, 100])
def test_search_and_padding_contract(k):
    gen = torch.Generator().manual_seed(k)
    table = _random_table(k, gen, dense=(k == 9))
    arrays = kernel_arrays(table)
    assert isinstance(arrays, KernelArrays)
    bp, s, c = arrays
    p = bp.numel()
    assert p & (p - 1) == 0 and p > k and (p == 1 or p // 2 <= k)
    assert bp.dtype == s.dtype == c.dtype == torch.float32
    assert s.numel() == c.numel() == p + 1
    real = bp[:k]
    assert torch.equal(real, table.breakpoints.float())  # fp32-exact: nothing merged
    assert bool(torch.isinf(bp[k:]).all()) and bool((bp[k:] > 0).all())
    assert bool((s[k:] == s[k]).all()) and bool((c[k:] == c[k]).all())

    inf = torch.tensor(math.inf)
    x = torch.cat([real, torch.nextafter(real, inf), torch.nextafter(real, -inf),
                   torch.randn(200, generator=gen) * 3, torch.tensor([0.0, -0.0, 1e30, -1e30,
                                                                      3.4e38, -3.4e38]),
                   torch.tensor([math.inf, -math.inf])])
    idx = branchless_search(bp, x)
    # The loop counts breakpoints <= x among bp[0..P-2] ...
    assert torch.equal(idx, torch.searchsorted(bp[:p - 1], x, right=True))
    # ... which is the real count for every finite x, and a piece equal to the last one at +inf.
    piece = torch.searchsorted(real, x, right=True)
    finite = torch.isfinite(x)
    assert torch.equal(idx[finite], piece[finite])
    assert bool((idx[x == math.inf] == p - 1).all()) and bool((idx[x == -math.inf] == 0).all())
    assert torch.equal(s[idx], s[piece]) and torch.equal(c[idx], c[piece])
    # A full search over all P entries returns up to P: the (P + 1)-th piece serves it.
    full = torch.searchsorted(bp, x, right=True)
    assert torch.equal(s[full], s[piece]) and torch.equal(c[full], c[piece])

    y = evaluate(table, x)
    assert y.dtype == torch.float32 and y.shape == x.shape
    want = s[piece] * x + c[piece]
    assert torch.equal(y[finite], want[finite])
    finite &= x.abs() < 1e37  # no fp32 overflow of f
    xf = x[finite].double()
    assert bool(((y[finite].double() - table(xf)).abs()
                 <= 4 * _ulp32(table(xf)) + 4e-7 * (table.slopes.abs().max() * xf.abs()
                                                    + table.intercepts.abs().max())).all())

    nan = branchless_search(bp, torch.tensor([math.nan]))
    assert nan.item() == 0 and math.isnan(evaluate(table, torch.tensor([math.nan])).item())


def test_search_on_non_decreasing_arrays_with_ties():
    gen = torch.Generator().manual_seed(7)
    for p in (1, 2, 4, 8, 16, 64):
        bp = torch.sort(torch.randint(-5, 6, (p,), generator=gen).float()).values
        x = torch.cat([torch.arange(-7, 8).float(), torch.arange(-7, 8).float() + 0.5,
                       torch.tensor([math.inf, -math.inf])])
        assert torch.equal(branchless_search(bp, x),
                           torch.searchsorted(bp[:p - 1], x, right=True))
    with pytest.raises(ValueError, match="power of two"):
        branchless_search(torch.zeros(3), torch.zeros(1))


def test_rounding_merges_breakpoints_on_one_fp32_value():
    # Three float64 breakpoints within one fp32 ulp of 1.0 and one between two fp32 values.
    bp = torch.tensor([-2.0, 1.0, 1.0 + 1e-12, 1.0 + 2e-12, 3.0 + 1e-9], dtype=F64)
    s = torch.tensor([0.5, -1.0, 4.0, -3.0, 2.0, 1.0], dtype=F64)
    c = torch.empty(6, dtype=F64)
    c[0] = 0.25
    for i in range(5):
        c[i + 1] = c[i] + (s[i] - s[i + 1]) * bp[i]
    table = PiecewiseLinear(bp, s, c)
    arrays = kernel_arrays(table)
    k = int(torch.isfinite(arrays.breakpoints).sum())
    assert torch.equal(arrays.breakpoints[:k], torch.tensor([-2.0, 1.0, 3.0]))
    # x == 1.0 takes the piece right of the last merged breakpoint (slope 2): by continuity it
    # is within |slope jumps| * 2e-12 of f(1.0).
    assert arrays.slopes[2].item() == 2.0
    inf = torch.tensor(math.inf)
    x = torch.cat([arrays.breakpoints[:k], torch.nextafter(arrays.breakpoints[:k], inf),
                   torch.nextafter(arrays.breakpoints[:k], -inf), torch.linspace(-5, 5, 101)])
    err = (evaluate(arrays, x).double() - table(x.double())).abs()
    assert bool((err <= 8 * _ulp32(torch.tensor(10.0)) * (1 + x.double().abs())).all())


def test_rounding_drops_breakpoints_beyond_fp32_and_merges_equal_pieces():
    bp = torch.tensor([-1e39, -1.0, 1.0, 1e39], dtype=F64)
    s = torch.tensor([0.0, 0.0, 1.0, 1.0 + 1e-12, 3.0], dtype=F64)
    c = torch.empty(5, dtype=F64)
    c[0] = 0.5
    for i in range(4):
        c[i + 1] = c[i] + (s[i] - s[i + 1]) * bp[i]
    # The last piece's intercept (-2e39) overflows fp32 but no finite fp32 x reaches it; pieces
    # 2 and 3 differ by 1e-12 in slope and intercept: one piece in fp32.
    table = PiecewiseLinear(bp, s, c)
    arrays = kernel_arrays(table)
    assert arrays.breakpoints.tolist() == [-1.0, math.inf]
    assert arrays.slopes.tolist() == [0.0, 1.0, 1.0]
    assert arrays.intercepts.tolist() == [0.5, 1.5, 1.5]
    big = torch.tensor([-3.4e38, -1.0, 0.0, 3.4e38])
    assert torch.equal(evaluate(arrays, big), table(big.double()).float())
    with pytest.raises(ValueError, match="overflow"):
        kernel_arrays(PiecewiseLinear(torch.zeros(0, dtype=F64), torch.tensor([1e39], dtype=F64),
                                      torch.zeros(1, dtype=F64)))


def test_piecewise_linear_validates():
    z = torch.zeros(1, dtype=F64)
    with pytest.raises(ValueError, match="increasing"):
        PiecewiseLinear(torch.tensor([1.0, 1.0], dtype=F64), torch.zeros(3, dtype=F64),
                        torch.zeros(3, dtype=F64))
    with pytest.raises(ValueError, match="need"):
        PiecewiseLinear(torch.zeros(1, dtype=F64), z, z)
    with pytest.raises(ValueError, match="float64"):
        PiecewiseLinear(torch.zeros(0), torch.zeros(1), torch.zeros(1))
    with pytest.raises(ValueError, match="finite"):
        PiecewiseLinear(torch.zeros(0, dtype=F64), torch.tensor([math.inf], dtype=F64), z)


def test_build_time_h32():
    net = _net(32, "random", 0)
    build_table(net)  # first-call overheads (allocator, kernels' dispatch) are not the cost
    times = []
    for _ in range(7):
        t0 = time.perf_counter()
        build_table(net)
        times.append(time.perf_counter() - t0)
    median = sorted(times)[3]
    print(f"build_table H=32: median {median * 1e3:.2f} ms")
    assert median < 0.05


def test_build_h256_is_exact_and_bounded():
    net = _net(256, "random", 1)
    t0 = time.perf_counter()
    table = build_table(net)
    print(f"build_table H=256: {(time.perf_counter() - t0) * 1e3:.1f} ms, "
          f"{table.num_breakpoints} breakpoints")
    x = _grid(table)
    err = (table(x) - _mlp(net, x, F64)).abs()
    assert bool((err <= 1e-12 * _scale(net, x)).all())


class _Logged(SimpleMetaNet):
    def describe(self):
        return "same forward"


class _Doubled(SimpleMetaNet):
    def forward(self, g):
        return 2 * self.net(g)


def test_is_tabulable():
    assert is_tabulable(SimpleMetaNet(1)) and is_tabulable(SimpleMetaNet(32))
    assert is_tabulable(SimpleMetaNet(8).double()) and is_tabulable(_Logged(4))
    assert not is_tabulable(_Doubled(4))
    assert not is_tabulable(SimpleMetaNet(4).net)
    assert not is_tabulable(nn.Linear(1, 1))

    def edited(fn):
        net = SimpleMetaNet(4)
        fn(net)
        return is_tabulable(net)

    assert not edited(lambda n: n.net.__setitem__(1, nn.Tanh()))
    assert not edited(lambda n: n.net.__setitem__(3, nn.LeakyReLU()))
    assert not edited(lambda n: n.net.__setitem__(2, nn.Linear(4, 4, bias=False)))
    assert not edited(lambda n: n.net.__setitem__(4, nn.Linear(4, 2)))
    assert not edited(lambda n: n.net.append(nn.ReLU()))
    assert not edited(lambda n: setattr(n, "net", nn.Sequential(*list(n.net)[:3])))
    assert not edited(lambda n: n.net[0].register_forward_hook(lambda m, i, o: o * 2))
    assert not edited(lambda n: n.register_forward_pre_hook(lambda m, i: (i[0] * 2,)))
    assert not edited(lambda n: parametrize.register_parametrization(
        n.net[2], "weight", _Scale()))

    handle = nn.modules.module.register_module_forward_hook(lambda m, i, o: o)
    try:
        assert not is_tabulable(SimpleMetaNet(4))
    finally:
        handle.remove()
    assert is_tabulable(SimpleMetaNet(4))

    with pytest.raises(TypeError):
        build_table(_Doubled(4))


class _Scale(nn.Module):
    def forward(self, w):
        return 2 * w
