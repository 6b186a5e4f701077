"""8-bit state under FSDP2 at world sizes 2 and 4 (tests/support/int8_cases.py). FSDP2 cuts
tensors by rows: where rows are whole blocks no block is cut and the run equals one process bit
for bit; a block a rank boundary cuts gets one scale per rank (its own part's largest
magnitude), so its values are within one step of the map at that scale, which is within the
bound a whole block's values have (checked on the first step against the fp32-state run of the
same sharding); every other block of a GrokAdamW tensor (and of a SuperGrok group without cut
tensors) stays equal to one process bit for bit."""
from __future__ import annotations

import pytest
import torch

from shardgrok import reference as R
from tests.support.int8_cases import (ALIGNED, CUT, FSDP2_SHAPES, assert_within_one_step,
                                     fsdp2_int8_run, local_values, step_width)
from tests.support.multirank import launch, ok

KINDS = ("grokadamw", "supergrok")
BACKENDS = ("kernel", "reference")
NAMES = [f"int8_fsdp2_{kind}_{backend}" for kind in KINDS for backend in BACKENDS]
KEYS = ("exp_avg", "exp_avg_sq", "mu")


@pytest.fixture(scope="module", params=[2, 4], ids=["world2", "world4"])
def results(request, tmp_path_factory):
    import shardgrok.kernels as K
    if K.cpu_extension() is None:
        pytest.skip(f"the CPU kernel is unavailable: {K.unavailable_reason()}")
    out = tmp_path_factory.mktemp(f"int8-fsdp2-{request.param}")
    hsdp = ["int8_hsdp"] if request.param == 4 else []
    _, res = launch(request.param, out, NAMES + ["int8_refused_fsdp1"] + hsdp, out, timeout=600)
    return res


def _runs(results, kind, backend, hsdp=False):
    if hsdp:
        if "int8_hsdp" not in results:
            pytest.skip("HSDP runs at world size 4")
        return [r[kind] for r in ok(results, "int8_hsdp")]
    return ok(results, f"int8_fsdp2_{kind}_{backend}")


def cut_blocks(ranks: list[list[dict]], i: int) -> set[int]:
    """The blocks of tensor ``i`` a rank boundary cuts."""
    return {r[i]["start"] // R.QBLOCK for r in ranks if r[i]["start"] % R.QBLOCK and r[i]["numel"]}


LAYOUTS = [(b, False) for b in BACKENDS] + [("kernel", True)]
LAYOUT_IDS = ["kernel", "reference", "hsdp"]


@pytest.mark.parametrize(("backend", "hsdp"), LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("kind", KINDS)
def test_whole_blocks_equal_one_process_bit_for_bit(results, kind, backend, hsdp):
    ranks = [r["run"] for r in _runs(results, kind, backend, hsdp)]
    one = fsdp2_int8_run(kind, backend, one=True)
    aligned = range(len(ALIGNED))
    cut_any = False
    for i in range(len(FSDP2_SHAPES)):
        quantized = "exp_avg_scale" in one[i]
        cuts = cut_blocks(ranks, i) if quantized else set()
        cut_any |= bool(cuts)
        if i in aligned:
            assert not cuts
        if kind == "supergrok" and i not in aligned:
            continue  # its per-tensor sums read mu: a cut block's difference reaches its group
        block = torch.arange(one[i]["param"].numel()) // R.QBLOCK
        keep = ~torch.isin(block, torch.tensor(sorted(cuts), dtype=torch.long))
        for rank, r in enumerate(ranks):
            got = r[i]
            assert torch.equal(got["param"].reshape(-1)[keep], one[i]["param"].reshape(-1)[keep]), (rank, i)
            for k in KEYS:
                assert torch.equal(got[k].reshape(-1)[keep], one[i][k].reshape(-1)[keep]), (rank, i, k)
                if quantized:
                    a = got["start"]
                    for j, b in enumerate(range(a // R.QBLOCK, a // R.QBLOCK + got[k + "_scale"].numel())):
                        if b not in cuts:
                            assert got[k + "_scale"][j] == one[i][k + "_scale"][b], (rank, i, k, b)
    assert cut_any  # the schedule does cut blocks


@pytest.mark.parametrize(("backend", "hsdp"), LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("kind", KINDS)
def test_cut_blocks_within_one_step(results, kind, backend, hsdp):
    """Every value within one step of the map at its rank's own scale, and that step within
    the bound a whole block's values have: |x|/8 (the map is a floating format with 3
    mantissa bits), or the block's linear step below its normal range."""
    got = _runs(results, kind, backend, hsdp)
    finer = 0
    for i in range(len(ALIGNED), len(ALIGNED) + len(CUT)):
        exact = {k: got[0]["first_fp32"][i][k].reshape(-1).float() for k in KEYS}
        finer += sum(assert_within_one_step(r["first_int8"][i], exact, f"tensor {i}") for r in got)
    assert finer > 0  # some rank's scale of a cut block is its own, smaller than the block's


def test_fsdp1_refuses_int8_state_before_changing_anything(results):
    for got in ok(results, "int8_refused_fsdp1"):
        for where in ("construction", "add_param_group"):
            assert got[where] is not None and "FSDP1Layout" in got[where] and \
                'state_dtype="int8" runs in one process' in got[where], got[where]
        assert got["groups_after"] == 1 and got["state_after"] == 1


# ---------------------------------------------------------------- checkpoints
@pytest.fixture(scope="module")
def dcp_jobs(tmp_path_factory):
    import shardgrok.kernels as K
    if K.cpu_extension() is None:
        pytest.skip(f"the CPU kernel is unavailable: {K.unavailable_reason()}")
    ckpt = tmp_path_factory.mktemp("int8-dcp")
    _, at4 = launch(4, tmp_path_factory.mktemp("int8-dcp4"), ["int8_fsdp2_dcp_save"], ckpt)
    _, at2 = launch(2, tmp_path_factory.mktemp("int8-dcp2"), ["int8_fsdp2_dcp_save"], ckpt)
    _, from4 = launch(2, tmp_path_factory.mktemp("int8-dcp-from4"), ["int8_fsdp2_dcp_resume"], ckpt,
                      "--resume-from", "4")
    _, from2 = launch(2, tmp_path_factory.mktemp("int8-dcp-from2"), ["int8_fsdp2_dcp_resume"], ckpt,
                      "--resume-from", "2")
    return {"save4": ok(at4, "int8_fsdp2_dcp_save"), "save2": ok(at2, "int8_fsdp2_dcp_save"),
            "from4": ok(from4, "int8_fsdp2_dcp_resume"), "from2": ok(from2, "int8_fsdp2_dcp_resume"),
            "ckpt": ckpt}


def _same_local(got: list[dict], want: list[dict], where: str) -> None:
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert sorted(g) == sorted(w), (where, i)
        for k in w:
            if isinstance(w[k], torch.Tensor):
                assert torch.equal(g[k], w[k]), (where, i, k)
            else:
                assert g[k] == w[k], (where, i, k)


@pytest.mark.parametrize("kind", KINDS)
def test_dcp_resume_at_the_same_world_size_is_bit_for_bit(dcp_jobs, kind):
    for rank, (got, want) in enumerate(zip(dcp_jobs["from2"], dcp_jobs["save2"], strict=True)):
        assert got[kind]["global_step"] == 6
        _same_local(got[kind]["loaded"], want[kind]["saved"], f"rank {rank}: loaded")
        _same_local(got[kind]["run"], want[kind]["run"], f"rank {rank}: resumed run")


def _whole_values(ranks: list[dict], i: int, key: str) -> torch.Tensor:
    """A tensor's whole values of one state, each rank's part at its own scales."""
    parts = sorted((r[i]["start"], local_values(r[i], key)) for r in ranks if r[i]["numel"])
    return torch.cat([v for _, v in parts])


@pytest.mark.parametrize("kind", KINDS)
def test_dcp_saved_at_4_loads_at_2_within_half_a_step(dcp_jobs, kind):
    """The saved values are read back exactly (each row at its own scales); a block the new
    sharding cuts elsewhere is quantized afresh, to nearest: within half a step of the map at
    the new scale. Whole-block tensors load bit for bit."""
    saved = [r[kind]["saved"] for r in dcp_jobs["save4"]]
    loaded = [r[kind]["loaded"] for r in dcp_jobs["from4"]]
    for i in range(len(ALIGNED) + len(CUT)):
        for k in KEYS:
            want = _whole_values(saved, i, k)
            if i < len(ALIGNED):
                assert torch.equal(loaded[0][i][k], saved[0][i][k]), (i, k)
            for r in loaded:
                a, n = r[i]["start"], r[i]["numel"]
                own = r[i][k + "_scale"][(torch.arange(a, a + n) // R.QBLOCK) - a // R.QBLOCK]
                err = (local_values(r[i], k) - want[a:a + n]).abs()
                assert bool((err <= step_width(want[a:a + n], own, R.QUANT_BIAS[k]) / 2).all()), (i, k)
        assert torch.equal(loaded[0][i]["param"], saved[0][i]["param"])


@pytest.mark.parametrize("kind", KINDS)
def test_gathered_full_state_loads_in_one_process(dcp_jobs, kind):
    """get_optimizer_state_dict(full_state_dict=True) gathers the codes and the scales by row;
    one process loads it (converted to its own blocks, within half a step) and steps on."""
    import shardgrok
    from tests.support.int8_cases import _opt, fsdp2_groups
    full = torch.load(str(dcp_jobs["ckpt"] / "int8-dcp-{}-w2.full.pt".format(kind)), weights_only=False)
    saved = [r[kind]["saved"] for r in dcp_jobs["save2"]]
    params = [torch.nn.Parameter(e["param"].clone()) for e in saved[0]]
    opt = _opt(kind, fsdp2_groups(params), "kernel", False)
    # torch keys the whole state by parameter name; the optimizer's own form is by index
    names = sorted(full["state"], key=lambda n: int(n.split(".")[-1]))
    groups = [dict(g, params=[names.index(n) for n in g["params"]]) for g in full["param_groups"]]
    opt.load_state_dict({"state": {names.index(n): st for n, st in full["state"].items()},
                         "param_groups": groups})
    assert opt.get_global_step() == 3 and isinstance(opt, shardgrok.GrokAdamW if kind == "grokadamw"
                                                     else shardgrok.SuperGrok)
    for i, p in enumerate(params):
        st = opt.state[p]
        for k in KEYS:
            want = _whole_values(saved, i, k) if "exp_avg_scale" in saved[0][i] else saved[0][i][k].reshape(-1)
            got = R.state_value(st, k, 0).reshape(-1)
            if "exp_avg_scale" not in st:
                assert torch.equal(got, want), (i, k)
                continue
            own = st[k + "_scale"][torch.arange(p.numel()) // R.QBLOCK]
            assert bool(((got - want).abs() <= step_width(want, own, R.QUANT_BIAS[k]) / 2).all()), (i, k)
            if i < len(ALIGNED):
                assert torch.equal(st[k], saved[0][i][k]), (i, k)


@pytest.mark.parametrize("kind", KINDS)
def test_dcp_saved_at_4_resumes_at_2(dcp_jobs, kind):
    """After the load above, the rest of the run: tensors of whole-block rows equal the
    uninterrupted world-4 run bit for bit; in the others the requantized cut blocks move the
    parameters by at most 10% of what the three steps moved them (measured: up to 6%)."""
    want, saved = dcp_jobs["save4"][0][kind]["run"], dcp_jobs["save4"][0][kind]["saved"]
    for got in dcp_jobs["from4"]:
        assert got[kind]["global_step"] == 6
        for i, (g, w, s) in enumerate(zip(got[kind]["run"], want, saved, strict=True)):
            if i < len(ALIGNED):
                assert torch.equal(g["param"], w["param"]), i
            moved = float((w["param"] - s["param"]).abs().max())
            assert float((g["param"] - w["param"]).abs().max()) <= 0.1 * moved, i
