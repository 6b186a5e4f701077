"""The grokking study of docs/grokking.md, stage by stage, from its committed plan.

    python benchmarks/grokking_study.py tune       # every family's grid on the tuning set
    python benchmarks/grokking_study.py select     # the choice per family, from the tuning runs
    python benchmarks/grokking_study.py heldout    # the choices, baselines and ablations, held out
    python benchmarks/grokking_study.py multivar   # SuperGrok with and without meta-steps, harder
    python benchmarks/grokking_study.py STAGE --dry-run   # the benchmarks/grokking.py command

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
import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PLAN = ROOT / "benchmarks" / "grokking_plan.toml"
STAGES = ("tune", "select", "heldout", "multivar")


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
    head = ["family", "setting", "score"] + [f"{op}: median steps" for op in t["ops"]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, specs in grid_specs(plan).items():
        for s in specs:
            cells = [name, f"**`{s}`**" if s in chosen else f"`{s}`",
                     f"{score(runs, s, t['ops'], t['steps'], target):,.0f}"]
            for op in t["ops"]:
                steps = [r["steps_to"][str(target)] for r in runs if r["op"] == op and r["spec"] == s]
                steps = sorted(math.inf if x is None else x for x in steps)
                m = statistics.median(steps)
                cells.append("never" if math.isinf(m) else f"{m:,.0f}")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def tuning_runs(plan: dict) -> list[dict]:
    import grokking   # the script's folder is first on sys.path
    path = ROOT / plan["tuning"]["results"]
    if not path.exists():
        raise SystemExit(f"{path.relative_to(ROOT)} does not exist: run the tune stage first")
    runs, _, _ = grokking.read_runs([str(path)])
    return runs


def derive(chosen: str, name: str, extra: str) -> str:
    """``chosen`` (a family's spec) under optimizer ``name`` with the overrides ``extra``
    appended: an ablation or a variant of a chosen setting."""
    rest = chosen.partition(":")[2]
    return f"{name}:{','.join(x for x in (rest, extra) if x)}"


def stage_specs(plan: dict, stage: str, chosen: dict[str, str]) -> list[str]:
    """A stage's specs: the families' choices (``choices = true``), the fixed specs, and the
    ``derived`` ones, ``[family, optimizer, overrides]`` each: the family's choice run as that
    optimizer with those overrides added."""
    s = plan[stage]
    out = [chosen[f] for f in plan["families"]] if s.get("choices") else []
    out += s.get("fixed", [])
    out += [derive(chosen[fam], name, extra) for fam, name, extra in s.get("derived", [])]
    return list(dict.fromkeys(out))


def command(plan: dict, stage: str, specs: list[str]) -> list[str]:
    c, s = plan["common"], plan["tuning" if stage == "tune" else stage]
    cmd = [sys.executable, str(ROOT / "benchmarks" / "grokking.py")]
    for op in s["ops"]:
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stage", choices=STAGES)
    ap.add_argument("--dry-run", action="store_true", help="print the command, run nothing")
    ap.add_argument("--plan", default=str(PLAN), help="the plan (%(default)s)")
    a = ap.parse_args(argv)
    plan = load_plan(pathlib.Path(a.plan))
    if a.stage == "select":
        runs = tuning_runs(plan)
        print(selection_table(plan, runs))
        return 0
    if a.stage == "tune":
        specs = [s for ss in grid_specs(plan).values() for s in ss]
    else:
        chosen = {k: v for k, (v, _) in select(plan, tuning_runs(plan)).items()}
        specs = stage_specs(plan, a.stage, chosen)
    cmd = command(plan, a.stage, specs)
    if a.dry_run:
        print(" ".join(cmd))
        return 0
    return subprocess.call(cmd, cwd=ROOT)


if __name__ == "__main__":
    sys.exit(main())
