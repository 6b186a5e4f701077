"""The compiled kernel at its lowest level: the shared header's functions (csrc/grok_math.h,
exposed as ``header_*``) against torch, and the C++ ``Plan`` driven directly, on segments at odd
offsets inside their sources, against the per-element reference functions of
shardgrok/reference.py.

The optimizer-level comparisons (both optimizers, kernel backend against reference backend) are
in tests/kernels/test_kernel.py.

Two oracles for the Plan's phase 2:
- shardgrok/reference.py's ``grokadamw_update_`` / ``supergrok_update_`` (the project's oracle),
  held to a rounding tolerance: torch's in-place ``add_(alpha=)``, ``addcmul_`` and ``addcdiv_``
  use fused multiply-adds, the kernel never does (``-ffp-contract=off``), so the two differ by
  about one fp32 rounding per operation;
- a bit-exact emulation of csrc/grok_math.h's operation order written here with separate fp32
  torch operations (IEEE, each rounded once: what the header does), held to equality. It pins
  down every column of the scalar table, the dtype conversions and the order of operations.
"""
from __future__ import annotations

import math

import pytest
import torch

from shardgrok import reference as R
from shardgrok.metanet import SimpleMetaNet
from shardgrok.metanet.table import build_table, evaluate, kernel_arrays
from tests.support.helpers import meta_net

F32 = torch.float32
F64 = torch.float64
LOG_MASK_LIMIT = 20.0


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().view(torch.int32)


def _random_floats(n: int, seed: int) -> torch.Tensor:
    """n float32 values with uniformly random bit patterns: every exponent, subnormals, inf, NaN."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-2**31, 2**31, (n,), generator=g, dtype=torch.int64).to(torch.int32).view(F32)


def _ties_and_specials() -> torch.Tensor:
    """Values exactly half-way between two bf16 / fp16 numbers (even and odd lower neighbour),
    one fp32 ulp either side of those, subnormals of all three formats, overflow to fp16's inf."""
    g = torch.Generator().manual_seed(7)
    hi = torch.randint(0, 1 << 16, (4096,), generator=g, dtype=torch.int64)
    bf16_ties = (hi << 16) | 0x8000                       # bf16 ties, both parities of bit 16
    hi13 = torch.randint(0, 1 << 19, (4096,), generator=g, dtype=torch.int64)
    f16_ties = (hi13 << 13) | 0x1000                      # fp16 ties (normal fp16 range and beyond)
    ties = torch.cat([bf16_ties, f16_ties])
    near = torch.cat([ties, ties + 1, ties - 1])
    sub32 = torch.randint(1, 1 << 23, (2048,), generator=g, dtype=torch.int64)  # fp32 subnormals
    bits = torch.cat([near, sub32, sub32 | (1 << 31)]) & 0xFFFFFFFF
    x = torch.where(bits >= 1 << 31, bits - (1 << 32), bits).to(torch.int32).view(F32)
    k = torch.arange(1, 2048, dtype=F64)
    f16_sub = torch.cat([k * 2.0**-24, (k + 0.5) * 2.0**-24, k * 2.0**-25]).to(F32)  # fp16 subnormals, ties
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), -float("nan"),
                            65504.0, 65519.0, 65520.0, 65535.0, 65536.0, 1e5, -1e5, 3.4028235e38,
                            -3.4028235e38, 1.1754944e-38, 2.0**-24, 2.0**-25, 2.0**-26, 2.0**-14,
                            6.0e-8, 1.0, -1.0, 1.00390625, 1.005859375, 256.5, 2049.0, 2051.0],
                           dtype=F32)
    return torch.cat([x, f16_sub, -f16_sub, special])


# ---------------------------------------------------------------- conversions
@pytest.mark.parametrize("to,dtype", [("bf16", torch.bfloat16), ("f16", torch.float16)])
def test_header_round_matches_torch_bitwise(ext, to, dtype):
    x = torch.cat([_random_floats(1 << 20, seed=1), _ties_and_specials()])
    got = ext.header_round(x, to)
    want = x.to(dtype).float()
    nan = want.isnan()
    assert bool(got[nan].isnan().all()), "a NaN did not stay NaN"
    assert not bool(got[~nan].isnan().any()), "a number became NaN"
    bad = (_bits(got) != _bits(want)) & ~nan
    assert not bool(bad.any()), (
        f"{int(bad.sum())} values round differently from torch, e.g. "
        f"{[(float(a), float(b), float(c)) for a, b, c in zip(x[bad][:4], got[bad][:4], want[bad][:4])]}")


def test_header_round_cases_that_matter(ext):
    """Explicit expectations, so the test does not only mirror torch: round half to even,
    subnormal fp16 results, overflow to inf, the largest finite fp16."""
    x = torch.tensor([1.0 + 2.0**-8, 1.0 + 3 * 2.0**-8, 65504.0, 65519.0, 65520.0, 1e5,
                      2.0**-25, 3 * 2.0**-25, 2.0**-26, -0.0], dtype=F32)
    f16 = ext.header_round(x, "f16")
    assert f16.tolist()[2:] == [65504.0, 65504.0, float("inf"), float("inf"), 0.0, 2.0**-23,
                                0.0, -0.0]
    assert math.copysign(1.0, float(f16[-1])) == -1.0
    bf = ext.header_round(x, "bf16")
    assert bf[0] == 1.0 and bf[1] == 1.0 + 4 * 2.0**-8  # ties to even, both directions


# ---------------------------------------------------------------- exp
def test_header_exp_within_two_ulp_on_dense_grid(ext):
    x = torch.linspace(-LOG_MASK_LIMIT, LOG_MASK_LIMIT, 4_000_001, dtype=F32)
    got = ext.header_exp(x).double()
    want = torch.exp(x.double())
    ulp = torch.exp2(torch.floor(torch.log2(want)) - 23)  # fp32 ulp at the exact value
    err = ((got - want).abs() / ulp).max().item()
    # measured: 0.96 ulp (relative 8.0e-8); the header claims "about 1 ulp"; 2 ulp allowed
    assert err <= 2.0, f"header_exp is {err:.2f} ulp from exp"
    assert float(((got - want).abs() / want).max()) <= 2.4e-7


def test_header_exp_clamps_outside_the_log_mask_range(ext):
    top, bottom = ext.header_exp(torch.tensor([LOG_MASK_LIMIT, -LOG_MASK_LIMIT]))
    assert abs(float(top) / math.exp(20) - 1) < 2.4e-7 and abs(float(bottom) / math.exp(-20) - 1) < 2.4e-7
    hi = ext.header_exp(torch.tensor([20.0001, 25.0, 88.0, 1e30, float("inf")]))
    lo = ext.header_exp(torch.tensor([-20.0001, -25.0, -104.0, -1e30, -float("inf")]))
    assert torch.equal(hi, top.expand(5)) and torch.equal(lo, bottom.expand(5))
    assert bool(ext.header_exp(torch.tensor([float("nan")])).isnan().all())


# ---------------------------------------------------------------- the meta-net's table
def _net(kind: str, seed: int = 0, hidden: int = 32) -> SimpleMetaNet:
    return meta_net(kind, seed, hidden)


def _table_probe(arrays) -> torch.Tensor:
    """x on and next to every breakpoint, zero, subnormals, a wide log-spread, huge values."""
    bp = arrays.breakpoints[torch.isfinite(arrays.breakpoints)]
    g = torch.Generator().manual_seed(3)
    spread = torch.randn(100_000, generator=g) * torch.exp2(torch.randint(-30, 30, (100_000,), generator=g).float())
    return torch.cat([bp, torch.nextafter(bp, torch.full_like(bp, -math.inf)),
                      torch.nextafter(bp, torch.full_like(bp, math.inf)), -bp,
                      torch.tensor([0.0, -0.0, 1e-45, -1e-45, 1e-40, 1e30, -1e30, 3e38, -3e38]),
                      torch.linspace(-5, 5, 20001), spread])


@pytest.mark.parametrize("kind", ["init", "random", "trained", "dead", "far"])
def test_header_table_matches_evaluate_bitwise(ext, kind):
    arrays = kernel_arrays(build_table(_net(kind)))
    if kind == "dead":
        assert arrays.breakpoints.numel() == 1  # one piece: the size-1 table, a search of no steps
    x = _table_probe(arrays)
    got = ext.header_table(x, arrays.breakpoints, arrays.slopes, arrays.intercepts,
                           arrays.breakpoints.numel())
    want = evaluate(arrays, x).clamp(-LOG_MASK_LIMIT, LOG_MASK_LIMIT)  # the header clamps after
    assert not bool(got.isnan().any())
    bad = _bits(got) != _bits(want)
    assert not bool(bad.any()), f"{int(bad.sum())} of {x.numel()} differ, e.g. x={x[bad][:4].tolist()}"


def test_header_table_agrees_with_the_mlp(ext):
    """Not only with its own oracle: the table is the meta-net (fp32 MLP rounding level)."""
    net = _net("random")
    arrays = kernel_arrays(build_table(net))
    x = torch.linspace(-4, 4, 10001)
    got = ext.header_table(x, arrays.breakpoints, arrays.slopes, arrays.intercepts,
                           arrays.breakpoints.numel())
    with torch.no_grad():
        want = net.double()(x.double().reshape(-1, 1)).reshape(-1)
    assert float((got.double() - want).abs().max()) < 1e-5


# ---------------------------------------------------------------- the Plan, directly
DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}


class Case:
    """Sources with segments at odd offsets (one spanning three kernel chunks, two pieces of the
    same tensor in different sources, an empty one), random state."""

    def __init__(self, ext, pdtype, sdtype, seed=0, gdtype=None):
        g = torch.Generator().manual_seed(seed)
        self.ext = ext
        chunk = ext.CHUNK
        big = 2 * chunk + 233  # three chunks, the last a ragged one
        # (tensor, source, offset, numel); tensor 0 has two pieces, in two sources; tensor 2 is
        # an empty parameter (its own empty source, as the optimizers' plans have it)
        self.rows = [(0, 0, 3, 17), (1, 0, 21, 1), (2, 2, 0, 0), (3, 1, 5, big), (0, 1, big + 6, 3),
                     (4, 0, 40, 23)]
        # where each piece starts in its whole tensor (stochastic rounding's counter): tensor 3's
        # piece crosses element 2^32, where the counter's high word changes
        self.starts = [0, 0, 0, 2**32 - 1000, 17, 7]
        self.n_tensors = 5
        self.sources = [torch.randn(64, generator=g).to(pdtype),
                        torch.randn(big + 20, generator=g).to(pdtype), torch.zeros(0, dtype=pdtype)]
        gdtype = gdtype or pdtype
        self.grads = [torch.randn(s.numel(), generator=g).to(gdtype) for s in self.sources]
        self.params = [self.sources[s].view(-1)[o:o + n] for _, s, o, n in self.rows]
        self.m = [(0.1 * torch.randn(n, generator=g)).to(sdtype) for *_, n in self.rows]
        self.v = [(0.01 * torch.rand(n, generator=g)).to(sdtype) for *_, n in self.rows]
        self.mu = [(0.1 * torch.randn(n, generator=g)).to(sdtype) for *_, n in self.rows]
        # two optimizer parameters: tensors 0-2 count in slot 0, 3-4 in slot 1
        self.steps = [torch.tensor(2.0), torch.tensor(0.0)]
        self.slot_of = torch.tensor([0, 0, 0, 1, 1])

    def plan(self):
        ext = self.ext
        rows = [(*r, start) for r, start in zip(self.rows, self.starts)]
        return ext.Plan(self.n_tensors, self.sources, torch.tensor(rows, dtype=torch.long),
                        self.params, self.m, self.v, self.mu, self.steps, self.slot_of)

    def resolved_plan(self, explicit_grads=False):
        """The plan, its gradients read: handed in (as FSDP2's layout does, any of the three
        dtypes) or from the sources' ``.grad``."""
        plan = self.plan()
        if explicit_grads:
            assert plan.resolve(self.grads)
        else:
            for s, gr in zip(self.sources, self.grads):
                s.grad = gr
            assert plan.resolve()
        return plan

    def snapshot(self):
        return {k: [t.clone() for t in getattr(self, k)]
                for k in ("sources", "m", "v", "mu", "steps")}

    def grad_piece(self, i):
        _, s, o, n = self.rows[i]
        return self.grads[s][o:o + n]


def _scalar_table(kind: str, steps, rounding: int = 0, seed: int = 0) -> torch.Tensor:
    """Per-tensor rows as the optimizers' _decide builds them, with distinct values per tensor
    (so a wrong row or column shows), SuperGrok's gate off on tensor 1 and a first step
    (alpha 0) on tensor 3; ``rounding`` the stochastic rounding flags (header.ROUNDING)."""
    n = len(steps)
    t = torch.zeros(n, len(R.COLUMNS), dtype=F64)
    C = R.COL
    for i in range(n):
        step = float(steps[i])
        b1 = 0.9 * 0.9 ** i
        alpha = 0.0 if (kind == "super" and i == 3) else 0.95 - 0.01 * i
        t[i, C["grad_scale"]] = 0.7 + 0.05 * i
        t[i, C["alpha"]] = alpha
        t[i, C["one_minus_alpha"]] = 1 - alpha
        t[i, C["amp"]] = 0.0 if (kind == "super" and i == 1) else 2.0 - 0.1 * i
        t[i, C["smart_scale"]] = 1.3 + 0.1 * i
        t[i, C["beta1"]] = b1
        t[i, C["one_minus_beta1"]] = 1 - b1
        t[i, C["beta2"]] = 0.999
        t[i, C["one_minus_beta2"]] = 1 - 0.999
        t[i, C["sqrt_bc2"]] = math.sqrt(1 - 0.999 ** step)
        t[i, C["eps"]] = 1e-8
        t[i, C["decay"]] = 1 - 1e-3 * 0.01
        t[i, C["step_size"]] = -1e-3 * (1 + i) / (1 - (b1 if kind == "super" else 0.9) ** step)
        t[i, C["step"]] = step
        t[i, C["rounding"]] = rounding
        t[i, C["seed"]] = seed
    return t


def _emulate(kind, p, g, h, m, v, mu, row):
    """csrc/grok_math.h's update, operation by operation, in fp32 (each op rounded once, IEEE:
    tensor-by-tensor or tensor-by-fp32-scalar products and sums, tensor-by-tensor quotients)."""
    k = {name: torch.tensor(float(row[i]), dtype=F64).to(F32) for i, name in enumerate(R.COLUMNS)}
    p, g, m, v, mu = (x.float() for x in (p, g, m, v, mu))
    if kind == "grok":
        g = g * k["grad_scale"]
        mu = mu * k["alpha"] + g * k["one_minus_alpha"]
        u = g + k["amp"] * mu
    else:
        mu = mu * k["alpha"] + g * k["one_minus_alpha"]
        final = h * k["smart_scale"]
        if float(k["amp"]) != 0.0:
            final = final + k["amp"] * mu
        u = final * k["grad_scale"]
    m = m * k["beta1"] + u * k["one_minus_beta1"]
    v = v * k["beta2"] + (u * u) * k["one_minus_beta2"]
    # torch's fp32 sqrt is not correctly rounded on every build (MKL/Sleef), an fp64 sqrt rounded
    # to fp32 is; and a full tensor, not a 0-dim one, as the divisor: torch divides by a scalar
    # as a multiply by its reciprocal
    sqrt_v = v.double().sqrt().float()
    denom = sqrt_v / torch.full_like(v, float(k["sqrt_bc2"])) + k["eps"]
    p = p * k["decay"]
    p = p + k["step_size"] * (m / denom)
    return p, m, v, mu


def stored(value: torch.Tensor, dtype: torch.dtype, row: torch.Tensor, tensor: int, start: int,
           which: str) -> torch.Tensor:
    """An fp32 result as phase 2 writes it to ``dtype`` storage: rounded stochastically where
    the row's flags say so (bf16 only), by the reference's draws, else to nearest."""
    k = R.StepScalars.from_row(row)
    return R.Rounding.of(k, tensor, start).apply(value.float(), dtype, which)


def _run_case(case, kind, use_table, arrays=None, user_h=None, explicit_grads=False,
              rounding=0, seed=0):
    ext = case.ext
    plan = case.resolved_plan(explicit_grads)
    assert plan.n_segments == len(case.rows)
    assert plan.n_chunks == sum(-(-n // ext.CHUNK) for *_, n in case.rows)
    code = ext.GROKADAMW if kind == "grok" else ext.SUPERGROK
    aux = {}
    if kind == "super":
        if use_table:
            aux = dict(breakpoints=arrays.breakpoints, slopes=arrays.slopes,
                       intercepts=arrays.intercepts, table_size=arrays.breakpoints.numel())
        else:
            aux = dict(hs=user_h)
    stats, present = plan.phase1(code, **aux)
    steps = plan.bump_steps(present)
    table = _scalar_table(kind, steps, rounding, seed)
    plan.phase2(code, table, **aux)
    return stats, present, steps, table


def _masked(ext, arrays, g):
    """h = exp(f(g)) g as the kernel computes it, from the header's own (tested) functions."""
    f = ext.header_table(g.float(), arrays.breakpoints, arrays.slopes, arrays.intercepts,
                         arrays.breakpoints.numel())
    return ext.header_exp(f) * g.float()


@pytest.mark.parametrize("kind", ["grok", "super"])
@pytest.mark.parametrize("pdt,sdt,gdt", [("f32", "f32", None), ("bf16", "bf16", None),
                                         ("f16", "f16", None), ("bf16", "f32", None),
                                         ("f16", "f32", None), ("f32", "f32", "bf16")])
def test_plan_odd_offsets_against_reference(ext, kind, pdt, sdt, gdt):
    pdtype, sdtype = DTYPES[pdt], DTYPES[sdt]
    case = Case(ext, pdtype, sdtype, gdtype=DTYPES[gdt] if gdt else None)
    before = case.snapshot()
    arrays = kernel_arrays(build_table(_net("random")))
    stats, present, steps, table = _run_case(case, kind, use_table=True, arrays=arrays,
                                             explicit_grads=gdt is not None)

    # bookkeeping: which tensors are present, and the step counters (slot 0 was at 2, slot 1 at 0)
    assert present.tolist() == [1.0, 1.0, 1.0, 1.0, 1.0]
    assert steps.tolist() == [3.0, 3.0, 3.0, 1.0, 1.0]
    assert [float(s) for s in case.steps] == [3.0, 1.0]

    # phase 1 against the reference partial sums of the same pieces (fp64 sums of exact products:
    # they differ only in summation order)
    old = before
    want = torch.zeros_like(stats)
    for i, (t, *_rest) in enumerate(case.rows):
        g = case.grad_piece(i)
        if kind == "grok":
            want[t] += R.grokadamw_partial_stats(g)
        else:
            want[t] += R.supergrok_partial_stats(g, _masked(ext, arrays, g), old["mu"][i])
    assert stats.shape == (5, 1 if kind == "grok" else ext.N_STATS)
    torch.testing.assert_close(stats, want, rtol=1e-12, atol=1e-30)

    # phase 2: every piece, against the reference update and the bit-exact emulation
    for i, (t, s, o, n_el) in enumerate(case.rows):
        g = case.grad_piece(i)
        p0 = old["sources"][s].view(-1)[o:o + n_el].clone()
        m0, v0, mu0 = (old[key][i].clone() for key in ("m", "v", "mu"))
        k = R.StepScalars.from_row(table[t])
        h = _masked(ext, arrays, g)
        rp, rm, rv, rmu = p0.clone(), m0.clone(), v0.clone(), mu0.clone()
        if kind == "grok":
            R.grokadamw_update_(rp, g, rm, rv, rmu, k=k)
        else:
            R.supergrok_update_(rp, g, h, rm, rv, rmu, k=k)
        got = (case.params[i], case.m[i], case.v[i], case.mu[i])
        for name, a, b in zip(("param", "exp_avg", "exp_avg_sq", "mu"), got, (rp, rm, rv, rmu)):
            _close_to_reference(name, a, b, i)
        ep, em, ev, emu = _emulate(kind, p0, g, h, m0, v0, mu0, table[t])
        for name, a, b in zip(("param", "exp_avg", "exp_avg_sq", "mu"), got, (ep, em, ev, emu)):
            b = b.to(a.dtype)
            assert torch.equal(a, b), (f"segment {i} {name}: {int((a != b).sum())} elements differ "
                                       "from the header's operation order")
    # nothing outside the segments was touched
    for s, src in enumerate(case.sources):
        mask = torch.ones(src.numel(), dtype=torch.bool)
        for _, si, o, n_el in case.rows:
            if si == s:
                mask[o:o + n_el] = False
        assert torch.equal(src[mask], old["sources"][s][mask])


def _close_to_reference(name, got, want, seg):
    """One step from identical inputs. fp32 storage: within 4 fp32 ulps of the tensor's scale
    (torch's fused multiply-adds against the kernel's separate roundings: measured <= 1 ulp).
    Low-precision storage: the two fp32 results round to the same or a neighbouring value, so
    at most one storage ulp at the element's magnitude (measured: 1)."""
    if got.numel() == 0:
        return
    a, b = got.double(), want.double()
    if got.dtype == F32:
        scale = float(b.abs().max())
        tol = 4 * 2.0**-23 * max(scale, 1e-30)
        assert float((a - b).abs().max()) <= tol, f"segment {seg} {name}"
    else:
        mant = 7 if got.dtype == torch.bfloat16 else 10
        tiny = 2.0**-133 if got.dtype == torch.bfloat16 else 2.0**-24
        ulp = torch.exp2(torch.floor(torch.log2(torch.maximum(a.abs(), b.abs()).clamp_min(1e-300))) - mant)
        ulp = ulp.clamp_min(tiny)
        assert bool(((a - b).abs() <= ulp).all()), f"segment {seg} {name}: more than 1 ulp"


@pytest.mark.parametrize("kind", ["grok", "super"])
@pytest.mark.parametrize("pdt,sdt,flags", [("bf16", "bf16", 3), ("f32", "bf16", 1),
                                           ("bf16", "f32", 2), ("bf16", "bf16", 1),
                                           ("f16", "f16", 3)])
def test_plan_stochastic_rounding_bitwise(isa_restored, kind, pdt, sdt, flags):
    """bf16 writes rounded stochastically (the flags of the rounding column): on every
    instruction set, each stored value is the header's fp32 result rounded by the reference's
    draws for its element's index in the whole tensor (tensor 3's piece starts 1,000 elements
    before 2^32), bit for bit; what the flags leave out, and fp16, round to nearest."""
    ext = isa_restored
    arrays = kernel_arrays(build_table(_net("random")))
    for isa in ext.supported_isas():
        ext.set_isa(isa)
        case = Case(ext, DTYPES[pdt], DTYPES[sdt], seed=4)
        old = case.snapshot()
        _, _, _, table = _run_case(case, kind, use_table=True, arrays=arrays, rounding=flags,
                                   seed=12345)
        for i, (t, s, o, n_el) in enumerate(case.rows):
            g = case.grad_piece(i)
            p0 = old["sources"][s].view(-1)[o:o + n_el]
            want = _emulate(kind, p0, g, _masked(ext, arrays, g), old["m"][i], old["v"][i],
                            old["mu"][i], table[t])
            got = (case.params[i], case.m[i], case.v[i], case.mu[i])
            for name, a, b in zip(("param", "exp_avg", "exp_avg_sq", "mu"), got, want):
                b = stored(b, a.dtype, table[t], t, case.starts[i], name)
                assert torch.equal(a, b), (f"{isa}: segment {i} {name}: "
                                           f"{int((a != b).sum())} of {a.numel()} differ")
        # the flags did something: the same step rounded to nearest differs somewhere
        if (pdt == "bf16" and flags & 2) or (sdt == "bf16" and flags & 1):
            near = Case(ext, DTYPES[pdt], DTYPES[sdt], seed=4)
            _run_case(near, kind, use_table=True, arrays=arrays)
            assert any(not torch.equal(a, b) for a, b in zip(_outputs(case), _outputs(near)))


def _int8_case(ext, pdtype, seed):
    """Case's segments with 8-bit state, at starts that are not whole blocks (the first chunk
    of each is shortened to end on one) and one piece 1,000 elements below 2^32: random codes
    (every code of the maps) and positive scales, one per block each piece touches."""
    case = Case(ext, pdtype, torch.float32, seed=seed)
    case.starts = [100, 255, 0, 2**32 - 1000 + 37, 17, 7]
    g = torch.Generator().manual_seed(seed + 50)
    case.m, case.v, case.mu, case.scales = [], [], [], []
    for (*_, n), start in zip(case.rows, case.starts):
        nb = R.n_blocks(start, n)
        case.m.append(torch.randint(-120, 121, (n,), generator=g).to(torch.int8))
        case.v.append(torch.randint(0, 249, (n,), generator=g).to(torch.uint8))
        case.mu.append(torch.randint(-120, 121, (n,), generator=g).to(torch.int8))
        case.scales.append([torch.rand(nb, generator=g) * s + 1e-3 for s in (0.1, 0.01, 0.5)])
    return case


@pytest.mark.parametrize("kind", ["grok", "super"])
@pytest.mark.parametrize("pdt,flags", [("f32", 0), ("f32", 1), ("bf16", 3)])
def test_plan_int8_state_bitwise(isa_restored, kind, pdt, flags):
    """8-bit state through the plan on every instruction set: phase 1 against the reference's
    sums of the dequantized mu, phase 2's parameters, codes and scales bit for bit against the
    header's fp32 update of the dequantized state, quantized block by block by the reference
    (the blocks along each tensor's element index, whatever the piece's start)."""
    ext = isa_restored
    arrays = kernel_arrays(build_table(_net("random")))
    keys = ("exp_avg", "exp_avg_sq", "mu")
    for isa in ext.supported_isas():
        ext.set_isa(isa)
        case = _int8_case(ext, DTYPES[pdt], seed=6)
        old = {k: [t.clone() for t in getattr(case, k)] for k in ("sources", "m", "v", "mu")}
        old_scales = [[t.clone() for t in sc] for sc in case.scales]
        rows = [(*r, start) for r, start in zip(case.rows, case.starts)]
        plan = ext.Plan(case.n_tensors, case.sources, torch.tensor(rows, dtype=torch.long),
                        case.params, case.m, case.v, case.mu, case.steps, case.slot_of,
                        case.scales)
        for src, gr in zip(case.sources, case.grads):
            src.grad = gr
        assert plan.resolve()
        code = ext.GROKADAMW if kind == "grok" else ext.SUPERGROK
        aux = {} if kind == "grok" else dict(breakpoints=arrays.breakpoints, slopes=arrays.slopes,
                                             intercepts=arrays.intercepts,
                                             table_size=arrays.breakpoints.numel())
        stats, present = plan.phase1(code, **aux)
        steps = plan.bump_steps(present)
        table = _scalar_table(kind, steps, flags, seed=99)
        plan.phase2(code, table, **aux)
        want_stats = torch.zeros_like(stats)
        for i, (t, s, o, n) in enumerate(case.rows):
            g, start = case.grad_piece(i), case.starts[i]
            state = [R.dequantize_state(c, sc, k, start)
                     for c, sc, k in zip((old["m"][i], old["v"][i], old["mu"][i]), old_scales[i], keys)]
            h = _masked(ext, arrays, g)
            if kind == "grok":
                want_stats[t] += R.grokadamw_partial_stats(g)
            else:
                want_stats[t] += R.supergrok_partial_stats(g, h, state[2])
            p0 = old["sources"][s].view(-1)[o:o + n]
            p1, m1, v1, u1 = _emulate(kind, p0, g, h, *state, table[t])
            assert torch.equal(case.params[i], stored(p1, case.params[i].dtype, table[t], t, start, "param")), \
                f"{isa}: segment {i} param"
            k = R.StepScalars.from_row(table[t])
            rounding = R.Rounding.of(k, t, start)
            for key, got, got_sc, value in zip(keys, (case.m[i], case.v[i], case.mu[i]),
                                               case.scales[i], (m1, v1, u1)):
                codes, scales = torch.empty_like(got), torch.empty_like(got_sc)
                R.quantize_state_(codes, scales, value, key, start, rounding)
                assert torch.equal(got_sc, scales), f"{isa}: segment {i} {key} scales"
                assert torch.equal(got, codes), (f"{isa}: segment {i} {key}: "
                                                 f"{int((got != codes).sum())} codes differ")
        torch.testing.assert_close(stats, want_stats, rtol=1e-12, atol=1e-30)


@pytest.mark.parametrize("pdt", ["f32", "bf16"])
def test_plan_user_meta_net_h_path(ext, pdt):
    """SuperGrok with masked gradients given (a user's meta-net): the kernel takes h as is."""
    case = Case(ext, DTYPES[pdt], DTYPES[pdt], seed=1)
    old = case.snapshot()
    g0 = torch.Generator().manual_seed(5)
    hs = [torch.randn(n, generator=g0) for *_, n in case.rows]
    stats, present, steps, table = _run_case(case, "super", use_table=False, user_h=hs)
    want = torch.zeros_like(stats)
    for i, (t, s, o, n_el) in enumerate(case.rows):
        g = case.grad_piece(i)
        want[t] += R.supergrok_partial_stats(g, hs[i], old["mu"][i])
        p0 = old["sources"][s].view(-1)[o:o + n_el]
        ep, em, ev, emu = _emulate("super", p0, g, hs[i], old["m"][i], old["v"][i],
                                   old["mu"][i], table[t])
        for a, b in zip((case.params[i], case.m[i], case.v[i], case.mu[i]), (ep, em, ev, emu)):
            assert torch.equal(a, b.to(a.dtype)), f"segment {i}"
    torch.testing.assert_close(stats, want, rtol=1e-12, atol=1e-30)


def _outputs(case):
    return [t.clone() for t in case.sources + case.m + case.v + case.mu + case.steps]


@pytest.mark.parametrize("kind", ["grok", "super"])
@pytest.mark.parametrize("pdt", ["f32", "bf16", "f16"])
def test_plan_every_isa_bitwise(isa_restored, kind, pdt):
    ext = isa_restored
    isas = ext.supported_isas()
    assert "generic" in isas and ext.isa() in isas
    arrays = kernel_arrays(build_table(_net("trained")))
    results = {}
    for isa in isas:
        ext.set_isa(isa)
        assert ext.isa() == isa
        case = Case(ext, DTYPES[pdt], DTYPES[pdt], seed=2)
        stats, *_ = _run_case(case, kind, use_table=True, arrays=arrays)
        results[isa] = [stats] + _outputs(case)
    first, *rest = isas
    for isa in rest:
        for j, (a, b) in enumerate(zip(results[first], results[isa], strict=True)):
            assert torch.equal(a, b), f"{isa} differs from {first} in output {j}"


def test_set_isa_rejects_unknown_names(isa_restored):
    with pytest.raises(RuntimeError, match="unknown instruction set"):
        isa_restored.set_isa("sse9")


def test_plan_source_without_gradient_is_left_alone(ext):
    case = Case(ext, F32, F32, seed=3)
    old = case.snapshot()
    plan = case.plan()
    case.sources[0].grad = case.grads[0]
    case.sources[2].grad = case.grads[2]
    assert plan.resolve()
    views = plan.grad_views()
    assert [v is None for v in views] == [False, False, False, True, True, False]
    assert torch.equal(views[0], case.grads[0][3:20])
    stats, present = plan.phase1(ext.GROKADAMW)
    # tensor 3 lives only in source 1; tensor 0 has a piece in source 0 (counted) and one in 1
    assert present.tolist() == [1.0, 1.0, 1.0, 0.0, 1.0]
    assert stats[3, 0] == 0.0
    torch.testing.assert_close(stats[0, 0], R.grokadamw_partial_stats(case.grads[0][3:20])[0],
                               rtol=1e-12, atol=0)
    steps = plan.bump_steps(present)
    assert steps.tolist() == [3.0, 3.0, 3.0, 1.0, 1.0]  # slot 1 counts through tensor 4
    plan.phase2(ext.GROKADAMW, _scalar_table("grok", steps))
    for i in (3, 4):  # the pieces in source 1
        _, s, o, n = case.rows[i]
        assert torch.equal(case.sources[1][o:o + n], old["sources"][1][o:o + n])
        for key in ("m", "v", "mu"):
            assert torch.equal(getattr(case, key)[i], old[key][i])
    assert not torch.equal(case.params[0], old["sources"][0][3:20])  # the rest did step


def test_plan_rejects_a_view_outside_its_offset(ext):
    case = Case(ext, F32, F32)
    case.params[0] = case.sources[0][4:21]  # one element off its row's offset (3)
    with pytest.raises(RuntimeError, match="must lie in its source at its offset"):
        case.plan()


def test_plan_accepts_an_empty_piece_inside_a_source(ext):
    """A zero-element view has data_ptr() == nullptr in PyTorch: an empty piece at a nonzero
    offset of a non-empty source must still be accepted (and left alone)."""
    src = torch.randn(40)
    old = src.clone()
    rows = torch.tensor([[0, 0, 3, 17, 0], [1, 0, 22, 0, 0]], dtype=torch.long)
    params = [src[3:20], src[22:22]]
    m, v, mu = ([torch.zeros(17), torch.zeros(0)] for _ in range(3))
    steps = [torch.tensor(0.0)]
    plan = ext.Plan(2, [src], rows, params, m, v, mu, steps, torch.tensor([0, 0]))
    assert plan.n_segments == 2 and plan.n_chunks == 1
    src.grad = torch.randn(40)
    assert plan.resolve()
    stats, present = plan.phase1(ext.GROKADAMW)
    assert present.tolist() == [1.0, 1.0] and stats[1, 0] == 0.0
    plan.phase2(ext.GROKADAMW, _scalar_table("grok", plan.bump_steps(present)))
    assert not torch.equal(src[3:20], old[3:20]) and torch.equal(src[20:], old[20:])
