"""Median optimizer-step time on the CPU: shardgrok's GrokAdamW and SuperGrok (kernel and reference
backends) against torch AdamW (foreach, fused) and the reference package ``grokadamw==0.1.2``.

    python benchmarks/step_cpu.py                          # 1M/300 and 10M/100, fp32, 30 steps
    python benchmarks/step_cpu.py --sizes 100k/10,1M/300 --steps 50 --threads 2
    python benchmarks/step_cpu.py --dtype bf16 --only grok-kernel,super-kernel
    python benchmarks/step_cpu.py --quick                  # tiny smoke run (100k/10, 3 steps)
    python benchmarks/step_cpu.py --json results.json

The model is a list of fp32 (or bf16) parameters of the given total size split as evenly as
possible over the given number of tensors (``--layout transformer``: the GPU run's mix of
shapes), each with a random gradient set once (no backward is timed). Every optimizer gets its
own copy. After a few warm-up steps the optimizers are timed round-robin (``--rounds`` rounds,
each a run of consecutive steps per optimizer) so that drift on a shared machine spreads over
all of them; the table reports the median of the per-step ``time.perf_counter()`` differences.
Slow optimizers (the reference paths) are time-boxed: when ``--steps`` steps would take more
than ``--max-seconds``, fewer are timed (at least ``--min-steps``) and the row says so.

Effective GB/s is the nominal bytes per parameter of each step (``bytes_per_param`` in
step_common.py, from the dtypes of the parameters and of the state the optimizer holds)
times the parameter count over the median time: a bandwidth figure, comparable between rows.

``--device`` is where the parameters, gradients and state live; this program only takes
``cpu`` (the default; it is accepted so that command lines naming it keep working). The GPU
run is ``benchmarks/step_cuda.py``, and ``--device cuda`` (or ``auto``) here says so.

Every output records its provenance (step_common.provenance: command line, git commit and
whether the tree was dirty, date, CPU model, thread count): the header lines of the printed
table, and the JSON's ``header``.
"""
from __future__ import annotations

import argparse
import gc
import math
import os
import statistics
import sys
import time

import torch

import step_common as C
from shardgrok import kernels

PROG = "benchmarks/step_cpu.py"
DEFAULT_SIZES = "1M/300,10M/100"
QUICK_SIZES = "100k/10"

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


def parse_device(text: str) -> str:
    if text.strip().lower() == "cpu":
        return "cpu"
    raise argparse.ArgumentTypeError(
        f"{text!r}: this is the CPU run; the GPU run is benchmarks/step_cuda.py "
        "(its --device takes cuda or cuda:N)")


def build_parser() -> argparse.ArgumentParser:
    p = C.build_parser(
        PROG, __doc__, C.OPTIMIZERS, sizes=DEFAULT_SIZES, quick_sizes=QUICK_SIZES, layout="even",
        steps="timed steps per optimizer (default 30; --quick: 3)",
        warmup="untimed warm-up steps (default 5; --quick: 1)",
        quick=f"{QUICK_SIZES}, 3 steps",
        dtype="; a bf16 run times shardgrok and AdamW fused only")
    p.add_argument("--device", type=parse_device, default="cpu",
                   help="where the model and the optimizers live: cpu only (the GPU run is "
                        "benchmarks/step_cuda.py)")
    p.add_argument("--rounds", type=int, default=None,
                   help="round-robin rounds the timed steps are split into (default 3; --quick: 1)")
    p.add_argument("--min-steps", type=int, default=3,
                   help="fewest timed steps under the time box (default 3)")
    return p


# ---------------------------------------------------------------------------------------------
# model and timing

def make_model(n: int, count: int, dtype: torch.dtype, seed: int,
               shapes: list[tuple[int, ...]] | None = None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The parameter values and their (fixed) gradients, shared source for every optimizer."""
    gen = torch.Generator().manual_seed(seed)
    values, grads = [], []
    for shape in shapes if shapes is not None else C.make_shapes(n, count, "even"):
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


def bench_size(label: str, n: int, count: int, keys: list[str], args, package_cls) -> list[dict]:
    dtype = C.DTYPES[args.dtype]
    values, grads = make_model(n, count, dtype, args.seed, C.make_shapes(n, count, args.layout))
    rows: dict[str, dict] = {}
    live: dict[str, dict] = {}

    for key in keys:
        row = {"optimizer": key, "label": C.ALL_OPTIMIZERS[key], "median_ms": None, "steps_timed": 0,
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
            opt, step = C.make_stepper(key, params, package_cls)
            warm, warm_s = C.warm_up(lambda: C.timed_steps(step, 1)[0], args.warmup, args.max_seconds)
            # from the state the optimizer chose (bf16 parameters get fp32 state by default)
            row["bytes_per_param"] = C.bytes_per_param(key, dtype, dtype, C.read_state_dtypes(opt, params))
        except Exception as e:
            row["note"] = C.error_note("error: ", e)
            continue
        est = C.step_estimate(warm)
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
                rows[key]["times_ms"] += [t * 1e3 for t in C.timed_steps(st["step"], block)]
            except Exception as e:
                rows[key]["note"] = C.error_note("error while timing: ", e)
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
    C.set_ratios(rows.values())
    return [rows[k] for k in keys]


# ---------------------------------------------------------------------------------------------
# report

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


def print_table(label: str, n: int, count: int, dtype: str, rows: list[dict],
                shapes: list[tuple[int, ...]] | None = None) -> None:
    desc = C.describe_shapes(shapes if shapes is not None else C.make_shapes(n, count, "even"))
    each = " each" if "matrices" not in desc else ""
    print(f"\n== {label}: {n:,} params in {count} tensors ({desc}{each}), {dtype} ==")
    head = f"{'optimizer':<32} {'median ms':>10} {'x fused':>8} {'B/param':>8} {'GB/s':>7} {'steps':>6}  note"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['label']:<32} {C.fmt(r['median_ms'], '10.3f'):>10} "
              f"{C.fmt(r['ratio_to_adamw_fused'], '8.2f'):>8} {C.fmt(r['bytes_per_param'], '8.0f'):>8} "
              f"{C.fmt(r['gbps'], '7.2f'):>7} {r['steps_timed'] or '-':>6}  {r['note'] or ''}")


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
        names = C.OPTIMIZERS
        if a is None or b is None:
            missing = [names[k] for k, v in ((num, a), (den, b)) if v is None]
            entry["line"] = f"{desc}: n/a ({', '.join(missing)} not timed)"
        else:
            ratio = a / b
            entry.update(met=ratio <= limit, ratio=ratio)
            if limit < 1:
                detail = (f"{names[num]} {a:.3f} ms vs {names[den]} {b:.3f} ms: "
                          f"{b / a:.1f}x faster (need >= {1 / limit:.0f}x)")
            else:
                detail = (f"{names[num]} {a:.3f} ms vs {names[den]} {b:.3f} ms: "
                          f"{ratio:.2f}x (need <= {limit:g}x)")
            entry["line"] = f"{desc}: {'met' if entry['met'] else 'NOT met'} ({detail})"
        if dtype != "fp32":
            entry["line"] += f" [{dtype} run; the targets are stated for fp32]"
        out.append(entry)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    C.resolve_args(args, parser, {"layout": ("even", "even"), "sizes": (DEFAULT_SIZES, QUICK_SIZES),
                                  "steps": (30, 3), "warmup": (5, 1), "rounds": (3, 1)})
    keys = C.row_keys(args.only, C.OPTIMIZERS)
    package_cls = C.import_grokadamw() if "grokadamw-pkg" in keys else None
    isa = kernel_isa()  # builds / loads the kernel before any timing
    prov = C.provenance(PROG, argv)
    header = {
        **prov,
        **C.versions(package_cls),
        "device": "cpu",
        "loadavg_start": loadavg(),
        "kernel_isa": isa,
        "dtype": args.dtype, "layout": args.layout,
        "steps": args.steps, "warmup": args.warmup, "rounds": args.rounds,
        "max_seconds": args.max_seconds,
    }
    print("shardgrok step benchmark")
    print("\n".join(C.provenance_lines(prov)))
    print(f"  torch {header['torch']}, shardgrok {header['shardgrok']}, grokadamw "
          f"{header['grokadamw'] or 'not installed'}, python {header['python']}")
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
        print_table(label, n, count, args.dtype, rows, C.make_shapes(n, count, args.layout))
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
        C.write_json(args.json, {
            "header": header, "elapsed_s": elapsed, "targets": targets,
            "sizes": [{"size": label, "params": n, "tensors": count, "results": results[label]}
                      for label, n, count in args.sizes]})
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
