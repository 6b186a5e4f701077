"""accelerate with GrokAdamW and SuperGrok: examples/accelerate_gpt2.py (a GPT-2 built from a
config) through ``accelerator.prepare`` on one process and on 2 ranks (torchrun, gloo), and
``save_state`` / ``load_state`` of the sharded optimizer, in float64 (see SPLIT_TOL).

Oracles: the one-process run for the 2-rank run (each step's global batch is split over the
ranks), the uninterrupted 2-rank run for the resumed one.
"""
from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest
import torch

pytest.importorskip("accelerate")
pytest.importorskip("transformers")

from tests.support.multirank import worker_env  # noqa: E402
from tests.support.paths import ROOT  # noqa: E402

EXAMPLE = ROOT / "examples" / "accelerate_gpt2.py"
KINDS = ("grokadamw", "supergrok")
# One process against two: the same batches, the gradients averaged by the all-reduce instead
# of over the whole batch. In float32 that rounding alone moves the weights by up to ~1e-4 after
# 6 Adam steps (and Adam hides a gradient scale error), so the runs are float64: 2e-13 measured
# for GrokAdamW. SuperGrok's signal comes from the loss, which transformers computes in float32
# (logits.float()): the ranks' mean of it differs from the whole batch's by ~1e-7, the weights
# then by ~1e-9.
SPLIT_TOL = 1e-8


def run(tmp: pathlib.Path, name: str, world: int, *args: str) -> list[dict]:
    prefix = ([sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={world}"] if world > 1 else [sys.executable])
    proc = subprocess.run(prefix + [str(EXAMPLE), "--result", str(tmp / name), "--dtype",
                                    "float64", *args],
                          capture_output=True, text=True, timeout=600, env=worker_env(),
                          cwd=tmp)
    assert proc.returncode == 0, f"{name}: exit {proc.returncode}\n{proc.stderr[-6000:]}"
    return [torch.load(tmp / f"{name}.rank{r}.pt", weights_only=False) for r in range(world)]


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("accelerate")
    out = {}
    for kind in KINDS:
        ck = str(tmp / f"{kind}.ckpt")
        out[kind] = {
            "one": run(tmp, f"{kind}.one", 1, "--optimizer", kind)[0],
            "two": run(tmp, f"{kind}.two", 2, "--optimizer", kind, "--save-at", "3",
                       "--output-dir", ck),
            "resumed": run(tmp, f"{kind}.resumed", 2, "--optimizer", kind, "--resume", ck),
        }
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_two_ranks_train_like_one_process(runs, kind):
    one, two = runs[kind]["one"], runs[kind]["two"]
    for res in two:
        assert res["summary"]["global_step"] == one["summary"]["global_step"] == 6
        assert max_diff(res["weights"], one["weights"]) < SPLIT_TOL
        for a, b in zip(res["losses"], one["losses"]):
            assert abs(a - b) < 1e-6  # transformers computes the loss in float32 (logits.float())
    assert max_diff(two[0]["weights"], two[1]["weights"]) == 0.0  # replicas stay identical


def test_supergrok_losses_reach_the_optimizer_through_the_wrapper(runs):
    """set_losses on optimizer_of(AcceleratedOptimizer): the signal moves (it stays None
    without both losses) and is the same on one process and on two."""
    one, two = runs["supergrok"]["one"], runs["supergrok"]["two"]
    signal = one["summary"]["cached_signal"]
    assert signal is not None
    for res in two:
        assert abs(res["summary"]["cached_signal"] - signal) < 1e-6


@pytest.mark.parametrize("kind", KINDS)
def test_save_state_load_state_resumes_exactly(runs, kind):
    two, resumed = runs[kind]["two"], runs[kind]["resumed"]
    for a, b in zip(two, resumed):
        assert b["summary"]["global_step"] == 6
        assert max_diff(a["weights"], b["weights"]) < 1e-6
        assert b["losses"] == a["losses"][3:]
        if kind == "supergrok":
            assert b["summary"]["cached_signal"] == a["summary"]["cached_signal"]
