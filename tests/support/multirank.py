"""Running a multi-rank test job: torchrun on this machine (gloo, CPU) executing scenarios of
tests/support/dist_worker.py, whose per-rank results come back as files."""
from __future__ import annotations

import math
import os
import pathlib
import subprocess
import sys

import pytest
import torch

from tests.support.helpers import max_diff  # noqa: F401  (the tests import it from here)
from tests.support.paths import ROOT


def worker_env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore::UserWarning")
    # The workers run as modules of this package (python -m tests.support...) from any working
    # directory, and import the checkout under test as pytest does, ahead of any installed copy.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, (str(ROOT), env.get("PYTHONPATH"))))
    env.pop("RANK", None)
    return env


def launch(world: int, out: pathlib.Path, names, ckpt: pathlib.Path, *extra, timeout=600):
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={world}", "-m", "tests.support.dist_worker", "--out", str(out),
           "--ckpt", str(ckpt), "--scenarios", ",".join(names), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=worker_env())
    # A rank can write its result and still die afterwards (at teardown, in a collective another
    # rank left hanging): the files alone do not say the job was sound.
    if proc.returncode != 0:
        raise AssertionError(f"torchrun exited {proc.returncode} ({', '.join(names)})\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    results = {}
    for name in names:
        per_rank = []
        for r in range(world):
            f = out / f"{name}.{r}.pt"
            if not f.exists():
                raise AssertionError(f"{name}: rank {r} wrote no result; torchrun exit "
                                     f"{proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
            per_rank.append(torch.load(f, weights_only=False))
        results[name] = per_rank
    return proc, results


def ok(results, name):
    """Per-rank results of a scenario, failing the test with the rank's traceback if it raised."""
    out = []
    for r, res in enumerate(results[name]):
        if "traceback" in res:
            pytest.fail(f"{name} failed on rank {r}:\n{res['traceback']}")
        out.append(res["ok"])
    return out


def assert_same_run(got: dict, want: dict, tol: float = 1e-6, coef_rel: float = 1e-6,
                    backend: str | None = None, rtol: float | None = None) -> None:
    """A run (scenarios.run) against the single-process one: whole parameters within ``tol``
    max abs (or, given ``rtol``, within ``rtol`` of their model-wide scale:
    relative_param_diff), and at every step the same gate decisions, clip coefficients
    (``coef_rel``) and alpha. ``got`` ran on ``backend`` (assert_backend), ``want`` on the
    default one."""
    if rtol is None:
        d = max_diff(got["params"], want["params"])
        assert d < tol, d
    else:
        d = relative_param_diff(got["params"], want["params"])
        assert d <= rtol, d
    assert_backend(got["record"], backend)
    assert_backend(want["record"])
    for t, (g, w) in enumerate(zip(got["record"], want["record"], strict=True)):
        assert g["last_clip_coefs"] == pytest.approx(w["last_clip_coefs"], rel=coef_rel, abs=0), t
        assert g["gate_engaged"] == w["gate_engaged"], t
        for key in ("alpha", "cached_alpha"):  # GrokAdamW reports one, SuperGrok the other
            assert (g[key] is None) == (w[key] is None)
            assert g[key] is None or g[key] == pytest.approx(w[key], rel=1e-12), (t, key)


def assert_backend(record: list[dict], want: str | None = None) -> None:
    """Every step of an fp32 run took the compiled kernel when this machine has it built (the
    default backend; a silent fallback would leave the kernel untested under the engines), or
    the backend ``want`` it asked for."""
    import shardgrok.kernels
    if want is None:
        want = "kernel" if shardgrok.kernels.cpu_extension() is not None else "reference"
    assert [r["backend"] for r in record] == [want] * len(record)


def assert_same_steps(got: list[dict], want: list[dict], coefs: bool = True,
                      backend: str | None = None) -> None:
    """Every step of an engine run as of ``want``: the kernel (``got``'s: ``backend``), the
    global step, the gate decisions, alpha and (``coefs``) the clip coefficients."""
    import pytest
    assert_backend(got, backend)
    assert_backend(want)
    for t, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g["global_step"] == w["global_step"], t
        assert g["gate_engaged"] == w["gate_engaged"], t
        for key in ("alpha", "cached_alpha"):
            assert (g[key] is None) == (w[key] is None)
            assert g[key] is None or g[key] == pytest.approx(w[key], rel=1e-12), (t, key)
        if coefs:
            assert g["last_clip_coefs"] == pytest.approx(w["last_clip_coefs"], rel=1e-6), t


def relative_param_diff(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    """max_diff over the model-wide scale of the parameters (max |want|): the measure of the
    kernel tests' FP32_RTOL (tests/kernels/test_kernel.py, assert_fp32_close)."""
    scale = max(float(w.detach().abs().max()) for w in want if w.numel())
    return max_diff(got, want) / scale


def emulated_cuda_target():
    """Build (once, here, before the ranks start) the emulated CUDA target that
    backend="cuda-emulated" runs, or skip saying why it is unavailable; a failure where
    SHARDGROK_REQUIRE_KERNEL=1, as the CPU kernel is then (the same compiler builds both)."""
    from shardgrok.kernels import cuda
    if cuda.emulated_extension() is None:
        why = f"the emulated CUDA target is unavailable: {cuda.emulated_unavailable_reason()}"
        if os.environ.get("SHARDGROK_REQUIRE_KERNEL") == "1":
            pytest.fail(why)
        pytest.skip(why)


def assert_matches_oracle(got: dict, want: dict, tol: float, backend: str | None = None) -> None:
    """A run (scenarios.run) against the independent oracle's (scenarios.naive_run): parameters
    within ``tol`` max abs; for SuperGrok also every step's gate decisions and clip coefficients
    (measured within 2e-7 relative of the float64 oracle in float32)."""
    d = max_diff(got["params"], want["params"])
    assert d < tol, d
    assert_backend(got["record"], backend)
    if want["gates"]:
        assert [r["gate_engaged"] for r in got["record"]] == want["gates"]
        for t, (g, w) in enumerate(zip(got["record"], want["clips"], strict=True)):
            assert g["last_clip_coefs"] == pytest.approx(w, rel=1e-6, abs=0), t


def meta_gradient_error(got: dict, want: dict) -> float:
    """Relative error of a meta-gradient (``{"grads": [...]}``) against another, over the whole
    gradient: some entries are zero in exact arithmetic (a uniform shift of the log-mask leaves
    the norm-preserving smart gradient unchanged), so per-entry ratios mean nothing."""
    assert len(got["grads"]) == len(want["grads"]), (len(got["grads"]), len(want["grads"]))
    for i, (x, y) in enumerate(zip(got["grads"], want["grads"], strict=True)):
        assert x.shape == y.shape, (i, tuple(x.shape), tuple(y.shape))
    g = torch.cat([x.reshape(-1) for x in got["grads"]])
    w = torch.cat([x.reshape(-1) for x in want["grads"]])
    err = float((g - w).norm() / w.norm())
    # inf, not NaN, as in max_diff (a NaN passes "not <" checks); a zero reference means nothing
    return err if math.isfinite(err) else math.inf
