"""Building the kernel: the fallback without a compiler, and torchrun-like ranks that build it
at the same time on an empty cache. Each runs in fresh processes with their own
TORCH_EXTENSIONS_DIR, so nothing here touches the suite's cached build."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from tests.support.paths import ROOT

STEP = textwrap.dedent("""
    import json, sys, warnings
    import torch, shardgrok, shardgrok.kernels as K
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(40))
    q = torch.nn.Parameter(p.detach().clone())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        auto = shardgrok.GrokAdamW([p], lr=1e-2)
        ref = shardgrok.GrokAdamW([q], lr=1e-2, backend="reference")
        for t in range(3):
            p.grad = torch.sin(torch.arange(40.0) + t); q.grad = p.grad.clone()
            auto.step(); ref.step()
    fallback = [str(w.message) for w in caught if "reference (PyTorch) step" in str(w.message)]
    try:
        shardgrok.GrokAdamW([torch.nn.Parameter(torch.ones(3))], backend="kernel").step()
        forced = None
    except RuntimeError as e:
        forced = str(e)
    print(json.dumps({"available": K.cpu_extension() is not None,
                      "reason": K.unavailable_reason(), "fallback": fallback, "forced": forced,
                      "backend": auto.get_state_summary()["backend"],
                      "diff": float((p - q).abs().max())}))
""")


def _env(tmp_path, **extra):
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"), OMP_NUM_THREADS="1",
               **extra)
    env.pop("SHARDGROK_BACKEND", None)
    env.pop("SHARDGROK_CPU_ISA", None)
    return env


def _result(proc):
    import json
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_without_a_compiler_auto_falls_back_with_one_warning_and_kernel_raises(tmp_path):
    env = _env(tmp_path, CXX=str(tmp_path / "no-such-compiler"))
    proc = subprocess.run([sys.executable, "-c", STEP], capture_output=True, text=True,
                          env=env, timeout=300)
    r = _result(proc)
    assert not r["available"] and r["reason"].startswith("building it failed")
    assert len(r["fallback"]) == 1 and "building it failed" in r["fallback"][0]
    assert r["backend"] == "reference" and r["diff"] == 0.0
    assert r["forced"] is not None and "backend='kernel'" in r["forced"] and "unavailable" in r["forced"]
    report = subprocess.run([sys.executable, "-m", "shardgrok.kernels"], capture_output=True,
                            text=True, env=env, timeout=300)
    assert report.returncode == 1 and "cpu kernel: unavailable: building it failed" in report.stdout


@pytest.mark.skipif(not os.environ.get("SHARDGROK_REQUIRE_KERNEL"),
                    reason="builds the kernel from scratch twice over (about a minute); CI runs it")
def test_ranks_starting_together_build_once_and_both_use_the_kernel(tmp_path):
    env = _env(tmp_path)
    procs = [subprocess.Popen([sys.executable, "-c", STEP], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    outs = [p.communicate(timeout=900) for p in procs]
    for p, (out, err) in zip(procs, outs):
        p.stdout, p.stderr = out, err
        r = _result(p)
        assert r["available"] and r["backend"] == "kernel" and not r["fallback"], r
        assert r["diff"] < 1e-6  # the kernel against the reference on the same steps
    built = list((tmp_path / "ext").glob("shardgrok_cpu_*/*.so"))
    assert len(built) == 1, built


@pytest.mark.skipif(not os.environ.get("SHARDGROK_REQUIRE_KERNEL"),
                    reason="compiles the extension ahead of time (about a minute); CI runs it")
def test_ahead_of_time_build_is_used_without_compiling_at_run_time(tmp_path):
    import shutil
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split()
    src = tmp_path / "src"
    for f in files:
        if f.startswith(("shardgrok/", "csrc/")) or f in ("setup.py", "pyproject.toml", "README.md"):
            (src / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(ROOT / f, src / f)
    env = _env(tmp_path, SHARDGROK_BUILD_KERNELS="1")
    build = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=src,
                           capture_output=True, text=True, env=env, timeout=900)
    assert build.returncode == 0, build.stderr[-4000:]
    assert list((src / "shardgrok").glob("_C_cpu*.so"))
    check = textwrap.dedent("""
        import json, shardgrok, shardgrok.kernels as K, torch
        p = torch.nn.Parameter(torch.randn(5)); p.grad = torch.randn(5)
        opt = shardgrok.GrokAdamW([p], backend="kernel"); opt.step()
        print(json.dumps({"file": shardgrok.__file__, "origin": K.status()["cpu"]["origin"],
                          "backend": opt.get_state_summary()["backend"]}))
    """)
    proc = subprocess.run([sys.executable, "-c", check], cwd=src, capture_output=True, text=True,
                          env=env, timeout=300)
    r = _result(proc)
    assert r["file"].startswith(str(src)) and r["backend"] == "kernel"
    assert r["origin"].startswith("ahead-of-time")
    assert not (tmp_path / "ext").exists()  # nothing was compiled just in time
