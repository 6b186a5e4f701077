"""The benchmark scripts run (a smoke run each; their figures are not tests), and every results
file they write says where it came from."""
import gc
import json
import math
import statistics
import os
import subprocess
import sys
import time

import pytest
import torch

from tests.support.paths import ROOT, head_commit, load_script

BENCH = ROOT / "benchmarks"

# step_cuda imports step_common as its sibling: loaded first, it is found in sys.modules
step_common = load_script("benchmarks/step_common.py")
step_cuda = load_script("benchmarks/step_cuda.py")

PROVENANCE_LINES = ("date:", "command:", "commit:", "cpu:")


def _check_provenance(prov: dict, script: str, threads: int, gpu=None):
    """The fields every results file carries, as written by step_common.provenance."""
    assert script in prov["command"] and sys.executable in prov["command"], prov
    assert prov["git_commit"] == head_commit() and isinstance(prov["git_dirty"], (bool, type(None)))
    assert prov["date"][:4].isdigit() and "T" in prov["date"]
    assert prov["cpu"] == step_common.cpu_model() and prov["cpu_count"] == os.cpu_count()
    assert prov["threads"] == threads and prov["gpu"] == gpu


def _check_provenance_lines(text: str, prefix: str):
    lines = text.splitlines()
    for field in PROVENANCE_LINES:
        assert any(ln.startswith(prefix + field) for ln in lines), (field, text[:2000])
    commit = head_commit()
    if commit:
        assert commit in text


def test_step_benchmark_quick_run_writes_its_json(tmp_path):
    out = tmp_path / "step.json"
    proc = subprocess.run([sys.executable, str(BENCH / "step_cpu.py"), "--quick", "--threads", "1",
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
    # where it came from: in the JSON's header and at the top of the printed table
    _check_provenance(data["header"], "benchmarks/step_cpu.py", threads=1)
    assert "--quick" in data["header"]["command"] and data["header"]["kernel_isa"]
    _check_provenance_lines(proc.stdout, "  ")
    assert "threads 1" in proc.stdout


def test_provenance_names_the_command_commit_and_machine(monkeypatch):
    prov = step_common.provenance("benchmarks/x.py", ["--a", "b c"], gpu="GPU 9")
    _check_provenance(prov, "benchmarks/x.py --a 'b c'", threads=torch.get_num_threads(), gpu="GPU 9")
    assert "  gpu:      GPU 9" in step_common.provenance_lines(prov)
    # the settings that change a measurement are part of the command
    monkeypatch.setenv("SHARDGROK_CPU_ISA", "avx2")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    cmd = step_common.command_line("benchmarks/x.py", [])
    assert cmd.startswith("OMP_NUM_THREADS=1 ") and "SHARDGROK_CPU_ISA=avx2 " in cmd
    # outside a git checkout the commit is unknown, not an error
    assert step_common.git_state("/") == (None, None)
    lines = step_common.provenance_lines({**prov, "git_commit": None, "git_dirty": None}, "# ")
    assert "# commit:   unknown (not a git checkout)" in lines


def test_provenance_of_the_gpu_check_script(capsys):
    """gpu_check.sh heads its files with the same lines, naming itself as the command
    (tests/kernels/test_gpu_check.py runs its --dry-run)."""
    assert step_common.main(["bash", "benchmarks/gpu_check.sh", "--dry-run"]) == 0
    out = capsys.readouterr().out
    _check_provenance_lines(out, "  ")
    command = out.splitlines()[1]
    assert command.startswith("  command:  ") and command.endswith("bash benchmarks/gpu_check.sh --dry-run")
    script = (BENCH / "gpu_check.sh").read_text()
    assert 'header=$("$PY" benchmarks/step_common.py bash benchmarks/gpu_check.sh "$@")' in script
    assert "benchmarks/step_cuda.py --sizes 100M/200" in script and "benchmarks/step.py" not in script


@pytest.mark.parametrize("state", ["fp32", "int8"])
def test_phases_benchmark_runs(state):
    proc = subprocess.run([sys.executable, str(BENCH / "phases.py"), "--size", "100k/10",
                           "--state", state], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("phase 1") == 3 and f"{state} state (stochastic)" in proc.stdout
    _check_provenance_lines(proc.stdout, "# ")


def test_state_formats_benchmark_runs(tmp_path):
    """The smoke run: every format's row timed, its state measured from the tensors (8-bit:
    3 + 12/256 bytes a parameter at 100k/10, whose tensors are 10,000 elements), and rows
    that cannot run here (torchao, bitsandbytes) saying why instead of failing."""
    out = tmp_path / "f.json"
    proc = subprocess.run([sys.executable, str(BENCH / "state_formats.py"), "--quick", "--json",
                           str(out)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _check_provenance_lines(proc.stdout, "  ")
    rows = {r["optimizer"]: r for r in json.loads(out.read_text())["sizes"][0]["rows"]}
    for fam in ("grok", "super"):
        assert rows[f"{fam}-fp32"]["state_bytes_per_param"] == 12.0
        assert rows[f"{fam}-bf16"]["state_bytes_per_param"] == 6.0
        assert abs(rows[f"{fam}-int8"]["state_bytes_per_param"] - (3 + 12 / 256)) < 0.01
        assert all(rows[f"{fam}-{f}"]["median_ms"] > 0 for f in ("fp32", "bf16", "int8"))
    for other in ("torchao-adamw8bit", "bnb-adamw8bit"):
        assert rows[other]["median_ms"] is not None or rows[other]["note"].startswith("cannot run")


@pytest.mark.parametrize("optimizer", ["grokadamw", "supergrok"])
def test_long_run_benchmark_runs(tmp_path, optimizer):
    """The smoke run, one process: samples every 100 steps, the plan cache inside its bound,
    and after a group added at step 300 and five load_state_dict round trips the state still
    equals the reference path's run to fp32 rounding."""
    out = tmp_path / "long.json"
    proc = subprocess.run([sys.executable, str(BENCH / "long_run.py"), "--optimizer", optimizer,
                           "--steps", "600", "--every", "100", "--json", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _check_provenance_lines(proc.stdout, "  ")
    res = json.loads(out.read_text())
    _check_provenance(res["provenance"], "long_run.py", 1)
    (samples,) = res["samples_per_rank"]
    assert [s["step"] for s in samples] == list(range(100, 601, 100))
    assert 1 <= res["max_plans"] <= res["plan_bound"]
    diffs = res["relative_diff_from_reference"]
    assert diffs["step"] == 0 and max(diffs.values()) < 1e-5, diffs


def test_restart_repro_runs(tmp_path):
    """The smoke run, one try per rendezvous, init_distributed's rows only (a plain row's
    failed restart waits out the 30 s timeout, and may or may not fail: that race is what the
    script counts): both restarts get through."""
    out = tmp_path / "restart.json"
    proc = subprocess.run([sys.executable, str(BENCH / "restart_repro.py"), "--tries", "1",
                           "--inits", "shardgrok", "--json", str(out)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _check_provenance_lines(proc.stdout, "  ")
    res = json.loads(out.read_text())
    rows = {(r["rendezvous"], r["init"]): r["got_through"] for r in res["rows"]}
    assert rows == {("static", "shardgrok"): 1, ("c10d", "shardgrok"): 1}


def test_grokking_results_carry_their_provenance(tmp_path):
    out, png = tmp_path / "g.json", tmp_path / "g.png"
    proc = subprocess.run([sys.executable, str(BENCH / "grokking.py"), "--p", "5", "--op", "x+y",
                           "--opt", "adamw", "--steps", "2", "--eval-every", "1", "--width", "8",
                           "--heads", "1", "--jobs", "1", "--threads", "1", "--quiet",
                           "--json", str(out), "--png", str(png)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    _check_provenance(data["provenance"], "benchmarks/grokking.py", threads=1)
    assert data["command"] == data["provenance"]["command"]
    pytest.importorskip("matplotlib")
    from PIL import Image
    assert json.loads(Image.open(png).info["Description"]) == data["provenance"]


# ---------------------------------------------------------------------------------------------
# the CUDA run (benchmarks/step_cuda.py)

def test_step_benchmark_cuda_without_cuda_exits_with_a_clear_message():
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    proc = subprocess.run([sys.executable, str(BENCH / "step_cuda.py"), "--device", "cuda",
                           "--quick"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2
    assert "CUDA is not available" in proc.stderr and "--device cuda" in proc.stderr
    assert "benchmarks/step_cpu.py" in proc.stderr  # where the CPU run is
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    # and the CPU run points at the GPU one
    proc = subprocess.run([sys.executable, str(BENCH / "step_cpu.py"), "--device", "cuda"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2 and "benchmarks/step_cuda.py" in proc.stderr


def test_bytes_per_param_follows_the_formula():
    f32, bf16 = torch.float32, torch.bfloat16
    fp32 = {"adamw-fused": 28, "adamw-foreach": 28, "grok": 40, "grok-kernel": 40, "grok-ref": 40,
            "grokadamw-pkg": 40, "super": 44, "super-trained": 44, "super-kernel": 44,
            "super-kernel-trained": 44, "super-ref": 44}
    for key, b in fp32.items():
        assert step_common.bytes_per_param(key, f32) == b, key
        assert step_common.bytes_per_param(key, f32, f32, f32) == b, key
        assert step_common.BYTES_PER_PARAM[key] == b, key  # the CPU run's nominal table agrees
    # bf16 everything: half
    assert [step_common.bytes_per_param(k, bf16) for k in ("adamw-fused", "grok", "super")] == [14, 20, 22]
    # bf16 parameters and gradients, fp32 state (shardgrok's state_dtype=None for bf16):
    # AdamW 2*2 + 2 + 4*4, GrokAdamW 2*2 + 2*2 + 6*4, SuperGrok 2*2 + 2*2 + 7*4
    assert [step_common.bytes_per_param(k, bf16, bf16, f32) for k in ("adamw-fused", "grok", "super")] \
        == [22, 32, 36]
    # state dtypes as read off an optimizer: by state key, or by m / v / mu
    mixed = {"exp_avg": f32, "exp_avg_sq": f32, "mu": bf16}
    assert step_common.bytes_per_param("super", bf16, None, mixed) == 2 * 2 + 2 * 2 + 2 * 4 + 2 * 4 + 3 * 2
    assert step_common.bytes_per_param("grok", f32, None, {"m": bf16}) == 8 + 8 + 2 * 2 + 8 + 8


def test_bytes_per_param_reads_the_state_the_optimizer_holds():
    import shardgrok
    p = torch.nn.Parameter(torch.zeros(8, dtype=torch.bfloat16))
    p.grad = torch.ones_like(p)
    opt = shardgrok.GrokAdamW([p], backend="reference")
    opt.step()
    dtypes = step_common.read_state_dtypes(opt, [p])
    assert set(dtypes) == {"m", "v", "mu"}
    assert dtypes["mu"] == opt.state[p]["mu"].dtype
    expected = 2 * 2 + 2 * 2 + sum(2 * opt.state[p][k].element_size()
                                   for k in ("exp_avg", "exp_avg_sq", "mu"))
    assert step_common.bytes_per_param("grok", p.dtype, p.grad.dtype, dtypes) == expected
    q = torch.nn.Parameter(torch.zeros(8))
    q.grad = torch.ones_like(q)
    adamw = torch.optim.AdamW([q], fused=True)
    adamw.step()
    assert step_common.read_state_dtypes(adamw, [q]) == {"m": torch.float32, "v": torch.float32}


def test_transformer_layout_is_exact_and_mixed():
    for n, count in ((10**9, 200), (10**8, 200), (10**7, 50), (10**6, 300), (10**5, 20)):
        shapes = step_common.transformer_shapes(n, count)
        assert len(shapes) == count and sum(math.prod(s) for s in shapes) == n
        mats = [s for s in shapes if len(s) == 2]
        assert 1 < len(mats) < count // 2  # a few matrices, many vectors
        assert sum(math.prod(s) for s in mats) > 0.9 * n
    assert step_common.transformer_shapes(1000, 10) == [(100,)] * 10  # too few tensors: the even split


class _CpuStandIn:
    """What step_cuda.py asks of a CUDA device, answered on the CPU: the CUDA mode's logic (sizes,
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


def _run_cuda_mode(monkeypatch, capsys, argv, device, indices=None):
    """step_cuda.main(argv) on ``device``; ``indices`` collects the --device index it asked for."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(step_cuda, "CudaDevice",
                        lambda index=None: (indices if indices is not None else []).append(index) or device)
    rc = step_cuda.main(argv)
    return rc, capsys.readouterr().out


def test_step_benchmark_cuda_mode_logic_on_a_cpu_stand_in(monkeypatch, capsys, tmp_path):
    out = tmp_path / "step_cuda.json"
    indices = []
    rc, stdout = _run_cuda_mode(
        monkeypatch, capsys, ["--quick", "--sizes", "200k/20,1M/20", "--copy-mib", "4",
                              "--device", "cuda:0", "--json", str(out)],
        _CpuStandIn(), indices)
    assert rc == 0 and indices == [0]
    data = json.loads(out.read_text())
    assert data["header"]["device_name"] == "CPU stand-in" and data["header"]["torch"]
    # where it came from, with the GPU's name: in the JSON's header and the printed header
    _check_provenance(data["header"], "benchmarks/step_cuda.py", threads=torch.get_num_threads(),
                      gpu="CPU stand-in")
    _check_provenance_lines(stdout, "  ")
    assert "  gpu:      CPU stand-in" in stdout
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
    shapes = step_common.transformer_shapes(10**6, 20)
    need = {k: step_cuda.memory_estimate(k, shapes, torch.float32)["total"]
            for k in step_cuda.CUDA_DEFAULT}
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
    proc = subprocess.run([sys.executable, str(BENCH / "step_cuda.py"), "--device", "cuda",
                           "--quick", "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["header"]["device_name"] == torch.cuda.get_device_name()
    _check_provenance(data["header"], str(BENCH / "step_cuda.py"), threads=data["header"]["threads"],
                      gpu=torch.cuda.get_device_name())
    assert data["copy_bandwidth"]["gbps"] > 0
    rows = {r["optimizer"]: r for size in data["sizes"] for r in size["results"]}
    assert {"adamw-fused", "adamw-foreach", "grok", "super", "super-trained"} <= set(rows)
    for r in rows.values():
        assert r["median_ms"] > 0 and r["ratio_to_adamw_fused"] > 0 and r["backend"], r
        assert r["fraction_of_copy"] > 0, r
    assert "targets" in proc.stdout


def test_step_benchmark_emulated_mode_takes_no_device(capsys):
    """--emulated (gpu_check.sh --dry-run; run in tests/kernels/test_gpu_check.py) is CPU
    tensors on the emulated target: a --device, even the default cuda, is refused."""
    for device in ("cuda", "cuda:0"):
        with pytest.raises(SystemExit) as e:
            step_cuda.main(["--emulated", "--device", device])
        assert e.value.code == 2
        assert "--emulated runs on CPU tensors" in capsys.readouterr().err


def test_cuda_targets_pass_and_fail_lines():
    assert step_common.parse_sizes(step_cuda.CUDA_DEFAULT_SIZES) == [("100M/200", 10**8, 200),
                                                                     ("1B/200", 10**9, 200)]

    def row(key, ms, bpp, ratio, frac):
        return {"optimizer": key, "label": step_common.ALL_OPTIMIZERS[key], "backend": "kernel",
                "median_ms": ms, "bytes_per_param": bpp, "ratio_to_adamw_fused": ratio,
                "gbps": 1000 * frac, "fraction_of_copy": frac}

    copy = {"gbps": 1000.0}
    sizes = [{"size": "1B/200", "params": 10**9, "results": [
        row("adamw-fused", 10.0, 28, 1.0, 0.9), row("grok", 14.0, 40, 1.4, 0.85),
        row("super", 21.0, 44, 2.1, 0.79)]}]
    lines = [t["line"] for t in step_cuda.check_targets(sizes, copy, "fp32")]
    assert [ln.split()[0] for ln in lines] == ["PASS", "FAIL", "PASS", "FAIL"], lines
    assert "1.40x (need <= 1.45x)" in lines[0] and "79.0% of the copy bandwidth" in lines[3]
    assert all(t["passed"] is None for t in step_cuda.check_targets([], copy, "fp32"))


def test_grokking_report_pairs_seeds():
    """--paired: per operation, one spec's steps over another's for each seed and their median,
    as computed here from the result file's runs."""
    path = ROOT / "benchmarks/results/grokking_study_tuned.json"
    spec, base = "adamw:weight_decay=3.0", "adamw:weight_decay=2.0"
    proc = subprocess.run([sys.executable, str(BENCH / "grokking.py"), "--report", str(path),
                           "--paired", spec, base], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = json.loads(path.read_text())["runs"]
    for op in ("x*y", "x+y", "x-y"):
        steps = {s: {r["seed"]: r["steps_to"]["0.95"] for r in runs if r["op"] == op and r["spec"] == s}
                 for s in (spec, base)}
        ratios = [steps[spec][k] / steps[base][k] for k in steps[spec]
                  if steps[spec][k] and steps[base].get(k)]
        row = next(line for line in proc.stdout.splitlines() if line.startswith(f"| `{op}` |"))
        assert row.rstrip(" |").endswith(f"{statistics.median(ratios):.3f}"), row


def test_profile_reads_callgrind_annotate():
    """benchmarks/profile_formats.py's parsing of callgrind_annotate's two reports (functions;
    source lines, inlined copies summed, a header's path as the compiler wrote it), and its
    refusal of a bad configuration. The valgrind runs themselves are not a test (minutes)."""
    prof = load_script("benchmarks/profile_formats.py")
    funcs = ("--------\n 600 (60.00%)  PROGRAM TOTALS\n"
             " 400 (40.00%)  /x/csrc/cpu/../grok_math.h:void (anonymous namespace)::store_codes<true>"
             "(sg::Segment const&, long) [/y.so]\n"
             " 200 (20.00%)  /x/csrc/cpu/loops.h:void (anonymous namespace)::store_codes<true>"
             "(sg::Segment const&, long) [/y.so]\n")
    rows = prof.top_functions(funcs, 600, 100, 5)
    assert len(rows) == 2 and "4.00/elem  grok_math.h: void store_codes<true>" in rows[0]
    lines = ("-- Auto-annotated source: /x/csrc/cpu/../grok_math.h\n"
             "-- line 182 ----------\n"
             "        .           x ^= x >> 16;\n"
             "  30 ( 5.00%)    x *= 0x7FEB352Du;\n"
             "   5 ( 0.83%)  => /x/other.h:f (2x)\n"
             "-- line 190 ----------\n"
             "  20 ( 3.33%)    x *= 0x7FEB352Du;\n"
             " 599 (99.80%)  events annotated\n"
             "-- User-annotated source: /x/other.h\n"
             "  99 (16.50%)    y = 1;\n")
    rows = prof.top_lines(lines, 600, 10, 5)
    assert len(rows) == 2, rows
    assert "3.00/elem  grok_math.h:183: x *= 0x7FEB352Du;" in rows[0]
    assert "2.00/elem  grok_math.h:190: x *= 0x7FEB352Du;" in rows[1]
    with pytest.raises(SystemExit) as e:
        prof.main(["--configs", "adam:fp32"])
    assert e.value.code == 2
