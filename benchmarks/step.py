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

Effective GB/s is the nominal bytes per parameter of each step (BYTES_PER_PARAM below) times the
parameter count over the median time: a bandwidth figure, comparable between rows.
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
ALIASES = {
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
           "super-ref"}

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


# ---------------------------------------------------------------------------------------------
# arguments

def parse_count(text: str) -> int:
    """'100k' -> 100_000, '1M' -> 1_000_000, '1.5M', '2G', '12345'."""
    t = text.strip()
    mult = {"k": 10**3, "m": 10**6, "g": 10**9}.get(t[-1:].lower(), 1)
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
        if key not in OPTIMIZERS:
            raise argparse.ArgumentTypeError(
                f"unknown optimizer {name!r}; choose from {', '.join(OPTIMIZERS)}")
        if key not in keys:
            keys.append(key)
    return keys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="benchmarks/step.py", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="optimizers (--only): " + ", ".join(OPTIMIZERS))
    p.add_argument("--sizes", type=parse_sizes, default=None,
                   help=f"comma list of PARAMS/TENSORS (default {DEFAULT_SIZES}; --quick: {QUICK_SIZES})")
    p.add_argument("--steps", type=int, default=None, help="timed steps per optimizer (default 30; --quick: 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed warm-up steps (default 5; --quick: 1)")
    p.add_argument("--rounds", type=int, default=None,
                   help="round-robin rounds the timed steps are split into (default 3; --quick: 1)")
    p.add_argument("--max-seconds", type=float, default=15.0,
                   help="time box per optimizer and size, warm-up included; a slower optimizer "
                        "times fewer steps (at least --min-steps) (default 15)")
    p.add_argument("--min-steps", type=int, default=3, help="fewest timed steps under the time box (default 3)")
    p.add_argument("--threads", type=int, default=None,
                   help=f"torch.set_num_threads (default torch.get_num_threads() = {torch.get_num_threads()})")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                   help="parameter dtype (default fp32); bf16 runs shardgrok and AdamW fused only")
    p.add_argument("--only", type=parse_only, default=None,
                   help="comma list of optimizers to run; AdamW fused is added as the baseline of the ratios")
    p.add_argument("--quick", action="store_true", help="tiny smoke run (100k/10, 3 steps)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="PATH", default=None, help="also write the results as JSON")
    return p


# ---------------------------------------------------------------------------------------------
# model and optimizers

def split_sizes(n: int, count: int) -> list[int]:
    base, extra = divmod(n, count)
    return [base + (1 if i < extra else 0) for i in range(count)]


def make_model(n: int, count: int, dtype: torch.dtype, seed: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The parameter values and their (fixed) gradients, shared source for every optimizer."""
    gen = torch.Generator().manual_seed(seed)
    values, grads = [], []
    for size in split_sizes(n, count):
        values.append((torch.randn(size, generator=gen) * 0.02).to(dtype))
        grads.append((torch.randn(size, generator=gen) * 1e-3).to(dtype))
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
    if key in ("grok-kernel", "grok-ref"):
        opt = shardgrok.GrokAdamW(params, lr=1e-3, backend="kernel" if key == "grok-kernel" else "reference")
        return opt, opt.step
    if key in ("super-kernel", "super-kernel-trained", "super-ref"):
        # warmup_steps=0: the cosine gate is live from the first step, as after warm-up
        opt = shardgrok.SuperGrok(params, lr=1e-3, warmup_steps=0,
                                  backend="reference" if key == "super-ref" else "kernel")
        if key == "super-kernel-trained":
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
    values, grads = make_model(n, count, dtype, args.seed)
    rows: dict[str, dict] = {}
    live: dict[str, dict] = {}

    for key in keys:
        row = {"optimizer": key, "label": OPTIMIZERS[key], "median_ms": None, "steps_timed": 0,
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

    scale = torch.empty((), dtype=dtype).element_size() / 4
    for key, row in rows.items():
        if row["times_ms"]:
            row["steps_timed"] = len(row["times_ms"])
            row["median_ms"] = statistics.median(row["times_ms"])
            row["bytes_per_param"] = BYTES_PER_PARAM[key] * scale
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


def print_table(label: str, n: int, count: int, dtype: str, rows: list[dict]) -> None:
    sizes = split_sizes(n, count)
    per = f"{sizes[0]}" if sizes[0] == sizes[-1] else f"{sizes[-1]}-{sizes[0]}"
    print(f"\n== {label}: {n:,} params in {count} tensors ({per} each), {dtype} ==")
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


def main(argv: list[str] | None = None) -> int:
    argv_list = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv_list)
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
    keys = [k for k in OPTIMIZERS if k in keys]  # table order

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
        print_table(label, n, count, args.dtype, rows)
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
