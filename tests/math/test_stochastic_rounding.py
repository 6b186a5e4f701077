"""Stochastic rounding of bf16 state and parameters (docs/algorithms.md, "State formats").

- the draws: the reference's torch implementation equals the header's C++ one for any seed,
  step, tensor, element index (past 2^32 too) and value; the conversion likewise, specials
  included; rounding picks one of the two neighbours and is unbiased; the draws look uniform;
- what it is for: a bf16 v decays as the fp32 one does (round-to-nearest keeps it), a bf16
  parameter moved by updates below half an ulp follows the fp32 one on average;
- where the bits come from: the kernel and the reference agree within one bf16 ulp on a small
  fraction of the elements; one and two threads, every instruction set: bit for bit; the seed
  is in the checkpoint and a resumed run equals the uninterrupted one bit for bit;
- bad arguments are refused by name.

The layouts (ZeRO-1, FSDP2 at world size 2 against one process, bit for bit) are in
tests/distributed/test_rounding_ranks.py.
"""
from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from shardgrok import GrokAdamW
from shardgrok import reference as R
from tests.math.test_state_dtype import make_opt
from tests.support.helpers import assert_bitwise_across_threads_and_isas

BF16 = torch.bfloat16
OPTIMIZERS = ("grokadamw", "supergrok")


def bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    """The bf16 spacing at |x| (normal range; the smallest normal's below it)."""
    a = x.double().abs().clamp_min(2.0**-126)
    return torch.exp2(torch.floor(torch.log2(a)) - 7)


# ---------------------------------------------------------------- the draws, both sides
def test_draws_match_the_header(ext):
    g = torch.Generator().manual_seed(0)
    index = torch.cat([torch.arange(0, 300), torch.randint(0, 2**40, (300,), generator=g),
                       torch.arange(2**32 - 150, 2**32 + 150)])
    for seed, step, tensor in [(0, 1, 0), (12345, 7, 3), (2**32 - 1, 2**33 + 5, 2**31 - 1)]:
        key = R.rounding_key(seed, step, tensor)
        for which in range(4):
            want = ext.header_rounding_bits(seed, step, tensor, index, which)
            got = R.rounding_bits(key, index, which)
            assert torch.equal(got, want), (seed, step, tensor, which)


def _bits16(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16).to(torch.int32) & 0xFFFF


def test_the_conversion_matches_the_header_specials_included(ext):
    g = torch.Generator().manual_seed(1)
    # fp32's largest finite value, then bf16's (exact: no draw moves it)
    specials = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"),
                             3.4028234663852886e38, -3.4028234663852886e38, 1e-45, -1e-45,
                             1.1754942e-38, 1.0, -1.0, 0.1, 3.3895313892515355e38])
    x = torch.cat([specials.repeat_interleave(16), torch.randn(4000, generator=g) * 10.0])
    bits = torch.randint(0, 2**32, x.shape, generator=g, dtype=torch.int64)
    bits[:16 * len(specials):16] = 0              # never up
    bits[1:16 * len(specials):16] = 2**32 - 1     # always up unless exact
    got = R.round_bf16_stochastic(x, bits)
    want = ext.header_round_stochastic(x, bits)  # bf16 values, exact in fp32
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(got), nan)
    assert torch.equal(_bits16(got[~nan]), _bits16(want[~nan].to(BF16)))
    # infinities stay, NaN is the canonical quiet NaN, exact values stay whatever the bits
    r = got[:16 * len(specials)].view(len(specials), 16).float()
    assert bool((r[2] == float("inf")).all()) and bool((r[3] == -float("inf")).all())
    assert bool(_bits16(got[64:80]).eq(0x7FC0).all())
    for j in (0, 10, 11):  # 0, 1, -1
        assert bool((r[j] == specials[j]).all())
    # fp32's largest finite value rounds up to infinity with the "always up" draw, bf16's stays
    assert float(r[5, 1]) == float("inf") and float(r[5, 0]) == 3.3895313892515355e38
    assert bool((r[13] == 3.3895313892515355e38).all())


def test_rounding_picks_a_neighbour_and_is_unbiased():
    """Every draw gives one of the two bf16 values around x (x cut to bf16 towards zero, and
    one ulp further out); over 4,096 draws per value (the draws of consecutive element
    indices) the mean is x within 4.5 standard errors."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(64, generator=g) * torch.exp2(torch.randint(-20, 20, (64,), generator=g).float())
    draws = 4096
    xs = x.repeat_interleave(draws)
    bits = R.rounding_bits(R.rounding_key(9, 1, 0), torch.arange(xs.numel()), 1)
    r = R.round_bf16_stochastic(xs, bits).double().view(64, draws)
    inner = (x.view(torch.int32) & ~0xFFFF).view(torch.float32).double()  # towards zero
    ulp = bf16_ulp(inner)
    outer = inner + torch.sign(x.double()) * ulp
    assert bool(((r == inner[:, None]) | (r == outer[:, None])).all())
    p = (x.double() - inner).abs() / ulp  # the probability of rounding outwards
    se = ulp * torch.sqrt(p * (1 - p) / draws)
    assert bool(((r.mean(1) - x.double()).abs() <= 4.5 * se + ulp * 1e-9).all())


def test_the_draws_look_uniform():
    """The top 16 bits (what rounding uses) of 2^16 consecutive elements' draws: 256 bins of
    their top byte within a chi-square bound (p ~ 1e-6 for 255 degrees of freedom), every bit
    set about half the time; and different values of one element draw differently."""
    index = torch.arange(2**16)
    for which in range(4):
        top = R.rounding_bits(R.rounding_key(0, 1, 0), index, which) >> 16
        counts = torch.bincount(top >> 8, minlength=256).double()
        chi2 = float(((counts - 256.0) ** 2 / 256.0).sum())
        assert chi2 < 380, chi2
        for b in range(16):
            frac = float(((top >> b) & 1).double().mean())
            assert abs(frac - 0.5) < 0.01, (which, b, frac)
    a, b = (R.rounding_bits(R.rounding_key(0, 1, 0), index, w) for w in (0, 1))
    assert float((a == b).double().mean()) < 1e-3


# ---------------------------------------------------------------- what it is for
@pytest.mark.parametrize("backend", ["kernel", "reference"])
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_a_bf16_v_decays_as_the_fp32_one(ext, name, backend):
    """100 steps of a constant gradient, then 1,000 of zeros: v should fall by 0.999^1000. With
    bf16 state rounded stochastically, v's total stays within 2% of the fp32 run's and the
    elements' median error within 10% (measured: 0.02-0.08% and ~4.6%); rounded to nearest it
    does not decay at all (measured: 2.5-2.7 times the fp32 total)."""
    n = 4096
    g0 = torch.randn(n, generator=torch.Generator().manual_seed(0))

    def run(state_dtype, rounding):
        p = nn.Parameter(torch.zeros(n))
        opt = make_opt(name, [p], backend, lr=1e-4, weight_decay=0.0, state_dtype=state_dtype,
                       state_rounding=rounding)
        for t in range(1100):
            p.grad = g0.clone() if t < 100 else torch.zeros(n)
            opt.step()
        return opt.state[p]["exp_avg_sq"].double()

    fp32 = run(None, "stochastic")  # fp32 state: the rounding keyword changes nothing
    sr = run(BF16, "stochastic")
    rn = run(BF16, "nearest")
    assert float(sr.sum() / fp32.sum()) == pytest.approx(1.0, abs=0.02)
    assert float(((sr - fp32).abs() / fp32).median()) < 0.10
    assert float(rn.sum() / fp32.sum()) > 2.0


@pytest.mark.parametrize("backend", ["kernel", "reference"])
def test_bf16_parameters_follow_updates_below_half_an_ulp(ext, backend):
    """Parameters at 1.0 (bf16 ulp 2^-7) moved by AdamW steps of lr 1e-4, 200 times: rounded to
    nearest they never move; rounded stochastically (param_rounding="stochastic") their mean
    follows the fp32 run's within 5% of its displacement (measured: 0.4%, both backends)."""
    n = 4096
    g = torch.Generator().manual_seed(3)
    grads = [torch.randn(n, generator=g) + 0.5 for _ in range(200)]

    def run(dtype, rounding):
        p = nn.Parameter(torch.ones(n, dtype=dtype))
        opt = GrokAdamW([p], lr=1e-4, weight_decay=0.0, param_rounding=rounding, backend=backend)
        for gr in grads:
            p.grad = gr.to(dtype)
            opt.step()
        return p.detach().double()

    fp32 = run(torch.float32, "nearest")
    moved = float(1.0 - fp32.mean())
    assert moved > 0.01  # two ulps and more of displacement, in steps of ~1/80 ulp
    assert torch.equal(run(BF16, "nearest"), torch.ones(n, dtype=torch.float64))
    sr = run(BF16, "stochastic")
    assert float(1.0 - sr.mean()) == pytest.approx(moved, rel=0.05)


# ---------------------------------------------------------------- where the bits come from
def _run(name, backend, steps=20, sizes=(4097, 300, 17, 1), seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    params = [nn.Parameter(torch.randn(n, generator=g).to(BF16)) for n in sizes]
    opt = make_opt(name, params, backend, lr=1e-3, state_dtype=BF16, param_rounding="stochastic",
                   **kw)
    for t in range(steps):
        gg = torch.Generator().manual_seed(100 + t)
        for p in params:
            p.grad = torch.randn(p.shape, generator=gg).to(BF16)
        opt.step(**({"train_loss": 1.0, "val_loss": 1.5} if name == "supergrok" else {}))
    return params, opt


def _outputs(params, opt):
    out = []
    for p in params:
        out.append(p.detach())
        out += [opt.state[p][k] for k in ("exp_avg", "exp_avg_sq", "mu")]
    return out


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_kernel_and_reference_agree_within_one_ulp_on_few_elements(ext, name):
    """Their fp32 results differ in the last bits now and then (fused multiply-adds, sqrt), so a
    stochastically rounded value may land one bf16 ulp apart; with the same draws that is rare.
    After 20 steps: every value within one ulp, at most 0.1% of them apart (measured: 0 of
    17,660 values, after 1 step and after 20, both optimizers)."""
    kern = _outputs(*_run(name, "kernel"))
    ref = _outputs(*_run(name, "reference"))
    apart = total = 0
    for a, b in zip(kern, ref, strict=True):
        d = (a.double() - b.double()).abs()
        assert bool((d <= bf16_ulp(torch.maximum(a.double().abs(), b.double().abs()))).all())
        apart += int((d > 0).sum())
        total += a.numel()
    assert apart <= total // 1000, (apart, total)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_one_and_two_threads_and_every_instruction_set_bitwise(ext, name):
    sizes = (2 * ext.CHUNK + 5, 300, 17)
    assert_bitwise_across_threads_and_isas(
        ext, lambda: _outputs(*_run(name, "kernel", steps=5, sizes=sizes)))


def test_the_seed_decides_the_bits(ext):
    a = _outputs(*_run("grokadamw", "kernel", steps=3, rounding_seed=1))
    b = _outputs(*_run("grokadamw", "kernel", steps=3, rounding_seed=1))
    c = _outputs(*_run("grokadamw", "kernel", steps=3, rounding_seed=2))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_the_seed_is_in_the_checkpoint_and_a_resume_is_bitwise(ext, name):
    whole = _outputs(*_run(name, "kernel", steps=8, rounding_seed=77))
    params, opt = _run(name, "kernel", steps=4, rounding_seed=77)
    sd = opt.state_dict()
    assert sd["param_groups"][0]["shardgrok"]["rounding_seed"] == 77
    buf = io.BytesIO()
    torch.save({"params": [p.detach().clone() for p in params], "opt": sd}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=False)
    params2 = [nn.Parameter(t) for t in saved["params"]]
    opt2 = make_opt(name, params2, "kernel", lr=1e-3, state_dtype=BF16,
                    param_rounding="stochastic", rounding_seed=5)  # the checkpoint's seed wins
    opt2.load_state_dict(saved["opt"])
    assert opt2.rounding_seed == 77
    assert opt2.state[params2[0]]["exp_avg_sq"].dtype == BF16
    for t in range(4, 8):
        gg = torch.Generator().manual_seed(100 + t)
        for p in params2:
            p.grad = torch.randn(p.shape, generator=gg).to(BF16)
        opt2.step(**({"train_loss": 1.0, "val_loss": 1.5} if name == "supergrok" else {}))
    for j, (a, b) in enumerate(zip(_outputs(params2, opt2), whole, strict=True)):
        assert torch.equal(a, b), f"output {j}"


def test_a_checkpoint_without_a_seed_keeps_the_optimizers_own(ext):
    params, opt = _run("grokadamw", "kernel", steps=1, rounding_seed=3)
    sd = opt.state_dict()
    del sd["param_groups"][0]["shardgrok"]["rounding_seed"]
    opt2 = make_opt("grokadamw", [nn.Parameter(p.detach().clone()) for p in params], "kernel",
                    state_dtype=BF16, rounding_seed=9)
    opt2.load_state_dict(sd)
    assert opt2.rounding_seed == 9


@pytest.mark.parametrize("kw,match", [
    (dict(state_rounding="up"), r"state_rounding must be one of .*stochastic.*nearest.*'up'"),
    (dict(param_rounding=True), r"param_rounding must be one of"),
    (dict(rounding_seed=-1), r"rounding_seed"),
    (dict(rounding_seed=2**32), r"rounding_seed"),
    (dict(rounding_seed=1.5), r"rounding_seed"),
])
def test_bad_rounding_arguments_are_refused_by_name(kw, match):
    with pytest.raises((ValueError, TypeError), match=match):
        GrokAdamW([nn.Parameter(torch.zeros(3))], **kw)
