"""The sharded engine (ZeRO-1 over replicated parameters) against the single-process oracle, in
real multi-rank jobs: torchrun with gloo on CPU, world sizes 2 and 4.

One torchrun job per world size runs every scenario of tests/support/dist_worker.py; the
single-process runs of the same scenarios (tests/support/scenarios.py, shard=False) are the oracle.
"""
from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import shardgrok
from tests.support import scenarios as S
from tests.support.helpers import toy
from tests.kernels.test_kernel import FP32_RTOL
from tests.support.multirank import (assert_matches_oracle, assert_same_run, emulated_cuda_target,
                                     launch, max_diff, meta_gradient_error, ok, worker_env)

MAIN = ("exact_grokadamw", "exact_supergrok", "exact_supergrok_nometa", "reference_grokadamw",
        "reference_supergrok", "collectives", "memory",
        "meta", "checkpoint_save", "resume", "load_wrong_shard", "fault_in_step", "nonfinite",
        "mismatch", "unsharded")
TOL = 1e-6
# fp32 runs against the float64 oracle, measured at world sizes 2 and 4: 2.5e-7 (GrokAdamW),
# 2.7e-7 (SuperGrok), as much as the single-process fp32 run differs from it: float32 rounding
# over 20 Adam steps of ~1e-2, not the sharding. About 4x that.
ORACLE_TOL = 1e-6
# the CUDA kernels built for the host (backend="cuda-emulated"): a job of their own, at world size 2
EMULATED = ("emulated_grokadamw", "emulated_supergrok")


# ---------------------------------------------------------------- the jobs (run once per module)
@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """Single-process checkpoints (world size 1) that the sharded jobs resume from."""
    d = tmp_path_factory.mktemp("ckpt")
    for kind in S.KINDS:
        S.save_checkpoint(kind, str(d))
    return d


@pytest.fixture(scope="module")
def world4(ckpt, tmp_path_factory):
    _, res = launch(4, tmp_path_factory.mktemp("w4"), MAIN + ("subgroups",), ckpt,
                    "--resume-from", "w1full")
    return res


@pytest.fixture(scope="module")
def world2(world4, ckpt, tmp_path_factory):
    # after world4: resumes from the checkpoint saved at world size 4
    _, res = launch(2, tmp_path_factory.mktemp("w2"), MAIN, ckpt,
                    "--resume-from", "w4full,w4shards,w4consolidated")
    return res


@pytest.fixture(scope="module")
def jobs(world2, world4):
    return {2: world2, 4: world4}


@pytest.fixture(scope="module")
def emulated_job(tmp_path_factory):
    """A job of its own: the emulated target is slow, and its test should not need the others'."""
    emulated_cuda_target()
    _, res = launch(2, tmp_path_factory.mktemp("emulated"), EMULATED,
                    tmp_path_factory.mktemp("emulated-ckpt"))
    return res


# ---------------------------------------------------------------- exactness
@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("kind", S.KINDS)
def test_sharded_run_matches_single_process(jobs, oracle, world, kind):
    ref = oracle[kind]
    for r, res in enumerate(ok(jobs[world], f"exact_{kind}")):
        assert_same_run(res, ref)
        for got, want in zip(res["record"], ref["record"], strict=True):
            assert got["avg_mu_norm"] == pytest.approx(want["avg_mu_norm"], rel=1e-5), r
    # the run exercised what it claims to: clipping, the gate both ways, a moving alpha
    recs = ref["record"]
    assert any(min(x["last_clip_coefs"]) < 1.0 for x in recs)
    if kind == "supergrok":
        flags = [f for x in recs[5:] for f in x["gate_engaged"]]
        assert any(flags) and not all(flags)
        assert not any(f for x in recs[:4] for f in x["gate_engaged"])  # warmup
        assert len({x["cached_alpha"] for x in recs}) > 2
    else:
        assert len({x["alpha"] for x in recs}) == len(recs)


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("kind", S.KINDS)
def test_sharded_run_matches_the_independent_oracle(jobs, world, kind):
    """Against tests/support/oracle.py, which shares no code with the project, not only against the
    project's own single-process run (SuperGrok without meta-steps, which the oracle lacks)."""
    name = "exact_grokadamw" if kind == "grokadamw" else "exact_supergrok_nometa"
    want = S.naive_run(kind)
    for res in ok(jobs[world], name):
        assert_matches_oracle(res, want, ORACLE_TOL)


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("kind", S.KINDS)
def test_sharded_reference_backend_matches_the_independent_oracle(jobs, world, kind):
    """The reference path stays the kernel's oracle under sharding too."""
    want = S.naive_run(kind)
    for res in ok(jobs[world], f"reference_{kind}"):
        assert_matches_oracle(res, want, ORACLE_TOL, backend="reference")


@pytest.mark.parametrize("kind", S.KINDS)
def test_zero1_on_the_emulated_cuda_target(emulated_job, oracle, kind):
    """The GPU's kernels and glue over each rank's owned pieces (backend="cuda-emulated"),
    against one process on the CPU kernel, within the kernel tests' fp32 tolerance. Measured:
    0 (GrokAdamW) and 2.5e-8 (SuperGrok) of the parameters' scale, as the CPU kernel sharded
    the same way (the sharded sums' order, not the target)."""
    ref = oracle[kind]
    runs = ok(emulated_job, f"emulated_{kind}")
    for res in runs:
        assert_same_run(res, ref, rtol=FP32_RTOL, backend="cuda-emulated")
        for got, want in zip(res["record"], ref["record"], strict=True):
            assert got["avg_mu_norm"] == pytest.approx(want["avg_mu_norm"], rel=1e-5)
    assert max_diff(runs[1]["params"], runs[0]["params"]) == 0.0


def test_process_group_selects_the_shard_group(jobs, oracle):
    runs = ok(jobs[4], "subgroups")
    for res in runs:
        for kind in S.KINDS:
            assert max_diff(res[kind]["params"], oracle[kind]["params"]) < TOL, kind
    total = sum(p.numel() for p in toy(S.DTYPE).parameters())
    assert runs[0]["elements"] + runs[1]["elements"] == total  # shared by a pair, not by 4
    assert runs[2]["elements"] + runs[3]["elements"] == total


@pytest.mark.parametrize("world", [2, 4])
def test_shard_false_is_purely_local(jobs, world):
    total = sum(p.numel() for p in toy(S.DTYPE).parameters())
    for res in ok(jobs[world], "unsharded"):
        assert res == {"collectives": [], "sharded": False, "elements": total}


@pytest.mark.parametrize("world", [2, 4])
def test_ranks_hold_identical_parameters(jobs, world):
    for kind in S.KINDS:
        runs = ok(jobs[world], f"exact_{kind}")
        for res in runs[1:]:
            assert max_diff(res["params"], runs[0]["params"]) == 0.0


# ---------------------------------------------------------------- one reduction, memory
@pytest.mark.parametrize("world", [2, 4])
def test_one_all_reduce_and_one_all_gather_per_step(jobs, world):
    runs = ok(jobs[world], "collectives")
    for res in runs:
        for kind in S.KINDS:
            assert res[kind] == {"all_reduce": 1, "all_gather_single": 1}, kind
    # losses given per rank (train_loss + rank) are averaged: alpha is the same everywhere
    assert len({res["supergrok_cached_alpha"] for res in runs}) == 1


@pytest.mark.parametrize("world", [2, 4])
def test_state_memory_is_one_nth(jobs, world):
    runs = ok(jobs[world], "memory")
    for kind in S.KINDS:
        totals = runs[0][kind]["group_totals"]
        total = sum(totals)
        per_rank = [res[kind]["elements"] for res in runs]
        assert sum(per_rank) == 3 * total  # no element's state is kept twice
        for res in runs:
            assert res[kind]["elements"] <= 3 * sum(math.ceil(t / world) for t in totals)
            assert res[kind]["bytes"] <= 3 * 4 * (total / world + len(totals))
        # the model really straddles: some tensor is split between ranks, and the 1-element
        # tensor (smaller than the world size) has exactly one owner
        numels = runs[0][kind]["numels"]
        split = [i for i, n in enumerate(numels)
                 if any(res[kind]["spans"][i] not in (None, (0, n)) for res in runs)]
        assert split
        tiny = numels.index(1)
        assert sum(res[kind]["spans"][tiny] is not None for res in runs) == 1


# ---------------------------------------------------------------- meta-net
@pytest.mark.parametrize("world", [2, 4])
def test_sharded_meta_gradient_matches_single_process(jobs, world):
    ref = S.meta_gradient()
    runs = ok(jobs[world], "meta")
    for res in runs:
        assert res["loss"] == pytest.approx(ref["loss"], rel=1e-12)
        assert meta_gradient_error(res, ref) < 1e-6
        for a, b in zip(res["net_after"], runs[0]["net_after"], strict=True):
            assert torch.equal(a, b)  # every rank's meta-net stays identical
        assert max_diff(res["net_after"], ref["net_after"]) < 1e-6


# ---------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("world,source", [(4, "w1full"), (2, "w4full"), (2, "w4shards"),
                                          (2, "w4consolidated")])
def test_resume_across_world_sizes_is_exact(jobs, oracle, world, source):
    runs = ok(jobs[world], "resume")
    for kind in S.KINDS:
        for res in runs:
            got = res[f"{kind}.{source}"]
            assert max_diff(got["params"], oracle[kind]["params"]) < TOL, kind
            assert got["record"][-1]["global_step"] == S.STEPS


@pytest.mark.parametrize("source", ["w4shards", "w4full", "w2full", "w2consolidated"])
def test_resume_on_one_process_from_sharded_checkpoint(jobs, ckpt, oracle, source):
    for kind in S.KINDS:
        got = S.resume(kind, str(ckpt), source)
        assert max_diff(got["params"], oracle[kind]["params"]) < TOL, kind


def test_full_state_dict_equals_single_process_state(jobs, ckpt):
    """The state gathered at world size 4 is the single-process state at the same step."""
    for kind in S.KINDS:
        single = torch.load(ckpt / f"{kind}.w1.full.pt", weights_only=True)
        for source in ("w4full", "w4shards", "w4consolidated"):
            full = S.load_optimizer_state(kind, str(ckpt), source)
            assert "sharding" not in full["param_groups"][0]["shardgrok"]
            for i, st in single["state"].items():
                for key, v in st.items():
                    assert full["state"][i][key].shape == v.shape
                    assert float((full["state"][i][key] - v).abs().max()) < TOL, (i, key)


def test_consolidate_state_dict_makes_rank_0s_state_dict_whole(jobs):
    """After consolidate_state_dict(to=0), rank 0's state_dict() is the full state (checked
    against one process above); every other rank's is still its shard."""
    for world in (2, 4):
        for rank, res in enumerate(ok(jobs[world], "checkpoint_save")):
            for kind in S.KINDS:
                assert res[kind]["shard_elsewhere"] == (rank != 0), (world, rank, kind)


def test_wrong_shard_is_refused(jobs):
    for world in (2, 4):
        for res in ok(jobs[world], "load_wrong_shard"):
            assert "consolidate_state_dict" in res["error"]


def test_consolidate_rejects_incomplete_shards(jobs, ckpt):
    shard = torch.load(ckpt / "grokadamw.w4.shard1.pt", weights_only=True)
    with pytest.raises(ValueError, match="one shard from each of the 4 ranks"):
        shardgrok.consolidate_state_dict([shard])


# ---------------------------------------------------------------- faults and bad input
@pytest.mark.parametrize("world", [2, 4])
def test_failure_on_one_rank_raises_everywhere(jobs, world):
    for r, res in enumerate(ok(jobs[world], "fault_in_step")):
        kind, msg = res["error"]
        if r == 1:
            assert kind == "ValueError" and "rank 1" in msg
        else:
            assert kind == "RuntimeError" and "failed on 1 other rank" in msg
        assert res["elapsed"] < 30
        assert res["unchanged"] and res["step_after"] == 2 and res["step_final"] == 3


@pytest.mark.parametrize("world", [2, 4])
def test_nonfinite_on_one_shard_follows_the_policy_everywhere(jobs, world):
    for res in ok(jobs[world], "nonfinite"):
        skip, raise_ = res["skip"], res["raise"]
        assert skip["error"] is None and skip["warned"] and skip["skipped"] == 1
        assert raise_["error"] == "FloatingPointError"
        for r in (skip, raise_):
            assert r["unchanged"] and r["state_unchanged"] and r["global_step"] == 2


@pytest.mark.parametrize("world", [2, 4])
def test_parameter_mismatch_is_detected_at_construction(jobs, world):
    for res in ok(jobs[world], "mismatch"):
        assert "differ between ranks" in res["error"] and "rank 1" in res["error"]


@pytest.mark.parametrize("where", ["reduce", "gather"])
def test_suspended_rank_inside_step_ends_in_an_error_naming_the_step(tmp_path, where):
    """Rank 1 suspended (not killed) inside step(): between phase 1 and the all-reduce, or
    between its update and the all-gather of the updated parameters. Rank 0 raises within the
    timeout naming the optimizer step and the collective and saying what became of its state,
    and the checkpoint saved before the step loads. Rank 1 never resumes: the job is killed."""
    timeout, out = 5.0, tmp_path / "out"
    out.mkdir()
    name = "suspended_rank" if where == "reduce" else "suspended_rank_gather"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "-m", "tests.support.dist_worker", "--out", str(out), "--ckpt", str(tmp_path),
           "--scenarios", name, "--timeout", str(timeout)]
    proc = subprocess.Popen(cmd, env=worker_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    result, res = out / f"{name}.0.pt", None
    try:
        deadline = time.monotonic() + 240
        while res is None and time.monotonic() < deadline:
            done = proc.poll() is not None
            try:   # torch.save writes in place: a file still being written does not load
                res = torch.load(result, weights_only=False)
            except (FileNotFoundError, RuntimeError, EOFError):
                if done:
                    break
                time.sleep(0.5)
    finally:
        # the ranks run in sessions of their own (torchrun's), the agent in the one made here
        for f in out.glob("*.pid.*"):
            try:
                os.kill(int(f.read_text()), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        os.killpg(proc.pid, signal.SIGKILL)
        log = proc.communicate(timeout=60)[0].decode(errors="replace")
    assert res is not None, f"rank 0 wrote no result\n{log[-5000:]}"
    r0 = ok({name: [res]}, name)[0]
    assert r0["error"] is not None, "rank 0's step returned although rank 1 was suspended"
    assert "SuperGrok.step() (optimizer step 3)" in r0["error"], r0["error"]
    assert timeout * 0.8 < r0["elapsed"] < 3 * timeout
    if where == "reduce":
        assert "the all-reduce of the step's sums across 2 ranks did not complete" in r0["error"]
        assert "Nothing was changed on this rank" in r0["error"]
        assert r0["unchanged"] and r0["step"] == 2
    else:
        assert "the all-gather of the updated parameters across 2 ranks did not complete" in r0["error"]
        assert "resume every rank from the last checkpoint" in r0["error"]
        assert not r0["unchanged"] and r0["step"] == 3
    assert r0["same_state"] and r0["loaded_step"] == 2


def test_stuck_rank_ends_in_an_error_after_the_timeout(tmp_path):
    timeout = 5.0
    proc, res = launch(2, tmp_path / "out", ["stuck_rank"], tmp_path, "--timeout", str(timeout),
                       timeout=120)
    r0 = ok(res, "stuck_rank")[0]
    assert r0["error"] is not None, "rank 0's step returned although rank 1 never joined"
    assert r0["elapsed"] < 3 * timeout
