"""8-bit state under ZeRO-1 at world sizes 2 and 4 (tests/support/int8_cases.py): the shares are
whole blocks of every 8-bit tensor, so each block's scale is settled by one rank and the run
equals one process bit for bit (parameters, codes, scales), on the kernel and on the reference
path. A one-process checkpoint resumed at world size 2 or 4 equals the uninterrupted one
process; the ranks' shards merge offline into the full state (consolidate_state_dict)."""
from __future__ import annotations

import pytest
import torch

import shardgrok
from shardgrok import reference as R
from tests.support.int8_cases import int8_run, step_width
from tests.support.multirank import launch, ok

KINDS = ("grokadamw", "supergrok")
BACKENDS = ("kernel", "reference")
NAMES = [f"int8_zero1_{kind}_{backend}" for kind in KINDS for backend in BACKENDS]


@pytest.fixture(scope="module", params=[2, 4], ids=["world2", "world4"])
def results(request, tmp_path_factory):
    import shardgrok.kernels as K
    if K.cpu_extension() is None:
        pytest.skip(f"the CPU kernel is unavailable: {K.unavailable_reason()}")
    out = tmp_path_factory.mktemp(f"int8-{request.param}")
    _, res = launch(request.param, out, NAMES + ["int8_zero1_convert"], out, timeout=600)
    return res


def _same(got: dict, want: dict, where: str) -> None:
    for i, (a, b) in enumerate(zip(got["params"], want["params"], strict=True)):
        assert torch.equal(a, b), f"{where}: param {i}"
    assert sorted(got["state"]) == sorted(want["state"])
    for i in want["state"]:
        g, w = got["state"][i], want["state"][i]
        assert sorted(g) == sorted(w), (where, i)
        for k in w:
            if k == "step":
                assert float(g[k]) == float(w[k])
                continue
            assert g[k].dtype == w[k].dtype, (where, i, k)
            assert torch.equal(g[k].reshape(w[k].shape).cpu(), w[k].cpu()), (
                f"{where}: tensor {i} {k}: {int((g[k].reshape(w[k].shape) != w[k]).sum())} differ")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
def test_zero1_equals_one_process_bit_for_bit(results, kind, backend):
    want = int8_run(kind, False, backend)
    assert want["backend"] == backend
    quantized = [i for i, st in want["state"].items() if "exp_avg_scale" in st]
    assert len(quantized) == 4  # the tensors of at least 4,096 elements
    for rank, got in enumerate(ok(results, f"int8_zero1_{kind}_{backend}")):
        assert got["whole"]["sharded"] and got["whole"]["backend"] == backend
        _same(got["whole"], want, f"rank {rank}")
        _same(got["resumed"], want, f"rank {rank}, resumed from one process")


@pytest.mark.parametrize("kind", KINDS)
def test_shards_merge_offline_into_the_full_state(results, kind):
    got = ok(results, f"int8_zero1_{kind}_kernel")
    merged = shardgrok.consolidate_state_dict([r["whole"]["shard"] for r in got])
    _same({"params": got[0]["whole"]["params"], "state": merged["state"]}, got[0]["whole"],
          "consolidated")


@pytest.mark.parametrize("kind", KINDS)
def test_checkpoints_convert_between_formats_under_sharding(results, kind):
    """A one-process fp32-state checkpoint loads into 8-bit sharded optimizers (each value
    quantized to nearest: within half a step), whose whole state loads back into fp32-state
    sharded ones as exactly the codes' values."""
    for got in ok(results, "int8_zero1_convert"):
        got = got[kind]
        converted = 0
        for i, st in got["fp32"].items():
            q, back = got["int8"][i], got["back"][i]
            for k in ("exp_avg", "exp_avg_sq", "mu"):
                assert back[k].dtype == torch.float32
                if "exp_avg_scale" not in q:
                    assert torch.equal(q[k], st[k]) and torch.equal(back[k], st[k])
                    continue
                converted += 1
                values = R.dequantize_state(q[k], q[k + "_scale"], k, 0)
                x = st[k].float()
                scale = R.block_absmax(x, 0)[torch.arange(x.numel()) // R.QBLOCK].view(x.shape)
                assert bool(((values - x).abs() <= step_width(x, scale, R.QUANT_BIAS[k]) / 2).all()), (i, k)
                assert torch.equal(back[k].reshape(values.shape), values), (i, k)
        assert converted == 12  # four tensors, three states
