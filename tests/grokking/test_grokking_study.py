"""benchmarks/grokking_study.py: the committed plan's shape, the selection rule worked by hand,
the stages' commands, and the goal and meta-step tables from made-up runs."""
from __future__ import annotations

import math
import subprocess
import sys

import pytest

from tests.support.paths import ROOT, load_script

load_script("benchmarks/step_common.py")   # grokking.py imports it from its own folder
load_script("benchmarks/grokking.py")
study = load_script("benchmarks/grokking_study.py")
PLAN = study.load_plan()


def test_the_plan_is_fair_and_held_out():
    sizes = {name: len(study.grid(fam)) for name, fam in PLAN["families"].items()}
    assert len(set(sizes.values())) == 1, sizes          # the same grid size for every family
    tuned = {name: "lr" in fam["grid"] for name, fam in PLAN["families"].items()}
    assert all(tuned.values()) or not any(tuned.values())   # lr tuned for all or for none
    t, h = PLAN["tuning"], PLAN["heldout"]
    assert not set(t["seeds"]) & set(h["seeds"]) and len(h["seeds"]) >= 5
    assert not set(t["ops"]) & set(h["ops"]) and len(h["ops"]) >= 3
    assert h["to_budget"] and not t.get("to_budget")
    assert any("**" in op for op in h["ops"])                # a non-linear one
    assert PLAN["multivar"]["steps"] <= 20000


def run(op, seed, s, steps, acc=0.99, secs=None, curve=()):
    return {"op": op, "seed": seed, "spec": s, "error": None,
            "steps_to": {"0.95": steps, "0.99": steps}, "final_test_acc": acc,
            "seconds_to": {"0.95": secs if secs is not None else steps and steps / 10,
                           "0.99": None},
            "curve": list(curve), "session": "s", "file": "f"}


CHOSEN = {f: f"{f}:w=1" for f in ("adamw", "adamw+ema", "grokadamw", "supergrok")}


def family_runs(op, steps, acc=None):
    """Three seeds of each family's choice in CHOSEN on ``op``: ``steps[family]`` steps to the
    targets (None: never), test accuracy ``acc[family]`` at the end (0.99 by default)."""
    return [run(op, seed, CHOSEN[f], st, (acc or {}).get(f, 0.99))
            for seed in range(3) for f, st in steps.items()]


def test_selection_rule_worked_by_hand():
    plan = {"tuning": {"ops": ["a", "b"], "steps": 1000}, "common": {"targets": [0.95]},
            "families": {"f": {"spec": "adamw", "grid": {"lr": [1, 2]}}}}
    one, two = "adamw:lr=1", "adamw:lr=2"
    runs = [run("a", 0, one, 400), run("a", 1, one, 600), run("b", 0, one, 900), run("b", 1, one, 100),
            # lr=2: fast on a, never on one seed of b (counts as 2 x 1000)
            run("a", 0, two, 200), run("a", 1, two, 200), run("b", 0, two, 300), run("b", 1, two, None)]
    assert study.grid_specs(plan) == {"f": [one, two]}
    # per operation the median over seeds, then the geometric mean over operations
    assert study.score(runs, one, ["a", "b"], 1000, 0.95) == pytest.approx(math.sqrt(500 * 500))
    assert study.score(runs, two, ["a", "b"], 1000, 0.95) == pytest.approx(math.sqrt(200 * 1150))
    assert study.select(plan, runs) == {"f": (two, pytest.approx(math.sqrt(200 * 1150)))}
    runs[-1]["steps_to"]["0.95"] = None
    runs[-2]["steps_to"]["0.95"] = None   # lr=2 now never gets b: 200 x 2000 > 500 x 500
    assert study.select(plan, runs)["f"][0] == one
    with pytest.raises(SystemExit, match="no tuning run"):
        study.score(runs, one, ["a", "c"], 1000, 0.95)


def test_stage_specs_and_commands():
    chosen = {f: study.grid(fam)[0] for f, fam in PLAN["families"].items()}
    specs = study.stage_specs(PLAN, "heldout", chosen)
    assert specs[:len(chosen)] == list(chosen.values()) and "adam+ema" in specs
    g = chosen["grokadamw"]
    assert g + ",gradient_clipping=0" in specs and g + ",gamma=0" in specs
    assert "supergrok+meta:" + chosen["supergrok"].partition(":")[2] + ",meta_every=20" in specs
    assert study.derive("adamw", "adamw", "max_grad_norm=1.0") == "adamw:max_grad_norm=1.0"
    assert study.derive("supergrok:kappa=0,lr=0.002,weight_decay=3.0", "supergrok+meta",
                        "weight_decay=0.1,meta_every=20") == \
        "supergrok+meta:kappa=0,lr=0.002,weight_decay=0.1,meta_every=20"   # overridden in place
    cmd = study.command(PLAN, "heldout", specs)
    assert "--to-budget" in cmd and cmd[cmd.index("--seeds") + 1] == "100,101,102,103,104"
    assert cmd.count("--opt") == len(specs)
    assert cmd.count("--op") == len(PLAN["heldout"]["ops"])
    one = study.command(PLAN, "heldout", specs, ["x/y"])
    assert one.count("--op") == 1 and one[one.index("--op") + 1] == "x/y"
    with pytest.raises(SystemExit, match="'x\\*y': not an operation of the heldout stage"):
        study.command(PLAN, "heldout", specs, ["x*y"])
    mv = study.command(PLAN, "multivar", ["supergrok"])
    assert mv[mv.index("--p") + 1] == "7" and mv[mv.index("--width") + 1] == "64"
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks/grokking_study.py"), "tune",
                          "--dry-run"], capture_output=True, text=True, check=True,
                         timeout=120).stdout
    assert out.count("--opt") == sum(len(study.grid(f)) for f in PLAN["families"].values())


def test_goal_table():
    plan = {"common": {"targets": [0.95]},
            "heldout": {"ops": ["x/y", "hard"], "goal_steps_ratio": 0.8}}
    runs = family_runs("x/y", {"adamw": 1000, "adamw+ema": 800, "grokadamw": 600, "supergrok": 700})
    runs += family_runs("hard", dict.fromkeys(CHOSEN),
                        acc={"adamw": 0.4, "adamw+ema": 0.5, "grokadamw": 0.6, "supergrok": 0.3})
    rows = study.goal_table(plan, CHOSEN, runs).splitlines()[2:]
    # x/y: the best baseline is AdamW + EMA (800); 600 / 800 = 0.75 met, 700 / 800 = 0.875 missed
    assert rows[0] == ("| `x/y` | `adamw+ema:w=1` | 800 (80 s) | `grokadamw:w=1` | 600 (60 s) | "
                       "0.75 | 0.75 | met |")
    assert rows[1].endswith("| 0.88 | 0.88 | missed |")
    # nothing gets there: the accuracy at the end decides
    assert "never (50.0% at the end)" in rows[2] and rows[2].endswith("| - | met |")
    assert "accuracy 30.0% vs 50.0%" in rows[3] and rows[3].endswith("missed |")


def test_meta_table():
    from shardgrok.demo.task import MASK_PROBES
    probes = len(MASK_PROBES)
    curve = [{"step": 0}, {"step": 20, "meta_loss": 4.0, "rescale": 1.0, "log_mask": [0.0] * probes},
             {"step": 40, "meta_loss": 2.0, "rescale": 0.5, "log_mask": [0.5] * probes}]
    meta = "supergrok+meta:kappa=0,meta_every=20"
    runs = [run("x", 0, meta, 300, curve=curve), run("x", 0, "supergrok:kappa=0", 400, acc=0.97)]
    row = study.meta_table(runs, 0.95).splitlines()[2]
    assert row.startswith("| `x` | `supergrok+meta:kappa=0,meta_every=20` | 1 | 4 -> 2 | 0.5 | 0.5 |")
    assert row.endswith("| 300/400 | 99.0/97.0 |")
    # each setting its own row, paired with SuperGrok without the meta-step's keywords
    runs.append(run("x", 0, meta + ",meta_lr=0.01", None, acc=0.5, curve=curve))
    rows = study.meta_table(runs, 0.95).splitlines()[2:]
    assert len(rows) == 2 and rows[1].endswith("| never/400 | 50.0/97.0 |")


def test_meta_plot(tmp_path):
    pytest.importorskip("matplotlib")
    from shardgrok.demo.task import MASK_PROBES
    curve = [{"step": k, "meta_loss": 4.0 / k, "rescale": 1.0, "log_mask": [k / 100] * len(MASK_PROBES)}
             for k in (20, 40, 60)]
    runs = [run("x", seed, "supergrok+meta:meta_every=20", 300, curve=curve) for seed in (0, 1)]
    study.meta_plot(runs, str(tmp_path / "m.png"))
    assert (tmp_path / "m.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(SystemExit, match="no run with meta-steps"):
        study.meta_plot([run("x", 0, "supergrok", 300)], str(tmp_path / "n.png"))


def test_recommended_is_compared_with_the_choices():
    from shardgrok import recommended
    plan = {"common": {"betas": [0.9, 0.98]}}
    chosen = {f: study.derive(f, f, ",".join(f"{k}={v!r}" for k, v in recommended(f).items()
                                             if k != "betas"))
              for f in ("adamw", "grokadamw", "supergrok")}
    assert study.as_recommended(plan, chosen["adamw"]) == ("adamw", recommended("adamw"))
    assert study.recommended_mismatches(plan, chosen) == []
    chosen["grokadamw"] += ",lamb=5.0"
    got = dict(sorted(recommended("grokadamw").items()))
    assert study.recommended_mismatches(plan, chosen) == [
        f"recommended('grokadamw') is {got}, the tuning stage chose "
        f"{dict(sorted((got | {'lamb': 5.0}).items()))}"]


def test_recommended_states_the_committed_tuning_choices():
    """shardgrok.recommended is the tuning stage's choice per family, read from the committed
    results file by the plan's rule: a re-tune that changes a choice fails here until
    shardgrok/recommended.py says the same."""
    chosen = {f: s for f, (s, _) in study.select(PLAN, study.tuning_runs(PLAN)).items()}
    assert study.recommended_mismatches(PLAN, chosen) == []


def test_summary_figures_come_from_the_runs():
    plan = {"common": {"targets": [0.95]},
            "families": {"adamw": {}, "adamw+ema": {}, "grokadamw": {}, "supergrok": {}},
            "heldout": {"ops": ["x/y"], "goal_steps_ratio": 0.8,
                        "derived": [["grokadamw", "grokadamw", "gamma=0"]]},
            "multivar": {"ops": ["a-b"], "p": 7,
                         "derived": [["supergrok", "supergrok", "weight_decay=0.1"],
                                     ["supergrok", "supergrok+meta",
                                      "weight_decay=0.1,meta_every=20"],
                                     ["supergrok", "supergrok+meta",
                                      "weight_decay=0.1,meta_every=20,meta_lr=0.01"]]}}
    held = family_runs("x/y", {"adamw": 1000, "adamw+ema": 900, "grokadamw": 450, "supergrok": 900})
    held += [run("x/y", seed, "grokadamw:w=1,gamma=0", 600) for seed in range(3)]
    for r in held:
        r["lowest_after"] = {"0.95": 0.97}
    held[2]["lowest_after"] = {"0.95": 0.90}   # seed 0's grokadamw run fell back
    mv = [run("a-b", 0, "supergrok:w=1,weight_decay=0.1", 1000, secs=80),
          run("a-b", 0, "supergrok+meta:w=1,weight_decay=0.1,meta_every=20", None, acc=0.4),
          # fewer steps, more seconds: the verdict gives both
          run("a-b", 0, "supergrok+meta:w=1,weight_decay=0.1,meta_every=20,meta_lr=0.01", 900,
              secs=100),
          run("a-b", 0, "supergrok:w=1", None, acc=0.9)]   # not the multivar setting
    text = study.summary(plan, CHOSEN, held, mv).splitlines()
    assert text[0] == ("- Chosen on the tuning set: AdamW `adamw:w=1`; AdamW + EMA `adamw+ema:w=1`; "
                       "GrokAdamW `grokadamw:w=1`; SuperGrok `supergrok:w=1`.")
    assert text[1] == ("- GrokAdamW at its choice met the goal on 1 of 1 held-out operations, against "
                       "the best tuned baseline there: `x/y` 0.50x the steps, 0.50x the time.")
    assert "SuperGrok at its choice met the goal on 0 of 1" in text[2] and "`x/y` 1.00x the steps" in text[2]
    assert text[3] == ("- Once at 95% test accuracy, 14 of the 15 held-out runs that got there "
                       "stayed at or above it to the budget; held of reached, per setting: "
                       "`adamw:w=1` 3 of 3; `adamw+ema:w=1` 3 of 3; `grokadamw:w=1` 2 of 3; "
                       "`supergrok:w=1` 3 of 3; `grokadamw:w=1,gamma=0` 3 of 3.")
    assert text[4] == ("- GrokAdamW's choice as `grokadamw` with `gamma=0`: `x/y` 600 steps against "
                       "450 steps.")
    assert text[5] == ("- `a-b` mod 7, `supergrok+meta` with `weight_decay=0.1,meta_every=20`: never "
                       "(40.0% at the end) against 1,000 steps without meta-steps.")
    assert text[6] == ("- `a-b` mod 7, `supergrok+meta` with `weight_decay=0.1,meta_every=20,"
                       "meta_lr=0.01`: 900 steps against 1,000 steps without meta-steps.")
    assert text[7] == ("- SuperGrok's meta-step beat SuperGrok without it in 1 of 2 comparisons "
                       "(task x meta-step setting; fewer median steps to the target, or a higher "
                       "test accuracy at the end where neither got there): `a-b` mod 7 with "
                       "`weight_decay=0.1,meta_every=20,meta_lr=0.01` (900 steps in 100 s against "
                       "1,000 steps in 80 s without).")
    assert len(text) == 8
    # a multivar stage still running: the setting without meta-steps has no run yet
    partial = [r for r in mv if "+meta" in r["spec"]]
    assert study.meta_comparisons(plan, CHOSEN, None, partial) == []


def verdict_plan(ops):
    return {"common": {"targets": [0.95]},
            "families": {"adamw": {}, "adamw+ema": {}, "grokadamw": {}, "supergrok": {}},
            "heldout": {"ops": ops, "seeds": [1, 2, 3], "goal_steps_ratio": 0.8,
                        "derived": [["supergrok", "supergrok+meta", "meta_every=20"]]},
            "multivar": {"ops": ["a-b"], "p": 7, "derived": []}}


def test_verdict_and_summary_say_what_is_missing_and_what_was_missed():
    """The README's sentences: per contender the operations where the goal was met, the share
    of runs that stayed at 95%, the meta-step's comparisons, and the conclusion, which is drawn
    only once every held-out operation has run, and is negative unless both met it everywhere."""
    runs = family_runs("x/y", {"adamw": 1000, "adamw+ema": 800, "grokadamw": 600, "supergrok": 700})
    runs += [run("x/y", seed, "supergrok+meta:w=1,meta_every=20", 500) for seed in range(3)]
    for r in runs:
        r["lowest_after"] = {"0.95": 0.97 if r["seed"] else 0.5}   # seed 0 falls back
    text = study.verdict(verdict_plan(["x/y", "z"]), CHOSEN, runs, None)
    assert ("was met by GrokAdamW on 1 of 1 operations and by SuperGrok on 0 of 1 operations. "
            in text)
    assert ("those that stayed there to the budget: AdamW 2 of 3, AdamW + EMA 2 of 3, "
            "GrokAdamW 2 of 3, SuperGrok 2 of 3. ") in text
    assert "meta-step beat SuperGrok without it in 1 of 1 comparisons" in text
    assert text.endswith("The held-out stage is not finished (`z` still to run), so no conclusion "
                         "is drawn yet.")
    assert study.summary(verdict_plan(["x/y", "z"]), CHOSEN, runs, None).splitlines()[1] == (
        "- Held-out operations not run yet: `z`; what follows is over `x/y` only.")
    # every operation run: SuperGrok missed (700 / 800 > 0.8), so the conclusion is negative
    assert study.verdict(verdict_plan(["x/y"]), CHOSEN, runs, None).endswith(
        "The goal is not met: no speed-up over a tuned AdamW is claimed for these settings.")
    for r in runs:
        if r["spec"] == CHOSEN["supergrok"]:
            r["steps_to"]["0.95"], r["seconds_to"]["0.95"] = 600, 60
    assert study.verdict(verdict_plan(["x/y"]), CHOSEN, runs, None).endswith("The goal is met.")
