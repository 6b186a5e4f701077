"""FSDP1 with torch.distributed.checkpoint (docs/distributed.md, "FSDP1 and DCP"), torch's AdamW
as the control: saved after SPLIT steps at world size 2 with get_optimizer_state_dict +
dcp.save, resumed into a fresh model and optimizer with dcp.load + set_optimizer_state_dict,
both use_orig_params settings. One torchrun job (tests/support/fsdp_cases.py, ``fsdp1_dcp``); the
resumed runs are compared with the uninterrupted single-process runs.
"""
from __future__ import annotations

import pytest
import torch

from tests.support import scenarios as S
from tests.support.helpers import toy
from tests.support.multirank import assert_same_run, launch, max_diff, ok

ORIGS = (False, True)


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    ckpt = tmp_path_factory.mktemp("fsdp1-dcp-ckpt")
    _, res = launch(2, tmp_path_factory.mktemp("fsdp1-dcp"), ("fsdp1_dcp",), ckpt)
    return ok(res, "fsdp1_dcp")


def _adamw_single_process() -> list[torch.Tensor]:
    """The control's uninterrupted run on one process: every rank of the FSDP1 job computes the
    same full-batch gradient, so FSDP's average is this run's gradient."""
    from tests.support.fsdp_cases import adamw_train
    model = toy(S.DTYPE, dead=False)
    adamw_train(model, torch.optim.AdamW(model.parameters(), lr=1e-2), range(S.STEPS))
    return S.params(model)


@pytest.mark.parametrize("orig", ORIGS)
def test_plain_dcp_load_fails_for_adamw_too(job, orig):
    """The documented torch limitation: with the default load planner, a rank holding no element
    of some tensor (here ``scale`` on rank 1) is taken for a pre-2.4 checkpoint and the load
    stops at the optimizer's param_groups, for torch's AdamW as for ours."""
    for res in job:
        for kind in ("adamw",) + S.KINDS:
            err = res[f"{kind}.orig{orig}"]["plain_load"]
            assert err is not None, (kind, "dcp.load now works with the default planner: "
                                     "update docs/distributed.md and this test")
            assert "Missing key in checkpoint state_dict: optim.param_groups" in err, (kind, err)
    # what triggers it: some rank holds no element of some tensor
    assert any(res[f"{kind}.orig{orig}"]["none_here"] for res in job for kind in S.KINDS)


@pytest.mark.parametrize("orig", ORIGS)
def test_adamw_control_resumes(job, orig):
    want = _adamw_single_process()
    for res in job:
        assert max_diff(res[f"adamw.orig{orig}"]["params"], want) < 1e-6


@pytest.mark.parametrize("orig", ORIGS)
@pytest.mark.parametrize("kind", S.KINDS)
def test_ours_resumes_like_the_uninterrupted_run(job, kind, orig):
    want = S.run(kind, dead=False, groups=S.one_group)  # one process, 20 steps without a break
    for res in job:
        got = res[f"{kind}.orig{orig}"]
        assert got["global_step"] == S.SPLIT
        if kind == "supergrok":
            assert got["cached_alpha"] == pytest.approx(want["record"][S.SPLIT - 1]["cached_alpha"],
                                                        rel=1e-12)
        assert_same_run(got, {"params": want["params"], "record": want["record"][S.SPLIT:]})


def test_every_tensor_gets_its_state_back(job):
    """Per-tensor state after the load, both use_orig_params. With True, FSDP1's load gives a
    rank no state for a tensor it holds no element of: AdamW never had any there (the piece gets
    no gradient); ours is eager, and the layout puts it back with the tensor's step count from
    the other ranks."""
    empty = 0
    for res in job:
        for n, keys, _ in res["adamw.origTrue"]["state"]:
            if n == 0:
                assert keys == []
        for kind in S.KINDS:
            for orig in ORIGS:
                for n, keys, step in res[f"{kind}.orig{orig}"]["state"]:
                    assert keys == ["exp_avg", "exp_avg_sq", "mu", "step"], (kind, orig, n, keys)
                    assert step == S.SPLIT, (kind, orig, n, step)  # every tensor stepped each time
                    empty += orig and n == 0
    assert empty  # the case was exercised
