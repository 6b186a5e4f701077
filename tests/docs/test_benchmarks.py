"""The benchmark scripts run (a smoke run each; their figures are not tests)."""
import gc
import json
import math
import subprocess
import sys
import time

import pytest
import torch

from tests.support.paths import ROOT, load_script


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


# ---------------------------------------------------------------------------------------------
# the CUDA mode (benchmarks/step.py --device cuda)

def _step_module():
    """benchmarks/step.py as a module (benchmarks/ is not a package)."""
    return load_script("benchmarks/step.py", "bench_step")


def test_step_benchmark_cuda_without_cuda_exits_with_a_clear_message():
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks/step.py"), "--device", "cuda",
                           "--quick"], capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    assert "CUDA is not available" in proc.stderr and "--device cuda" in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""


def test_bytes_per_param_follows_the_formula():
    step = _step_module()
    f32, bf16 = torch.float32, torch.bfloat16
    fp32 = {"adamw-fused": 28, "adamw-foreach": 28, "grok": 40, "grok-kernel": 40, "grok-ref": 40,
            "grokadamw-pkg": 40, "super": 44, "super-trained": 44, "super-kernel": 44,
            "super-kernel-trained": 44, "super-ref": 44}
    for key, b in fp32.items():
        assert step.bytes_per_param(key, f32) == b, key
        assert step.bytes_per_param(key, f32, f32, f32) == b, key
        assert step.BYTES_PER_PARAM[key] == b, key  # the CPU run's nominal table agrees
    # bf16 everything: half
    assert [step.bytes_per_param(k, bf16) for k in ("adamw-fused", "grok", "super")] == [14, 20, 22]
    # bf16 parameters and gradients, fp32 state (shardgrok's state_dtype=None for bf16):
    # AdamW 2*2 + 2 + 4*4, GrokAdamW 2*2 + 2*2 + 6*4, SuperGrok 2*2 + 2*2 + 7*4
    assert [step.bytes_per_param(k, bf16, bf16, f32) for k in ("adamw-fused", "grok", "super")] \
        == [22, 32, 36]
    # state dtypes as read off an optimizer: by state key, or by m / v / mu
    mixed = {"exp_avg": f32, "exp_avg_sq": f32, "mu": bf16}
    assert step.bytes_per_param("super", bf16, None, mixed) == 2 * 2 + 2 * 2 + 2 * 4 + 2 * 4 + 3 * 2
    assert step.bytes_per_param("grok", f32, None, {"m": bf16}) == 8 + 8 + 2 * 2 + 8 + 8


def test_bytes_per_param_reads_the_state_the_optimizer_holds():
    import shardgrok
    step = _step_module()
    p = torch.nn.Parameter(torch.zeros(8, dtype=torch.bfloat16))
    p.grad = torch.ones_like(p)
    opt = shardgrok.GrokAdamW([p], backend="reference")
    opt.step()
    dtypes = step.read_state_dtypes(opt, [p])
    assert set(dtypes) == {"m", "v", "mu"}
    assert dtypes["mu"] == opt.state[p]["mu"].dtype
    expected = 2 * 2 + 2 * 2 + sum(2 * opt.state[p][k].element_size()
                                   for k in ("exp_avg", "exp_avg_sq", "mu"))
    assert step.bytes_per_param("grok", p.dtype, p.grad.dtype, dtypes) == expected
    q = torch.nn.Parameter(torch.zeros(8))
    q.grad = torch.ones_like(q)
    adamw = torch.optim.AdamW([q], fused=True)
    adamw.step()
    assert step.read_state_dtypes(adamw, [q]) == {"m": torch.float32, "v": torch.float32}


def test_transformer_layout_is_exact_and_mixed():
    step = _step_module()
    for n, count in ((10**9, 200), (10**8, 200), (10**7, 50), (10**6, 300), (10**5, 20)):
        shapes = step.transformer_shapes(n, count)
        assert len(shapes) == count and sum(math.prod(s) for s in shapes) == n
        mats = [s for s in shapes if len(s) == 2]
        assert 1 < len(mats) < count // 2  # a few matrices, many vectors
        assert sum(math.prod(s) for s in mats) > 0.9 * n
    assert step.transformer_shapes(1000, 10) == [(100,)] * 10  # too few tensors: the even split


class _CpuStandIn:
    """What step.py asks of a CUDA device, answered on the CPU: the CUDA mode's logic (sizes,
    memory estimates and skips, rows freed one after another, the table, targets, JSON) tested
    on a machine without a GPU. Times are perf_counter."""

    def __init__(self, free=64 * 1024**3):
        self.device = torch.device("cpu")
        self.free = free

    def describe(self):
        return {"device_name": "CPU stand-in", "device": "cpu", "capability": "0.0",
                "multiprocessors": 0, "cuda": None, "memory_total_bytes": 2 * self.free,
                "memory_free_bytes_at_start": self.free}

    def synchronize(self):
        pass

    def elapsed_ms(self, fn, n):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        return (time.perf_counter() - t) * 1e3

    def mem_get_info(self):
        return self.free, 2 * self.free

    def free_cache(self):
        gc.collect()

    def reset_peak(self):
        pass

    def peak_bytes(self):
        return 0

    def generator(self, seed):
        return torch.Generator().manual_seed(seed)


def _run_cuda_mode(monkeypatch, capsys, argv, device):
    step = _step_module()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(step, "CudaDevice", lambda: device)
    rc = step.main(["--device", "cuda", *argv])
    return rc, capsys.readouterr().out


def test_step_benchmark_cuda_mode_logic_on_a_cpu_stand_in(monkeypatch, capsys, tmp_path):
    out = tmp_path / "step_cuda.json"
    rc, stdout = _run_cuda_mode(
        monkeypatch, capsys, ["--quick", "--sizes", "200k/20,1M/20", "--copy-mib", "4",
                              "--json", str(out)], _CpuStandIn())
    assert rc == 0
    data = json.loads(out.read_text())
    assert data["header"]["device_name"] == "CPU stand-in" and data["header"]["torch"]
    assert data["copy_bandwidth"]["gbps"] > 0
    assert [s["size"] for s in data["sizes"]] == ["200k/20", "1M/20"]
    for size in data["sizes"]:
        rows = {r["optimizer"]: r for r in size["results"]}
        assert list(rows) == ["adamw-fused", "adamw-foreach", "grok", "super", "super-trained"]
        for r in rows.values():
            assert r["median_ms"] > 0 and r["ratio_to_adamw_fused"] > 0, r
            assert r["repeats"] == 3 and len(r["times_ms"]) == 3 and r["backend"], r
            assert r["fraction_of_copy"] == pytest.approx(r["gbps"] / data["copy_bandwidth"]["gbps"])
            assert r["memory_estimate_bytes"] > 0
        assert rows["adamw-fused"]["ratio_to_adamw_fused"] == 1.0
        assert rows["adamw-fused"]["bytes_per_param"] == 28 and rows["grok"]["bytes_per_param"] == 40
        assert rows["super"]["bytes_per_param"] == 44
        assert rows["grok"]["backend"] in ("kernel", "reference")
    assert len(data["targets"]) == 4 and all(t["passed"] is None for t in data["targets"])
    assert "memory:" in stdout and "copy bandwidth" in stdout and "% copy" in stdout
    assert stdout.count("n/a ") == 4  # no 1B size: the targets say so


def test_step_benchmark_cuda_mode_skips_what_does_not_fit(monkeypatch, capsys, tmp_path):
    out = tmp_path / "step_cuda.json"
    # 1M params fp32: AdamW fused alone needs 16 MB + 256 MiB slack; 100 MiB "free"
    rc, stdout = _run_cuda_mode(
        monkeypatch, capsys, ["--quick", "--sizes", "1M/20", "--copy-mib", "1", "--json", str(out)],
        _CpuStandIn(free=100 * 1024**2))
    assert rc == 0
    data = json.loads(out.read_text())
    assert "does not fit" in data["sizes"][0]["skipped"] and data["sizes"][0]["results"] == []
    assert "size 1M/20 skipped" in stdout
    # room for AdamW fused, not for the rows that need more: those rows say so, the rest run
    step = _step_module()
    shapes = step.transformer_shapes(10**6, 20)
    need = {k: step.memory_estimate(k, shapes, torch.float32)["total"] for k in step.CUDA_DEFAULT}
    assert need["adamw-fused"] < need["adamw-foreach"] < need["grok"] < need["super"]
    rc, stdout = _run_cuda_mode(
        monkeypatch, capsys, ["--quick", "--sizes", "1M/20", "--copy-mib", "1", "--json", str(out)],
        _CpuStandIn(free=need["adamw-foreach"]))
    assert rc == 0
    rows = {r["optimizer"]: r for r in json.loads(out.read_text())["sizes"][0]["results"]}
    assert rows["adamw-fused"]["median_ms"] > 0 and rows["adamw-foreach"]["median_ms"] > 0
    for key in ("grok", "super", "super-trained"):
        assert rows[key]["median_ms"] is None and rows[key]["note"].startswith("skipped: needs"), rows[key]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_step_benchmark_cuda_quick_run(tmp_path):
    out = tmp_path / "step_cuda.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks/step.py"), "--device", "cuda",
                           "--quick", "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["header"]["device_name"] == torch.cuda.get_device_name()
    assert data["copy_bandwidth"]["gbps"] > 0
    rows = {r["optimizer"]: r for size in data["sizes"] for r in size["results"]}
    assert {"adamw-fused", "adamw-foreach", "grok", "super", "super-trained"} <= set(rows)
    for r in rows.values():
        assert r["median_ms"] > 0 and r["ratio_to_adamw_fused"] > 0 and r["backend"], r
        assert r["fraction_of_copy"] > 0, r
    assert "targets" in proc.stdout


def test_cuda_targets_pass_and_fail_lines():
    step = _step_module()
    assert step.parse_sizes(step.CUDA_DEFAULT_SIZES) == [("100M/200", 10**8, 200),
                                                          ("1B/200", 10**9, 200)]

    def row(key, ms, bpp, ratio, frac):
        return {"optimizer": key, "label": step.ALL_OPTIMIZERS[key], "backend": "kernel",
                "median_ms": ms, "bytes_per_param": bpp, "ratio_to_adamw_fused": ratio,
                "gbps": 1000 * frac, "fraction_of_copy": frac}

    copy = {"gbps": 1000.0}
    sizes = [{"size": "1B/200", "params": 10**9, "results": [
        row("adamw-fused", 10.0, 28, 1.0, 0.9), row("grok", 14.0, 40, 1.4, 0.85),
        row("super", 21.0, 44, 2.1, 0.79)]}]
    lines = [t["line"] for t in step.check_targets_cuda(sizes, copy, "fp32")]
    assert [ln.split()[0] for ln in lines] == ["PASS", "FAIL", "PASS", "FAIL"], lines
    assert "1.40x (need <= 1.45x)" in lines[0] and "79.0% of the copy bandwidth" in lines[3]
    assert all(t["passed"] is None for t in step.check_targets_cuda([], copy, "fp32"))
