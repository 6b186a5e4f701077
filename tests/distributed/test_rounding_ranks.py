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
