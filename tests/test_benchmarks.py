"""The benchmark scripts run (a smoke run each; their figures are not tests)."""
import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_step_benchmark_quick_run_writes_its_json(tmp_path):
    out = tmp_path / "step.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks/step.py"), "--quick",
                           "--only", "grok-kernel,super-kernel,grok-ref", "--json", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    rows = {r["optimizer"]: r for size in data["sizes"] for r in size["results"]}
    assert {"adamw-fused", "grok-kernel", "super-kernel", "grok-ref"} <= set(rows)
    assert "shardgrok GrokAdamW kernel" in proc.stdout and "x fused" in proc.stdout
    for r in rows.values():  # every optimizer timed, ratios against fused AdamW of the same run
        assert r["median_ms"] > 0 and r["ratio_to_adamw_fused"] > 0, r
    assert rows["adamw-fused"]["ratio_to_adamw_fused"] == 1.0


def test_phases_benchmark_runs():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks/phases.py"), "--size", "100k/10"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("phase 1") == 3
