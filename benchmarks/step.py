"""Median optimizer-step time: shardgrok's GrokAdamW and SuperGrok (kernel and reference backends)
against torch AdamW (foreach, fused) and the reference package ``grokadamw==0.1.2``.

    python benchmarks/step.py                          # 1M/300 and 10M/100, fp32, 30 steps
    python benchmarks/step.py --sizes 100k/10,1M/300 --steps 50 --threads 2
    python benchmarks/step.py --dtype bf16 --only grok-kernel,super-kernel
    python benchmarks/step.py --quick                  # tiny smoke run (100k/10, 3 steps)
    python benchmarks/step.py --json results.json

The model is a list of fp32 (or bf16) parameters of the given total size split as evenly as
possible over the given number of tensors, each with a random gradient set once (no backward is
timed). Every optimizer gets its own copy. After a few warm-up steps the optimizers are timed
round-robin (``--rounds`` rounds, each a run of consecutive steps per optimizer) so that drift on
a shared machine spreads over all of them; the table reports the median of the per-step
``time.perf_counter()`` differences. Slow optimizers (the reference paths) are time-boxed: when
``--steps`` steps would take more than ``--max-seconds``, fewer are timed and the row says so.

Effective GB/s is the nominal bytes per parameter of each step (:func:`bytes_per_param`, from the
dtypes of the parameters and of the state the optimizer holds; BYTES_PER_PARAM is its fp32 table)
times the parameter count over the median time: a bandwidth figure, comparable between rows.

On a GPU (``--device cuda``; ``--device auto`` picks CUDA when torch sees one, else the CPU run
above, unchanged):

    python benchmarks/step.py --device cuda --json benchmarks/results/step_<gpu>.json
    python benchmarks/step.py --device cuda --quick    # smoke run (10M/50, 3 steps x 3 repeats)

the model (default 100M/200 and 1B/200) is a transformer-like mix of shapes (``--layout
transformer``: an embedding matrix and, per block, four weight matrices and eight vectors) on
the current CUDA device. The optimizers run one after the other, each on a fresh copy of the
model, and each one's parameters, gradients and state are let go (they live in one function
call; then ``gc.collect()`` and ``torch.cuda.empty_cache()``) before the next is built; the
memory each needs is estimated and
printed first, and a row (or a whole size) that would not fit in ``torch.cuda.mem_get_info()``
is skipped, saying so. A row's time is the median over ``--repeats`` repeats of a
``torch.cuda.Event`` pair around ``--steps`` consecutive steps (after warm-up), divided by the
steps; ``torch.cuda.synchronize()`` runs only outside the timed region. The shardgrok rows are
built as in the CPU run (``backend`` left to the optimizers' own rule: the CUDA kernel when it
is built, else the reference path) and print the backend their steps used.

The same run measures the device-to-device copy bandwidth (``dst.copy_(src)`` of a
``--copy-mib`` MiB tensor, 2 x nbytes moved per copy, median of repeats) and reports each row's
effective bandwidth as a fraction of it. The bytes a step moves per parameter, for an ideal
implementation (:func:`bytes_per_param`), from the element sizes P, G of the parameter and its
gradient and M, V, MU of the state tensors the optimizer actually holds after its first step::

    AdamW      reads p, g, m, v; writes p, m, v                         2P +  G + 2M + 2V
    GrokAdamW  phase 1 reads g; phase 2 reads p, g, m, v, mu, writes
               p, m, v, mu                                               2P + 2G + 2M + 2V + 2MU
    SuperGrok  phase 1 reads g, mu; phase 2 as GrokAdamW                2P + 2G + 2M + 2V + 3MU

fp32 everything: 28, 40 and 44 B; bf16 parameters with fp32 state: 22, 32 and 36 B.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import logging
import math
import os
import platform
import shlex
import statistics
import sys
import time
import warnings

import torch

# Run from a checkout without installing: put the repository root on the path.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import shardgrok  # noqa: E402
from shardgrok import kernels  # noqa: E402

DEFAULT_SIZES = "1M/300,10M/100"
QUICK_SIZES = "100k/10"

# Nominal bytes moved per parameter by one step, at fp32 (4 B per element access); a bf16 run
# scales them by 2/4 (parameters, gradients and the m, v, mu state are all bf16 then).
BYTES_PER_PARAM = {
    # fused AdamW: reads p, g, m, v and writes p, m, v -> 7 x 4 B
    "adamw-fused": 28,
    "adamw-foreach": 28,  # same traffic in the ideal; foreach makes several passes in practice
    # two-phase GrokAdamW kernel: phase 1 reads g (norm, partial sums); phase 2 reads
    # p, g, m, v, mu and writes p, m, v, mu -> (1 + 5 + 4) x 4 B
    "grok-kernel": 40,
    # SuperGrok kernel: phase 1 reads g and mu (norms, cosine-gate dot products) -> (2 + 5 + 4) x 4 B
    "super-kernel": 44,
    "super-kernel-trained": 44,
    # reference paths: the same nominal budget as their kernel counterparts
    "grok-ref": 40,
    "super-ref": 44,
    # the grokadamw package: the same algorithm as GrokAdamW, so the same nominal budget
    "grokadamw-pkg": 40,
    # the backend="auto" rows: the same budget
    "grok": 40,
    "super": 44,
    "super-trained": 44,
}

# key -> display label, in table order
OPTIMIZERS = {
    "adamw-fused": "torch AdamW fused",
    "adamw-foreach": "torch AdamW foreach",
    "grok-kernel": "shardgrok GrokAdamW kernel",
    "grok-ref": "shardgrok GrokAdamW reference",
    "super-kernel": "shardgrok SuperGrok kernel",
    "super-kernel-trained": "shardgrok SuperGrok kernel, trained-like net",
    "super-ref": "shardgrok SuperGrok reference",
    "grokadamw-pkg": "grokadamw 0.1.2 GrokAdamW",
}
# The same optimizers with ``backend`` left to their own rule (``"auto"``, or SHARDGROK_BACKEND):
# the compiled kernel where it takes the tensors (the CPU kernel; on CUDA the CUDA kernel once it
# is built), else the reference path. The CUDA run's default rows; the backend a step used is
# printed with each row.
AUTO_OPTIMIZERS = {
    "grok": "shardgrok GrokAdamW",
    "super": "shardgrok SuperGrok",
    "super-trained": "shardgrok SuperGrok, trained-like net",
}
# every key, in table order (the CPU run's default rows, OPTIMIZERS, keep their order)
ALL_OPTIMIZERS = {"adamw-fused": OPTIMIZERS["adamw-fused"],
                  "adamw-foreach": OPTIMIZERS["adamw-foreach"],
                  **AUTO_OPTIMIZERS, **OPTIMIZERS}
CUDA_DEFAULT = ["adamw-fused", "adamw-foreach", "grok", "super", "super-trained"]
# which update each key runs, for the bytes it moves (bytes_per_param)
FAMILY = {"adamw-fused": "adamw", "adamw-foreach": "adamw",
          "grok": "grok", "grok-kernel": "grok", "grok-ref": "grok", "grokadamw-pkg": "grok",
          "super": "super", "super-trained": "super", "super-kernel": "super",
          "super-kernel-trained": "super", "super-ref": "super"}
ALIASES = {
    "supergrok": "super", "grokadamw-auto": "grok", "supergrok-auto": "super",
    "super-auto": "super", "grok-auto": "grok", "supergrok-trained": "super-trained",
    "fused": "adamw-fused", "adamw_fused": "adamw-fused",
    "foreach": "adamw-foreach", "adamw_foreach": "adamw-foreach",
    "grokadamw-kernel": "grok-kernel", "grokadamw-reference": "grok-ref", "grok-reference": "grok-ref",
    "supergrok-kernel": "super-kernel", "supergrok-reference": "super-ref",
    "super-reference": "super-ref",
    "grokadamw": "grokadamw-pkg", "package": "grokadamw-pkg", "grokadamw-0.1.2": "grokadamw-pkg",
    "pkg": "grokadamw-pkg",
}
BASELINE = "adamw-fused"
# Optimizers a bf16 run times: shardgrok and the fused baseline. (torch AdamW foreach and
# grokadamw 0.1.2 also step bf16 parameters; add them here to time them too.)
BF16_OK = {"adamw-fused", "grok-kernel", "grok-ref", "super-kernel", "super-kernel-trained",
           "super-ref", "grok", "super", "super-trained"}

# The project's step-time targets (only checked for the default sizes).
TARGETS = [
    # (description, size label, numerator key, denominator key, max ratio num/den)
    ("GrokAdamW kernel <= 1.5x AdamW fused at 10M/100", "10M/100", "grok-kernel", "adamw-fused", 1.5),
    ("GrokAdamW kernel <= 2x AdamW fused at 1M/300", "1M/300", "grok-kernel", "adamw-fused", 2.0),
    ("GrokAdamW kernel >= 5x faster than grokadamw 0.1.2 at 1M/300", "1M/300", "grok-kernel",
     "grokadamw-pkg", 1 / 5),
    ("SuperGrok kernel <= 4x AdamW fused at 10M/100", "10M/100", "super-kernel", "adamw-fused", 4.0),
]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

CUDA_DEFAULT_SIZES = "100M/200,1B/200"
CUDA_QUICK_SIZES = "10M/50"
LAYOUTS = ("even", "transformer")

# The issue's CUDA targets, at 1B parameters (printed as PASS/FAIL, never asserted):
# (description, parameter count, row keys in order of preference, kind, limit). "ratio": step
# time over AdamW fused's <= limit; "copy": effective bandwidth at the row's bytes per parameter
# >= limit x the measured device-to-device copy bandwidth.
CUDA_TARGET_PARAMS = 10**9
CUDA_TARGETS = [
    ("GrokAdamW <= 1.45x AdamW fused at 1B params", ("grok", "grok-kernel"), "ratio", 1.45),
    ("SuperGrok (default meta-net) <= 2x AdamW fused at 1B params", ("super", "super-kernel"),
     "ratio", 2.0),
    ("GrokAdamW >= 80% of the copy bandwidth at its bytes/param, 1B params",
     ("grok", "grok-kernel"), "copy", 0.80),
    ("SuperGrok (default meta-net) >= 80% of the copy bandwidth at its bytes/param, 1B params",
     ("super", "super-kernel"), "copy", 0.80),
]


# ---------------------------------------------------------------------------------------------
# arguments

def parse_count(text: str) -> int:
    """'100k' -> 100_000, '1M' -> 1_000_000, '1.5M', '2G' or '2B' (2 x 10^9), '12345'."""
    t = text.strip()
    mult = {"k": 10**3, "m": 10**6, "g": 10**9, "b": 10**9}.get(t[-1:].lower(), 1)
    if mult != 1:
        t = t[:-1]
    try:
        value = float(t) * mult
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 100k, 1M, 10M)") from None
    if value < 1 or value != int(value):
        raise argparse.ArgumentTypeError(f"not a positive whole size: {text!r}")
    return int(value)


def parse_sizes(text: str) -> list[tuple[str, int, int]]:
    """'1M/300,10M/100' -> [('1M/300', 1000000, 300), ('10M/100', 10000000, 100)]."""
    out = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        if "/" not in item:
            raise argparse.ArgumentTypeError(f"size {item!r}: expected PARAMS/TENSORS, e.g. 1M/300")
        n_text, c_text = item.split("/", 1)
        n, c = parse_count(n_text), parse_count(c_text)
        if c > n:
            raise argparse.ArgumentTypeError(f"size {item!r}: more tensors than parameters")
        out.append((f"{n_text.strip()}/{c_text.strip()}", n, c))
    if not out:
        raise argparse.ArgumentTypeError("no sizes given")
    return out


def parse_only(text: str) -> list[str]:
    keys = []
    for name in text.split(","):
        name = name.strip().lower()
        if not name:
            continue
        key = ALIASES.get(name, name)
        if key not in ALL_OPTIMIZERS:
            raise argparse.ArgumentTypeError(
                f"unknown optimizer {name!r}; choose from {', '.join(ALL_OPTIMIZERS)}")
        if key not in keys:
            keys.append(key)
    return keys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="benchmarks/step.py", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="optimizers (--only): " + ", ".join(ALL_OPTIMIZERS) + "\n(default rows: cpu: "
               + ", ".join(OPTIMIZERS) + "; cuda: " + ", ".join(CUDA_DEFAULT) + ")")
    p.add_argument("--device", choices=("cpu", "cuda", "auto"), default="cpu",
                   help="where the model and the optimizers live (default cpu); auto: cuda when "
                        "torch.cuda.is_available(), else cpu")
    p.add_argument("--sizes", type=parse_sizes, default=None,
                   help=f"comma list of PARAMS/TENSORS (default cpu {DEFAULT_SIZES}, cuda "
                        f"{CUDA_DEFAULT_SIZES}; --quick: cpu {QUICK_SIZES}, cuda {CUDA_QUICK_SIZES})")
    p.add_argument("--layout", choices=LAYOUTS, default=None,
                   help="the tensors' shapes: even (1-D tensors of equal size; the cpu default) or "
                        "transformer (an embedding, per block 4 matrices and 8 vectors; the cuda "
                        "default)")
    p.add_argument("--steps", type=int, default=None,
                   help="timed steps per optimizer (default 30; --quick: 3); cuda: per repeat "
                        "(default 10; --quick: 3)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed warm-up steps (default 5, cuda 3; --quick: 1)")
    p.add_argument("--rounds", type=int, default=None,
                   help="cpu: round-robin rounds the timed steps are split into (default 3; "
                        "--quick: 1)")
    p.add_argument("--repeats", type=int, default=None,
                   help="cuda: timed repeats of --steps steps per optimizer, the median reported "
                        "(default 5; --quick: 3)")
    p.add_argument("--copy-mib", type=float, default=None,
                   help="cuda: size of the tensor the copy bandwidth is measured with, MiB "
                        "(default 1024; --quick: 64)")
    p.add_argument("--max-seconds", type=float, default=15.0,
                   help="time box per optimizer and size, warm-up included; a slower optimizer "
                        "times fewer steps (at least --min-steps) (default 15)")
    p.add_argument("--min-steps", type=int, default=3,
                   help="cpu: fewest timed steps under the time box (default 3; cuda: 1 step per "
                        "repeat and 3 repeats)")
    p.add_argument("--threads", type=int, default=None,
                   help=f"torch.set_num_threads (default torch.get_num_threads() = {torch.get_num_threads()})")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                   help="parameter dtype (default fp32); a cpu bf16 run times shardgrok and AdamW "
                        "fused only")
    p.add_argument("--only", type=parse_only, default=None,
                   help="comma list of optimizers to run; AdamW fused is added as the baseline of the ratios")
    p.add_argument("--quick", action="store_true",
                   help=f"tiny smoke run (cpu {QUICK_SIZES}, 3 steps; cuda {CUDA_QUICK_SIZES}, "
                        "3 steps x 3 repeats)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="PATH", default=None, help="also write the results as JSON")
    return p


# ---------------------------------------------------------------------------------------------
# model and optimizers

def split_sizes(n: int, count: int) -> list[int]:
    base, extra = divmod(n, count)
    return [base + (1 if i < extra else 0) for i in range(count)]


def transformer_shapes(n: int, count: int) -> list[tuple[int, ...]]:
    """``count`` shapes of ``n`` elements in all, shaped like a transformer's parameters: an
    embedding matrix (V, d) first; then L = (count - 3) // 12 blocks of four matrices (3d, d),
    (d, d), (4d, d), (d, 4d) and eight vectors (two layer norms' weight and bias, the four
    biases); the (count - 3) % 12 tensors left over as extra (d,) vectors; a final layer norm
    (d,), (d + r,) whose bias absorbs the r < d elements the embedding's whole rows leave, so
    the total is exact. d (a multiple of 64 where it can be) puts about 85% of the parameters
    in the blocks' matrices and the rest mostly in the embedding: a few large matrices and many
    small vectors. Fewer than 15 tensors (no room for a block) fall back to the even split."""
    if count < 15:
        return [(s,) for s in split_sizes(n, count)]
    blocks = (count - 3) // 12
    extra = count - 3 - 12 * blocks

    def fixed(d):  # every element but the embedding's
        return 12 * blocks * d * d + 13 * blocks * d + 2 * d + extra * d

    d = max(64, round(math.sqrt(0.85 * n / (12 * blocks)) / 64) * 64)
    while d > 1 and fixed(d) + d > n:  # at least one embedding row
        d = d - 64 if d > 128 else d - 1
    if fixed(d) + d > n:
        return [(s,) for s in split_sizes(n, count)]
    rows, r = divmod(n - fixed(d), d)
    shapes: list[tuple[int, ...]] = [(rows, d)]
    for _ in range(blocks):
        shapes += [(d,), (d,), (3 * d, d), (3 * d,), (d, d), (d,),        # ln1, qkv, out
                   (d,), (d,), (4 * d, d), (4 * d,), (d, 4 * d), (d,)]    # ln2, fc1, fc2
    shapes += [(d,)] * extra + [(d,), (d + r,)]
    assert len(shapes) == count and sum(math.prod(s) for s in shapes) == n
    return shapes


def make_shapes(n: int, count: int, layout: str) -> list[tuple[int, ...]]:
    if layout == "transformer":
        return transformer_shapes(n, count)
    return [(s,) for s in split_sizes(n, count)]


def make_model(n: int, count: int, dtype: torch.dtype, seed: int,
               shapes: list[tuple[int, ...]] | None = None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The parameter values and their (fixed) gradients, shared source for every optimizer."""
    gen = torch.Generator().manual_seed(seed)
    values, grads = [], []
    for shape in shapes if shapes is not None else [(s,) for s in split_sizes(n, count)]:
        values.append((torch.randn(shape, generator=gen) * 0.02).to(dtype))
        grads.append((torch.randn(shape, generator=gen) * 1e-3).to(dtype))
    return values, grads


def params_from(values, grads) -> list[torch.nn.Parameter]:
    params = []
    for v, g in zip(values, grads):
        p = torch.nn.Parameter(v.clone())
        p.grad = g.clone()
        params.append(p)
    return params


def import_grokadamw():
    """The reference package's GrokAdamW, or None. Its import calls logging.basicConfig(INFO);
    undo that so it does not change this script's (or a test's) logging."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from grokadamw import GrokAdamW
    except Exception:
        return None
    finally:
        for h in list(root.handlers):
            if h not in handlers:
                root.removeHandler(h)
        root.setLevel(level)
    return GrokAdamW


def make_stepper(key: str, params, package_cls):
    """(optimizer, step function) for one optimizer key; raises when it cannot be had."""
    if key == "adamw-fused":
        opt = torch.optim.AdamW(params, lr=1e-3, fused=True)
        return opt, opt.step
    if key == "adamw-foreach":
        opt = torch.optim.AdamW(params, lr=1e-3, foreach=True)
        return opt, opt.step
    if key in ("grok-kernel", "grok-ref", "grok"):
        # "grok": backend left to the optimizer's rule (the kernel when it takes the tensors)
        opt = shardgrok.GrokAdamW(params, lr=1e-3, backend={"grok-kernel": "kernel",
                                                             "grok-ref": "reference"}.get(key))
        return opt, opt.step
    if key in ("super-kernel", "super-kernel-trained", "super-ref", "super", "super-trained"):
        # warmup_steps=0: the cosine gate is live from the first step, as after warm-up
        opt = shardgrok.SuperGrok(params, lr=1e-3, warmup_steps=0,
                                  backend={"super-ref": "reference", "super-kernel": "kernel",
                                           "super-kernel-trained": "kernel"}.get(key))
        if key in ("super-kernel-trained", "super-trained"):
            # The default initialisation has zero biases: one breakpoint, a 2-entry table. A
            # trained net's kinks spread out: weights drawn N(0, 1) give ~60-70 breakpoints, a
            # 128-entry table, 7 search steps per element instead of 1.
            gen = torch.Generator().manual_seed(0)
            with torch.no_grad():
                for w in opt.meta_net.net.parameters():
                    w.copy_(torch.randn(w.shape, generator=gen))

        def step():  # the losses make the signal (alpha) path run every step
            opt.step(train_loss=1.0, val_loss=1.5)
        return opt, step
    if key == "grokadamw-pkg":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt = package_cls(params, lr=1e-3)

        def step():  # silence its autocast (CUDA-only) warnings
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                opt.step()
        return opt, step
    raise KeyError(key)


# ---------------------------------------------------------------------------------------------
# timing

def timed_steps(step, n: int) -> list[float]:
    times = []
    gc_was = gc.isenabled()
    gc.disable()
    try:
        for _ in range(n):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
    finally:
        if gc_was:
            gc.enable()
    return times


def bench_size(label: str, n: int, count: int, keys: list[str], args, package_cls) -> list[dict]:
    dtype = DTYPES[args.dtype]
    values, grads = make_model(n, count, dtype, args.seed, make_shapes(n, count, args.layout))
    rows: dict[str, dict] = {}
    live: dict[str, dict] = {}

    for key in keys:
        row = {"optimizer": key, "label": ALL_OPTIMIZERS[key], "median_ms": None, "steps_timed": 0,
               "steps_planned": 0, "warmup_steps": 0, "bytes_per_param": None, "gbps": None,
               "ratio_to_adamw_fused": None, "note": None, "times_ms": []}
        rows[key] = row
        if key == "grokadamw-pkg" and package_cls is None:
            row["note"] = "not installed"
            continue
        if args.dtype != "fp32" and key not in BF16_OK:
            row["note"] = f"skipped: {args.dtype} runs time shardgrok and AdamW fused only"
            continue
        params = params_from(values, grads)
        try:
            opt, step = make_stepper(key, params, package_cls)
            # Warm-up: --warmup steps (at least 1; the first one allocates the state), cut short
            # once past a quarter of the time box.
            warm, t_start = [], time.perf_counter()
            for i in range(max(1, args.warmup)):
                warm += timed_steps(step, 1)
                if time.perf_counter() - t_start > args.max_seconds / 4:
                    break
            warm_s = time.perf_counter() - t_start
            # from the state the optimizer chose (bf16 parameters get fp32 state by default)
            row["bytes_per_param"] = bytes_per_param(key, dtype, dtype, read_state_dtypes(opt, params))
        except Exception as e:
            msg = str(e).strip().splitlines()
            row["note"] = f"error: {type(e).__name__}: {msg[0] if msg else ''}"[:200]
            continue
        # Time box (warm-up included): the fastest warm-up step after the first estimates the
        # step time; a lone slow step on a busy machine must not cut a fast optimizer's steps.
        est = min(warm[1:] if len(warm) > 1 else warm)
        planned = args.steps
        box = max(args.max_seconds - warm_s, 0.0)
        if est * planned > box:
            planned = max(min(args.min_steps, args.steps), int(box / max(est, 1e-9)))
        row["warmup_steps"] = len(warm)
        row["steps_planned"] = planned
        live[key] = {"opt": opt, "step": step, "params": params, "left": planned}

    # Round-robin: each round runs a block of consecutive steps of every live optimizer.
    rounds = max(1, args.rounds)
    for r in range(rounds):
        for key, st in live.items():
            if st["left"] <= 0:
                continue
            block = math.ceil(st["left"] / (rounds - r))
            try:
                rows[key]["times_ms"] += [t * 1e3 for t in timed_steps(st["step"], block)]
            except Exception as e:
                msg = str(e).strip().splitlines()
                rows[key]["note"] = f"error while timing: {type(e).__name__}: {msg[0] if msg else ''}"[:200]
                st["left"] = 0
                continue
            st["left"] -= block
    live.clear()
    gc.collect()

    for key, row in rows.items():
        if row["times_ms"]:
            row["steps_timed"] = len(row["times_ms"])
            row["median_ms"] = statistics.median(row["times_ms"])
            row["gbps"] = row["bytes_per_param"] * n / (row["median_ms"] * 1e-3) / 1e9
            if row["steps_timed"] < args.steps and row["note"] is None:
                row["note"] = f"time-boxed: {row['steps_timed']} of {args.steps} steps"
    base = rows.get(BASELINE, {}).get("median_ms")
    for row in rows.values():
        if base and row["median_ms"] is not None:
            row["ratio_to_adamw_fused"] = row["median_ms"] / base
    return [rows[k] for k in keys]


# ---------------------------------------------------------------------------------------------
# report

def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def loadavg() -> list[float] | None:
    """The machine's 1/5/15-minute load (timings on a shared machine need it)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def kernel_isa() -> str:
    try:
        cpu = kernels.status()["cpu"]
    except Exception as e:
        return f"unavailable ({type(e).__name__}: {e})"
    if cpu["available"]:
        return f"{cpu['isa']} (supported: {', '.join(cpu['supported_isas'])})"
    return f"unavailable ({cpu['reason']})"


def fmt(x, spec, none="-"):
    return none if x is None else format(x, spec)


def describe_shapes(shapes: list[tuple[int, ...]]) -> str:
    """'10000 each' (an even split), else the mix: '1 embedding (67765, 2112), 64 matrices ...'."""
    if all(len(s) == 1 for s in shapes):
        sizes = sorted((s[0] for s in shapes), reverse=True)
        return f"{sizes[0]}" if sizes[0] == sizes[-1] else f"{sizes[-1]}-{sizes[0]}"
    mats = [s for s in shapes if len(s) > 1]
    vecs = [s for s in shapes if len(s) == 1]
    big = max(mats, key=math.prod)
    return (f"{len(mats)} matrices, largest {big[0]}x{big[1]}, and {len(vecs)} vectors of "
            f"{min(v[0] for v in vecs)}-{max(v[0] for v in vecs)}")


def print_table(label: str, n: int, count: int, dtype: str, rows: list[dict],
                shapes: list[tuple[int, ...]] | None = None) -> None:
    desc = describe_shapes(shapes if shapes is not None else [(s,) for s in split_sizes(n, count)])
    each = " each" if "matrices" not in desc else ""
    print(f"\n== {label}: {n:,} params in {count} tensors ({desc}{each}), {dtype} ==")
    head = f"{'optimizer':<32} {'median ms':>10} {'x fused':>8} {'B/param':>8} {'GB/s':>7} {'steps':>6}  note"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['label']:<32} {fmt(r['median_ms'], '10.3f'):>10} "
              f"{fmt(r['ratio_to_adamw_fused'], '8.2f'):>8} {fmt(r['bytes_per_param'], '8.0f'):>8} "
              f"{fmt(r['gbps'], '7.2f'):>7} {r['steps_timed'] or '-':>6}  {r['note'] or ''}")


def check_targets(results: dict[str, list[dict]], dtype: str) -> list[dict]:
    """The project's targets, for the default sizes present in this run."""
    out = []
    for desc, size, num, den, limit in TARGETS:
        if size not in results:
            continue
        by_key = {r["optimizer"]: r for r in results[size]}
        a = by_key.get(num, {}).get("median_ms")
        b = by_key.get(den, {}).get("median_ms")
        entry = {"target": desc, "size": size, "dtype": dtype, "met": None, "ratio": None, "limit": limit}
        if a is None or b is None:
            missing = [OPTIMIZERS[k] for k, v in ((num, a), (den, b)) if v is None]
            entry["line"] = f"{desc}: n/a ({', '.join(missing)} not timed)"
        else:
            ratio = a / b
            entry.update(met=ratio <= limit, ratio=ratio)
            if limit < 1:
                detail = (f"{OPTIMIZERS[num]} {a:.3f} ms vs {OPTIMIZERS[den]} {b:.3f} ms: "
                          f"{b / a:.1f}x faster (need >= {1 / limit:.0f}x)")
            else:
                detail = (f"{OPTIMIZERS[num]} {a:.3f} ms vs {OPTIMIZERS[den]} {b:.3f} ms: "
                          f"{ratio:.2f}x (need <= {limit:g}x)")
            entry["line"] = f"{desc}: {'met' if entry['met'] else 'NOT met'} ({detail})"
        if dtype != "fp32":
            entry["line"] += f" [{dtype} run; the targets are stated for fp32]"
        out.append(entry)
    return out


# ---------------------------------------------------------------------------------------------
# bytes per parameter, and the CUDA run

GiB = 1024**3
# state key -> the name bytes_per_param gives it (grokadamw 0.1.2 calls mu "grok_ema")
STATE_NAMES = {"exp_avg": "m", "exp_avg_sq": "v", "mu": "mu", "grok_ema": "mu"}


def _elem(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def bytes_per_param(key: str, param_dtype: torch.dtype, grad_dtype: torch.dtype | None = None,
                    state_dtypes: torch.dtype | dict | None = None) -> int:
    """Bytes one step of optimizer ``key`` moves per parameter in an ideal implementation (each
    tensor read once per pass that needs it, each written once), from the element sizes P of the
    parameter, G of its gradient (default: the parameter's dtype) and M, V, MU of its exp_avg,
    exp_avg_sq and mu state. ``state_dtypes``: one dtype for all three, or a dict keyed by state
    key (``exp_avg``, ``exp_avg_sq``, ``mu``) or by ``m``, ``v``, ``mu``, as
    :func:`read_state_dtypes` gives it; what it leaves out has the parameter's dtype.

        AdamW (fused, foreach):  reads p, g, m, v; writes p, m, v          2P +  G + 2M + 2V
        GrokAdamW:  phase 1 reads g; phase 2 reads p, g, m, v, mu and
                    writes p, m, v, mu                                     2P + 2G + 2M + 2V + 2MU
        SuperGrok:  phase 1 reads g, mu; phase 2 as GrokAdamW             2P + 2G + 2M + 2V + 3MU

    fp32 everything: 28, 40, 44 (BYTES_PER_PARAM); bf16 everything: 14, 20, 22; bf16
    parameters and gradients with fp32 state (shardgrok's ``state_dtype=None`` default for bf16
    parameters): 22, 32, 36.
    """
    family = FAMILY[key]
    p = _elem(param_dtype)
    g = _elem(grad_dtype if grad_dtype is not None else param_dtype)
    if state_dtypes is None or isinstance(state_dtypes, torch.dtype):
        m = v = mu = _elem(state_dtypes if state_dtypes is not None else param_dtype)
    else:
        named = {STATE_NAMES.get(k, k): d for k, d in state_dtypes.items()}
        m, v, mu = (_elem(named.get(name, param_dtype)) for name in ("m", "v", "mu"))
    if family == "adamw":
        return 2 * p + g + 2 * m + 2 * v
    if family == "grok":
        return 2 * p + 2 * g + 2 * m + 2 * v + 2 * mu
    return 2 * p + 2 * g + 2 * m + 2 * v + 3 * mu


def read_state_dtypes(opt, params) -> dict[str, torch.dtype]:
    """{'m': dtype, 'v': dtype, 'mu': dtype} of the state the optimizer holds for its first
    parameter that has any (read after a step: the optimizer chose them, not this script)."""
    for p in params:
        st = opt.state.get(p)
        if not st:
            continue
        out = {}
        for k, name in STATE_NAMES.items():
            t = st.get(k)
            if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dim() > 0:
                out[name] = t.dtype
        if out:
            return out
    return {}


def memory_estimate(key: str, shapes: list[tuple[int, ...]], dtype: torch.dtype) -> dict[str, int]:
    """Device bytes row ``key`` needs at most, estimated before anything is allocated: its own
    copy of the parameters and gradients, its state, the temporaries of its step, and slack
    for the allocator (256 MiB + 3%). shardgrok's state is counted as fp32 for low-precision
    parameters (its ``state_dtype=None`` default; the worst case either way), torch AdamW's in
    the parameters' dtype. Temporaries: AdamW foreach makes sqrt(v) of every tensor at once;
    the shardgrok reference path works tensor by tensor (fp64 copies for its sums, fp32 work
    copies: 24 B per element of the largest tensor) and SuperGrok's keeps h = exp(f(g)) g of
    every tensor in fp32 from phase 1 to phase 2. A row whose backend is left to the
    optimizer is counted as the reference (what it falls back to)."""
    n = sum(math.prod(s) for s in shapes)
    big = max(math.prod(s) for s in shapes)
    p = _elem(dtype)
    family = FAMILY[key]
    model = 2 * n * p
    if family == "adamw":
        state = 2 * n * p
        temp = n * p if key == "adamw-foreach" else 0
    elif key == "grokadamw-pkg":
        state = 0  # kept on the host and moved to the device tensor by tensor
        temp = big * (3 * p + 24)
    else:
        state = 3 * n * max(p, 4)
        temp = 24 * big
        if family == "super" and key not in ("super-kernel", "super-kernel-trained"):
            temp += 4 * n
    slack = 256 * 1024**2 + (model + state + temp) * 3 // 100
    return {"model": model, "state": state, "temporaries": temp, "slack": slack,
            "total": model + state + temp + slack}


class CudaDevice:
    """What the CUDA run asks of the device, in one place (the tests stand a CPU double in)."""

    def __init__(self):
        self.device = torch.device("cuda", torch.cuda.current_device())

    def describe(self) -> dict:
        props = torch.cuda.get_device_properties(self.device)
        free, total = self.mem_get_info()
        return {"device_name": torch.cuda.get_device_name(self.device),
                "device": str(self.device), "capability": f"{props.major}.{props.minor}",
                "multiprocessors": props.multi_processor_count, "cuda": torch.version.cuda,
                "memory_total_bytes": total, "memory_free_bytes_at_start": free}

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)

    def elapsed_ms(self, fn, n: int) -> float:
        """Milliseconds of ``n`` consecutive ``fn()`` calls, between a pair of CUDA events;
        synchronised before and after, outside the events."""
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        self.synchronize()
        start.record()
        for _ in range(n):
            fn()
        end.record()
        self.synchronize()
        return start.elapsed_time(end)

    def mem_get_info(self) -> tuple[int, int]:
        return torch.cuda.mem_get_info(self.device)

    def free_cache(self) -> None:
        gc.collect()
        torch.cuda.empty_cache()

    def reset_peak(self) -> None:
        torch.cuda.reset_peak_memory_stats(self.device)

    def peak_bytes(self) -> int:
        return torch.cuda.max_memory_allocated(self.device)

    def generator(self, seed: int) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(seed)


def copy_bandwidth(dev, nbytes: int, repeats: int, copies: int = 10) -> dict:
    """Device-to-device copy bandwidth: ``dst.copy_(src)`` of an fp32 tensor of ``nbytes``,
    ``copies`` per timed repeat; 2 x nbytes move per copy (read + write); the median repeat."""
    numel = max(1, int(nbytes) // 4)
    src = torch.empty(numel, dtype=torch.float32, device=dev.device).fill_(1.0)
    dst = torch.empty_like(src)
    try:
        dst.copy_(src)  # warm-up
        gc_was = gc.isenabled()
        gc.disable()
        try:
            times = [dev.elapsed_ms(lambda: dst.copy_(src), copies) / copies for _ in range(repeats)]
        finally:
            if gc_was:
                gc.enable()
    finally:
        del src, dst
        dev.free_cache()
    med = statistics.median(times)
    moved = 2 * numel * 4
    return {"tensor_bytes": numel * 4, "bytes_per_copy": moved, "copies_per_repeat": copies,
            "repeats": repeats, "times_ms": times, "median_ms": med,
            "bytes_per_s": moved / (med * 1e-3), "gbps": moved / (med * 1e-3) / 1e9}


def backend_of(key: str, opt) -> str:
    """The backend the row's last step used: shardgrok's own report, else what torch runs."""
    if key == "adamw-fused":
        return "torch fused"
    if key == "adamw-foreach":
        return "torch foreach"
    if key == "grokadamw-pkg":
        return "grokadamw"
    backend = None
    try:
        backend = opt.get_state_summary().get("backend")
    except Exception:
        pass
    if backend is None:
        backend = getattr(opt, "_last_report", {}).get("backend")
    return "?" if backend is None else str(backend)


def _error_note(prefix: str, e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{prefix}{type(e).__name__}: {msg[0] if msg else ''}"[:200]


def run_row_cuda(key: str, shapes, dtype, args, package_cls, dev, row: dict) -> None:
    """Build row ``key``'s model and optimizer on the device, warm up, time; fill ``row``.
    Everything it allocates is local: it is freed when this returns (or raises)."""
    gen = dev.generator(args.seed)  # every row starts from the same model
    params = []
    for shape in shapes:
        p = torch.empty(shape, dtype=dtype, device=dev.device).normal_(0.0, 0.02, generator=gen)
        g = torch.empty_like(p).normal_(0.0, 1e-3, generator=gen)
        p = torch.nn.Parameter(p)
        p.grad = g
        params.append(p)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt, step = make_stepper(key, params, package_cls)
        # warm-up: --warmup steps (at least 1; the first allocates the state), cut short past a
        # quarter of the time box
        warm, t_start = [], time.perf_counter()
        for _ in range(max(1, args.warmup)):
            warm.append(dev.elapsed_ms(step, 1))
            if time.perf_counter() - t_start > args.max_seconds / 4:
                break
        warm_s = time.perf_counter() - t_start
    fallback = [str(w.message) for w in caught if "reference" in str(w.message).lower()]
    row["backend"] = backend_of(key, opt)
    row["state_dtypes"] = {k: str(d).replace("torch.", "") for k, d in read_state_dtypes(opt, params).items()}
    row["bytes_per_param"] = bytes_per_param(key, params[0].dtype, params[0].grad.dtype,
                                             read_state_dtypes(opt, params) or None)
    row["warmup_steps"] = len(warm)
    if fallback:
        row["note"] = f"fallback: {fallback[0]}"[:200]
    # time box (warm-up included): fewer steps per repeat, then fewer repeats (at least 3)
    est = min(warm[1:] if len(warm) > 1 else warm)
    box = max(args.max_seconds - warm_s, 0.0) * 1e3
    steps, repeats = args.steps, args.repeats
    if est * steps * repeats > box:
        steps = max(1, min(steps, int(box / max(est * repeats, 1e-9))))
        if est * steps * repeats > box:
            repeats = max(min(3, repeats), min(repeats, int(box / max(est * steps, 1e-9))))
    gc_was = gc.isenabled()
    gc.disable()
    try:
        times = [dev.elapsed_ms(step, steps) / steps for _ in range(repeats)]
    except Exception as e:
        row["note"] = _error_note("error while timing: ", e)
        times = []
    finally:
        if gc_was:
            gc.enable()
    row["peak_memory_bytes"] = dev.peak_bytes()
    row["steps_per_repeat"], row["repeats"], row["times_ms"] = steps, repeats, times
    if times:
        row["median_ms"] = statistics.median(times)
        if (steps < args.steps or repeats < args.repeats) and row["note"] is None:
            row["note"] = (f"time-boxed: {repeats} x {steps} of {args.repeats} x {args.steps} "
                           "steps")


def bench_size_cuda(label: str, n: int, count: int, keys: list[str], args, package_cls, dev,
                    copy: dict) -> dict:
    dtype = DTYPES[args.dtype]
    shapes = make_shapes(n, count, args.layout)
    dev.free_cache()
    free, total = dev.mem_get_info()
    est = {k: memory_estimate(k, shapes, dtype) for k in keys}
    info = {"size": label, "params": n, "tensors": count, "layout": args.layout,
            "shapes": describe_shapes(shapes), "largest_tensor": max(math.prod(s) for s in shapes),
            "memory_free_bytes": free, "memory_total_bytes": total, "skipped": None, "results": []}
    print(f"\n== {label}: {n:,} params in {count} tensors ({info['shapes']}), {args.dtype} ==")
    print(f"memory: {free / GiB:.1f} GiB free of {total / GiB:.1f} GiB (torch.cuda.mem_get_info); "
          "needed per row, one row at a time, estimated before allocating:")
    for k in keys:
        e = est[k]
        print(f"  {ALL_OPTIMIZERS[k]:<42} {e['total'] / GiB:6.2f} GiB = params+grads "
              f"{e['model'] / GiB:.2f} + state {e['state'] / GiB:.2f} + temporaries "
              f"{e['temporaries'] / GiB:.2f} + slack {e['slack'] / GiB:.2f}")
    sys.stdout.flush()
    if est[BASELINE]["total"] > free:
        info["skipped"] = (f"size {label} skipped: it does not fit; even {ALL_OPTIMIZERS[BASELINE]} "
                           f"needs {est[BASELINE]['total'] / GiB:.2f} GiB and "
                           f"{free / GiB:.2f} GiB are free")
        print(info["skipped"])
        return info

    rows: dict[str, dict] = {}
    for key in keys:
        row = {"optimizer": key, "label": ALL_OPTIMIZERS[key], "backend": None, "median_ms": None,
               "steps_per_repeat": 0, "repeats": 0, "warmup_steps": 0, "bytes_per_param": None,
               "state_dtypes": None, "bytes_per_s": None, "gbps": None, "fraction_of_copy": None,
               "ratio_to_adamw_fused": None, "memory_estimate_bytes": est[key]["total"],
               "peak_memory_bytes": None, "note": None, "times_ms": []}
        rows[key] = row
        if key == "grokadamw-pkg" and package_cls is None:
            row["note"] = "not installed"
            continue
        dev.free_cache()  # the previous row's model and state are gone
        free_now = dev.mem_get_info()[0]
        if est[key]["total"] > free_now:
            row["note"] = (f"skipped: needs {est[key]['total'] / GiB:.2f} GiB, "
                           f"{free_now / GiB:.2f} GiB free")
            continue
        dev.reset_peak()
        try:
            run_row_cuda(key, shapes, dtype, args, package_cls, dev, row)
        except Exception as e:  # torch.cuda.OutOfMemoryError among others
            row["note"] = _error_note("error: ", e)
        dev.free_cache()  # after the except block: the exception's traceback held the tensors

    for row in rows.values():
        if row["median_ms"] is not None:
            row["bytes_per_s"] = row["bytes_per_param"] * n / (row["median_ms"] * 1e-3)
            row["gbps"] = row["bytes_per_s"] / 1e9
            row["fraction_of_copy"] = row["gbps"] / copy["gbps"]
    base = rows[BASELINE]["median_ms"]
    for row in rows.values():
        if base and row["median_ms"] is not None:
            row["ratio_to_adamw_fused"] = row["median_ms"] / base
    info["results"] = [rows[k] for k in keys]
    print_table_cuda(info["results"])
    return info


def print_table_cuda(rows: list[dict]) -> None:
    head = (f"{'optimizer':<42} {'backend':<13} {'median ms':>10} {'x fused':>8} {'B/param':>8} "
            f"{'GB/s':>8} {'% copy':>7} {'peak GiB':>9} {'steps':>7}  note")
    print(head)
    print("-" * len(head))
    for r in rows:
        steps = f"{r['repeats']}x{r['steps_per_repeat']}" if r["times_ms"] else "-"
        frac = None if r["fraction_of_copy"] is None else 100 * r["fraction_of_copy"]
        peak = None if r["peak_memory_bytes"] is None else r["peak_memory_bytes"] / GiB
        print(f"{r['label']:<42} {r['backend'] or '-':<13} {fmt(r['median_ms'], '10.3f'):>10} "
              f"{fmt(r['ratio_to_adamw_fused'], '8.2f'):>8} {fmt(r['bytes_per_param'], '8.0f'):>8} "
              f"{fmt(r['gbps'], '8.1f'):>8} {fmt(frac, '7.1f'):>7} {fmt(peak, '9.2f'):>9} "
              f"{steps:>7}  {r['note'] or ''}")


def check_targets_cuda(sizes: list[dict], copy: dict, dtype: str) -> list[dict]:
    """The issue's CUDA targets as PASS / FAIL / n/a lines, at the run's 1B-parameter size."""
    at = [s for s in sizes if s["params"] == CUDA_TARGET_PARAMS and s["results"]]
    out = []
    for desc, prefs, kind, limit in CUDA_TARGETS:
        entry = {"target": desc, "kind": kind, "limit": limit, "size": None, "optimizer": None,
                 "backend": None, "value": None, "passed": None, "dtype": dtype}
        if not at:
            entry["line"] = f"n/a   {desc}: no 1B-parameter size timed in this run"
        else:
            size = at[-1]
            by_key = {r["optimizer"]: r for r in size["results"]}
            base = by_key[BASELINE]
            row = next((by_key[k] for k in prefs if k in by_key and by_key[k]["median_ms"] is not None), None)
            entry["size"] = size["size"]
            if row is None or (kind == "ratio" and base["median_ms"] is None):
                entry["line"] = f"n/a   {desc}: not timed in this run"
            else:
                who = f"{row['label']} [{row['backend']}]"
                entry.update(optimizer=row["optimizer"], backend=row["backend"])
                if kind == "ratio":
                    value = row["ratio_to_adamw_fused"]
                    passed = value <= limit
                    detail = (f"{who} {row['median_ms']:.3f} ms vs AdamW fused "
                              f"{base['median_ms']:.3f} ms: {value:.2f}x (need <= {limit:g}x)")
                else:
                    value = row["fraction_of_copy"]
                    passed = value >= limit
                    detail = (f"{who} {row['gbps']:.1f} GB/s at {row['bytes_per_param']:.0f} B/param "
                              f"= {100 * value:.1f}% of the copy bandwidth {copy['gbps']:.1f} GB/s "
                              f"(need >= {100 * limit:.0f}%)")
                entry.update(value=value, passed=passed)
                entry["line"] = f"{'PASS' if passed else 'FAIL'}  {desc}: {detail}"
        if dtype != "fp32":
            entry["line"] += f" [{dtype} run; the targets are stated for fp32]"
        out.append(entry)
    return out


def cuda_kernel_status() -> str:
    """shardgrok's own word on its CUDA kernel (python -m shardgrok.kernels), for the header."""
    try:
        cuda = kernels.status().get("cuda") or {}
    except Exception as e:
        return f"unknown ({type(e).__name__}: {e})"
    if cuda.get("available"):
        return "available" + (f" ({cuda['origin']})" if cuda.get("origin") else "")
    return f"unavailable ({cuda.get('reason') or 'no reason given'})"


def main_cuda(args, parser, argv_list: list[str], argv) -> int:
    if not torch.cuda.is_available():
        why = (f"this torch ({torch.__version__}) is built without CUDA" if torch.version.cuda is None
               else f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU")
        parser.error(f"--device cuda: CUDA is not available: {why}; run it on a machine with a "
                     "GPU, or use --device cpu (or --device auto, which picks cuda only when "
                     "there is one)")
    if args.sizes is None:
        args.sizes = parse_sizes(CUDA_QUICK_SIZES if args.quick else CUDA_DEFAULT_SIZES)
    if args.layout is None:
        args.layout = "transformer"
    if args.steps is None:
        args.steps = 3 if args.quick else 10
    if args.warmup is None:
        args.warmup = 1 if args.quick else 3
    if args.repeats is None:
        args.repeats = 3 if args.quick else 5
    if args.copy_mib is None:
        args.copy_mib = 64 if args.quick else 1024
    for name in ("steps", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    if args.copy_mib <= 0:
        parser.error("--copy-mib must be > 0")
    if args.threads is not None:
        if args.threads < 1:
            parser.error("--threads must be >= 1")
        torch.set_num_threads(args.threads)

    keys = list(CUDA_DEFAULT) if args.only is None else list(args.only)
    if BASELINE not in keys:
        keys.insert(0, BASELINE)
    keys = [k for k in ALL_OPTIMIZERS if k in keys]  # table order

    dev = CudaDevice()
    package_cls = import_grokadamw() if "grokadamw-pkg" in keys else None
    gpu = dev.describe()
    kernel = cuda_kernel_status()
    command = " ".join(shlex.quote(a) for a in [sys.executable, sys.argv[0] if argv is None
                                                else "benchmarks/step.py", *argv_list])
    header = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": command,
        "device": "cuda",
        **gpu,
        "torch": torch.__version__,
        "shardgrok": shardgrok.__version__,
        "grokadamw": getattr(sys.modules.get("grokadamw"), "__version__", None) if package_cls else None,
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "threads": torch.get_num_threads(),
        "cuda_kernel": kernel,
        "dtype": args.dtype, "layout": args.layout,
        "steps": args.steps, "warmup": args.warmup, "repeats": args.repeats,
        "max_seconds": args.max_seconds,
        "bytes_per_param_formula": {"adamw": "2P + G + 2M + 2V", "grokadamw": "2P + 2G + 2M + 2V + 2MU",
                                    "supergrok": "2P + 2G + 2M + 2V + 3MU"},
    }
    print("shardgrok step benchmark (CUDA)")
    print(f"  date:     {header['date']}")
    print(f"  command:  {command}")
    print(f"  torch {header['torch']} (CUDA {gpu['cuda']}), shardgrok {header['shardgrok']}, "
          f"grokadamw {header['grokadamw'] or 'not installed'}, python {header['python']}")
    print(f"  gpu:      {gpu['device_name']} ({gpu['device']}, compute capability "
          f"{gpu['capability']}, {gpu['multiprocessors']} SMs, {gpu['memory_total_bytes'] / GiB:.1f} "
          f"GiB, {gpu['memory_free_bytes_at_start'] / GiB:.1f} GiB free)")
    print(f"  cpu:      {header['cpu']}, threads {header['threads']}")
    print(f"  shardgrok CUDA kernel: {kernel}; each row prints the backend its steps used")
    print(f"  timing:   median over {args.repeats} repeats of a torch.cuda.Event pair around "
          f"{args.steps} consecutive steps, per step, after {args.warmup} warm-up; synchronize "
          f"outside the timed region; one optimizer at a time, time box {args.max_seconds:g} s each")
    sys.stdout.flush()

    t0 = time.perf_counter()
    dev.free_cache()
    copy_bytes = int(args.copy_mib * 1024**2)
    free = dev.mem_get_info()[0]
    if 2 * copy_bytes > free // 2:  # src and dst in at most half of what is free
        copy_bytes = max(4, free // 4)
    copy = copy_bandwidth(dev, copy_bytes, max(5, args.repeats))
    print(f"\ncopy bandwidth: dst.copy_(src) of {copy['tensor_bytes'] / 1024**2:.0f} MiB, "
          f"2 x {copy['tensor_bytes'] / 1e9:.3f} GB moved per copy, median of {copy['repeats']} "
          f"repeats of {copy['copies_per_repeat']} copies: {copy['median_ms']:.3f} ms, "
          f"{copy['gbps']:.1f} GB/s")
    sys.stdout.flush()

    sizes = []
    for label, n, count in args.sizes:
        sizes.append(bench_size_cuda(label, n, count, keys, args, package_cls, dev, copy))
        sys.stdout.flush()
    print("\nB/param: bytes an ideal step moves per parameter, from the element sizes of the "
          "parameter (P), gradient (G) and the state the optimizer holds (M, V, MU): AdamW "
          "2P+G+2M+2V, GrokAdamW 2P+2G+2M+2V+2MU, SuperGrok 2P+2G+2M+2V+3MU. GB/s: B/param x "
          "params / median step time. % copy: that over the copy bandwidth above.")

    targets = check_targets_cuda(sizes, copy, args.dtype)
    print("\ntargets (the issue's, at 1B params; printed, not asserted):")
    for t in targets:
        print(f"  {t['line']}")
    elapsed = time.perf_counter() - t0
    print(f"\n(total {elapsed:.0f} s)")

    if args.json:
        doc = {"header": header, "elapsed_s": elapsed, "copy_bandwidth": copy, "targets": targets,
               "sizes": sizes}
        d = os.path.dirname(os.path.abspath(args.json))
        os.makedirs(d, exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)
        print(f"wrote {args.json}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv_list = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv_list)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda":
        return main_cuda(args, parser, argv_list, argv)
    if args.layout is None:
        args.layout = "even"
    if args.sizes is None:
        args.sizes = parse_sizes(QUICK_SIZES if args.quick else DEFAULT_SIZES)
    if args.steps is None:
        args.steps = 3 if args.quick else 30
    if args.warmup is None:
        args.warmup = 1 if args.quick else 5
    if args.rounds is None:
        args.rounds = 1 if args.quick else 3
    if args.steps < 1:
        build_parser().error("--steps must be >= 1")
    if args.threads is not None:
        if args.threads < 1:
            build_parser().error("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()

    keys = list(OPTIMIZERS) if args.only is None else list(args.only)
    if BASELINE not in keys:
        keys.insert(0, BASELINE)
    keys = [k for k in ALL_OPTIMIZERS if k in keys]  # table order

    package_cls = import_grokadamw() if "grokadamw-pkg" in keys else None
    isa = kernel_isa()  # builds / loads the kernel before any timing
    command = " ".join(shlex.quote(a) for a in [sys.executable, sys.argv[0] if argv is None
                                                else "benchmarks/step.py", *argv_list])
    header = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": command,
        "torch": torch.__version__,
        "shardgrok": shardgrok.__version__,
        "grokadamw": getattr(sys.modules.get("grokadamw"), "__version__", None) if package_cls else None,
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": threads,
        "loadavg_start": loadavg(),
        "kernel_isa": isa,
        "dtype": args.dtype,
        "steps": args.steps, "warmup": args.warmup, "rounds": args.rounds,
        "max_seconds": args.max_seconds,
    }
    print("shardgrok step benchmark")
    print(f"  date:     {header['date']}")
    print(f"  command:  {command}")
    print(f"  torch {header['torch']}, shardgrok {header['shardgrok']}, grokadamw "
          f"{header['grokadamw'] or 'not installed'}, python {header['python']}")
    print(f"  cpu:      {header['cpu']} ({header['cpu_count']} logical CPUs), threads {threads}")
    print(f"  kernel:   {isa}")
    if header["loadavg_start"] is not None:
        load = header["loadavg_start"]
        print(f"  load:     {' '.join(f'{x:.2f}' for x in load)} (1/5/15 min, at start)")
        if load[0] >= 0.5 * (os.cpu_count() or 1):
            print(f"  WARNING:  the machine is busy (1-min load {load[0]:.2f} on {os.cpu_count()} CPUs): "
                  "timings are noisy, with more threads than free cores most of all")
    print(f"  timing:   median of per-step perf_counter over {args.steps} steps after {args.warmup} "
          f"warm-up, {args.rounds} round-robin rounds, time box {args.max_seconds:g} s per optimizer")
    sys.stdout.flush()

    results: dict[str, list[dict]] = {}
    t0 = time.perf_counter()
    for label, n, count in args.sizes:
        rows = bench_size(label, n, count, keys, args, package_cls)
        results[label] = rows
        print_table(label, n, count, args.dtype, rows, make_shapes(n, count, args.layout))
        sys.stdout.flush()

    targets = check_targets(results, args.dtype)
    if targets:
        print("\ntargets:")
        for t in targets:
            print(f"  {t['line']}")
    elapsed = time.perf_counter() - t0
    header["loadavg_end"] = loadavg()
    end_load = (f", load {' '.join(f'{x:.2f}' for x in header['loadavg_end'])} at end"
                if header["loadavg_end"] is not None else "")
    print(f"\n(total {elapsed:.0f} s{end_load})")

    if args.json:
        doc = {"header": header, "elapsed_s": elapsed, "targets": targets,
               "sizes": [{"size": label, "params": n, "tensors": count, "results": results[label]}
                         for label, n, count in args.sizes]}
        d = os.path.dirname(os.path.abspath(args.json))
        os.makedirs(d, exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
