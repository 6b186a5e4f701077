"""8-bit state under DeepSpeed ZeRO 1-3, and 2-3 with ZeRO-Offload (tests/support/int8_cases.py),
at world size 2, from the config's "optimizer" entry. DeepSpeed cuts tensors anywhere inside its
flat partitions: a cut block gets one scale per rank (its own part's largest magnitude), so on
the first step every value is within one step of the map at its rank's scale of the fp32-state
run's value, inside the bound a whole block's values have; an engine checkpoint resumes the
run bit for bit."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("deepspeed")

from tests.support.int8_cases import assert_within_one_step  # noqa: E402
from tests.support.multirank import launch, ok  # noqa: E402

TAGS = [f"{kind}-{where}" for kind in ("grokadamw", "supergrok")
        for where in ("1", "2", "3", "2-offload", "3-offload")]


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    import shardgrok.kernels as K
    if K.cpu_extension() is None:
        pytest.skip(f"the CPU kernel is unavailable: {K.unavailable_reason()}")
    _, res = launch(2, tmp_path_factory.mktemp("int8-ds"), ["int8_ds"],
                    tmp_path_factory.mktemp("int8-ds-ckpt"), timeout=900)
    return ok(res, "int8_ds")


@pytest.mark.parametrize("tag", TAGS)
def test_first_step_within_one_step_of_fp32_state(job, tag):
    finer, codes = 0, 0
    for rank in job:
        got = rank[tag]
        for i, entry in enumerate(got["first"]):
            if not entry["numel"]:
                continue
            assert "exp_avg_scale" in entry, (tag, i)  # the whole partition keeps codes
            codes += entry["numel"]
            finer += assert_within_one_step(entry, got["exact"][i], f"{tag} tensor {i}")
    assert codes == sum(t["exp_avg"].numel() for t in job[0][tag]["exact"])  # every element once
    assert finer > 0  # a block cut by the partition boundary, scaled by each rank alone


@pytest.mark.parametrize("tag", TAGS)
def test_engine_checkpoint_resumes_bit_for_bit(job, tag):
    for rank in job:
        got = rank[tag]
        assert got["offloaded"] == tag.endswith("offload")
        assert got["loaded_step"] == 3
        for a, b in zip(got["resumed"]["params"], got["run"]["params"], strict=True):
            assert torch.equal(a, b), tag
        for a, b in zip(got["resumed"]["state"], got["run"]["state"], strict=True):
            assert sorted(a) == sorted(b)
            for k in b:
                assert (torch.equal(a[k], b[k]) if isinstance(b[k], torch.Tensor) else a[k] == b[k]), (tag, k)


def test_elastic_checkpoints_are_refused_with_int8_state(job):
    for rank in job:
        assert rank["elastic"] is not None and '"elastic_checkpoint": true' in rank["elastic"], rank["elastic"]
