"""FSDP2, HSDP and FSDP1 against the single-process oracle, in real torchrun jobs (gloo, CPU):
tests/support/fsdp_cases.py holds the scenarios, tests/support/scenarios.py the shared model and
schedule.

The model has tensors whose first dimension does not divide by the world size (7, 3, 1 rows
at world sizes 2 and 4), so some ranks hold empty shards.
"""
from __future__ import annotations

import pytest

from tests.support import scenarios as S
from tests.kernels.test_kernel import FP32_RTOL
from tests.support.multirank import (assert_matches_oracle, assert_same_run, emulated_cuda_target,
                                     launch, max_diff, meta_gradient_error, ok)

AT4 = ("fsdp2_exact", "fsdp2_nometa", "hsdp_exact", "fsdp2_state", "fsdp2_meta", "fsdp2_dcp_save",
       "fsdp_bad_args", "fsdp1_wrong_group")
AT2 = ("fsdp2_exact", "fsdp1_exact", "fsdp1_nometa", "fsdp2_state", "fsdp2_bf16", "fsdp2_meta",
       "fsdp2_dcp_resume", "fsdp2_after_the_optimizer")
# Same casts, same result: measured 0.0 at world size 2 (the bf16 products are the same and
# the fp32 average of two equal gradients is exact); the fp32 run differs by ~1e-3.
BF16_TOL = 1e-6
# fp32 runs against the float64 oracle (tests/support/oracle.py), measured: FSDP2 2.5e-7 / 2.7e-7,
# FSDP1 1.6e-7 / 3.3e-7 (GrokAdamW / SuperGrok), the single-process fp32 run's own distance from it.
# About 3x the largest.
ORACLE_TOL = 1e-6


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tmp_path_factory.mktemp("fsdp-ckpt")


@pytest.fixture(scope="module")
def jobs(ckpt, tmp_path_factory):
    _, at4 = launch(4, tmp_path_factory.mktemp("fsdp4"), AT4, ckpt)
    # after the world-4 job: resumes from its DCP checkpoint at world size 2
    _, at2 = launch(2, tmp_path_factory.mktemp("fsdp2"), AT2, ckpt, "--resume-from", "4")
    return {2: at2, 4: at4}


@pytest.fixture(scope="module")
def emulated_job(tmp_path_factory):
    """A job of its own: the emulated target is slow, and its test should not need the others'."""
    emulated_cuda_target()
    _, res = launch(2, tmp_path_factory.mktemp("fsdp-emulated"), ("fsdp2_emulated",),
                    tmp_path_factory.mktemp("fsdp-emulated-ckpt"))
    return res


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("kind", S.KINDS)
def test_fsdp2_matches_single_process(jobs, oracle, world, kind):
    for res in ok(jobs[world], "fsdp2_exact"):
        assert_same_run(res[kind], oracle[kind])


@pytest.mark.parametrize("kind", S.KINDS)
def test_fsdp2_on_the_emulated_cuda_target(emulated_job, oracle, kind):
    """fully_shard on a CPU mesh, the GPU's kernels and glue over each rank's local shards
    (backend="cuda-emulated"), against one process on the CPU kernel, within the kernel tests'
    fp32 tolerance. Measured: 0 (GrokAdamW) and 4.9e-8 (SuperGrok) of the parameters' scale, as
    the CPU kernel under FSDP2."""
    for res in ok(emulated_job, "fsdp2_emulated"):
        assert_same_run(res[kind], oracle[kind], rtol=FP32_RTOL, backend="cuda-emulated")


@pytest.mark.parametrize("kind", S.KINDS)
def test_fsdp2_applied_after_the_optimizer_like_accelerate(jobs, oracle, kind):
    """accelerate's FSDP2 plugin swaps the optimizer's parameters for DTensors after it was
    built: the optimizer starts again on them before its first step."""
    for res in ok(jobs[2], "fsdp2_after_the_optimizer"):
        assert res[kind]["dtensor_state"] == "DTensor"
        assert_same_run(res[kind], oracle[kind])


@pytest.mark.parametrize("kind", S.KINDS)
def test_hsdp_matches_single_process(jobs, oracle, kind):
    """2 x 2 mesh: statistics summed over the replicate dimension too would double every norm
    and change the clip coefficients and gates."""
    for res in ok(jobs[4], "hsdp_exact"):
        assert_same_run(res[kind], oracle[kind])


@pytest.mark.parametrize("kind", S.KINDS)
def test_fsdp_matches_the_independent_oracle(jobs, kind):
    """FSDP2 at world size 4 (empty shards) and FSDP1 at 2 against tests/support/oracle.py, not only
    the project's own single-process run (SuperGrok without meta-steps, which the oracle lacks)."""
    fsdp2 = S.naive_run(kind)
    fsdp1 = S.naive_run(kind, dead=False, groups=S.one_group)
    if kind == "grokadamw":
        runs = [(r["grokadamw"], fsdp2) for r in ok(jobs[4], "fsdp2_exact")]
        runs += [(r[f"grokadamw.orig{o}"], fsdp1) for r in ok(jobs[2], "fsdp1_exact")
                 for o in (False, True)]
    else:
        runs = [(r, fsdp2) for r in ok(jobs[4], "fsdp2_nometa")]
        runs += [(r, fsdp1) for r in ok(jobs[2], "fsdp1_nometa")]
    for got, want in runs:
        assert_matches_oracle(got, want, ORACLE_TOL)


@pytest.mark.parametrize("orig", [False, True])
@pytest.mark.parametrize("kind", S.KINDS)
def test_fsdp1_matches_single_process(jobs, kind, orig):
    want = S.run(kind, dead=False, groups=S.one_group)
    for res in ok(jobs[2], "fsdp1_exact"):
        assert_same_run(res[f"{kind}.orig{orig}"], want)


@pytest.mark.parametrize("world", [2, 4])
def test_fsdp2_state_is_dtensor_and_one_reduction(jobs, world):
    for res in ok(jobs[world], "fsdp2_state"):
        assert res["fsdp2"]["dtensor_state"]
        assert res["fsdp2"]["calls"] == [("all_reduce", world)]  # no parameter all-gather
        if world == 4:  # HSDP: the scalars over the 2 replicas, the sums over the 2 shards only
            assert res["hsdp"]["dtensor_state"]
            assert res["hsdp"]["calls"] == [("all_reduce", 2), ("all_reduce", 2)]


def test_fsdp2_bf16_mixed_precision_matches_same_casts(jobs):
    """FSDP2 with MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32) against one process
    computing in a bf16 copy of fp32 parameters, 20 steps."""
    for kind in S.KINDS:
        want = S.run(kind, meta=False, backward_fn=_bf16_backward())
        for res in ok(jobs[2], "fsdp2_bf16"):
            got = res[kind]
            assert max_diff(got["params"], want["params"]) < BF16_TOL, kind
            fp32 = S.run(kind, meta=False)  # and it did train in bf16: not the fp32 run
            assert max_diff(got["params"], fp32["params"]) > 1e-4, kind


def _bf16_backward():
    from tests.support.fsdp_cases import bf16_backward
    return bf16_backward


@pytest.mark.parametrize("world", [2, 4])
def test_fsdp2_meta_gradient_matches_single_process(jobs, world):
    ref = S.meta_gradient()
    for res in ok(jobs[world], "fsdp2_meta"):
        assert res["loss"] == pytest.approx(ref["loss"], rel=1e-10)
        assert meta_gradient_error(res, ref) < 1e-6
        assert max_diff(res["net_after"], ref["net_after"]) < 1e-6


def test_dcp_checkpoint_saved_at_4_resumes_at_2(jobs, oracle):
    for kind in S.KINDS:
        want = oracle[kind]
        for res in ok(jobs[2], "fsdp2_dcp_resume"):
            got = res[kind]
            assert got["global_step"] == S.SPLIT
            assert got["steps"] == [0, S.SPLIT]  # the dead layer never stepped
            if kind == "supergrok":
                assert got["cached_alpha"] == pytest.approx(want["record"][S.SPLIT - 1]["cached_alpha"],
                                                            rel=1e-12)
            assert max_diff(got["params"], want["params"]) < 1e-6, kind
            for g, w in zip(got["record"], want["record"][S.SPLIT:], strict=True):
                assert g["gate_engaged"] == w["gate_engaged"]


def test_bad_arguments_with_fsdp_parameters(jobs):
    for res in ok(jobs[4], "fsdp_bad_args"):
        assert "shard=False cannot apply" in res["shard_false"]
        assert "process_group is not used with DTensor" in res["process_group"]
        assert "full_state_dict() is for ZeRO" in res["full_state_dict"]
        assert "every parameter must be a DTensor" in res["mixed"]


def test_fsdp1_over_the_wrong_group_is_refused(jobs):
    for res in ok(jobs[4], "fsdp1_wrong_group"):
        assert "process_group= the group FSDP1 shards over" in res["default"]
        assert res["right_group_tensors"] == 5
