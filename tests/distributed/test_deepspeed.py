"""DeepSpeed: GrokAdamW and SuperGrok from the config's "optimizer" entry (and as an instance or
a callable) at ZeRO stages 0-3, in real torchrun jobs on CPU (gloo), against one process.

Clipping configuration that makes the runs comparable: GrokAdamW with gradient_clipping 0.5 and
DeepSpeed's "gradient_clipping": 0.5 (DeepSpeed clips, globally, with the same formula);
SuperGrok with gradient_clipping 0.5 and DeepSpeed's "gradient_clipping": 0 (SuperGrok clips
its own final gradient per group).
"""
from __future__ import annotations

import math

import pytest

pytest.importorskip("deepspeed")

from tests.kernels.test_kernel import FP32_RTOL  # noqa: E402
from tests.support import ds_cases as D  # noqa: E402
from tests.support import scenarios as S  # noqa: E402
from tests.support.multirank import (assert_backend, assert_same_steps,  # noqa: E402
                                     assert_matches_oracle, emulated_cuda_target, launch,
                                     max_diff, meta_gradient_error, ok, relative_param_diff)

AT2 = ("ds_exact", "ds_ways", "ds_bad_config", "ds_checkpoint", "ds_bf16", "ds_meta",
       "ds_frozen")
AT4 = ("ds_exact", "ds_nometa")
# fp32 runs against the float64 oracle (tests/support/oracle.py), measured at ZeRO 2 and 3, world
# size 4: 3.6e-7 (GrokAdamW), 2.7e-7 (SuperGrok), float32 rounding. About 3x the largest.
ORACLE_TOL = 1e-6


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    ckpt = tmp_path_factory.mktemp("ds-ckpt")
    _, at2 = launch(2, tmp_path_factory.mktemp("ds2"), AT2, ckpt)
    _, at4 = launch(4, tmp_path_factory.mktemp("ds4"), AT4, ckpt)
    return {2: at2, 4: at4}


@pytest.fixture(scope="module")
def emulated_job(tmp_path_factory):
    """A job of its own: the emulated target is slow, and its test should not need the others'."""
    emulated_cuda_target()
    _, res = launch(2, tmp_path_factory.mktemp("ds-emulated"), ("ds_emulated",),
                    tmp_path_factory.mktemp("ds-emulated-ckpt"))
    return res


@pytest.fixture(scope="module")
def oracle():
    """One process (SuperGrok with meta-steps every 3 steps, as the DeepSpeed runs)."""
    return {kind: D.oracle(kind) for kind in S.KINDS}


@pytest.mark.parametrize("world,stage", [(2, 0), (2, 1), (2, 2), (2, 3), (4, 2), (4, 3)])
@pytest.mark.parametrize("kind", S.KINDS)
def test_config_entry_matches_single_process(jobs, oracle, world, stage, kind):
    want = oracle[kind]
    runs = ok(jobs[world], "ds_exact")
    for res in runs:
        got = res[f"{kind}.{stage}"]
        assert max_diff(got["params"], want["params"]) < 1e-6
        # stage 0 has no ZeRO optimizer to report DeepSpeed's clip coefficient
        assert_same_steps(got["record"], want["record"], coefs=stage > 0)
    if stage > 0:  # ZeRO shards the optimizer state: each rank holds about 1/N of it
        total = sum(p.numel() for p in want["params"])
        assert all(r[f"{kind}.{stage}"]["sharded_state"] < total for r in runs)
        assert sum(r[f"{kind}.{stage}"]["sharded_state"] for r in runs) >= total


@pytest.mark.parametrize("kind", S.KINDS)
def test_zero2_on_the_emulated_cuda_target(emulated_job, oracle, kind):
    """ZeRO 2 (the config's "gradient_clipping" as in the runs above), the GPU's kernels and
    glue over each rank's flat fp32 partitions (backend="cuda-emulated"), against one process
    on the CPU kernel, within the kernel tests' fp32 tolerance. Measured: 3.8e-8 (GrokAdamW)
    and 0 (SuperGrok) of the parameters' scale, as the CPU kernel under ZeRO 2."""
    want = oracle[kind]
    for res in ok(emulated_job, "ds_emulated"):
        got = res[kind]
        d = relative_param_diff(got["params"], want["params"])
        assert d <= FP32_RTOL, d
        assert_same_steps(got["record"], want["record"], backend="cuda-emulated")


@pytest.mark.parametrize("kind", S.KINDS)
def test_zero_matches_the_independent_oracle(jobs, kind):
    """ZeRO 2 and 3 at world size 4 against tests/support/oracle.py, not only the project's own
    single-process run (SuperGrok without meta-steps, which the oracle lacks; GrokAdamW, as
    configured here, without a grokking signal)."""
    want = S.naive_run(kind, dead=False, signal=False)
    for res in ok(jobs[4], "ds_exact" if kind == "grokadamw" else "ds_nometa"):
        for stage in (2, 3):
            got = res[f"grokadamw.{stage}"] if kind == "grokadamw" else res[stage]
            assert_matches_oracle(got, want, ORACLE_TOL)


def test_instance_and_callable_work_too(jobs, oracle):
    for res in ok(jobs[2], "ds_ways"):
        for kind in S.KINDS:
            for how in ("instance", "callable"):
                assert max_diff(res[f"{kind}.{how}"]["params"], oracle[kind]["params"]) < 1e-6


def test_bad_config_entries_are_named(jobs):
    for res in ok(jobs[2], "ds_bad_config"):
        assert "bogus" in res["unknown"]
        assert "lr must be" in res["range"]
        assert "betas" in res["betas"]
        assert 'GrokAdamW(gradient_clipping=0.3)' in res["clip_mismatch"]
        assert '"gradient_clipping": 0.5' in res["clip_mismatch"]
        assert "under DeepSpeed ZeRO" in res["process_group"] and "drop both" in res["process_group"]


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
@pytest.mark.parametrize("kind", S.KINDS)
def test_engine_checkpoint_resumes_exactly(jobs, oracle, stage, kind):
    want = oracle[kind]
    for res in ok(jobs[2], "ds_checkpoint"):
        got = res[f"{kind}-{stage}"]
        assert got["after"] == got["before"] and got["after"]["global_step"] == S.SPLIT
        assert max_diff(got["params"], want["params"]) < 1e-6
        assert_same_steps(got["record"], want["record"][S.SPLIT:], coefs=stage > 0)


@pytest.mark.parametrize("kind", S.KINDS)
def test_bf16_trains_with_zero_and_is_refused_without(jobs, oracle, kind):
    runs = ok(jobs[2], "ds_bf16")
    for res in runs:
        assert "FP16_UnfusedOptimizer) is not supported" in res[f"{kind}.0"]["error"]
        for stage in (1, 2, 3):
            got = res[f"{kind}.{stage}"]
            assert got["global_step"] == S.STEPS
            assert all(math.isfinite(x) for x in got["losses"])
            assert got["losses"][-1] < got["losses"][0]
            # bf16 compute, fp32 master weights: close to, not equal to, the fp32 run
            assert 1e-6 < max_diff(got["params"], oracle[kind]["params"]) < 0.05
    for stage in (1, 2, 3):  # every rank holds the same model
        assert max_diff(runs[0][f"{kind}.{stage}"]["params"], runs[1][f"{kind}.{stage}"]["params"]) == 0


def test_meta_step_between_backward_and_step(jobs):
    ref = D.meta_oracle()
    runs = ok(jobs[2], "ds_meta")
    for res in runs:
        for stage in (0, 1, 2, 3, "3p"):
            got = res[stage]
            assert got["loss"] == pytest.approx(ref["loss"], rel=1e-5)
            assert meta_gradient_error(got, ref) < 1e-5, stage
            assert got["global_step"] == 1
            # the look-ahead left no trace: the step after it is the single-process step
            assert max_diff(got["params"], ref["params"]) < 1e-6, stage
    for stage in (0, 1, 2, 3, "3p"):  # the meta-nets stay identical across ranks
        assert max_diff(runs[0][stage]["net"], runs[1][stage]["net"]) == 0


def test_frozen_parameter_in_the_groups(jobs):
    for res in ok(jobs[2], "ds_frozen"):
        for stage in (0, 1, 2, 3):
            assert res[stage] == {"global_step": 4, "tensors": 5, "frozen_kept": True}, stage
