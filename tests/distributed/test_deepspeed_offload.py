"""DeepSpeed ZeRO-Offload (``"offload_optimizer": {"device": "cpu"}``) with GrokAdamW and SuperGrok
at ZeRO 2 and 3, in one torchrun job on CPU (gloo, world size 2; scenarios in
tests/support/ds_offload_cases.py), against the same config without offload (run in the same job)
and the single-process run of tests/support/ds_cases.py; examples/zero_offload.json is loaded and
trained as it is.

On this CPU-only machine the model is on the CPU too, so what is exercised is DeepSpeed's offload
code path (gradients copied into CPU fp32 partitions, clipping and the step there, the fp32
partitions copied back into the model), not the GPU-to-host traffic.
"""
from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("deepspeed")

from tests.support import ds_cases as D  # noqa: E402
from tests.support import ds_offload_cases as O  # noqa: E402
from tests.support import scenarios as S  # noqa: E402
from tests.support.multirank import assert_backend, launch, max_diff, ok
from tests.support.multirank import assert_same_steps as same_steps  # noqa: E402

SCENARIOS = ("ds_offload", "ds_offload_ways", "ds_offload_example")
# fp32, the same schedule. Measured against the run without offload and one process: 0 for
# SuperGrok (DeepSpeed does not clip here) and 3e-8 max abs for GrokAdamW (DeepSpeed clips, on
# the offloaded partitions in its own order: float32 rounding); 1e-6 as in
# tests/distributed/test_deepspeed.py.
TOL = 1e-6


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    """All offload scenarios in one torchrun launch."""
    _, results = launch(2, tmp_path_factory.mktemp("ds-offload"), SCENARIOS,
                        tmp_path_factory.mktemp("ds-offload-ckpt"))
    return results


@pytest.fixture(scope="module")
def oracle():
    """One process without DeepSpeed: SPLIT and STEPS steps (SuperGrok with meta-steps every 3
    steps, as the DeepSpeed runs), and SuperGrok's STEPS steps without meta-steps."""
    out = {}
    for kind in S.KINDS:
        out[kind, S.SPLIT] = D.oracle(kind, steps=range(S.SPLIT))
        out[kind, S.STEPS] = D.oracle(kind)
    out["supergrok", "nometa"] = D.oracle("supergrok", meta=False)
    return out


def assert_offloaded(state, kind):
    """Our optimizer (not DeepSpeedCPUAdam) is the one DeepSpeed steps, under offload, with its
    state on the CPU and keyed by DeepSpeed's fp32 partitions."""
    assert state["optimizer"] == D.NAME[kind]
    assert state["offload"] is True
    assert state["state_devices"] == ["cpu"] and state["partition_devices"] == ["cpu"]
    assert state["keyed_by_partitions"]


def model_size(oracle):
    return sum(p.numel() for p in oracle["grokadamw", S.STEPS]["params"])


@pytest.mark.parametrize("stage", O.STAGES)
@pytest.mark.parametrize("kind", S.KINDS)
def test_offload_matches_the_run_without_it(jobs, oracle, stage, kind):
    runs = ok(jobs, "ds_offload")
    for res in runs:
        plain, off = res[f"{kind}.{stage}"]["plain"], res[f"{kind}.{stage}"]["offload"]
        assert_offloaded(off["state"], kind)
        assert plain["state"]["offload"] is False
        assert max_diff(off["params_split"], plain["params_split"]) < TOL
        assert max_diff(off["params_split"], oracle[kind, S.SPLIT]["params"]) < TOL
        # every step: the kernel, the same gate decisions, clip coefficients and alpha
        same_steps(off["record"], plain["record"][:S.SPLIT])
        same_steps(off["record"], oracle[kind, S.SPLIT]["record"])
    # the state is sharded over the ranks under offload too
    total = model_size(oracle)
    elements = [r[f"{kind}.{stage}"]["offload"]["state"]["elements"] for r in runs]
    assert all(e < total for e in elements) and sum(elements) >= total


def test_supergrok_meta_steps_ran_under_offload(jobs, oracle):
    """The runs above include SuperGrok's meta-steps (every 3 steps): the meta-net moved, stays
    the same on every rank, and the result is the one-process run with meta-steps, not the one
    without."""
    runs = ok(jobs, "ds_offload")
    for stage in O.STAGES:
        offs = [r[f"supergrok.{stage}"]["offload"] for r in runs]
        assert max_diff(offs[0]["net"], offs[0]["net_initial"]) > 1e-4  # measured 6.8e-4
        assert max_diff(offs[0]["net"], offs[1]["net"]) == 0
        for off in offs:
            with_meta = max_diff(off["continued_params"], oracle["supergrok", S.STEPS]["params"])
            without = max_diff(off["continued_params"], oracle["supergrok", "nometa"]["params"])
            assert with_meta < TOL and without > 10 * max(with_meta, 1e-7)


@pytest.mark.parametrize("stage", O.STAGES)
@pytest.mark.parametrize("kind", S.KINDS)
def test_engine_checkpoint_resumes_exactly_with_offload(jobs, oracle, stage, kind):
    for res in ok(jobs, "ds_offload"):
        plain, off = res[f"{kind}.{stage}"]["plain"], res[f"{kind}.{stage}"]["offload"]
        assert off["after"] == off["before"] and off["after"]["global_step"] == S.SPLIT
        assert_offloaded(off["resumed_state"], kind)
        # the fresh engine that loaded the checkpoint takes the steps the saving one took
        assert max_diff(off["resumed_params"], off["continued_params"]) == 0
        same_steps(off["resumed_record"], off["continued_record"])
        # ... which are those of the uninterrupted runs without offload and on one process
        assert max_diff(off["resumed_params"], plain["params"]) < TOL
        assert max_diff(off["resumed_params"], oracle[kind, S.STEPS]["params"]) < TOL
        same_steps(off["resumed_record"], oracle[kind, S.STEPS]["record"][S.SPLIT:])


def test_instance_and_callable_with_zero_force_ds_cpu_optimizer_false(jobs, oracle):
    for res in ok(jobs, "ds_offload_ways"):
        for kind in S.KINDS:
            for how in ("instance", "callable"):  # ZeRO 3 and ZeRO 2
                got = res[f"{kind}.{how}"]
                assert_offloaded(got["state"], kind)
                assert max_diff(got["params"], oracle[kind, S.SPLIT]["params"]) < TOL
                same_steps(got["record"], oracle[kind, S.SPLIT]["record"])


def test_what_deepspeed_does_without_zero_force_ds_cpu_optimizer(jobs, oracle):
    """DeepSpeed's default (true) refuses a client optimizer (instance or callable) under offload
    at deepspeed.initialize; the config entry is built as it is and trains."""
    for res in ok(jobs, "ds_offload_ways"):
        for how in ("instance", "callable"):
            err = res[f"default.{how}"]
            assert err is not None and err["type"] == "ZeRORuntimeException"
            assert "ZeRO-Offload with a client provided optimizer" in err["message"]
            assert "GrokAdamW" in err["message"]
            assert '"zero_force_ds_cpu_optimizer": false' in err["message"]
        got = res["default.config"]
        assert_offloaded(got["state"], "grokadamw")
        assert max_diff(got["params"], oracle["grokadamw", S.SPLIT]["params"]) < TOL
        same_steps(got["record"], oracle["grokadamw", S.SPLIT]["record"])


def test_bf16_with_offload_matches_bf16_without(jobs):
    runs = ok(jobs, "ds_offload_ways")
    for res in runs:
        for kind, stage in (("grokadamw", 2), ("supergrok", 3)):
            off, plain = (res[f"bf16.{kind}.{stage}"][k] for k in ("offload", "plain"))
            assert_offloaded(off["state"], kind)
            assert_backend([{"backend": off["backend"]}, {"backend": plain["backend"]}])
            assert off["global_step"] == plain["global_step"] == S.SPLIT
            assert all(math.isfinite(x) for x in off["losses"])
            assert off["losses"] == pytest.approx(plain["losses"], rel=1e-6)
            assert max_diff(off["params"], plain["params"]) < TOL
    for kind, stage in (("grokadamw", 2), ("supergrok", 3)):  # every rank holds the same model
        assert max_diff(runs[0][f"bf16.{kind}.{stage}"]["offload"]["params"],
                        runs[1][f"bf16.{kind}.{stage}"]["offload"]["params"]) == 0


def test_partial_offload_is_refused_by_deepspeed(jobs):
    for res in ok(jobs, "ds_offload_ways"):
        assert res["ratio"] == "Hybrid Optimizer Only Supports DeepSpeedCPUAdam"


def test_example_config_is_an_offload_config_with_grokadamw():
    cfg = json.loads(O.EXAMPLE.read_text())
    assert cfg["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert cfg["zero_optimization"]["stage"] in (2, 3)
    assert cfg["zero_force_ds_cpu_optimizer"] is False
    assert cfg["optimizer"]["type"] == "GrokAdamW"
    # set explicitly (DeepSpeed's default is 1.0), and GrokAdamW's agrees (an error otherwise)
    assert "gradient_clipping" in cfg
    assert cfg["optimizer"]["params"]["gradient_clipping"] == cfg["gradient_clipping"]


def test_example_config_trains(jobs):
    want = O.example_oracle()
    runs = ok(jobs, "ds_offload_example")
    for res in runs:
        got, plain = res["example"], res["plain"]
        assert_offloaded(got["state"], "grokadamw")
        assert plain["state"]["offload"] is False
        for run in (got, plain):
            assert max_diff(run["params"], want["params"]) < TOL
            assert_backend(run["record"])
            for g, w in zip(run["record"], want["record"], strict=True):
                assert g["global_step"] == w["global_step"]
                assert g["last_clip_coefs"] == pytest.approx(w["last_clip_coefs"], rel=1e-6)
        assert max_diff(got["params"], plain["params"]) < TOL
    # clipping engaged (the coefficient below 1), so the explicit setting was exercised
    assert min(c for r in want["record"] for c in r["last_clip_coefs"]) < 1
