"""Stochastic rounding does not depend on the sharding: bf16 parameters and bf16 state, both
rounded stochastically, stepped by ZeRO-1 and by FSDP2 (DTensor rows, split unevenly) at world
size 2, equal bit for bit to one process running the same schedule, on the kernel and on the
reference path (tests/support/rounding_cases.py). The draws depend on (seed, step, tensor,
element index in the whole tensor, value) only, and each layout hands the kernel where its
pieces start in their tensors."""
from __future__ import annotations

import pytest
import torch

from tests.support.multirank import launch, ok
from tests.support.rounding_cases import rounding_run

KINDS = ("grokadamw", "supergrok")
LAYOUTS = ("zero1", "fsdp2")
BACKENDS = ("kernel", "reference")
NAMES = [f"rounding_{layout}_{kind}_{backend}" for kind in KINDS for layout in LAYOUTS
         for backend in BACKENDS]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    import shardgrok.kernels as K
    if K.cpu_extension() is None:
        pytest.skip(f"the CPU kernel is unavailable: {K.unavailable_reason()}")
    out = tmp_path_factory.mktemp("rounding")
    _, res = launch(2, out, NAMES, out, timeout=600)
    return res


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kind", KINDS)
def test_sharded_equals_one_process_bit_for_bit(results, kind, layout, backend):
    want = rounding_run(kind, "one", backend)
    assert want["backend"] == backend
    for rank, got in enumerate(ok(results, f"rounding_{layout}_{kind}_{backend}")):
        assert got["sharded"] and got["backend"] == backend
        for i, (a, b) in enumerate(zip(got["params"], want["params"], strict=True)):
            assert a.dtype == torch.bfloat16 and torch.equal(a, b), f"rank {rank} param {i}"
        for i, (sa, sb) in enumerate(zip(got["state"], want["state"], strict=True)):
            for key, a, b in zip(("exp_avg", "exp_avg_sq", "mu"), sa, sb):
                assert a.dtype == torch.bfloat16 and torch.equal(a, b), (
                    f"rank {rank} tensor {i} {key}: {int((a != b).sum())} of {a.numel()} differ")


# ---------------------------------------------------------------- DeepSpeed
@pytest.fixture(scope="module")
def engine_results(tmp_path_factory):
    """The DeepSpeed and FSDP1 jobs (one launch; DeepSpeed must be installed)."""
    pytest.importorskip("deepspeed")
    out = tmp_path_factory.mktemp("rounding-ds")
    _, res = launch(2, out, ["rounding_ds", "rounding_fsdp1"], out, timeout=600)
    return res


def _bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    return torch.exp2(torch.floor(torch.log2(x.double().abs().clamp_min(2.0**-126))) - 7)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_deepspeed_partitions_draw_as_one_process(engine_results, stage):
    """ZeRO 1-3 at world size 2 cut the tensors anywhere: bf16 state rounded stochastically
    equals one process's wherever their fp32 inputs agree. DeepSpeed's own gradient averaging
    and norms leave the fp32 values a last bit apart now and then, so: every value within one
    bf16 ulp and at most 1% of them apart (measured: 0 of the 201 values at every stage, against
    48-66 apart when the layout hands the kernel 0 as every piece's start in its tensor)."""
    from tests.support.rounding_cases import ds_rounding_oracle
    want = ds_rounding_oracle()
    for rank, got in enumerate(ok(engine_results, "rounding_ds")):
        g = got[stage]
        for i, (a, b) in enumerate(zip(g["params"], want["params"], strict=True)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"rank {rank} param {i}")
        apart = total = 0
        for i, (sa, sb) in enumerate(zip(g["state"], want["state"], strict=True)):
            for key, a, b in zip(("exp_avg", "exp_avg_sq", "mu"), sa, sb):
                # DeepSpeed's gather returns fp32: the values must be bf16 ones
                assert torch.equal(a.float(), a.to(torch.bfloat16).float()), (i, key)
                d = (a.double() - b.double()).abs()
                assert bool((d <= _bf16_ulp(torch.maximum(a.double().abs(), b.double().abs()))).all()), (
                    f"rank {rank} tensor {i} {key}: more than one ulp apart")
                apart += int((d > 0).sum())
                total += a.numel()
        assert apart <= total // 100, (stage, apart, total)


# ---------------------------------------------------------------- FSDP1
@pytest.mark.parametrize("orig", [False, True], ids=["flat", "orig_params"])
def test_fsdp1_pieces_draw_as_one_process(engine_results, orig):
    """FSDP1 at world size 2, FlatParameters and use_orig_params=True: the parameters equal one
    process's bit for bit after 8 steps with bf16 m, v, mu rounded stochastically (a draw at
    the wrong index moves m or v by an ulp, and the parameters with it)."""
    from tests.support.rounding_cases import ds_rounding_oracle
    want = ds_rounding_oracle(one_group=True)
    for rank, got in enumerate(ok(engine_results, "rounding_fsdp1")):
        g = got[orig]
        assert g["sharded"]
        for i, (a, b) in enumerate(zip(g["params"], want["params"], strict=True)):
            assert torch.equal(a, b), f"rank {rank} param {i}: {float((a - b).abs().max())}"
