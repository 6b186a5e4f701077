"""The reference math: one implementation of every formula in docs/design.md, per tensor (or per
local piece of a tensor). The optimizers call these on whatever local storage a layout hands them;
the compiled kernels are tested against them.

Two phases per step (docs/design.md):
- phase 1 reads gradients and state and returns per-tensor partial sums (fp64), never writing;
- after one reduction of those sums, ``*_decide`` turns them into per-tensor scalars (gate, clip
  coefficient, smart-gradient scale), and phase 2 applies the update in place.
Phase 1 writes nothing, so a step found non-finite after the reduction leaves all state intact.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .kernels.header import COLUMNS, DRAWS, QUANT, ROUNDING, STATS

ACC = torch.float64  # accumulator dtype for the per-tensor sums
ALPHA_MAX = 1.0 - 1e-8


# COLUMNS: the per-tensor scalar table phase 2 reads, defined by csrc/grok_math.h (enum Column).
COL = {name: i for i, name in enumerate(COLUMNS)}


@dataclass(frozen=True)
class StepScalars:
    """One tensor's row of the table: every scalar its phase-2 update needs (Python floats).

    ``amp`` is lamb for GrokAdamW and, for SuperGrok, lamb where the cosine gate engaged (else
    0); ``alpha`` is SuperGrok's 0 on a tensor's first step (mu starts at the raw gradient);
    ``decay = 1 - lr * weight_decay``, ``step_size = -lr / (1 - beta1^t)`` with the seed's
    beta1 (GrokAdamW: global, SuperGrok: layer-wise)."""

    grad_scale: float
    alpha: float
    one_minus_alpha: float
    amp: float
    smart_scale: float
    beta1: float
    one_minus_beta1: float
    beta2: float
    one_minus_beta2: float
    sqrt_bc2: float
    eps: float
    decay: float
    step_size: float
    step: float       # t after this step: the stochastic rounding's counter (with the seed)
    rounding: float   # ROUNDING flags: which bf16 writes round stochastically
    seed: float

    @classmethod
    def from_row(cls, row: torch.Tensor) -> "StepScalars":
        return cls(*row.tolist())


# ---------------------------------------------------------------- stochastic rounding
# csrc/grok_math.h's counter-based draws, in torch's int64 arithmetic (every value kept in
# [0, 2^32), products split so none overflows int64): the same bits for every element wherever
# it is computed. The kernels are tested against these functions.
_M32 = 0xFFFFFFFF


def _mul32(x, c: int):
    """(x * c) mod 2^32 for a Python int or an int64 tensor in [0, 2^32)."""
    if isinstance(x, int):
        return (x * c) & _M32
    return ((x & 0xFFFF) * c + ((((x >> 16) * c) & 0xFFFF) << 16)) & _M32


def mix32(x):
    """Wellons' lowbias32 hash of 32-bit words (a Python int or an int64 tensor)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def rounding_key(seed: int, step: int, tensor: int) -> int:
    """One tensor's key for one step (``sg::rounding_key``)."""
    k = mix32((seed & _M32) ^ 0x9E3779B9)
    k = mix32(k ^ (step & _M32))
    k = mix32(k ^ ((step >> 32) & _M32))
    return mix32(k ^ tensor)


def rounding_bits(key: int, index: torch.Tensor, which: int) -> torch.Tensor:
    """The 32-bit draws (int64) of elements ``index`` (their indices in the whole tensor) for
    value ``which`` (:data:`DRAWS`): ``sg::rounding_bits(sg::rounding_base(key, index), which)``."""
    index = index.to(torch.int64)
    hi = _mul32((index >> 32) & _M32, 0x9E3779B9)
    base = mix32((index & _M32) ^ ((hi + key) & _M32))
    return mix32((base + _mul32(which + 1, 0x632BE5AB)) & _M32)


def round_bf16_stochastic(x: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """``x`` (fp32; fp64 is rounded to fp32 first) rounded to bfloat16 up or down by the top 16
    of ``bits``: up with probability (dropped bits) / 2^16 (``sg::f32_to_bf16_stochastic``)."""
    x = x.float()
    u = x.reshape(-1).view(torch.int32).to(torch.int64) & _M32
    r = (u + (bits.reshape(-1) >> 16)) >> 16
    r = torch.where(torch.isnan(x.reshape(-1)), 0x7FC0, r)
    r = torch.where(r >= 0x8000, r - 0x10000, r)  # the 16-bit pattern as int16
    return r.to(torch.int16).view(torch.bfloat16).view(x.shape)


# ---------------------------------------------------------------- 8-bit blockwise state
# csrc/grok_math.h's codes (state_dtype="int8"): the same integer and fp32 operations, in torch.
QBLOCK = QUANT["block"]          # elements per scale, along the tensor's own element index
QMIN_NUMEL = QUANT["min_numel"]  # smaller tensors keep fp32 state
SIGNED, UNSIGNED = QUANT["signed"], QUANT["unsigned"]  # the codes' exponent bias (m, mu / v)
CODE_DTYPE = {SIGNED: torch.int8, UNSIGNED: torch.uint8}
#: per state key: the bias of its codes
QUANT_BIAS = {"exp_avg": SIGNED, "exp_avg_sq": UNSIGNED, "mu": SIGNED}


def _f32_bits(x: torch.Tensor) -> torch.Tensor:
    return x.float().contiguous().view(torch.int32).to(torch.int64) & _M32


def _bits_f32(u: torch.Tensor) -> torch.Tensor:
    u = torch.where(u >= 2**31, u - 2**32, u)
    return u.to(torch.int32).view(torch.float32)


def quantize_magnitude(n: torch.Tensor, bias: int, bits: torch.Tensor | None) -> torch.Tensor:
    """``sg::quantize_magnitude<bias>`` of fp32 ``n >= 0``: int64 codes, to nearest or (with
    ``bits``, int64 words) stochastically."""
    u = _f32_bits(n)
    if bits is None:
        add = 0x7FFFF + ((u >> 20) & 1)
        d = torch.tensor(0.5, dtype=torch.float32)
    else:
        add = bits >> 12
        d = (bits >> 12).to(torch.float32) * 2.0**-20
    normal = ((u - ((127 - bias) << 23) + add) >> 20).clamp(max=bias << 3)
    t = n.float() * 2.0 ** (bias + 2)  # exact: a power of two
    low = (t + d).to(torch.int64)  # fp32 sum, truncated
    return torch.where(u >= ((128 - bias) << 23), normal, low)


def dequantize_magnitude(q: torch.Tensor, bias: int) -> torch.Tensor:
    q = q.to(torch.int64)
    high = _bits_f32((q << 20) + ((127 - bias) << 23))
    return torch.where(q >= 8, high, q.to(torch.float32) * 2.0 ** (-bias - 2))


def quantize_codes(x: torch.Tensor, inv_scale: torch.Tensor, bias: int,
                   bits: torch.Tensor | None) -> torch.Tensor:
    """Codes of fp32 ``x`` at ``inv_scale`` (per element, broadcast from its block's):
    signed (two's complement int8) for :data:`SIGNED`, unsigned (uint8) for :data:`UNSIGNED`."""
    n = x.float() * inv_scale
    q = quantize_magnitude(n.abs(), bias, bits)
    if bias == SIGNED:
        q = torch.where(n < 0, -q, q)
    return q.to(CODE_DTYPE[bias])


def dequantize_codes(codes: torch.Tensor, scale: torch.Tensor, bias: int) -> torch.Tensor:
    c = codes.to(torch.int64)
    mag = dequantize_magnitude(c.abs(), bias) * scale
    return torch.where(c < 0, -mag, mag)


def inverse_scale(scale: torch.Tensor) -> torch.Tensor:
    """1 / scale (fp32), 0 for a block of zeros (``sg::inverse_scale``)."""
    scale = scale.float()
    return torch.where(scale > 0, 1.0 / torch.where(scale > 0, scale, 1.0), 0.0)


def block_index(start: int, numel: int) -> torch.Tensor:
    """For each element of a piece starting at element ``start`` of its tensor, its block
    among the piece's blocks (blocks lie along the tensor's element index)."""
    return (torch.arange(start, start + numel) // QBLOCK) - start // QBLOCK


def n_blocks(start: int, numel: int) -> int:
    """How many blocks a piece of ``numel`` elements from element ``start`` touches."""
    return 0 if numel == 0 else (start + numel - 1) // QBLOCK - start // QBLOCK + 1


def block_absmax(x: torch.Tensor, start: int) -> torch.Tensor:
    """Each touched block's largest magnitude of the piece ``x`` (flat, from ``start``)."""
    x = x.reshape(-1).float()
    out = torch.zeros(n_blocks(start, x.numel()), dtype=torch.float32)
    return out.scatter_reduce_(0, block_index(start, x.numel()), x.abs(), "amax")


def dequantize_state(codes: torch.Tensor, scales: torch.Tensor, key: str, start: int) -> torch.Tensor:
    """The fp32 values of one state (``key``: "exp_avg", ...) of a piece from ``start``."""
    flat = codes.reshape(-1)
    per = scales.float()[block_index(start, flat.numel())]
    return dequantize_codes(flat, per, QUANT_BIAS[key]).view(codes.shape)


def quantize_state_(codes: torch.Tensor, scales: torch.Tensor, values: torch.Tensor, key: str,
                    start: int, rounding: "Rounding | None") -> None:
    """Write fp32 ``values`` of a piece from ``start`` into its ``codes`` and per-block
    ``scales`` (each block's largest magnitude), stochastically where ``rounding`` says so."""
    flat = values.reshape(-1).float()
    scale = block_absmax(flat, start)
    bits = None
    if rounding is not None and rounding.state:
        index = torch.arange(rounding.start, rounding.start + flat.numel(), dtype=torch.int64)
        bits = rounding_bits(rounding.key, index, DRAWS[key])
    inv = inverse_scale(scale)[block_index(start, flat.numel())]
    codes.copy_(quantize_codes(flat, inv, QUANT_BIAS[key], bits).view(codes.shape))
    scales.copy_(scale)


def piece_scales(pieces: list[tuple[int, int, int]]) -> list[tuple[int, int]]:
    """Where each piece's scales sit in a scale vector that holds them piece after piece:
    ``(offset, count)`` per ``(begin, end, start)`` piece."""
    out, at = [], 0
    for a, e, start in pieces:
        out.append((at, n_blocks(start, e - a)))
        at += out[-1][1]
    return out


def dequantize_pieces(codes: torch.Tensor, scales: torch.Tensor, key: str,
                      pieces: list[tuple[int, int, int]]) -> torch.Tensor:
    """fp32 values of flat ``codes`` holding ``pieces`` (0 outside them)."""
    flat = codes.reshape(-1)
    out = torch.zeros(flat.shape, dtype=torch.float32, device=flat.device)
    for (a, e, start), (o, n) in zip(pieces, piece_scales(pieces)):
        out[a:e] = dequantize_state(flat[a:e], scales[o:o + n], key, start)
    return out.view(codes.shape)


def quantize_pieces_(codes: torch.Tensor, scales: torch.Tensor, values: torch.Tensor, key: str,
                     pieces: list[tuple[int, int, int]]) -> None:
    """Write fp32 ``values`` of ``pieces`` into flat ``codes`` and their ``scales``, to
    nearest."""
    flat, vals = codes.view(-1), values.reshape(-1)
    for (a, e, start), (o, n) in zip(pieces, piece_scales(pieces)):
        quantize_state_(flat[a:e], scales[o:o + n], vals[a:e], key, start, None)


#: the scale vector of each state key in an 8-bit state (state_dtype="int8")
SCALE_KEYS = {key: key + "_scale" for key in QUANT_BIAS}


def is_quantized(state: dict) -> bool:
    """Whether a state dict entry (one tensor's, or a piece's) holds 8-bit codes."""
    return "exp_avg_scale" in state


def state_value(state: dict, key: str, start: int) -> torch.Tensor:
    """State ``key`` of a piece from element ``start`` of its tensor as values (the codes
    dequantized for 8-bit state; the tensor itself otherwise)."""
    if not is_quantized(state):
        return state[key]
    return dequantize_state(state[key], state[SCALE_KEYS[key]], key, start)


@contextmanager
def state_values(state: dict, start: int, rounding: "Rounding | None"):
    """m, v, mu of a piece to update in place: the state tensors themselves, or for 8-bit
    state fp32 values that are quantized back, block by block, when the block exits without
    an error (stochastically where ``rounding`` says so)."""
    keys = ("exp_avg", "exp_avg_sq", "mu")
    if not is_quantized(state):
        yield tuple(state[k] for k in keys)
        return
    values = [state_value(state, k, start) for k in keys]
    yield tuple(values)
    for k, v in zip(keys, values):
        quantize_state_(state[k], state[SCALE_KEYS[k]], v, k, start, rounding)


@dataclass(frozen=True)
class Rounding:
    """How one piece's phase-2 writes round: its tensor's key for this step, the index of its
    first element in its whole tensor, and whether bf16 state and bf16 parameters round
    stochastically (otherwise, and for every other dtype, to nearest)."""

    key: int
    start: int
    state: bool
    param: bool

    @classmethod
    def of(cls, k: StepScalars, tensor: int, start: int) -> "Rounding":
        flags = int(k.rounding)
        return cls(rounding_key(int(k.seed), int(k.step), tensor), start,
                   bool(flags & ROUNDING["state"]), bool(flags & ROUNDING["param"]))

    def apply(self, src: torch.Tensor, dtype: torch.dtype, which: str) -> torch.Tensor:
        """``src`` (this piece's values, in order) rounded to ``dtype`` as value ``which``
        (:data:`DRAWS`: "param", "exp_avg", ...) is written: stochastically where this
        piece's flags say so and ``dtype`` is bfloat16, else to nearest."""
        stochastic = self.param if which == "param" else self.state
        if dtype != torch.bfloat16 or not stochastic:
            return src.to(dtype)
        index = torch.arange(self.start, self.start + src.numel(), dtype=torch.int64)
        return round_bf16_stochastic(src, rounding_bits(self.key, index, DRAWS[which])).view(src.shape)

    def write(self, dst: torch.Tensor, src: torch.Tensor, which: str) -> None:
        """``dst.copy_(src)`` rounded as :meth:`apply` says."""
        dst.copy_(self.apply(src, dst.dtype, which).view(dst.shape))


def layer_beta1(beta1, gamma, layer):
    return beta1 * (1.0 - gamma) ** layer


def group_values(groups: list[dict], keys: tuple[str, ...]) -> torch.Tensor:
    """[n_groups, len(keys)] float64 of group hyperparameters (``beta1``/``beta2`` from betas)."""
    rows = []
    for g in groups:
        beta1, beta2 = g["betas"]
        rows.append([float(beta1 if k == "beta1" else beta2 if k == "beta2" else g[k]) for k in keys])
    return torch.tensor(rows, dtype=ACC).reshape(len(groups), len(keys))


ADAM_KEYS = ("lr", "beta1", "beta2", "eps", "weight_decay", "gamma")


def adam_columns(table: torch.Tensor, hyper: torch.Tensor, layer: torch.Tensor, step: torch.Tensor,
                 *, layerwise_bias_correction: bool) -> None:
    """Fill the AdamW columns of ``table[n, len(COLUMNS)]`` from per-tensor ``hyper[n, ADAM_KEYS]``
    (each tensor's group's values), layer indices and step counts (after this step's count)."""
    lr, beta1, beta2, eps, wd, gamma = hyper.unbind(1)
    b1l = layer_beta1(beta1, gamma, layer)
    bc1 = 1.0 - (b1l if layerwise_bias_correction else beta1) ** step
    bc2 = 1.0 - beta2 ** step
    table[:, COL["beta1"]] = b1l
    table[:, COL["one_minus_beta1"]] = 1.0 - b1l
    table[:, COL["beta2"]] = beta2
    table[:, COL["one_minus_beta2"]] = 1.0 - beta2
    table[:, COL["sqrt_bc2"]] = bc2.sqrt()
    table[:, COL["eps"]] = eps
    table[:, COL["decay"]] = 1.0 - lr * wd
    table[:, COL["step_size"]] = -lr / bc1  # inf for a tensor that has never stepped: unused


def alpha_from_signal(alpha_init: float, kappa: float, signal: float | None) -> float:
    """alpha = alpha_init * exp(-kappa * signal), clamped to [0, 1 - 1e-8]; alpha_init without a
    signal. The exponent is capped so a very negative signal saturates instead of overflowing."""
    alpha = alpha_init if signal is None else alpha_init * math.exp(min(-kappa * signal, 50.0))
    return min(max(alpha, 0.0), ALPHA_MAX)


def clip_coefficient(max_norm: float, norm_sq: float) -> float:
    """``clip_grad_norm_``'s coefficient: min(1, max_norm / (norm + 1e-6)); 1 when disabled."""
    if max_norm <= 0:
        return 1.0
    return min(1.0, max_norm / (math.sqrt(max(norm_sq, 0.0)) + 1e-6))


def clip_coefficients(max_norm: torch.Tensor, norm_sq: torch.Tensor) -> torch.Tensor:
    """:func:`clip_coefficient` elementwise on float64 tensors (per group), on their device: the
    same IEEE operations, so the same values, without reading the norm back to the host."""
    coef = (max_norm / (norm_sq.clamp_min(0).sqrt() + 1e-6)).clamp(max=1.0)
    return torch.where(max_norm > 0, coef, torch.ones_like(coef))


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.dot(a.reshape(-1).to(ACC), b.reshape(-1).to(ACC))


_WIDE = (torch.float32, torch.float64)


def _f32(t: torch.Tensor) -> torch.Tensor:
    """At least fp32: bf16/fp16 storage is updated in fp32 math."""
    return t if t.dtype in _WIDE else t.float()


def _math_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The dtype an update of these tensors computes in: fp32 for bf16/fp16/fp32 storage, fp64
    as soon as one of them is fp64 (parameter and state may differ in dtype)."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _in_math_dtype(tensors: tuple[torch.Tensor, ...], run, rounding: Rounding | None = None,
                   roles: tuple[str, ...] = ()) -> None:
    """``run(*work)`` on copies of ``tensors`` in their math dtype (those already in it are used
    in place), then each copy written back once, rounded to its tensor's own dtype (by
    ``rounding`` where given, ``roles`` naming each tensor's draw)."""
    dtype = _math_dtype(*tensors)
    work = [t if t.dtype == dtype else t.to(dtype) for t in tensors]
    run(*work)
    for j, (dst, src) in enumerate(zip(tensors, work)):
        if dst is not src:
            if rounding is None:
                dst.copy_(src)
            else:
                rounding.write(dst, src, roles[j])


def adamw_(param: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
           update: torch.Tensor, k: StepScalars) -> None:
    """m, v update with ``update`` as the gradient, then
    ``theta -= lr * (m_hat / (sqrt(v_hat) + eps) + weight_decay * theta)``. Computed in the
    math dtype of param, m and v (:func:`_math_dtype`), each written back in its own dtype."""
    tensors = (param, exp_avg, exp_avg_sq)
    dtype = _math_dtype(*tensors)
    if any(t.dtype != dtype for t in tensors):
        return _in_math_dtype(tensors, lambda p, m, v: adamw_(p, m, v, update, k))
    exp_avg.mul_(k.beta1).add_(update, alpha=k.one_minus_beta1)
    exp_avg_sq.mul_(k.beta2).addcmul_(update, update, value=k.one_minus_beta2)
    denom = (exp_avg_sq.sqrt() / k.sqrt_bc2).add_(k.eps)
    param.mul_(k.decay)
    param.addcdiv_(exp_avg, denom, value=k.step_size)


def _in_math_dtype_update(fn):
    """Run an in-place update (param, grad, [h,] exp_avg, exp_avg_sq, mu) in the math dtype of
    the parameter and its state (fp32 for bf16/fp16 storage, fp64 once any of them is fp64),
    writing the parameter and m, v, mu back once, each rounded to its own dtype: low-precision
    parameters with fp32 state (the default) are rounded once, at the end of the update.
    ``rounding`` (a :class:`Rounding`) makes the bf16 writes it names stochastic."""
    def wrapper(param, grad, *rest, k, rounding: Rounding | None = None):
        tensors = (param, *rest[-3:])  # param, exp_avg, exp_avg_sq, mu
        dtype = _math_dtype(*tensors)
        if all(t.dtype == dtype for t in tensors):
            return fn(param, grad, *rest, k=k)
        extra = [_f32(t) for t in rest[:-3]]  # SuperGrok's h
        _in_math_dtype(tensors, lambda p, m, v, mu: fn(p, grad, *extra, m, v, mu, k=k),
                       rounding, ("param", "exp_avg", "exp_avg_sq", "mu"))
    return wrapper


# ---------------------------------------------------------------- GrokAdamW
GROKADAMW_STATS = STATS[:1]  # csrc/grok_math.h, enum Stat: GrokAdamW sums the first only


def grokadamw_partial_stats(grad: torch.Tensor) -> torch.Tensor:
    return _dot(grad, grad).reshape(1)


@_in_math_dtype_update
def grokadamw_update_(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor,
                      exp_avg_sq: torch.Tensor, mu: torch.Tensor, *, k: StepScalars) -> None:
    g = _f32(grad)
    if k.grad_scale != 1.0:
        g = g * k.grad_scale
    mu.mul_(k.alpha).add_(g, alpha=k.one_minus_alpha)       # mu = a mu + (1 - a) g
    g_hat = g + k.amp * mu                                   # g_hat = g + lamb mu
    adamw_(param, exp_avg, exp_avg_sq, g_hat, k)


# ---------------------------------------------------------------- SuperGrok
# Sums against the *previous* mu; the gate needs mu_t = a mu + (1 - a) g, whose inner products
# are linear in these, so phase 1 needs no global value (alpha comes from rank-averaged losses).
SUPERGROK_STATS = STATS  # csrc/grok_math.h, enum Stat


def supergrok_partial_stats(grad: torch.Tensor, h: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    g = grad.reshape(-1).to(ACC)
    h = h.reshape(-1).to(ACC)
    m = mu.reshape(-1).to(ACC)
    return torch.stack([g @ g, h @ h, h @ m, h @ g, m @ m, m @ g])


@dataclass(frozen=True)
class SuperGrokDecision:
    smart_scale: torch.Tensor   # [n] rescale * ||g|| / ||h||
    amp: torch.Tensor           # [n] lamb where the gate engaged, else 0
    final_sq: torch.Tensor      # [n] ||smart + amp * mu_t||^2 (before clipping)
    engaged: torch.Tensor       # [n] bool


def supergrok_decide(stats: torch.Tensor, mu_alpha: torch.Tensor, lamb: torch.Tensor,
                     rescale: float, amplify: torch.Tensor) -> SuperGrokDecision:
    """Per-tensor gate and norms from the reduced sums ``stats[n, len(SUPERGROK_STATS)]``."""
    gg, hh, hm, hg, mm, mg = stats.unbind(1)
    a = mu_alpha.to(stats.dtype)
    h_mu = a * hm + (1 - a) * hg                                    # <h, mu_t>
    mu_sq = (a * a * mm + 2 * a * (1 - a) * mg + (1 - a) ** 2 * gg).clamp_min(0)
    h_norm = hh.clamp_min(0).sqrt()
    g_norm = gg.clamp_min(0).sqrt()
    scale = torch.where(h_norm > 0, rescale * g_norm / torch.where(h_norm > 0, h_norm, 1), 0)
    smart_norm = scale.abs() * h_norm
    smart_mu = scale * h_mu
    mu_norm = mu_sq.sqrt()
    valid = (smart_norm >= 1e-8) & (mu_norm >= 1e-8)
    cos = torch.where(valid, smart_mu / torch.where(valid, smart_norm * mu_norm, 1), 0)
    engaged = (cos > 0) & amplify
    amp = torch.where(engaged, lamb.to(stats.dtype), 0)
    final_sq = (smart_norm ** 2 + 2 * amp * smart_mu + amp * amp * mu_sq).clamp_min(0)
    return SuperGrokDecision(scale, amp, final_sq, engaged)


@_in_math_dtype_update
def supergrok_update_(param: torch.Tensor, grad: torch.Tensor, h: torch.Tensor,
                      exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, mu: torch.Tensor, *,
                      k: StepScalars) -> None:
    g = _f32(grad)
    mu.mul_(k.alpha).add_(g, alpha=k.one_minus_alpha)       # raw, unclipped g (Rule 1)
    final = h.view_as(g) * k.smart_scale
    if k.amp:
        final.add_(mu, alpha=k.amp)
    if k.grad_scale != 1.0:
        final.mul_(k.grad_scale)
    adamw_(param, exp_avg, exp_avg_sq, final, k)
