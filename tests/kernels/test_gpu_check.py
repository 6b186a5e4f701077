"""benchmarks/gpu_check.sh, the GPU machine's check, kept from rotting where there is no GPU:
its ``--dry-run`` runs every stage's Python on the emulated CUDA target (the builds, the GPU
tests collected, the sanitizer cases with ``backend="cuda-emulated"``, step_cuda.py
``--emulated``) and writes every file a GPU run writes, each with its provenance."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.support.paths import ROOT, head_commit

SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
STAGES = ("status", "tests", "memcheck", "racecheck", "benchmark")
PROVENANCE = ("date:", "command:", "commit:", "cpu:")


@pytest.fixture(scope="module")
def emulated(ext):
    """The emulated target, built before the script runs (its stages' time limits are for a
    built one, as on the GPU machine after its first stage)."""
    from shardgrok.kernels import cuda
    e = cuda.emulated_extension()
    if e is None:
        pytest.skip(f"the emulated CUDA target is unavailable: {cuda.emulated_unavailable_reason()}")
    return e


def _assert_provenance_first(text: str, name: str):
    """The file starts with step_common's provenance lines, naming gpu_check.sh --dry-run."""
    head = text.splitlines()[:4]
    for line, field in zip(head, PROVENANCE, strict=True):
        assert line.startswith("  " + field), (name, head)
    assert head[1].endswith("bash benchmarks/gpu_check.sh --dry-run"), (name, head[1])
    commit = head_commit()
    if commit:
        assert commit in head[2], (name, head[2])


def test_dry_run_writes_every_file_with_its_provenance(emulated, tmp_path):
    out = tmp_path / "out"
    results = sorted(p.name for p in (ROOT / "benchmarks" / "results").iterdir())
    env = dict(os.environ, OUT=str(out), PY=sys.executable)
    env.pop("GPU_CHECK_SECONDS", None)
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run"], env=env, capture_output=True,
                          text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    names = {f"gpu_emulated_{s}.txt" for s in ("status", "tests", "memcheck", "racecheck",
                                                 "summary")}
    names |= {"step_emulated_20k.txt", "step_emulated_20k.json"}
    assert {p.name for p in out.iterdir()} == names
    # nothing written into the repository's results
    assert sorted(p.name for p in (ROOT / "benchmarks" / "results").iterdir()) == results

    texts = {n: (out / n).read_text() for n in names if n.endswith(".txt")}
    for name, text in texts.items():
        _assert_provenance_first(text, name)
    summary = texts["gpu_emulated_summary.txt"]
    for stage in STAGES:  # racecheck has nothing to run without compute-sanitizer
        want = ["racecheck", "not", "run"] if stage == "racecheck" else [stage, "ok"]
        assert any(ln.split()[:len(want)] == want for ln in summary.splitlines()), summary
    assert "every stage passed" in summary
    for name in ("status", "tests", "memcheck"):
        assert texts[f"gpu_emulated_{name}.txt"].rstrip().endswith("# exit status 0"), name
    assert texts["step_emulated_20k.txt"].rstrip().endswith("# exit status 0")
    assert texts["gpu_emulated_racecheck.txt"].rstrip().endswith("# exit status 99")

    status = texts["gpu_emulated_status.txt"]
    assert "cuda_emulated" in status and "cuda-emulated (testing backend): available" in status
    assert "collected" in texts["gpu_emulated_tests.txt"]
    assert "test_cuda_ranks.py::test_two_ranks_match_one_process" in texts["gpu_emulated_tests.txt"]
    cases = texts["gpu_emulated_memcheck.txt"]
    assert "4 of 4 cases ok" in cases and "in shared memory" in cases and "in global memory" in cases

    step = texts["step_emulated_20k.txt"]
    assert "emulated target" in step and "cuda-emulated" in step
    data = json.loads((out / "step_emulated_20k.json").read_text())
    assert data["header"]["emulated"] is True and data["header"]["gpu"] is None
    assert "benchmarks/step_cuda.py --emulated" in data["header"]["command"]
    assert data["copy_bandwidth"] is None
    rows = {r["optimizer"]: r for size in data["sizes"] for r in size["results"]}
    assert set(rows) == {"adamw-fused", "grok", "super"}
    assert rows["grok"]["backend"] == rows["super"]["backend"] == "cuda-emulated"
    assert all(r["median_ms"] > 0 and r["fraction_of_copy"] is None for r in rows.values())


def test_without_a_gpu_it_points_at_the_dry_run(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    env = dict(os.environ, OUT=str(tmp_path / "out"), PY=sys.executable)
    proc = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "--dry-run" in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists()
    proc = subprocess.run(["bash", str(SCRIPT), "--quick"], env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and "usage" in proc.stderr
