"""The grokking study of docs/grokking.md, stage by stage, from its committed plan.

    python benchmarks/grokking_study.py tune       # every family's grid on the tuning set
    python benchmarks/grokking_study.py select     # the choice per family, from the tuning runs
    python benchmarks/grokking_study.py heldout    # the choices, baselines and ablations, held out
    python benchmarks/grokking_study.py multivar   # SuperGrok with and without meta-steps, harder
    python benchmarks/grokking_study.py STAGE --dry-run   # the benchmarks/grokking.py command
    python benchmarks/grokking_study.py progress   # runs done per stage, and the CPU time spent
    python benchmarks/grokking_study.py goal       # the held-out goal, operation by operation
    python benchmarks/grokking_study.py summary    # the page's conclusions, with their figures
    python benchmarks/grokking_study.py verdict    # the goal's answer in a few sentences (README)
    python benchmarks/grokking_study.py meta [STAGE]  # what SuperGrok's meta-step learned

The plan (benchmarks/grokking_plan.toml) was committed before any held-out run: the tuning set
(operations and seeds the settings are chosen on), the held-out set (operations and seeds never
used in choosing), each optimizer family's grid (the same size for every family), the rule that
picks a family's setting, and what the held-out stage runs. Each stage is one
benchmarks/grokking.py command writing a results file that it resumes when interrupted; ``tune``
and ``heldout`` can be run again to finish.
"""
from __future__ import annotations

import argparse
import itertools
import math
import pathlib
import statistics
import subprocess
import sys
import textwrap
import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PLAN = ROOT / "benchmarks" / "grokking_plan.toml"
STAGES = ("tune", "select", "heldout", "multivar")
REPORTS = ("progress", "goal", "meta", "summary", "verdict")
NAMES = {"adamw": "AdamW", "adamw+ema": "AdamW + EMA", "grokadamw": "GrokAdamW",
         "supergrok": "SuperGrok"}
BASELINES = ("adamw", "adamw+ema")   # the families the goal's "best tuned baseline" is taken from
CONTENDERS = ("grokadamw", "supergrok")


def load_plan(path: pathlib.Path = PLAN) -> dict:
    with open(path, "rb") as f:
        return tomllib.load(f)


def spec(base: str, settings: dict) -> str:
    """``name:key=value,...`` in the order given (benchmarks/grokking.py's syntax)."""
    name, _, fixed = base.partition(":")
    parts = [fixed] if fixed else []
    parts += [f"{k}={v!r}" for k, v in settings.items()]
    return f"{name}:{','.join(parts)}" if parts else name


def grid(family: dict) -> list[str]:
    """A family's specs: every combination of its grid, the first key varying slowest."""
    keys = list(family["grid"])
    return [spec(family["spec"], dict(zip(keys, values)))
            for values in itertools.product(*(family["grid"][k] for k in keys))]


def grid_specs(plan: dict) -> dict[str, list[str]]:
    return {name: grid(fam) for name, fam in plan["families"].items()}


def score(runs: list[dict], s: str, ops: list[str], budget: int, target: float) -> float:
    """The selection rule: per operation the median over seeds of steps to ``target`` (a run
    that did not get there counts as twice the budget), then the geometric mean over operations.
    Lower is better; a setting that fails on one operation pays for it on all."""
    logs = []
    for op in ops:
        steps = [r["steps_to"][str(target)] for r in runs if r["op"] == op and r["spec"] == s]
        if not steps:
            raise SystemExit(f"no tuning run of {s!r} on {op!r}: run the tune stage to the end")
        steps = [2 * budget if x is None else x for x in steps]
        logs.append(math.log(statistics.median(steps)))
    return math.exp(sum(logs) / len(logs))


def select(plan: dict, runs: list[dict]) -> dict[str, tuple[str, float]]:
    """Per family: (its chosen spec, its score). Ties go to the grid's earlier spec."""
    t = plan["tuning"]
    target = plan["common"]["targets"][0]
    out = {}
    for name, specs in grid_specs(plan).items():
        scores = [(score(runs, s, t["ops"], t["steps"], target), i, s) for i, s in enumerate(specs)]
        best = min(scores)
        out[name] = (best[2], best[0])
    return out


def selection_table(plan: dict, runs: list[dict]) -> str:
    """Every grid point's score and per-operation medians, the chosen one in bold."""
    t = plan["tuning"]
    target = plan["common"]["targets"][0]
    chosen = {s for s, _ in select(plan, runs).values()}
    head = ["family", "setting", "score"] + [f"`{op}`: median steps" for op in t["ops"]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, specs in grid_specs(plan).items():
        for s in specs:
            cells = [name, f"**`{s}`**" if s in chosen else f"`{s}`",
                     f"{score(runs, s, t['ops'], t['steps'], target):,.0f}"]
            for op in t["ops"]:
                steps = sorted(math.inf if r["steps_to"][str(target)] is None
                               else r["steps_to"][str(target)]
                               for r in runs if r["op"] == op and r["spec"] == s)
                m = statistics.median(steps)
                cells.append("never" if math.isinf(m) else f"{m:,.0f}")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def as_recommended(plan: dict, chosen: str) -> tuple[str, dict]:
    """A family's chosen spec as ``shardgrok.recommended`` states it: (optimizer name, its
    constructor keywords), the plan's betas included (``adamw+ema`` has no entry there)."""
    from shardgrok.demo.recipes import parse_spec
    name, kw = parse_spec(chosen)
    return name, {"betas": tuple(plan["common"]["betas"])} | kw


def recommended_mismatches(plan: dict, chosen: dict[str, str]) -> list[str]:
    """Where ``shardgrok.recommended`` differs from the tuning stage's choices (empty: it
    states them). Keywords are compared as values: 0 and 0.0 agree."""
    from shardgrok import recommended
    out = []
    for family in ("adamw", "grokadamw", "supergrok"):
        name, want = as_recommended(plan, chosen[family])
        got = recommended(name)
        if got != want:
            out.append(f"recommended({name!r}) is {dict(sorted(got.items()))}, the tuning "
                       f"stage chose {dict(sorted(want.items()))}")
    return out


def tuning_runs(plan: dict) -> list[dict]:
    return stage_runs(plan, "tuning")


def derive(chosen: str, name: str, extra: str) -> str:
    """``chosen`` (a family's spec) under optimizer ``name`` with the overrides ``extra``
    (a key already there takes the new value): an ablation or a variant of a chosen setting."""
    from shardgrok.demo.recipes import parse_spec, spec_of
    return spec_of(name, parse_spec(chosen)[1] | parse_spec(f"{name}:{extra}")[1])


def stage_specs(plan: dict, stage: str, chosen: dict[str, str]) -> list[str]:
    """A stage's specs: the families' choices (``choices = true``), the fixed specs, and the
    ``derived`` ones, ``[family, optimizer, overrides]`` each: the family's choice run as that
    optimizer with those overrides added."""
    s = plan[stage]
    out = [chosen[f] for f in plan["families"]] if s.get("choices") else []
    out += s.get("fixed", [])
    out += [derive(chosen[fam], name, extra) for fam, name, extra in s.get("derived", [])]
    return list(dict.fromkeys(out))


def command(plan: dict, stage: str, specs: list[str], ops: list[str] | None = None) -> list[str]:
    """The benchmarks/grokking.py command of a stage, for ``ops`` of the stage's operations
    (all of them by default)."""
    c, s = plan["common"], plan["tuning" if stage == "tune" else stage]
    unknown = [op for op in ops or [] if op not in s["ops"]]
    if unknown:
        raise SystemExit(f"--op {unknown[0]!r}: not an operation of the {stage} stage; its "
                         f"operations are {', '.join(map(repr, s['ops']))}")
    cmd = [sys.executable, str(ROOT / "benchmarks" / "grokking.py")]
    for op in ops or s["ops"]:
        cmd += ["--op", op]
    cmd += ["--p", str(s.get("p", c["p"])), "--seeds", ",".join(map(str, s["seeds"])),
            "--steps", str(s["steps"]), "--targets", ",".join(map(str, c["targets"])),
            "--jobs", str(c["jobs"]), "--json", str(ROOT / s["results"])]
    for key in ("train_fraction", "val_fraction", "batch_size", "eval_every", "lr_warmup"):
        cmd += [f"--{key.replace('_', '-')}", str(s.get(key, c[key]))]
    if "width" in s:
        cmd += ["--width", str(s["width"])]
    cmd += ["--betas", *map(str, c["betas"])]
    if s.get("to_budget"):
        cmd.append("--to-budget")
    for sp in specs:
        cmd += ["--opt", sp]
    return cmd


def progress_table(plan: dict) -> str:
    """Per stage: runs planned, runs in its results file, and the CPU time they took (the sum
    of their wall times: one core each)."""
    import grokking
    fams = plan["families"]
    planned = {"tuning": sum(len(grid(f)) for f in fams.values()),
               "heldout": len(fams) * bool(plan["heldout"].get("choices"))
               + len(plan["heldout"].get("fixed", [])) + len(plan["heldout"].get("derived", [])),
               "multivar": len(plan["multivar"].get("derived", []))}
    head = ["stage", "operations x seeds x settings", "runs planned", "runs done", "CPU hours"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for stage, n in planned.items():
        s = plan[stage]
        path = ROOT / s["results"]
        runs = grokking.read_runs([str(path)])[0] if path.exists() else []
        total = len(s["ops"]) * len(s["seeds"]) * n
        lines.append(f"| {stage} | {len(s['ops'])} x {len(s['seeds'])} x {n} | {total} | "
                     f"{len(runs)} | {sum(r['wall_time_s'] for r in runs) / 3600:.1f} |")
    return "\n".join(lines)


def stage_runs(plan: dict, stage: str) -> list[dict]:
    """The runs of a plan section's results file (``tuning``, ``heldout``, ``multivar``)."""
    import grokking   # the script's folder is first on sys.path
    path = ROOT / plan[stage]["results"]
    if not path.exists():
        command = "tune" if stage == "tuning" else stage
        raise SystemExit(f"{path.relative_to(ROOT)} does not exist: run `grokking_study.py "
                         f"{command}` first")
    return grokking.read_runs([str(path)])[0]


def ops_run(plan: dict, stage: str, runs: list[dict]) -> list[str]:
    """The stage's operations that have runs, in the plan's order: a stage run one operation
    per invocation is reported on as far as it has got."""
    have = {r["op"] for r in runs}
    return [op for op in plan[stage]["ops"] if op in have]


def _cell(runs: list[dict], op: str, s: str, target: float) -> dict:
    """One (operation, spec): median steps to ``target`` (None: most runs did not get there),
    median seconds to it, median test accuracy at the end, its runs."""
    import grokking
    mine = [r for r in runs if r["op"] == op and r["spec"] == s]
    if not mine:
        raise SystemExit(f"no run of {s!r} on {op!r}")
    return {"steps": grokking._median([r["steps_to"][str(target)] for r in mine]),
            "seconds": grokking._median([r["seconds_to"][str(target)] for r in mine]),
            "acc": statistics.median(r["final_test_acc"] or 0.0 for r in mine), "runs": mine}


def _better(a: dict, b: dict) -> bool:
    """Whether cell ``a`` beats ``b``: fewer median steps to the target, or, where neither
    median got there, a higher median test accuracy at the end."""
    if a["steps"] is not None or b["steps"] is not None:
        return b["steps"] is None or (a["steps"] is not None and a["steps"] < b["steps"])
    return a["acc"] > b["acc"]


def goal_rows(plan: dict, chosen: dict[str, str], runs: list[dict]) -> list[dict]:
    """Per held-out operation and contender: the best tuned baseline there (the better of the
    AdamW and AdamW + EMA choices, :func:`_better`), both cells, the steps ratio and the time
    ratio (None where the rows are not from one run set, or a median did not get there), and
    whether the goal is met: steps ratio at most ``goal_steps_ratio`` and time ratio below 1;
    where neither median got there, a higher test accuracy at the end."""
    import grokking
    target = plan["common"]["targets"][0]
    goal = plan["heldout"]["goal_steps_ratio"]
    out = []
    for op in ops_run(plan, "heldout", runs):
        cells = {f: _cell(runs, op, chosen[f], target) for f in BASELINES + CONTENDERS}
        base = BASELINES[0]
        for f in BASELINES[1:]:
            if _better(cells[f], cells[base]):
                base = f
        b = cells[base]
        for f in CONTENDERS:
            c = cells[f]
            row = {"op": op, "baseline": base, "base": b, "family": f, "cell": c,
                   "steps_ratio": None, "time_ratio": None}
            if c["steps"] is not None and b["steps"] is not None:
                row["steps_ratio"] = c["steps"] / b["steps"]
                if grokking.same_run_set(c["runs"], b["runs"]):
                    row["time_ratio"] = c["seconds"] / b["seconds"]
                row["met"] = (row["steps_ratio"] <= goal and row["time_ratio"] is not None
                              and row["time_ratio"] < 1)
            elif b["steps"] is None and c["steps"] is None:
                row["met"] = c["acc"] > b["acc"]
            else:
                row["met"] = c["steps"] is not None
            out.append(row)
    return out


def goal_table(plan: dict, chosen: dict[str, str], runs: list[dict]) -> str:
    """:func:`goal_rows` as a table: each contender's median steps over the best baseline's
    (the goal: at most ``goal_steps_ratio``) and median seconds over its (below 1), or, where
    neither median reached the target, their test accuracies at the end."""
    head = ["operation", "best baseline", "its steps (s)", "optimizer", "steps (s)",
            "steps ratio", "time ratio", "goal"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def steps(c):
        if c["steps"] is None:
            return f"never ({100 * c['acc']:.1f}% at the end)"
        return f"{c['steps']:,.0f} ({c['seconds']:,.0f} s)"

    for row in goal_rows(plan, chosen, runs):
        b, c = row["base"], row["cell"]
        if row["steps_ratio"] is not None:
            r = f"{row['steps_ratio']:.2f}"
            t = "other run set" if row["time_ratio"] is None else f"{row['time_ratio']:.2f}"
        elif b["steps"] is None and c["steps"] is None:
            r, t = f"accuracy {100 * c['acc']:.1f}% vs {100 * b['acc']:.1f}%", "-"
        else:
            r, t = "only " + (row["family"] if row["met"] else "the baseline") + " got there", "-"
        lines.append(f"| `{row['op']}` | `{chosen[row['baseline']]}` | {steps(b)} | "
                     f"`{chosen[row['family']]}` | {steps(c)} | {r} | {t} | "
                     f"{'met' if row['met'] else 'missed'} |")
    return "\n".join(lines)


def _codes(ops: list[str]) -> str:
    return ", ".join(f"`{op}`" for op in ops)


def _held(runs: list[dict], target: float) -> tuple[int, int]:
    """(runs that reached ``target``, those of them whose test accuracy never fell below it
    again up to the budget)."""
    import grokking
    return (sum(r["steps_to"][str(target)] is not None for r in runs),
            sum(grokking.held(r, target) for r in runs))


def _median_or_acc(c: dict) -> str:
    return (f"{c['steps']:,.0f} steps" if c["steps"] is not None
            else f"never ({100 * c['acc']:.1f}% at the end)")


def summary(plan: dict, chosen: dict[str, str], heldout: list[dict],
            multivar: list[dict] | None) -> str:
    """The conclusions of docs/grokking.md as bullets, every figure computed here from the
    results files: the choices, the goal per contender, whether 95% held once reached, what
    each of GrokAdamW's parts and SuperGrok's meta-step changed."""
    target = plan["common"]["targets"][0]
    ops = ops_run(plan, "heldout", heldout)
    out = ["- Chosen on the tuning set: " + "; ".join(
        f"{NAMES[f]} `{chosen[f]}`" for f in plan["families"]) + "."]
    pending = [op for op in plan["heldout"]["ops"] if op not in ops]
    if pending:
        out.append(f"- Held-out operations not run yet: {_codes(pending)}; what follows is "
                   f"over {_codes(ops)} only.")
    rows = goal_rows(plan, chosen, heldout)
    for f in CONTENDERS:
        mine = [r for r in rows if r["family"] == f]
        met = [r["op"] for r in mine if r["met"]]
        parts = []
        for r in mine:
            if r["steps_ratio"] is not None:
                t = "" if r["time_ratio"] is None else f", {r['time_ratio']:.2f}x the time"
                parts.append(f"`{r['op']}` {r['steps_ratio']:.2f}x the steps{t}")
            else:
                parts.append(f"`{r['op']}` {_median_or_acc(r['cell'])} against "
                             f"{_median_or_acc(r['base'])}")
        out.append(f"- {NAMES[f]} at its choice met the goal on {len(met)} of {len(mine)} held-out "
                   f"operations, against the best tuned baseline there: " + "; ".join(parts) + ".")
    reached, held = _held(heldout, target)
    per_spec = {sp: _held([r for r in heldout if r["spec"] == sp], target)
                for sp in dict.fromkeys(r["spec"] for r in heldout)}
    out.append(f"- Once at {target:.0%} test accuracy, {held} of the {reached} held-out runs that "
               f"got there stayed at or above it to the budget; held of reached, per setting: "
               + "; ".join(f"`{sp}` {h} of {n}" for sp, (n, h) in per_spec.items()) + ".")
    h = plan["heldout"]
    for fam, name, extra in h.get("derived", []):
        s = derive(chosen[fam], name, extra)
        if s == chosen[fam] or not extra:
            continue
        cells = [f"`{op}` {_median_or_acc(_cell(heldout, op, s, target))} against "
                 f"{_median_or_acc(_cell(heldout, op, chosen[fam], target))}" for op in ops]
        out.append(f"- {NAMES[fam]}'s choice as `{name}` with `{extra}`: " + "; ".join(cells) + ".")
    for c in meta_comparisons(plan, chosen, None, multivar):
        out.append(f"- {c['task']}, `{c['name']}` with `{c['extra']}`: "
                   f"{_median_or_acc(c['meta'])} against {_median_or_acc(c['plain'])} "
                   f"without meta-steps.")
    out.append("- " + _meta_verdict(meta_comparisons(plan, chosen, heldout, multivar)))
    return "\n".join(out)


def meta_comparisons(plan: dict, chosen: dict[str, str], heldout: list[dict] | None,
                     multivar: list[dict] | None) -> list[dict]:
    """Every SuperGrok-with-meta-steps setting of the held-out and multivar stages against the
    same SuperGrok without them, per operation run: the two cells and whether the meta-step won
    (:func:`_better`: fewer median steps to the target, or a higher accuracy at the end where
    neither median got there)."""
    target = plan["common"]["targets"][0]
    out = []
    for stage, runs in (("heldout", heldout), ("multivar", multivar)):
        if not runs:
            continue
        for fam, name, extra in plan[stage].get("derived", []):
            if not name.endswith("+meta"):
                continue
            s = derive(chosen[fam], name, extra)
            for op in ops_run(plan, stage, runs):
                have = {r["spec"] for r in runs if r["op"] == op}
                if s not in have or _without_meta(s) not in have:
                    continue   # a stage still running: compared once both have runs
                task = f"`{op}`" if stage == "heldout" else f"`{op}` mod {plan[stage]['p']}"
                meta = _cell(runs, op, s, target)
                plain = _cell(runs, op, _without_meta(s), target)
                out.append({"task": task, "name": name, "extra": extra, "meta": meta,
                            "plain": plain, "won": _better(meta, plain)})
    return out


def _meta_verdict(comparisons: list[dict]) -> str:
    won = [c for c in comparisons if c["won"]]
    text = (f"SuperGrok's meta-step beat SuperGrok without it in {len(won)} of "
            f"{len(comparisons)} comparisons (task x meta-step setting; fewer median steps to "
            f"the target, or a higher test accuracy at the end where neither got there)")
    if won:
        text += ": " + "; ".join(f"{c['task']} with `{c['extra']}` ({_with_time(c['meta'])} "
                                 f"against {_with_time(c['plain'])} without)" for c in won)
    return text + "."


def _with_time(cell: dict) -> str:
    """Median steps and, where it got there, median seconds to the target (both cells of a
    meta comparison come from one run set: one operation's runs of one invocation)."""
    text = _median_or_acc(cell)
    return text if cell["steps"] is None else f"{text} in {cell['seconds']:.0f} s"


def verdict(plan: dict, chosen: dict[str, str], heldout: list[dict],
            multivar: list[dict] | None) -> str:
    """The held-out stage's answer to the plan's goal in a few sentences (the README's)."""
    ops = ops_run(plan, "heldout", heldout)
    goal = plan["heldout"]["goal_steps_ratio"]
    rows = goal_rows(plan, chosen, heldout)
    met = {f: sum(r["met"] for r in rows if r["family"] == f) for f in CONTENDERS}
    text = (f"On operations and seeds held out from choosing ({_codes(ops)}; "
            f"{len(plan['heldout']['seeds'])} seeds each), the goal, at most {goal:g}x the median "
            f"steps to {plan['common']['targets'][0]:.0%} test accuracy of the best tuned "
            f"baseline (AdamW or AdamW + EMA) in less wall time, was met by "
            + " and by ".join(f"{NAMES[f]} on {met[f]} of {len(ops)} operations"
                              for f in CONTENDERS) + ". ")
    target = plan["common"]["targets"][0]
    stayed = {f: _held([r for r in heldout if r["spec"] == chosen[f]], target)
              for f in plan["families"]}
    text += (f"Of the runs at each family's choice that reached {target:.0%}, those that stayed "
             "there to the budget: " + ", ".join(f"{NAMES[f]} {h} of {n}"
                                                 for f, (n, h) in stayed.items()) + ". ")
    text += _meta_verdict(meta_comparisons(plan, chosen, heldout, multivar)) + " "
    pending = [op for op in plan["heldout"]["ops"] if op not in ops]
    if pending:
        text += (f"The held-out stage is not finished ({_codes(pending)} still to run), so "
                 "no conclusion is drawn yet.")
    elif all(met[f] == len(ops) for f in CONTENDERS):
        text += "The goal is met."
    else:
        text += ("The goal is not met: no speed-up over a tuned AdamW is claimed for "
                 "these settings.")
    return text


def meta_table(runs: list[dict], target: float) -> str:
    """What the meta-step learned, per operation and ``supergrok+meta`` setting over its runs:
    the look-ahead validation loss at the first and the last evaluation, the meta-net's rescale
    and log-mask f(g) at the last evaluation (median per probe; f = 0 leaves g as it is); then
    the paired comparison with the same SuperGrok without meta-steps (the spec without ``+meta``,
    ``meta_every`` and ``meta_lr``): per seed, steps to ``target`` and test accuracy at the end,
    with / without."""
    from shardgrok.demo.task import MASK_PROBES
    med = statistics.median
    head = (["operation", "setting", "runs", "meta-loss first -> last", "rescale at the end"]
            + [f"f({g:g})" for g in MASK_PROBES]
            + [f"steps to {target:.0%} with / without", "test acc at the end with / without"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    keys = dict.fromkeys((r["op"], r["spec"]) for r in runs if r["spec"].startswith("supergrok+meta"))
    for op, spec in keys:
        metas = [r for r in runs if r["op"] == op and r["spec"] == spec
                 and any("meta_loss" in c for c in r["curve"])]
        if not metas:
            continue
        recorded = [[c for c in r["curve"] if "meta_loss" in c] for r in metas]
        first = med(cs[0]["meta_loss"] for cs in recorded)
        last = med(cs[-1]["meta_loss"] for cs in recorded)
        cells = [f"`{op}`", f"`{spec}`", str(len(metas)), f"{first:.3g} -> {last:.3g}",
                 f"{med(cs[-1]['rescale'] for cs in recorded):.3g}"]
        cells += [f"{med(cs[-1]['log_mask'][i] for cs in recorded):.2g}"
                  for i in range(len(MASK_PROBES))]
        pairs, accs = [], []
        plain = _without_meta(spec)
        for r in metas:
            other = [o for o in runs if (o["op"], o["seed"], o["spec"]) == (op, r["seed"], plain)]
            if other:
                a, b = r["steps_to"][str(target)], other[0]["steps_to"][str(target)]
                pairs.append(f"{'never' if a is None else a}/{'never' if b is None else b}")
                accs.append(f"{100 * (r['final_test_acc'] or 0):.1f}/"
                            f"{100 * (other[0]['final_test_acc'] or 0):.1f}")
        cells += ["; ".join(pairs) or "-", "; ".join(accs) or "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def meta_plot(runs: list[dict], path: str) -> None:
    """Per operation, over the ``supergrok+meta`` runs: the look-ahead validation loss against
    step, and the meta-net's log-mask at each probe against step (one line per run)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from shardgrok.demo.task import MASK_PROBES

    metas = [r for r in runs if r["spec"].startswith("supergrok+meta")
             and any("meta_loss" in c for c in r["curve"])]
    ops = list(dict.fromkeys(r["op"] for r in metas))
    if not ops:
        raise SystemExit("meta --png: no run with meta-steps recorded")
    fig, axes = plt.subplots(2, len(ops), figsize=(5 * len(ops), 7), squeeze=False)
    for j, op in enumerate(ops):
        for k, r in enumerate(r for r in metas if r["op"] == op):
            cs = [c for c in r["curve"] if "meta_loss" in c]
            steps = [c["step"] for c in cs]
            axes[0][j].plot(steps, [c["meta_loss"] for c in cs], lw=1, alpha=0.7)
            for i, g in enumerate(MASK_PROBES):
                axes[1][j].plot(steps, [c["log_mask"][i] for c in cs], lw=1, alpha=0.7,
                                color=f"C{i}", label=f"g = {g:g}" if k == 0 else None)
        axes[0][j].set_title(f"{op}: look-ahead validation loss")
        axes[0][j].set_yscale("log")
        axes[1][j].set_title(f"{op}: meta-net log-mask f(g)")
        axes[1][j].set_xlabel("step")
    axes[1][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _without_meta(s: str) -> str:
    """The ``supergrok`` spec of a ``supergrok+meta`` one: its settings less the meta-step's."""
    rest = s.partition(":")[2]
    kept = [kv for kv in rest.split(",")
            if kv and not kv.startswith(("meta_every=", "meta_lr="))]
    return "supergrok" + (":" + ",".join(kept) if kept else "")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stage", choices=STAGES + REPORTS)
    ap.add_argument("of", nargs="?", default="heldout", choices=("heldout", "multivar"),
                    help="meta: the stage whose runs to read (%(default)s)")
    ap.add_argument("--dry-run", action="store_true", help="print the command, run nothing")
    ap.add_argument("--op", action="append", metavar="OP",
                    help="tune/heldout/multivar: run only this operation of the stage "
                         "(repeatable). One operation per invocation keeps each operation's "
                         "rows in one run set, the condition for comparing their wall times")
    ap.add_argument("--png", metavar="PATH", help="meta: plot the meta-loss and log-mask here")
    ap.add_argument("--plan", default=str(PLAN), help="the plan (%(default)s)")
    a = ap.parse_args(argv)
    plan = load_plan(pathlib.Path(a.plan))
    if a.stage == "select":
        runs = tuning_runs(plan)
        print(selection_table(plan, runs))
        return 0
    if a.stage == "progress":
        print(progress_table(plan))
        return 0
    if a.stage == "goal":
        chosen = {k: v for k, (v, _) in select(plan, tuning_runs(plan)).items()}
        print(goal_table(plan, chosen, stage_runs(plan, "heldout")))
        return 0
    if a.stage in ("summary", "verdict"):
        chosen = {k: v for k, (v, _) in select(plan, tuning_runs(plan)).items()}
        mv = ROOT / plan["multivar"]["results"]
        args = (plan, chosen, stage_runs(plan, "heldout"),
                stage_runs(plan, "multivar") if mv.exists() else None)
        if a.stage == "summary":
            print(summary(*args))
        else:   # a paragraph of the README, wrapped as its prose is
            print(textwrap.fill(verdict(*args), 96, break_long_words=False,
                                break_on_hyphens=False))
        return 0
    if a.stage == "meta":
        runs = stage_runs(plan, a.of)
        print(meta_table(runs, plan["common"]["targets"][0]))
        if a.png:
            meta_plot(runs, a.png)
        return 0
    if a.stage == "tune":
        specs = [s for ss in grid_specs(plan).values() for s in ss]
    else:
        chosen = {k: v for k, (v, _) in select(plan, tuning_runs(plan)).items()}
        specs = stage_specs(plan, a.stage, chosen)
    cmd = command(plan, a.stage, specs, a.op)
    if a.dry_run:
        print(" ".join(cmd))
        return 0
    return subprocess.call(cmd, cwd=ROOT)


if __name__ == "__main__":
    sys.exit(main())
