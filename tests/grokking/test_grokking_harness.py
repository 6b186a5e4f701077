"""benchmarks/grokking.py: the formula parser against brute force, its errors, the optimizer
specs, and a short run's JSON."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from shardgrok.demo.ops import parse_op
from shardgrok.demo.task import DemoConfig, make_data

from tests.support.paths import ROOT, load_script

load_script("benchmarks/step_common.py")   # grokking.py imports it from its own folder
grokking = load_script("benchmarks/grokking.py")


def brute(formula: str, p: int) -> dict[tuple[int, int], int]:
    """The table by Python integers: '/' by searching the inverse."""
    out = {}
    for x in range(p):
        for y in range(p):
            if formula == "x*y":
                out[x, y] = x * y % p
            elif formula == "x+y":
                out[x, y] = (x + y) % p
            elif formula == "x-y":
                out[x, y] = (x - y) % p
            elif formula == "x/y":
                if y:
                    out[x, y] = next(z for z in range(p) if z * y % p == x)
            elif formula == "x**2+x*y+y**2":
                out[x, y] = (x * x + x * y + y * y) % p
            elif formula == "-(x+3)/(y*2)":
                if y:
                    out[x, y] = next(z for z in range(p) if z * 2 * y % p == (-(x + 3)) % p)
            elif formula == "x*x":
                out[x, y] = x * x % p
    return out


@pytest.mark.parametrize("formula", ["x*y", "x+y", "x-y", "x/y", "x**2+x*y+y**2", "-(x+3)/(y*2)",
                                     "x*x"])
def test_formulas_match_brute_force(formula):
    p = 7
    want = brute(formula, p)
    d = make_data(p, 0.5, seed=0, op=formula)
    x, y = torch.cat([d.x_train, d.x_val, d.x_test]), torch.cat([d.y_train, d.y_val, d.y_test])
    got = {(int(a), int(b)): int(c) for (a, _, b, _), c in zip(x.tolist(), y.tolist())}
    assert len(got) == len(x)   # the three splits are disjoint
    assert got == want  # every defined pair once, dividing by 0 left out


def test_formulas_in_more_letters():
    """(a*c + b*d - e) mod 5 over every 5-tuple, as [a, op, b, op, c, op, d, op, e, eq]."""
    p = 5
    d = make_data(p, 0.5, seed=1, op="a*c+b*d-e")
    x, y = torch.cat([d.x_train, d.x_val, d.x_test]), torch.cat([d.y_train, d.y_val, d.y_test])
    assert x.shape == (p ** 5, 10)
    assert (x[:, 1:-1:2] == p).all() and (x[:, -1] == p + 1).all()
    got = {tuple(r[0::2]): int(c) for r, c in zip(x.tolist(), y.tolist())}
    assert got == {(a, b, c, e_, f): (a * c + b * e_ - f) % p
                   for a in range(p) for b in range(p) for c in range(p) for e_ in range(p)
                   for f in range(p)}
    assert parse_op("b-a", 7).variables == ("a", "b") and parse_op("y", 7).variables == ("x", "y")
    with pytest.raises(ValueError, match="takes 2 operands"):
        parse_op("b-a", 7)(torch.arange(3))


def test_three_disjoint_splits():
    d = make_data(97, 0.5, seed=3, op="x*y", val_fraction=0.1)
    assert (len(d.y_train), len(d.y_val), len(d.y_test)) == (4704, 941, 3764)
    rows = [tuple(r) for t in (d.x_train, d.x_val, d.x_test) for r in t.tolist()]
    assert len(set(rows)) == 97 * 97
    # the training split does not depend on how the rest is divided
    other = make_data(97, 0.5, seed=3, op="x*y", val_fraction=0.3)
    assert torch.equal(other.x_train, d.x_train) and len(other.y_val) == 2823
    with pytest.raises(ValueError, match="val_fraction must be in"):
        DemoConfig(train_fraction=0.5, val_fraction=0.5)


@pytest.mark.parametrize("formula,message", [
    ("x//y", "FloorDiv is not allowed"),
    ("x%y", "Mod is not allowed"),
    ("zz+1", "unknown name 'zz'"),
    ("X+1", "unknown name 'X'"),
    ("x**y", "exponent of \\*\\* must be an integer literal"),
    ("x+", "is not a formula"),
    ("", "must be a formula"),
    ("1.5*x", "non-negative integers"),
    ("__import__('os')", "Call is not allowed"),
    ("x if y else 1", "IfExp is not allowed"),
])
def test_bad_formulas_say_what_is_wrong(formula, message):
    with pytest.raises(ValueError, match=message):
        parse_op(formula, 7)


def test_division_needs_a_prime():
    with pytest.raises(ValueError, match="needs p prime"):
        parse_op("x/y", 8)
    parse_op("x*y", 8)  # no division: any modulus


def test_specs():
    assert grokking.parse_spec("adamw") == ("adamw", {})
    assert grokking.parse_spec("grokadamw:lamb=5,betas=(0.9,0.99),layer_groups=True") == (
        "grokadamw", {"lamb": 5, "betas": (0.9, 0.99), "layer_groups": True})
    for bad, message in [("sgd", "unknown optimizer 'sgd'"), ("adamw:lr", "key=value"),
                         ("adamw:lr=abs(1)", "not a Python literal"), ("adamw:lr=(", "key=value")]:
        with pytest.raises(ValueError, match=message):
            grokking.parse_spec(bad)


def test_bad_formula_on_the_command_line_is_a_usage_error():
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks/grokking.py"), "--op", "x^y",
                        "--steps", "1"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "BitXor is not allowed" in r.stderr and "Traceback" not in r.stderr


def test_short_run_json(tmp_path):
    out = tmp_path / "g.json"
    cmd = [sys.executable, str(ROOT / "benchmarks/grokking.py"), "--p", "11", "--op", "x+y",
           "--op", "x/y", "--seeds", "0,1", "--steps", "30", "--eval-every", "10", "--width",
           "32", "--heads", "2", "--jobs", "2", "--lr", "3e-3", "--quiet", "--json", str(out),
           "--opt", "adamw", "--opt", "adam+ema:lamb=3", "--opt", "grokadamw:layer_groups=True",
           "--opt", "supergrok+meta:meta_every=10,warmup_steps=5"]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600)
    d = json.loads(out.read_text())
    assert d["schema"] == grokking.SCHEMA
    assert d["config"]["ops"] == ["x+y", "x/y"] and d["config"]["targets"] == [0.95, 0.99]
    assert len(d["runs"]) == 2 * 2 * 4
    for r in d["runs"]:
        assert r["error"] is None, r
        assert set(r["steps_to"]) == set(r["seconds_to"]) == {"0.95", "0.99"}
        assert r["steps_run"] <= 30 and r["curve"][0]["step"] == 0
        assert [c["step"] for c in r["curve"]] == sorted(c["step"] for c in r["curve"])
        assert all(0.0 <= c["test_acc"] <= 1.0 and 0.0 <= c["val_acc"] <= 1.0 for c in r["curve"])
        if r["steps_to"]["0.95"] is None:
            assert r["steps_run"] == 30
    # the same (op, seed) start from the same weights: the first evaluation agrees
    firsts = {(r["op"], r["seed"]): set() for r in d["runs"]}
    for r in d["runs"]:
        firsts[r["op"], r["seed"]].add(r["curve"][0]["val_loss"])
    assert all(len(v) == 1 for v in firsts.values())
    assert {(row["op"], row["spec"]) for row in d["summary"]} == {(r["op"], r["spec"]) for r in d["runs"]}
    for row in d["summary"]:
        assert row["seeds"] == 2 and row["errors"] == 0
    # the meta-step's record: its look-ahead loss and the meta-net's log-mask at each evaluation
    meta = next(r for r in d["runs"] if r["spec"].startswith("supergrok+meta"))
    last = meta["curve"][-1]
    assert last["meta_loss"] > 0 and len(last["log_mask"]) == 9 and "rescale" in last
    assert last["breakpoints"] >= len(last["breakpoints_near"]) > 0
    assert last["breakpoints_near"] == sorted(last["breakpoints_near"])
    assert "meta_loss" not in next(r for r in d["runs"] if r["spec"] == "adamw")["curve"][-1]

    # resumed: the runs there are kept as they are, only the missing ones run
    before = {(r["op"], r["seed"], r["spec"]): r for r in d["runs"]}
    more = [c if c != "0,1" else "0,1,2" for c in cmd]
    more = more[:more.index("--opt")] + ["--opt", "adamw", "--opt", "adam+ema:lamb=3"]
    r = subprocess.run([c for c in more if c != "--quiet"], check=True, capture_output=True,
                       text=True, timeout=600)
    assert "8 of the planned runs are there, 4 to run" in r.stdout, r.stdout
    d2 = json.loads(out.read_text())
    assert len(d2["runs"]) == 16 + 4 and len(d2["sessions"]) == 2
    for r in d2["runs"]:
        key = (r["op"], r["seed"], r["spec"])
        assert r == before[key] if key in before else r["seed"] == 2
    # another setting that changes what a run measures is refused, naming it
    bad = [c if c != "3e-3" else "1e-3" for c in more]
    r = subprocess.run(bad, capture_output=True, text=True, timeout=600)
    assert r.returncode != 0 and "lr: 0.003 there, 0.001 here" in r.stderr


def test_medians_count_unreached_runs_as_slowest():
    runs = [{"op": "x*y", "spec": "adamw", "seed": s, "error": None, "final_test_acc": 1.0,
             "steps_to": {"0.95": st}, "seconds_to": {"0.95": sec}}
            for s, (st, sec) in enumerate([(100, 10.0), (300, 20.0), (None, None)])]
    row, = grokking.summarise(runs, [0.95])
    assert row["median_steps_to_0.95"] == 300 and row["median_seconds_to_0.95"] == 20.0
    assert row["reached_0.95"] == 2
    runs[1]["steps_to"]["0.95"] = runs[1]["seconds_to"]["0.95"] = None   # most did not reach it
    row, = grokking.summarise(runs, [0.95])
    assert row["median_steps_to_0.95"] is None and row["reached_0.95"] == 1


def test_report_tables_from_json(tmp_path):
    """--report: the docs' tables from result files, with the ratio to a baseline spec."""
    def run(spec, seed, steps, secs):
        return {"op": "x+y", "spec": spec, "seed": seed, "error": None, "final_test_acc": 0.99,
                "wall_time_s": secs, "steps_run": steps, "lowest_after": {"0.95": 0.96},
                "steps_to": {"0.95": steps}, "seconds_to": {"0.95": secs}, "curve": []}
    d = {"schema": grokking.SCHEMA, "config": {"targets": [0.95], "p": 11},
         "runs": [run("adamw", 0, 400, 40.0), run("adamw", 1, 600, 50.0),
                  run("grokadamw", 0, 200, 30.0), run("grokadamw", 1, 300, 20.0)]}
    path = tmp_path / "r.json"
    path.write_text(json.dumps(d))
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks/grokking.py"), "--report",
                          str(path), "--versus", "adamw"], capture_output=True, text=True,
                         check=True, timeout=120).stdout
    rows = {line.split("|")[2].strip(): line for line in out.splitlines()[2:]}
    # median (min-max) steps, reached / held, accuracy at the end, ms per step, s to the target
    assert "| 500 (400-600) | 2 / 2 | 99.0% | 92 | 45 | 1.00x / 1.00x |" in rows["`adamw`"]
    assert "| 250 (200-300) | 2 / 2 | 99.0% | 108 | 25 | 2.00x / 1.80x |" in rows["`grokadamw`"]
    # the same runs with the baseline's from another file: no time ratio across run sets
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**d, "runs": d["runs"][:2]}))
    path.write_text(json.dumps({**d, "runs": d["runs"][2:]}))
    split = subprocess.run([sys.executable, str(ROOT / "benchmarks/grokking.py"), "--report",
                            str(path), str(other), "--versus", "adamw"], capture_output=True,
                           text=True, check=True, timeout=120).stdout
    assert "| 2.00x / other run set |" in split
    path.write_text(json.dumps(d))
    only = subprocess.run([sys.executable, str(ROOT / "benchmarks/grokking.py"), "--report",
                           str(path), "--only", "grokadamw", "--versus", "adamw"],
                          capture_output=True, text=True, check=True, timeout=120).stdout
    assert len(only.splitlines()) == 3 and "2.00x / 1.80x" in only   # the ratio still to adamw
    d["runs"].append(run("adamw", 0, 800, 60.0) | {"op": "x*y"})
    path.write_text(json.dumps(d))
    pooled = subprocess.run([sys.executable, str(ROOT / "benchmarks/grokking.py"), "--report",
                             str(path), "--pool-ops", "--only", "adamw"], capture_output=True,
                            text=True, check=True, timeout=120).stdout
    assert pooled.splitlines()[2].startswith("| `all` | `adamw` | 3 | 600 (400-800) | 3 / 3 |")
    d["runs"].pop()
    # --diagnostics: alpha and clipping from the curves (medians over seeds)
    d["runs"][2]["curve"] = [{"step": 0, "train_loss": None, "train_acc": None},
                             {"step": 10, "alpha": 0.9, "clip_coef": 0.2, "train_loss": 2.0,
                              "train_acc": 0.5},
                             {"step": 20, "alpha": 0.5, "clip_coef": 0.4, "train_loss": 1.0,
                              "train_acc": 0.75}]
    d["runs"][3]["curve"] = [{"step": 10, "alpha": 0.7, "clip_coef": 0.6, "train_loss": 3.0,
                              "train_acc": 0.25}]
    path.write_text(json.dumps(d))
    diag = subprocess.run([sys.executable, str(ROOT / "benchmarks/grokking.py"), "--report",
                           str(path), "--diagnostics"], capture_output=True, text=True,
                          check=True, timeout=120).stdout
    assert diag.splitlines()[2] == "| `x+y` | `grokadamw` | 0.6 | 0.6 | 0.5 | 0.4 | 2 | 0.5 |"
    assert len(diag.splitlines()) == 3   # adamw records no alpha: no row
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"schema": "other"}))
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks/grokking.py"), "--report",
                        str(bad)], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "not a shardgrok.grokking/2 file" in r.stderr
