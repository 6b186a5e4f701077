"""How fast do optimizers grok modular arithmetic? Steps and wall time to 95% and 99% validation
accuracy, over operations, seeds and optimizer settings, in parallel processes.

    python benchmarks/grokking.py --op "x*y" --op "x+y" --op "x-y" --seeds 0,1,2 \\
        --opt adamw --opt "adam+ema" --opt grokadamw --opt "grokadamw:gamma=0,gradient_clipping=0" \\
        --opt supergrok --opt "supergrok+meta:meta_every=100" --json out.json --png out.png

The task and model are the demo's (shardgrok/demo/task.py): all pairs ``[x, op, y, eq]`` of
residues mod ``--p`` labelled by the formula (``/`` is the modular inverse; pairs dividing by 0
are left out), ``--train-fraction`` of them for training, the 2-layer transformer. Every run of
one (operation, seed) starts from the same initial weights and sees the same batches.

Optimizers, by name, with keyword overrides after a colon (Python literals:
``"grokadamw:lamb=5,betas=(0.9,0.99)"``): the specs of shardgrok/demo/recipes.py, which the demo
uses too (adamw, adam, adam+ema, grokadamw, supergrok, supergrok+meta; a bare name is the
optimizer at its own defaults). ``lr``, ``betas`` and ``weight_decay`` default to ``--lr``,
``--betas``, ``--weight-decay``.

The JSON holds the configuration, every run (its curve: step, validation accuracy and loss at
each evaluation, training loss and accuracy averaged over the batches since the previous one,
GrokAdamW's and SuperGrok's alpha, clipping coefficient and gate share at the last step; steps
and seconds to each target) and per (operation, optimizer) the medians over seeds, and its
``provenance`` (step_common.provenance: command line, git commit and whether the tree was
dirty, date, CPU model, torch threads per run). ``--png`` draws validation accuracy against step
(needs matplotlib: ``pip install -e .[demo]``), with the same provenance in the image's
``Description`` text field.
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
from typing import Any

import torch

import step_common
from shardgrok.demo.recipes import NAMES, parse_spec

SCHEMA = "shardgrok.grokking/1"
PROG = "benchmarks/grokking.py"


# ---------------------------------------------------------------------------- one run
def run_one(job: dict[str, Any]) -> dict[str, Any]:
    """One (operation, seed, optimizer) run, in a worker process."""
    from shardgrok.demo.task import DemoConfig, make_data, make_model, train_one

    torch.set_num_threads(job["threads"])
    cfg = DemoConfig(**job["config"], optimizers=("adamw",), progress=False)
    name, overrides = parse_spec(job["spec"])
    data = make_data(cfg.p, cfg.train_fraction, cfg.seed, cfg.op)
    init = {k: v.clone() for k, v in make_model(cfg).state_dict().items()}
    t0 = time.perf_counter()
    try:
        res = train_one(job["spec"], cfg, data, init, log=lambda s: None,
                        targets=tuple(job["targets"]))
        error = None
    except Exception as e:  # a diverging or refused setting is a result too
        res, error = {}, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return {
        "op": cfg.op, "seed": cfg.seed, "spec": job["spec"], "optimizer": name,
        "overrides": overrides, "error": error,
        "steps_to": {str(t): res.get("reached", {}).get(t) for t in job["targets"]},
        "seconds_to": {str(t): res.get("seconds_to", {}).get(t) for t in job["targets"]},
        "steps_run": res.get("steps_run"), "wall_time_s": time.perf_counter() - t0,
        "final_val_acc": res.get("final_val_acc"), "final_train_loss": res.get("final_train_loss"),
        "curve": res.get("history", []),
    }


def _median(values: list) -> float | None:
    """Median with runs that never reached the target counted as infinitely slow (None when
    more than half did not reach it)."""
    if not values:
        return None
    v = sorted(math.inf if x is None else x for x in values)
    m = statistics.median(v)
    return None if math.isinf(m) else m


def summarise(runs: list[dict], targets: list[float]) -> list[dict]:
    rows = []
    keys = sorted({(r["op"], r["spec"]) for r in runs}, key=lambda k: (k[0], k[1]))
    for op, spec in keys:
        mine = [r for r in runs if r["op"] == op and r["spec"] == spec]
        row = {"op": op, "spec": spec, "seeds": len(mine),
               "errors": sum(r["error"] is not None for r in mine)}
        for t in targets:
            row[f"median_steps_to_{t}"] = _median([r["steps_to"][str(t)] for r in mine])
            row[f"median_seconds_to_{t}"] = _median([r["seconds_to"][str(t)] for r in mine])
            row[f"reached_{t}"] = sum(r["steps_to"][str(t)] is not None for r in mine)
        rows.append(row)
    return rows


def plot(result: dict, path: str, prov: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ops = list(dict.fromkeys(r["op"] for r in result["runs"]))
    specs = list(dict.fromkeys(r["spec"] for r in result["runs"]))
    rows = -(-len(specs) // 2)
    fig, axes = plt.subplots(1, len(ops), figsize=(5 * len(ops), 4 + 0.18 * rows), squeeze=False)
    colors = {s: f"C{i % 10}" for i, s in enumerate(specs)}
    for ax, op in zip(axes[0], ops):
        for r in result["runs"]:
            if r["op"] != op or not r["curve"]:
                continue
            ax.plot([c["step"] for c in r["curve"]], [c["val_acc"] for c in r["curve"]],
                    color=colors[r["spec"]], alpha=0.7, lw=1,
                    label=r["spec"] if r["seed"] == min(x["seed"] for x in result["runs"]) else None)
        for t in result["config"]["targets"]:
            ax.axhline(t, color="grey", lw=0.5, ls=":")
        ax.set_title(f"{op} mod {result['config']['p']}")
        ax.set_xlabel("step")
        ax.set_ylabel("validation accuracy")
        ax.set_ylim(0, 1.02)
    handles, names = axes[0][0].get_legend_handles_labels()
    rows = -(-len(names) // 2)   # the legend below the panels, two columns
    fig.legend(handles, names, fontsize=7, loc="lower center", ncol=2, frameon=False)
    fig.tight_layout(rect=(0, 0.035 * rows + 0.02, 1, 1))
    fig.savefig(path, dpi=120, metadata={"Description": json.dumps(prov)})


def markdown(runs: list[dict], targets: list[float], versus: list[str] | None = None,
             only: list[str] | None = None) -> str:
    """The tables of docs/grokking.md from result files' runs: per operation and spec the
    medians over seeds of steps and seconds to each target, how many seeds reached it, the
    median final validation accuracy and wall time per step (of the whole run); with ``versus``, the ratio of each spec's median steps and
    seconds to the first target over those of each listed spec (>1: the listed spec is slower);
    with ``only``, just those specs' rows."""
    every = summarise(runs, targets)
    by = {(r["op"], r["spec"]): r for r in every}
    rows = [r for r in every if not only or r["spec"] in only]
    def fmt(x, d=0):
        return "-" if x is None else f"{x:,.{d}f}"
    head = ["operation", "optimizer", "seeds"]
    for t in targets:
        head += [f"steps to {t:.0%}", f"s to {t:.0%}", f"reached {t:.0%}"]
    head += ["final val acc", "ms per step"]
    t0 = targets[0]
    for v in versus or []:
        head.append(f"{v}: steps / s ratio")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        mine = [x for x in runs if x["op"] == r["op"] and x["spec"] == r["spec"]]
        acc = statistics.median(x["final_val_acc"] or 0.0 for x in mine)
        cells = [r["op"], f"`{r['spec']}`", str(r["seeds"])]
        for t in targets:
            cells += [fmt(r[f"median_steps_to_{t}"]), fmt(r[f"median_seconds_to_{t}"]),
                      f"{r[f'reached_{t}']}/{r['seeds']}"]
        errors = [x["error"] for x in mine if x["error"]]
        cells.append(f"error ({errors[0]})" if len(errors) == len(mine) else f"{100 * acc:.1f}%")
        per_step = [1000 * x["wall_time_s"] / x["steps_run"] for x in mine if x.get("steps_run")]
        cells.append(f"{statistics.median(per_step):.0f}" if per_step else "-")
        for v in versus or []:
            o = by.get((r["op"], v))
            a, b = r[f"median_steps_to_{t0}"], o and o[f"median_steps_to_{t0}"]
            sa, sb = r[f"median_seconds_to_{t0}"], o and o[f"median_seconds_to_{t0}"]
            if a and b and sa and sb:
                cells.append(f"{b / a:.2f}x / {sb / sa:.2f}x")
            else:
                cells.append("-" if not a else f"{v}: median not reached")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired(runs: list[dict], pairs: list[list[str]], target: float) -> str:
    """``(SPEC, BASE)`` pairs: per operation, the ratio of SPEC's steps to ``target`` over BASE's
    for each seed both ran (the same initial weights and batches), and their median: a paired
    comparison, which a ratio of medians is not. A seed where either did not reach the target
    is listed, not counted."""
    head = ["operation", "optimizer", "against", "per-seed steps ratio", "median ratio"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    key = str(target)
    for spec, base in pairs:
        for op in sorted({r["op"] for r in runs}):
            of = {s: {r["seed"]: r["steps_to"].get(key) for r in runs if r["op"] == op and r["spec"] == s}
                  for s in (spec, base)}
            ratios, cells = [], []
            for seed in sorted(set(of[spec]) & set(of[base])):
                a, b = of[spec][seed], of[base][seed]
                if a and b:
                    ratios.append(a / b)
                    cells.append(f"{seed}: {a}/{b} = {a / b:.2f}")
                else:
                    cells.append(f"{seed}: not reached")
            med = f"{statistics.median(ratios):.3f}" if ratios else "-"
            lines.append(f"| {op} | `{spec}` | `{base}` | {'; '.join(cells)} | {med} |")
    return "\n".join(lines)


def diagnostics(runs: list[dict], only: list[str] | None = None) -> str:
    """What GrokAdamW and SuperGrok decided, from the curves: per operation and spec the median
    over seeds of the alpha and clipping coefficient at the last evaluation and their smallest
    values over the run, the training loss and accuracy at the end."""
    keys = sorted({(r["op"], r["spec"]) for r in runs if not only or r["spec"] in only})
    head = ["operation", "optimizer", "alpha at the end", "smallest alpha",
            "clip coefficient at the end", "smallest clip coefficient", "training loss at the end",
            "training accuracy at the end"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    med = lambda xs: statistics.median(xs) if xs else None  # noqa: E731
    for op, spec in keys:
        curves = [r["curve"] for r in runs if r["op"] == op and r["spec"] == spec and r["curve"]]
        tagged = [[c for c in cv if "alpha" in c] for cv in curves]
        tagged = [t for t in tagged if t]
        if not tagged:
            continue
        vals = [med([t[-1]["alpha"] for t in tagged]), med([min(c["alpha"] for c in t) for t in tagged]),
                med([t[-1]["clip_coef"] for t in tagged]),
                med([min(c["clip_coef"] for c in t) for t in tagged]),
                med([cv[-1]["train_loss"] for cv in curves if cv[-1]["train_loss"] is not None]),
                med([cv[-1]["train_acc"] for cv in curves if cv[-1]["train_acc"] is not None])]
        cells = [op, f"`{spec}`"] + ["-" if v is None else f"{v:.3g}" for v in vals]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report(paths: list[str], versus: list[str] | None, only: list[str] | None,
           png: str | None, diag: bool = False, pool_ops: bool = False,
           argv: list[str] | None = None, pairs: list[list[str]] | None = None) -> int:
    """``--report``: the markdown tables (and plot) of result files, without training."""
    runs, targets, config = [], None, None
    for path in paths:
        with open(path) as f:
            d = json.load(f)
        if d.get("schema") != SCHEMA:
            raise SystemExit(f"--report {path}: not a {SCHEMA} file (schema {d.get('schema')!r})")
        runs += d["runs"]
        targets = targets or d["config"]["targets"]
        config = config or d["config"]
    if pool_ops:   # one row per spec over every operation and seed
        runs = [{**r, "op": "all"} for r in runs]
    known = {r["spec"] for r in runs}
    named = [s for p in pairs or [] for s in p]
    for spec in (versus or []) + (only or []) + named:
        if spec not in known:
            raise SystemExit(f"--report: no run of {spec!r} in {', '.join(paths)}")
    if pairs:
        print(paired(runs, pairs, targets[0]))
        return 0
    print(diagnostics(runs, only) if diag else markdown(runs, targets, versus, only))
    if png:
        plot({"runs": runs, "config": config}, png, step_common.provenance(PROG, argv))
        print(f"plot: {png}")
    return 0


# ---------------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    from shardgrok.demo.task import DemoConfig
    d = DemoConfig()
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--op", action="append", help='a formula in x and y mod p, e.g. "x*y", "x/y" '
                    '(repeatable; default x*y)')
    ap.add_argument("--p", type=int, default=d.p, help="the modulus (%(default)s)")
    ap.add_argument("--seeds", default="0", help="comma-separated seeds (%(default)s)")
    ap.add_argument("--opt", action="append", help="an optimizer spec, name[:key=value,...] "
                    f"(repeatable; names: {', '.join(NAMES)}; default: each name at its defaults)")
    ap.add_argument("--steps", type=int, default=4000, help="step budget per run (%(default)s)")
    ap.add_argument("--targets", default="0.95,0.99", help="validation accuracies (%(default)s)")
    ap.add_argument("--lr", type=float, default=d.lr)
    ap.add_argument("--betas", type=float, nargs=2, default=d.betas)
    ap.add_argument("--weight-decay", type=float, default=d.weight_decay,
                    help="default weight decay of every optimizer (%(default)s, Grokfast's)")
    ap.add_argument("--lr-warmup", type=int, default=d.lr_warmup)
    ap.add_argument("--batch-size", type=int, default=d.batch_size)
    ap.add_argument("--eval-every", type=int, default=d.eval_every)
    ap.add_argument("--train-fraction", type=float, default=d.train_fraction)
    ap.add_argument("--width", type=int, default=d.width)
    ap.add_argument("--heads", type=int, default=d.heads)
    ap.add_argument("--jobs", type=int, default=max(1, (os.cpu_count() or 1)),
                    help="parallel processes (%(default)s)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process (%(default)s)")
    ap.add_argument("--json", metavar="PATH", help="write the results here")
    ap.add_argument("--png", metavar="PATH", help="plot validation accuracy against step here")
    ap.add_argument("--quiet", action="store_true", help="no per-run lines")
    ap.add_argument("--report", nargs="+", metavar="JSON",
                    help="no training: print the markdown tables of these result files (their "
                         "runs pooled; with --png, their plot)")
    ap.add_argument("--versus", action="append", metavar="SPEC",
                    help="with --report: a column of the ratio of this spec's median steps and "
                         "seconds to the first target over each row's (repeatable)")
    ap.add_argument("--paired", action="append", nargs=2, metavar=("SPEC", "BASE"),
                    help="with --report: per operation, SPEC's steps to the first target over "
                         "BASE's for each seed, and their median (repeatable)")
    ap.add_argument("--only", action="append", metavar="SPEC",
                    help="with --report: only this spec's rows (repeatable)")
    ap.add_argument("--pool-ops", action="store_true",
                    help="with --report: medians over every operation and seed together")
    ap.add_argument("--diagnostics", action="store_true",
                    help="with --report: GrokAdamW's and SuperGrok's alpha and clipping "
                         "coefficient from the curves, instead of the steps")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.report:
        return report(args.report, args.versus, args.only, args.png, args.diagnostics,
                      args.pool_ops, argv, args.paired)
    from shardgrok.demo.ops import parse_op
    ops = args.op or ["x*y"]
    specs = args.opt or list(NAMES)
    try:
        for op in ops:
            parse_op(op, args.p)
        for spec in specs:
            parse_spec(spec)
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
        targets = sorted(float(t) for t in args.targets.split(",") if t.strip())
    except ValueError as e:
        ap.error(str(e))
    if not seeds or not targets or not all(0 < t <= 1 for t in targets):
        ap.error("--seeds and --targets need at least one value each; targets in (0, 1]")
    for name in ("steps", "jobs", "threads", "eval_every"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    base = dict(p=args.p, steps=args.steps, lr=args.lr, betas=tuple(args.betas),
                weight_decay=args.weight_decay, lr_warmup=args.lr_warmup,
                batch_size=args.batch_size, eval_every=args.eval_every,
                train_fraction=args.train_fraction, width=args.width, heads=args.heads,
                threads=None)
    jobs = [{"config": {**base, "op": op, "seed": seed}, "spec": spec, "targets": targets,
             "threads": args.threads}
            for op in ops for seed in seeds for spec in specs]
    prov = step_common.provenance(PROG, argv, threads=args.threads)
    t0 = time.perf_counter()
    runs = []
    ctx = mp.get_context("spawn")  # fresh interpreters: no torch thread state inherited
    with ctx.Pool(min(args.jobs, len(jobs))) as pool:
        for r in pool.imap_unordered(run_one, jobs):
            runs.append(r)
            if not args.quiet:
                reach = ", ".join(f"{float(t):.0%}: {r['steps_to'][t] if r['steps_to'][t] is not None else '-'}"
                                  for t in r["steps_to"])
                print(f"[{len(runs)}/{len(jobs)}] {r['op']} seed {r['seed']} {r['spec']}: {reach}"
                      f"  ({r['wall_time_s']:.0f} s){'  ' + r['error'] if r['error'] else ''}",
                      flush=True)
    runs.sort(key=lambda r: (ops.index(r["op"]), r["seed"], specs.index(r["spec"])))
    result = {"schema": SCHEMA,
              "command": prov["command"],
              "config": {**base, "ops": ops, "seeds": seeds, "specs": specs, "targets": targets,
                         "jobs": args.jobs, "threads_per_job": args.threads},
              "machine": {"torch": torch.__version__, "python": platform.python_version(),
                          "cpus": os.cpu_count()},
              "provenance": prov,
              "wall_time_s": time.perf_counter() - t0,
              "runs": runs, "summary": summarise(runs, targets)}
    print(f"\n{'op':<8} {'optimizer':<44} " + " ".join(
        f"{'steps ' + format(t, '.0%'):>10} {'s ' + format(t, '.0%'):>8}" for t in targets))
    for row in result["summary"]:
        cells = []
        for t in targets:
            st, sec = row[f"median_steps_to_{t}"], row[f"median_seconds_to_{t}"]
            cells.append(f"{'-' if st is None else int(st):>10} {'-' if sec is None else f'{sec:.0f}':>8}")
        print(f"{row['op']:<8} {row['spec']:<44} " + " ".join(cells))
    if args.json:
        step_common.write_json(args.json, result)
        print(f"JSON: {args.json}")
    if args.png:
        try:
            plot(result, args.png, prov)
            print(f"plot: {args.png}")
        except ImportError:
            print("plot skipped: matplotlib is not installed (pip install -e .[demo])",
                  file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
