"""Hugging Face Trainer with GrokAdamW and SuperGrok: examples/trainer_gpt2.py (a GPT-2 built from
a config, no download) under torchrun (DDP, ZeRO-1 state), through DeepSpeed's config
"optimizer" entry, and on one process, driven by tests/support/hf_worker.py.

Oracles: the uninterrupted run for a resumed one (Trainer's own save_strategy and
resume_from_checkpoint), and Trainer's own log (its "loss" and "eval_loss") for the losses the
callback fed the optimizer.
"""
from __future__ import annotations

import math
import pathlib
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from shardgrok.optim.supergrok import loss_signal  # noqa: E402
from tests.support.multirank import worker_env  # noqa: E402

TOL = 1e-6
KINDS = ("grokadamw", "supergrok")


def _launch(mode: str, out: pathlib.Path, world: int) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    prefix = ([sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={world}"] if world > 1 else [sys.executable])
    proc = subprocess.run(prefix + ["-m", "tests.support.hf_worker", "--mode", mode,
                                    "--out", str(out)],
                          capture_output=True, text=True, timeout=600, env=worker_env())
    assert proc.returncode == 0, f"{mode}: exit {proc.returncode}\n{proc.stderr[-6000:]}"
    results = []
    for r in range(world):
        res = torch.load(out / f"rank{r}.pt", weights_only=False)
        if "traceback" in res:
            pytest.fail(f"{mode} failed on rank {r}:\n{res['traceback']}")
        results.append(res["ok"])
    return results


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    return _launch("ddp", tmp_path_factory.mktemp("hf_ddp"), 2)


@pytest.fixture(scope="module")
def deepspeed_runs(tmp_path_factory):
    pytest.importorskip("deepspeed")
    return _launch("deepspeed", tmp_path_factory.mktemp("hf_ds"), 2)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return _launch("single", tmp_path_factory.mktemp("hf_single"), 1)[0]


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def expected_signals(log: list[dict]) -> dict[int, float | None]:
    """Per optimizer step, SuperGrok's signal from Trainer's log: that step's logged training
    loss against the last evaluation before it (None before the first)."""
    out, val = {}, None
    for entry in log:
        if "loss" in entry:
            out[entry["step"]] = None if val is None else loss_signal(entry["loss"], val)
        if "eval_loss" in entry:
            val = entry["eval_loss"]
    return out


def assert_signals(record: list[dict], log: list[dict], key: str, abs_tol: float = 1e-6) -> None:
    want = expected_signals(log)
    assert [r["step"] for r in record] == sorted(want) and any(v is not None for v in want.values())
    for r in record:
        got, exp = r[key], want[r["step"]]
        if exp is None:
            assert got is None or (key == "grokking_signal" and got == 0.0), r
        else:
            # float32 losses averaged in another order than Trainer's log
            assert got is not None and math.isclose(got, exp, rel_tol=1e-5, abs_tol=abs_tol), (r, exp)


# ---------------------------------------------------------------- Trainer under torchrun
@pytest.mark.parametrize("kind", KINDS)
def test_trainer_ddp_resume_matches_uninterrupted(ddp, kind):
    for rank, res in enumerate(ddp):
        run = res[kind]
        assert max_diff(run["full"], run["resumed"]) < TOL, (rank, kind)
        assert run["saved_sharding"] is False  # optimizer.pt holds the whole state
        full = {e["step"]: e["loss"] for e in run["full_log"] if "loss" in e}
        resumed = {e["step"]: e["loss"] for e in run["resumed_log"] if "loss" in e}
        assert sorted(resumed) == sorted(full) == list(range(1, 7))  # 1-3 from the checkpoint
        for step, loss in resumed.items():
            assert abs(loss - full[step]) < TOL


def test_trainer_ddp_resumes_8bit_state(ddp):
    """ZeRO-1 with state_dtype="int8" under Trainer: optimizer.pt holds the whole state as codes
    and scales, and the resumed run equals the uninterrupted one."""
    for rank, res in enumerate(ddp):
        run = res["grokadamw_int8"]
        assert run["saved_sharding"] is False and run["saved_int8"] >= 2, run["saved_int8"]
        assert max_diff(run["full"], run["resumed"]) < TOL, rank


def test_trainer_ddp_feeds_the_logged_losses(ddp):
    """Gradient accumulation 2, token-averaged losses over 2 ranks: the optimizer's signal is
    computed from exactly the loss Trainer logs (SuperGrok; GrokAdamW with grokadamw_signal)."""
    for res in ddp:
        assert_signals(res["supergrok"]["record"], res["supergrok"]["full_log"], "cached_signal")
        # GrokAdamW averages its signal functions' values over the ranks, each computed from
        # its rank's loss: the mean of (val - t_r) / t_r, not (val - mean t) / mean t. With the
        # ranks' losses 0.2% apart here, that is ~1e-5.
        assert_signals(res["grokadamw"]["record"], res["grokadamw"]["full_log"], "grokking_signal",
                       abs_tol=1e-4)


def test_trainer_ddp_without_callback_never_loads_silently(ddp):
    """Rank 0's optimizer.pt is its shard without GrokCallback: rank 1 refuses it by name."""
    assert all(res["sharded"] for res in ddp)
    assert ddp[0]["bare_error"] is None
    assert "consolidate_state_dict" in ddp[1]["bare_error"]
    assert "GrokCallback" in ddp[1]["bare_error"]


# ---------------------------------------------------------------- Trainer + DeepSpeed config
@pytest.mark.parametrize("kind", KINDS)
def test_trainer_deepspeed_config_entry_resumes(deepspeed_runs, kind):
    """"optimizer": {"type": "GrokAdamW" / "SuperGrok"} with "auto" lr, betas, eps and weight
    decay, ZeRO 2: trains, and resumes from DeepSpeed's checkpoint as if uninterrupted."""
    for res in deepspeed_runs:
        run = res[kind]
        assert max_diff(run["full"], run["resumed"]) < TOL, kind
        assert [r["global_step"] for r in run["record"]] == list(range(1, 7))


def test_trainer_deepspeed_feeds_supergrok(deepspeed_runs):
    for res in deepspeed_runs:
        assert_signals(res["supergrok"]["record"], res["supergrok"]["full_log"], "cached_signal")


# ---------------------------------------------------------------- one process
def test_trainer_single_process_feeds_supergrok(single):
    run = single["supergrok"]
    assert_signals(run["record"], run["log"], "cached_signal")
    assert not any("max_grad_norm" in w for w in run["warnings"])  # the example sets it to 0


def test_trainer_clipping_on_top_of_the_optimizers_is_warned(single):
    assert any("max_grad_norm" in w and "gradient_clipping=1.0" in w
               for w in single["clip_warnings"]), single["clip_warnings"]


def test_callback_refuses_another_optimizer(single):
    assert "GrokAdamW or SuperGrok" in single["adamw_error"]
