"""``state_dtype=``: the dtype of m, v and mu, above all for bf16/fp16 parameters trained without
fp32 master weights (plain DDP, FSDP2 with bf16 parameters).

The problem: bf16 keeps 8 significant bits, so half an ulp is at least 2^-9 = 1.95e-3 of the
value, and 1 - beta2 = 1e-3 is less: 0.999 * v rounds back to v, and a bf16 v cannot decay
(tested below against the formula). The default (None) keeps m, v, mu in fp32 for bf16/fp16 parameters and in the
parameter's dtype otherwise; ``torch.bfloat16`` on bf16 parameters gives the old, torch.optim-like
behaviour.

Tolerances (measured on this machine, AVX-512, torch 2.13, when these tests were written):
- fp32 state against the formula in fp64, 60 steps (both backends): measured max |error| /
  max |formula| 6.6e-7 (v), 1.4e-6 (m, which decays to 0.2% of its size), 1.3e-6 (mu);
  STATE_RTOL = 1e-5. The bf16 parameter equal to the fp64 updates rounded once per step.
- kernel vs reference, bf16 parameters with fp32 state, 20 steps: parameters within one bf16
  ulp at the element's scale (max of |reference|, |initial value| and 1e-2, as in
  tests/kernels/test_kernel.py); measured: 1 element of 65,537 one ulp off, the rest equal. m, v, mu
  within KERNEL_RTOL = 1e-6 of each tensor's scale; measured <= 2.0e-7 (the two paths differ
  only in fp32 rounding of the same operations, and the state does not depend on the
  parameters).
- ZeRO-1 at world size 2 against one process: the same tolerances (measured: equal bit for bit,
  parameters and gathered state, both optimizers).
"""
from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

from shardgrok import GrokAdamW, SuperGrok
from tests.kernels.test_kernel import make_params as kernel_params, normal_grads
from tests.support import scenarios as S
from tests.support.helpers import meta_net

BF16 = torch.bfloat16
OPTIMIZERS = ("grokadamw", "supergrok")
BACKENDS = ("kernel", "reference")
STATE_KEYS = ("exp_avg", "exp_avg_sq", "mu")
STATE_RTOL = 1e-5   # fp32 state vs the fp64 formula, 60 steps: measured <= 1.4e-6
KERNEL_RTOL = 1e-6  # kernel vs reference state, per tensor scale: measured <= 2.0e-7


def make_opt(name, params, backend="reference", **kw):
    kw.setdefault("lr", 1e-2)
    if name == "grokadamw":
        return GrokAdamW(params, backend=backend, **kw)
    kw.setdefault("warmup_steps", 0)
    return SuperGrok(params, backend=backend, meta_net=meta_net("random"), **kw)


def make_params(sizes, dtype=BF16, seed=0):
    return kernel_params(sizes, dtype, seed)


def storage_ulp(x: torch.Tensor, dtype) -> torch.Tensor:
    """One ulp of ``dtype`` at |x| (float64), subnormal spacing included."""
    mant, tiny = {BF16: (7, 2.0**-133), torch.float16: (10, 2.0**-24),
                  torch.float32: (23, 2.0**-149)}[dtype]
    e = torch.floor(torch.log2(x.double().abs().clamp_min(1e-300)))
    return torch.exp2(e - mant).clamp_min(tiny)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (b nonzero somewhere)."""
    a, b = a.detach().double(), b.detach().double()
    assert a.shape == b.shape and bool(torch.isfinite(a).all()) and bool(torch.isfinite(b).all())
    scale = float(b.abs().max())
    assert scale > 0
    return float((a - b).abs().max()) / scale


# ---------------------------------------------------------------- (a) the problem is real
def formula_fp64(g_seq, *, lr, betas, eps, alpha):
    """GrokAdamW with lamb = 0, no clipping, no weight decay, layer 0 (beta1_l = beta1), worked
    out in float64 from docs/algorithms.md (GrokAdamW): m, v, mu after every step, and the parameter update
    of every step."""
    b1, b2 = betas
    m = v = mu = torch.zeros_like(g_seq[0], dtype=torch.float64)
    out = []
    for t, g in enumerate(g_seq, start=1):
        g = g.double()
        mu = alpha * mu + (1 - alpha) * g
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        delta = -lr * (m / (1 - b1 ** t)) / ((v / (1 - b2 ** t)).sqrt() + eps)
        out.append((m, v, mu, delta))
    return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_state_cannot_decay_v_and_the_default_follows_the_formula(backend):
    """One step with an O(1) gradient, then 59 with gradients ~1e-4: v should decay as
    0.999^(t-1). In bf16 rounded to nearest (``state_rounding="nearest"``, torch.optim's
    behaviour) 0.999 v rounds back to v, so it stays exactly where step 1 put it
    (after 60 steps the formula is ~6% lower, 7 to 15 bf16 ulps); in fp32 (the default) it follows
    the fp64 formula."""
    steps, n = 60, 33
    gen = torch.Generator().manual_seed(5)
    g_seq = [torch.randn(n, generator=gen).to(BF16)]
    g_seq += [(torch.randn(n, generator=gen) * 1e-4).to(BF16) for _ in range(steps - 1)]
    kw = dict(lr=1e-3, lamb=0.0, gradient_clipping=0.0, weight_decay=0.0)
    want = formula_fp64(g_seq, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, alpha=0.98)
    runs = {}
    for state_dtype in (BF16, None):
        p = nn.Parameter(torch.zeros(n, dtype=BF16))
        opt = GrokAdamW([p], backend=backend, state_dtype=state_dtype, state_rounding="nearest",
                        **kw)
        vs = []
        for g in g_seq:
            p.grad = g
            opt.step()
            vs.append(opt.state[p]["exp_avg_sq"].clone())
        runs[state_dtype] = (p, opt, vs)
        assert opt.get_state_summary()["backend"] == backend

    # bf16 state: v is stuck at its first value, far from the formula
    _, opt, vs = runs[BF16]
    assert opt.state[opt.param_groups[0]["params"][0]]["exp_avg_sq"].dtype == BF16
    v1, v_end = vs[0], vs[-1]
    assert torch.equal(v_end, v1)
    decayed = want[-1][1]
    assert 0.93 < float((decayed / want[0][1]).mean()) < 0.95  # what it should have done
    assert rel(v_end, decayed) > 0.05

    # default (fp32 state on bf16 parameters): the formula at every step
    p, opt, vs = runs[None]
    st = opt.state[p]
    assert all(st[k].dtype == torch.float32 for k in STATE_KEYS)
    worst = max(rel(v, w[1]) for v, w in zip(vs, want))
    assert worst <= STATE_RTOL, worst
    m, _, mu, _ = want[-1]
    assert rel(st["exp_avg"], m) <= STATE_RTOL
    assert rel(st["mu"], mu) <= STATE_RTOL
    # the parameter: each step's fp64 update added to it and rounded to bf16 once
    q = torch.zeros(n, dtype=BF16)
    for _, _, _, delta in want:
        q = (q.double() + delta).to(BF16)
    ulp = storage_ulp(torch.maximum(q.double().abs(), torch.tensor(1e-3, dtype=torch.float64)), BF16)
    assert float(((p.detach().double() - q.double()).abs() / ulp).max()) <= 1.0


# ---------------------------------------------------------------- (b) defaults and choices
@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize("param_dtype,default", [
    (torch.bfloat16, torch.float32), (torch.float16, torch.float32),
    (torch.float32, torch.float32), (torch.float64, torch.float64)],
    ids=["bf16", "fp16", "fp32", "fp64"])
def test_default_state_dtype(name, param_dtype, default):
    params = make_params([4, 7], param_dtype)
    opt = make_opt(name, params)
    assert opt.state_dtype is None
    for p in params:
        assert opt.state_dtype_for(p) == default
        assert [opt.state[p][k].dtype for k in STATE_KEYS] == [default] * 3
        assert all(opt.state[p][k].shape == p.shape for k in STATE_KEYS)
        assert opt.state[p]["step"].dtype == torch.float32  # torch.optim's step counter, as before


@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16],
                         ids=["fp32", "fp64", "bf16", "fp16"])
def test_explicit_state_dtype_applies_to_every_tensor(name, state_dtype):
    params = [make_params([5], d)[0] for d in (torch.bfloat16, torch.float16, torch.float32, torch.float64)]
    opt = make_opt(name, params, state_dtype=state_dtype)
    for t in range(2):
        for p, g in zip(params, normal_grads(params, t)):
            p.grad = g
        opt.step()
    for p, d in zip(params, (torch.bfloat16, torch.float16, torch.float32, torch.float64)):
        assert p.dtype == d
        assert [opt.state[p][k].dtype for k in STATE_KEYS] == [state_dtype] * 3
        assert all(bool(opt.state[p][k].isfinite().all()) for k in STATE_KEYS)
        assert bool(opt.state[p]["exp_avg_sq"].ge(0).all())
        assert bool(opt.state[p]["exp_avg_sq"].gt(0).any())


@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize("bad", ["float8", torch.int32, torch.complex64, torch.float8_e4m3fn, 32,
                                 torch.tensor(1.0)],
                         ids=["str", "int32", "complex64", "fp8", "int", "tensor"])
def test_bad_state_dtype_is_refused(name, bad):
    with pytest.raises(ValueError, match=r"state_dtype .*torch\.float32, torch\.float64, "
                                         r"torch\.bfloat16, torch\.float16"):
        make_opt(name, make_params([3]), state_dtype=bad)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_fp32_params_with_fp64_state_compute_in_fp64(name):
    """A wider state than the parameter: the update runs in fp64 and only the parameter is
    rounded, once per step. Equal bit for bit to fp64 parameters rounded to fp32 after every
    step (no clipping: GrokAdamW scales an fp32 gradient in fp32)."""
    a = make_params([9, 40], torch.float32)
    b = [nn.Parameter(p.detach().double()) for p in a]
    kw = dict(gradient_clipping=0.0) if name == "grokadamw" else {}
    oa = make_opt(name, a, state_dtype=torch.float64, **kw)
    ob = make_opt(name, b, **kw)
    for t in range(6):
        for p, q, g in zip(a, b, normal_grads(a, t)):
            p.grad, q.grad = g, g.double()
        oa.step()
        ob.step()
        with torch.no_grad():
            for q in b:
                q.copy_(q.float().double())
    for p, q in zip(a, b):
        assert torch.equal(p.detach().double(), q.detach())
        for k in STATE_KEYS:
            assert oa.state[p][k].dtype == torch.float64
            assert torch.equal(oa.state[p][k], ob.state[q][k]), k


def test_fp64_state_takes_the_reference_with_one_warning():
    """The kernel keeps fp32/bf16/fp16 state: fp64 state falls back (auto) or raises (kernel)."""
    import shardgrok.kernels as K
    if K.cpu_extension() is None:
        pytest.skip(f"the CPU kernel is unavailable: {K.unavailable_reason()}")
    p = make_params([8], torch.float32)[0]
    opt = GrokAdamW([p], backend="auto", state_dtype=torch.float64)
    p.grad = torch.ones(8)
    with pytest.warns(UserWarning, match="float64"):
        opt.step()
    assert opt.get_state_summary()["backend"] == "reference"
    opt = GrokAdamW([p], backend="kernel", state_dtype=torch.float64)
    with pytest.raises(RuntimeError, match="float64"):
        opt.step()


# ---------------------------------------------------------------- (c) kernel vs reference
@pytest.mark.parametrize("size", [1, 17, 65537])
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_kernel_matches_reference_bf16_params_fp32_state(ext, name, size):
    runs = {}
    for backend in BACKENDS:
        params = make_params([size])
        opt = make_opt(name, params, backend, gradient_clipping=100.0)
        for t in range(20):
            for p, g in zip(params, normal_grads(params, t)):
                p.grad = g
            opt.step()
        assert opt.get_state_summary()["backend"] == backend
        runs[backend] = (params, opt)
    (pk, ok), (pr, orr) = runs["kernel"], runs["reference"]
    p0 = make_params([size])
    for a, b, z in zip(pk, pr, p0):
        assert a.dtype == b.dtype == BF16
        assert not torch.equal(b, z)  # it moved
        scale = torch.maximum(torch.maximum(b.detach().double().abs(), z.detach().double().abs()),
                              torch.tensor(1e-2, dtype=torch.float64))
        err = (a.detach().double() - b.detach().double()).abs() / storage_ulp(scale, BF16)
        assert float(err.max()) <= 1.0, f"{float(err.max()):.2f} ulp"
        for k in STATE_KEYS:
            x, y = ok.state[a][k], orr.state[b][k]
            assert x.dtype == y.dtype == torch.float32
            assert rel(x, y) <= KERNEL_RTOL, (k, rel(x, y))
        assert float(ok.state[a]["step"]) == float(orr.state[b]["step"]) == 20


# ---------------------------------------------------------------- (d) checkpoints
def _train(name, params, opt, steps):
    for t in steps:
        for p, g in zip(params, normal_grads(params, t)):
            p.grad = g
        if name == "supergrok" and t % 4 == 0:
            opt.step(train_loss=1.0, val_loss=1.0 + 0.05 * t)
        else:
            opt.step()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_checkpoint_keeps_fp32_state_and_resumes_bitwise(request, name, backend):
    if backend == "kernel":
        request.getfixturevalue("ext")  # skips, naming why, where the kernel is not built
    sizes = [1, 17, 300]
    whole_p = make_params(sizes)
    whole = make_opt(name, whole_p, backend)
    _train(name, whole_p, whole, range(12))

    first_p = make_params(sizes)
    first = make_opt(name, first_p, backend)
    _train(name, first_p, first, range(6))
    buf = io.BytesIO()
    torch.save({"opt": first.state_dict(), "params": [p.detach() for p in first_p]}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=False)
    assert all(saved["opt"]["state"][i][k].dtype == torch.float32
               for i in range(len(sizes)) for k in STATE_KEYS)

    second_p = [nn.Parameter(t.clone()) for t in saved["params"]]
    second = make_opt(name, second_p, backend)
    second.load_state_dict(saved["opt"])
    for i, p in enumerate(second_p):
        for k in STATE_KEYS:
            got = second.state[p][k]
            assert got.dtype == torch.float32, k  # not cast to the parameter's bf16
            assert torch.equal(got, saved["opt"]["state"][i][k]), k
    _train(name, second_p, second, range(6, 12))
    for p, q in zip(second_p, whole_p):
        assert torch.equal(p, q)
        for k in STATE_KEYS:
            assert torch.equal(second.state[p][k], whole.state[q][k]), k


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_checkpoint_converts_to_this_optimizers_state_dtype(name):
    """A bf16-state checkpoint loads into a default optimizer as fp32 (exactly), and an fp32
    one into ``state_dtype=torch.bfloat16`` as bf16."""
    params = make_params([17])
    low = make_opt(name, params, state_dtype=BF16)
    _train(name, params, low, range(3))
    sd = copy.deepcopy(low.state_dict())
    wide = make_opt(name, [nn.Parameter(p.detach().clone()) for p in params])
    wide.load_state_dict(sd)
    (q,) = wide.param_groups[0]["params"]
    for k in STATE_KEYS:
        assert wide.state[q][k].dtype == torch.float32
        assert torch.equal(wide.state[q][k], sd["state"][0][k].float())
    back = make_opt(name, [nn.Parameter(p.detach().clone()) for p in params], state_dtype=BF16)
    back.load_state_dict(wide.state_dict())
    (r,) = back.param_groups[0]["params"]
    for k in STATE_KEYS:
        assert back.state[r][k].dtype == BF16
        assert torch.equal(back.state[r][k], low.state[params[0]][k])


# ---------------------------------------------------------------- (e) ZeRO-1, world size 2
def test_zero1_world2_bf16_default_state_matches_one_process(tmp_path):
    from tests.support.multirank import launch, ok as results_of
    _, res = launch(2, tmp_path / "out", ["bf16_default_state"], tmp_path / "ckpt")
    for kind in S.KINDS:
        want = S.bf16_run(kind)
        for r, got in enumerate(results_of(res, "bf16_default_state")):
            got = got[kind]
            for t, (g, w) in enumerate(zip(got["record"], want["record"], strict=True)):
                assert g["backend"] == w["backend"], (r, t)
                assert g["gate_engaged"] == w["gate_engaged"], (r, t)
                assert g["last_clip_coefs"] == pytest.approx(w["last_clip_coefs"], rel=1e-6), (r, t)
            for a, b in zip(got["params"], want["params"], strict=True):
                assert a.dtype == b.dtype == BF16
                scale = b.double().abs().clamp_min(1e-2)
                err = (a.double() - b.double()).abs() / storage_ulp(scale, BF16)
                assert float(err.max()) <= 1.0, (kind, r, float(err.max()))
            assert sorted(got["state"]) == sorted(want["state"])
            for i, st in want["state"].items():
                for k in STATE_KEYS:
                    x, y = got["state"][i][k], st[k]
                    assert x.dtype == y.dtype == torch.float32, (kind, i, k)
                    assert x.shape == y.shape
                    if y.abs().max() > 0:
                        assert rel(x, y) <= KERNEL_RTOL, (kind, r, i, k, rel(x, y))
                    else:  # the layer without gradients
                        assert torch.equal(x, y)
