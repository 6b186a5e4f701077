"""How fast do optimizers grok modular arithmetic? Steps and wall time to 95% and 99% test
accuracy, over operations, seeds and optimizer settings, in parallel processes.

    python benchmarks/grokking.py --op "x*y" --op "x+y" --op "x-y" --seeds 0,1,2 \\
        --opt adamw --opt "adam+ema" --opt grokadamw --opt "grokadamw:gamma=0,gradient_clipping=0" \\
        --opt supergrok --opt "supergrok+meta:meta_every=100" --json out.json --png out.png

The task and model are the demo's (shardgrok/demo/task.py): every tuple of residues mod ``--p``
as ``[x, op, y, eq]`` (``[a, op, b, op, ..., eq]`` for a formula in more letters) labelled by
the formula (``/`` is the modular inverse; tuples dividing by 0 are left out), split at random
into three disjoint parts: ``--train-fraction`` for training, ``--val-fraction`` for validation
(the grokking signal's validation loss and SuperGrok's meta-step read it, nothing is scored on
it) and the rest for test (every accuracy, loss and step-to-target this reports). Every run of
one (operation, seed) starts from the same initial weights and sees the same batches.

A run stops once it reaches every target, or with ``--to-budget`` trains the whole budget and
records the lowest test accuracy after first reaching each target (did it stay there?).

``--json`` is written after every finished run, and a command given an existing file resumes
it: runs already there (same operation, seed and spec) are kept, the rest are run; the settings
that make runs comparable (everything but the lists of operations, seeds and specs, ``--jobs``
and the output paths) must match the file's. Each run records the invocation (``session``) it
ran in, so wall times are compared only within one set of runs measured side by side.

Optimizers, by name, with keyword overrides after a colon (Python literals:
``"grokadamw:lamb=5,betas=(0.9,0.99)"``): the specs of shardgrok/demo/recipes.py, which the demo
uses too (adamw, adam, adam+ema, grokadamw, supergrok, supergrok+meta; a bare name is the
optimizer at its own defaults). ``lr``, ``betas`` and ``weight_decay`` default to ``--lr``,
``--betas``, ``--weight-decay``.

The JSON holds the configuration, every run (its curve: step, test accuracy and loss and
validation accuracy and loss at each evaluation, training loss and accuracy averaged over the batches since the previous one,
GrokAdamW's and SuperGrok's alpha, clipping coefficient and gate share at the last step; steps
and seconds to each target) and per (operation, optimizer) the medians over seeds, and the
``provenance`` of each session (step_common.provenance: command line, git commit and whether
the tree was dirty, date, CPU model, torch threads per run). ``--png`` draws test accuracy
against step
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

SCHEMA = "shardgrok.grokking/2"
OLD_SCHEMA = "shardgrok.grokking/1"   # scored on the validation split (no test split): read only
# the settings a resumed file must share with the command (the rest: which runs, and how)
COMPARABLE = ("p", "steps", "lr", "betas", "weight_decay", "lr_warmup", "batch_size",
              "eval_every", "train_fraction", "val_fraction", "width", "heads", "stop_at_target",
              "targets", "threads_per_job")
PROG = "benchmarks/grokking.py"


# ---------------------------------------------------------------------------- one run
def run_one(job: dict[str, Any]) -> dict[str, Any]:
    """One (operation, seed, optimizer) run, in a worker process."""
    from shardgrok.demo.task import DemoConfig, make_data, make_model, train_one

    torch.set_num_threads(job["threads"])
    cfg = DemoConfig(**job["config"], optimizers=("adamw",), progress=False)
    name, overrides = parse_spec(job["spec"])
    data = make_data(cfg.p, cfg.train_fraction, cfg.seed, cfg.op, cfg.val_fraction)
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
        "lowest_after": {str(t): res.get("lowest_after", {}).get(t) for t in job["targets"]},
        "steps_run": res.get("steps_run"), "wall_time_s": time.perf_counter() - t0,
        "final_test_acc": res.get("final_test_acc"), "final_train_loss": res.get("final_train_loss"),
        "session": job["session"], "curve": res.get("history", []),
    }


def _median(values: list) -> float | None:
    """Median with runs that never reached the target counted as infinitely slow (None when
    more than half did not reach it)."""
    if not values:
        return None
    v = sorted(math.inf if x is None else x for x in values)
    m = statistics.median(v)
    return None if math.isinf(m) else m


def _spread(values: list) -> str:
    """``median (min-max)`` of steps to a target over seeds, ``never`` for a run that did not
    reach it (counted as the slowest)."""
    if not values:
        return "-"
    v = sorted(math.inf if x is None else x for x in values)
    fmt = lambda x: "never" if math.isinf(x) else f"{x:,.0f}"  # noqa: E731
    m = statistics.median(v)
    if len(v) == 1 or v[0] == v[-1]:
        return fmt(m)
    return f"{fmt(m)} ({fmt(v[0])}-{fmt(v[-1])})"


def held(run: dict, target: float) -> bool:
    """Whether a run reached ``target`` and its test accuracy never fell below it again up to
    the budget (``--to-budget`` runs record the lowest accuracy after reaching it)."""
    return (run["steps_to"][str(target)] is not None
            and (run.get("lowest_after") or {}).get(str(target), 0) >= target)


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
            # of those that reached it, how many never fell below it again (a run stopped at its
            # last target has its lowest accuracy after this one up to that stop); None for
            # files from before the harness recorded it
            row[f"held_{t}"] = (sum(held(r, t) for r in mine)
                                if all("lowest_after" in r for r in mine) else None)
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
            ax.plot([c["step"] for c in r["curve"]], [c[ACC] for c in r["curve"]],
                    color=colors[r["spec"]], alpha=0.7, lw=1,
                    label=r["spec"] if r["seed"] == min(x["seed"] for x in result["runs"]) else None)
        for t in result["config"]["targets"]:
            ax.axhline(t, color="grey", lw=0.5, ls=":")
        ax.set_title(f"{op} mod {result['config']['p']}")
        ax.set_xlabel("step")
        ax.set_ylabel("test accuracy")
        ax.set_ylim(0, 1.02)
    handles, names = axes[0][0].get_legend_handles_labels()
    rows = -(-len(names) // 2)   # the legend below the panels, two columns
    fig.legend(handles, names, fontsize=7, loc="lower center", ncol=2, frameon=False)
    fig.tight_layout(rect=(0, 0.035 * rows + 0.02, 1, 1))
    fig.savefig(path, dpi=120, metadata={"Description": json.dumps(prov)})


ACC = "test_acc"   # the curves' scored accuracy (read_runs maps the old files' onto it)


def same_run_set(a: list[dict], b: list[dict]) -> bool:
    """Whether two rows' wall times may be compared: every run of both from one file and one
    session (one invocation, its runs interleaved on the same machine)."""
    where = {(r.get("file"), r.get("session")) for r in a + b}
    return len(where) == 1


def markdown(runs: list[dict], targets: list[float], versus: list[str] | None = None,
             only: list[str] | None = None, split: str = "test") -> str:
    """The tables of docs/grokking.md from result files' runs: per operation and spec, over
    seeds, the median (min-max) steps to each target, how many runs reached it and how many of
    those stayed at or above it, the median (min-max) test accuracy at the end, the median wall
    time per step and seconds to the first target; with ``versus``, the ratio of each listed
    spec's median steps to the first target over the row's (>1: the listed spec is slower), and
    of their seconds where both rows were measured in one run set (:func:`same_run_set`);
    with ``only``, just those specs' rows. ``split`` names the accuracy's split in the header."""
    every = summarise(runs, targets)
    by = {(r["op"], r["spec"]): r for r in every}
    rows = [r for r in every if not only or r["spec"] in only]
    held = all(r[f"held_{t}"] is not None for r in rows for t in targets)
    head = ["operation", "optimizer", "seeds"]
    for t in targets:
        head += [f"steps to {t:.0%}", f"reached / held {t:.0%}" if held else f"reached {t:.0%}"]
    head += [f"{split} acc at the last evaluation", "ms per step", f"s to {targets[0]:.0%}"]
    t0 = targets[0]
    for v in versus or []:
        head.append(f"{v}: steps / s ratio")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    of = lambda op, spec: [x for x in runs if x["op"] == op and x["spec"] == spec]  # noqa: E731
    for r in rows:
        mine = of(r["op"], r["spec"])
        cells = [f"`{r['op']}`", f"`{r['spec']}`", str(r["seeds"])]
        for t in targets:
            cells += [_spread([x["steps_to"][str(t)] for x in mine]),
                      f"{r[f'reached_{t}']} / {r[f'held_{t}']}" if held else str(r[f"reached_{t}"])]
        errors = [x["error"] for x in mine if x["error"]]
        accs = sorted(100 * (x["final_test_acc"] or 0.0) for x in mine)
        acc = f"{statistics.median(accs):.1f}%" + (
            f" ({accs[0]:.1f}-{accs[-1]:.1f})" if accs and accs[0] != accs[-1] else "")
        cells.append(f"error ({errors[0]})" if len(errors) == len(mine) else acc)
        per_step = [1000 * x["wall_time_s"] / x["steps_run"] for x in mine if x.get("steps_run")]
        cells.append(f"{statistics.median(per_step):.0f}" if per_step else "-")
        sec = r[f"median_seconds_to_{t0}"]
        cells.append("-" if sec is None else f"{sec:,.0f}")
        for v in versus or []:
            o = by.get((r["op"], v))
            a, b = r[f"median_steps_to_{t0}"], o and o[f"median_steps_to_{t0}"]
            sa, sb = r[f"median_seconds_to_{t0}"], o and o[f"median_seconds_to_{t0}"]
            if a and b:
                timed = (f"{sb / sa:.2f}x" if sa and sb and same_run_set(mine, of(r["op"], v))
                         else "other run set")
                cells.append(f"{b / a:.2f}x / {timed}")
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
            lines.append(f"| `{op}` | `{spec}` | `{base}` | {'; '.join(cells)} | {med} |")
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
        cells = [f"`{op}`", f"`{spec}`"] + ["-" if v is None else f"{v:.3g}" for v in vals]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def read_runs(paths: list[str]) -> tuple[list[dict], list[float], dict]:
    """(runs, targets, the first file's config with ``split``: the split their accuracies are
    scored on) of result files, each run tagged with its ``file``. Files of the first schema, scored on the validation split before the harness had
    a test split, are read with their validation accuracy as the scored one (``test_acc``);
    mixing them with current files is refused."""
    runs, targets, config, schemas = [], None, None, set()
    for path in paths:
        with open(path) as f:
            d = json.load(f)
        schema = d.get("schema")
        if schema not in (SCHEMA, OLD_SCHEMA):
            raise SystemExit(f"--report {path}: not a {SCHEMA} file (schema {schema!r})")
        schemas.add(schema)
        for r in d["runs"]:
            r = {**r, "file": path}
            if schema == OLD_SCHEMA:
                r["final_test_acc"] = r.get("final_val_acc")
                r["curve"] = [{**c, ACC: c.get("val_acc")} for c in r.get("curve", [])]
            runs.append(r)
        targets = targets or d["config"]["targets"]
        config = config or d["config"]
    if len(schemas) > 1:
        raise SystemExit(f"--report: {', '.join(paths)} mix files scored on the validation "
                         f"split ({OLD_SCHEMA}) with files scored on the test split ({SCHEMA})")
    config = {**config, "split": "test" if SCHEMA in schemas else "validation"}
    return runs, targets, config


def report(paths: list[str], versus: list[str] | None, only: list[str] | None,
           png: str | None, diag: bool = False, pool_ops: bool = False,
           argv: list[str] | None = None, pairs: list[list[str]] | None = None) -> int:
    """``--report``: the markdown tables (and plot) of result files, without training."""
    runs, targets, config = read_runs(paths)
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
    print(diagnostics(runs, only) if diag else
          markdown(runs, targets, versus, only, config["split"]))
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
    ap.add_argument("--targets", default="0.95,0.99", help="test accuracies (%(default)s)")
    ap.add_argument("--to-budget", action="store_true",
                    help="train every run to the step budget instead of stopping at the targets")
    ap.add_argument("--lr", type=float, default=d.lr)
    ap.add_argument("--betas", type=float, nargs=2, default=d.betas)
    ap.add_argument("--weight-decay", type=float, default=d.weight_decay,
                    help="default weight decay of every optimizer (%(default)s, Grokfast's)")
    ap.add_argument("--lr-warmup", type=int, default=d.lr_warmup)
    ap.add_argument("--batch-size", type=int, default=d.batch_size)
    ap.add_argument("--eval-every", type=int, default=d.eval_every)
    ap.add_argument("--train-fraction", type=float, default=d.train_fraction)
    ap.add_argument("--val-fraction", type=float, default=d.val_fraction,
                    help="share for validation, read only by the grokking signal and the "
                         "meta-step (%(default)s); the rest is the test split")
    ap.add_argument("--width", type=int, default=d.width)
    ap.add_argument("--heads", type=int, default=d.heads)
    ap.add_argument("--jobs", type=int, default=max(1, (os.cpu_count() or 1)),
                    help="parallel processes (%(default)s)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process (%(default)s)")
    ap.add_argument("--json", metavar="PATH",
                    help="write the results here, after every run; an existing file is resumed")
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


def run_set(path: str | None, base: dict, ops: list[str], seeds: list[int], specs: list[str],
            targets: list[float]) -> tuple[dict | None, list[dict]]:
    """(the file's result so far or None, the runs it holds that this command plans). A file
    whose comparable settings differ from the command's is refused, naming them."""
    if not path or not os.path.exists(path):
        return None, []
    with open(path) as f:
        old = json.load(f)
    if old.get("schema") != SCHEMA:
        raise SystemExit(f"--json {path}: exists and is not a {SCHEMA} file; give a new path")
    mine = {**base, "targets": targets}
    differ = [k for k in COMPARABLE if json.dumps(old["config"].get(k)) != json.dumps(mine.get(k))]
    if differ:
        raise SystemExit(f"--json {path}: holds runs with other settings ("
                         + ", ".join(f"{k}: {old['config'].get(k)!r} there, {mine.get(k)!r} here"
                                     for k in differ) + "); give a new path to start afresh")
    planned = {(op, seed, spec) for op in ops for seed in seeds for spec in specs}
    return old, [r for r in old["runs"] if (r["op"], r["seed"], r["spec"]) in planned]


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
                train_fraction=args.train_fraction, val_fraction=args.val_fraction,
                width=args.width, heads=args.heads, stop_at_target=not args.to_budget,
                threads=None)
    try:   # every setting checked before the first run
        from shardgrok.demo.task import DemoConfig
        for op in ops:
            DemoConfig(**base, op=op, progress=False)
    except ValueError as e:
        ap.error(str(e))
    base["threads_per_job"] = args.threads
    old, done = run_set(args.json, base, ops, seeds, specs, targets)
    prov = step_common.provenance(PROG, argv, threads=args.threads)
    session = prov["date"]
    have = {(r["op"], r["seed"], r["spec"]) for r in done}
    config_keys = {k: v for k, v in base.items() if k != "threads_per_job"}
    jobs = [{"config": {**config_keys, "op": op, "seed": seed}, "spec": spec, "targets": targets,
             "threads": args.threads, "session": session}
            for op in ops for seed in seeds for spec in specs if (op, seed, spec) not in have]
    if done and not args.quiet:
        print(f"{args.json}: {len(done)} of the planned runs are there, {len(jobs)} to run",
              flush=True)
    kept = [r for r in (old or {}).get("runs", []) if r not in done]  # other studies' runs
    every_op = list(dict.fromkeys([*(old or {}).get("config", {}).get("ops", []), *ops]))
    every_seed = list(dict.fromkeys([*(old or {}).get("config", {}).get("seeds", []), *seeds]))
    every_spec = list(dict.fromkeys([*(old or {}).get("config", {}).get("specs", []), *specs]))
    sessions = (old or {}).get("sessions", []) + [prov]
    t0 = time.perf_counter()
    runs = list(done)

    def result() -> dict:
        every = kept + runs
        every.sort(key=lambda r: (every_op.index(r["op"]), r["seed"], every_spec.index(r["spec"])))
        return {"schema": SCHEMA, "command": prov["command"],
                "config": {**base, "ops": every_op, "seeds": every_seed, "specs": every_spec,
                           "targets": targets, "jobs": args.jobs},
                "machine": {"torch": torch.__version__, "python": platform.python_version(),
                            "cpus": os.cpu_count()},
                "provenance": sessions[0], "sessions": sessions,
                "wall_time_s": (old or {}).get("wall_time_s", 0.0) + time.perf_counter() - t0,
                "runs": every, "summary": summarise(every, targets)}

    def save() -> None:
        if args.json:   # whole or not at all: an interrupted write leaves the previous file
            tmp = f"{args.json}.tmp"
            step_common.write_json(tmp, result())
            os.replace(tmp, args.json)

    ctx = mp.get_context("spawn")  # fresh interpreters: no torch thread state inherited
    if jobs:
        with ctx.Pool(min(args.jobs, len(jobs))) as pool:
            for r in pool.imap_unordered(run_one, jobs):
                runs.append(r)
                save()
                if not args.quiet:
                    reach = ", ".join(
                        f"{float(t):.0%}: {r['steps_to'][t] if r['steps_to'][t] is not None else '-'}"
                        for t in r["steps_to"])
                    print(f"[{len(runs) - len(done)}/{len(jobs)}] {r['op']} seed {r['seed']} "
                          f"{r['spec']}: {reach}  ({r['wall_time_s']:.0f} s)"
                          f"{'  ' + r['error'] if r['error'] else ''}", flush=True)
    print(f"\n{'op':<8} {'optimizer':<44} " + " ".join(
        f"{'steps ' + format(t, '.0%'):>10} {'s ' + format(t, '.0%'):>8}" for t in targets))
    for row in summarise(runs, targets):   # this command's runs
        cells = []
        for t in targets:
            st, sec = row[f"median_steps_to_{t}"], row[f"median_seconds_to_{t}"]
            cells.append(f"{'-' if st is None else int(st):>10} {'-' if sec is None else f'{sec:.0f}':>8}")
        print(f"{row['op']:<8} {row['spec']:<44} " + " ".join(cells))
    if args.json and jobs:   # (every run there already: the file stays as it was)
        print(f"JSON: {args.json}")
    if args.png:
        try:
            plot(result(), args.png, prov)
            print(f"plot: {args.png}")
        except ImportError:
            print("plot skipped: matplotlib is not installed (pip install -e .[demo])",
                  file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
