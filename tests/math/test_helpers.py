"""The comparisons the other tests rest on: each must fail on what would otherwise slip through
(a NaN after the first tensor, a short list, a broadcastable shape, a failed torchrun job)."""
from __future__ import annotations

import copy
import math
import subprocess

import pytest
import torch

from tests.support import multirank
from tests.support.helpers import max_abs_diff, max_diff, toy
from tests.support.multirank import assert_matches_oracle, assert_same_run, meta_gradient_error


def _tensors():
    return [torch.zeros(2, 3), torch.ones(4), torch.full((1,), 2.0)]


def test_max_diff_is_the_largest_pairwise_difference():
    a, b = _tensors(), _tensors()
    b[1][2] += 0.25
    b[2][0] -= 0.5
    assert max_diff(a, b) == 0.5
    assert max_diff(a, _tensors()) == 0.0
    assert max_diff([torch.zeros(0)], [torch.zeros(0)]) == 0.0


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("side", ["one", "both"])
def test_max_diff_nonfinite_anywhere_is_inf(value, side):
    a, b = _tensors(), _tensors()
    b[2][0] = value  # the last tensor: Python's max would skip a NaN there
    if side == "both":
        a[2][0] = value
    assert max_diff(a, b) == math.inf
    assert not max_diff(a, b) < 1e-6


def test_max_diff_refuses_partial_comparisons():
    a = _tensors()
    with pytest.raises(AssertionError, match="3 tensors with 2"):
        max_diff(a, a[:2])
    with pytest.raises(AssertionError, match="shape"):  # (1,) would broadcast against (4,)
        max_diff(a, [a[0], a[1], torch.ones(4)])
    with pytest.raises(AssertionError, match="nothing"):
        max_diff([], [])


def test_max_abs_diff_compares_modules_by_name():
    m1, m2 = toy(), toy()
    assert max_abs_diff(m1, m2) == 0.0
    with torch.no_grad():
        m2.b.weight[0, 0] += 0.125
    assert max_abs_diff(m1, m2) == pytest.approx(0.125, rel=1e-12)
    with torch.no_grad():
        m2.dead.bias.fill_(float("nan"))  # the last parameter
    assert max_abs_diff(m1, m2) == math.inf
    with pytest.raises(AssertionError, match="names differ"):  # one parameter short
        max_abs_diff(m1, toy(dead=False))
    wide = toy()
    wide.dead = torch.nn.Linear(3, 1).double()
    with pytest.raises(AssertionError, match="shape"):
        max_abs_diff(m1, wide)


def _run():
    import shardgrok.kernels
    backend = "kernel" if shardgrok.kernels.cpu_extension() is not None else "reference"
    rec = {"backend": backend, "last_clip_coefs": [0.5, 1.0], "gate_engaged": [True, False],
           "alpha": None, "cached_alpha": 0.9}
    return {"params": _tensors(), "record": [dict(rec), dict(rec)], "gates": [], "clips": []}


def test_assert_same_run_fails_on_a_nan_in_a_later_tensor():
    want = _run()
    assert_same_run(copy.deepcopy(want), want)
    got = copy.deepcopy(want)
    got["params"][-1].fill_(float("nan"))  # an all-NaN dead.bias
    with pytest.raises(AssertionError):
        assert_same_run(got, want)
    got = copy.deepcopy(want)
    got["params"] = got["params"][:-1]
    with pytest.raises(AssertionError):
        assert_same_run(got, want)


def test_assert_matches_oracle_checks_parameters_gates_and_clips():
    run = _run()
    want = {"params": _tensors(), "gates": [[True, False]] * 2, "clips": [[0.5, 1.0]] * 2}
    assert_matches_oracle(run, want, 1e-6)
    for change in ("nan", "gate", "clip", "short"):
        got = copy.deepcopy(run)
        if change == "nan":
            got["params"][-1].fill_(float("nan"))
        elif change == "gate":
            got["record"][1]["gate_engaged"] = [True, True]
        elif change == "clip":
            got["record"][1]["last_clip_coefs"] = [0.5 * (1 + 1e-5), 1.0]
        else:
            got["record"] = got["record"][:1]
        with pytest.raises(AssertionError):
            assert_matches_oracle(got, want, 1e-6)


def test_meta_gradient_error():
    want = {"grads": [torch.tensor([3.0, 0.0]), torch.tensor([[4.0]])]}
    got = {"grads": [torch.tensor([3.0, 0.0]), torch.tensor([[4.5]])]}
    assert meta_gradient_error(got, want) == pytest.approx(0.1, rel=1e-6)
    got["grads"][0][1] = float("nan")
    assert meta_gradient_error(got, want) == math.inf
    zero = {"grads": [torch.zeros(2), torch.zeros(1, 1)]}
    assert meta_gradient_error(want, zero) == math.inf  # nothing to be relative to
    with pytest.raises(AssertionError):
        meta_gradient_error({"grads": want["grads"][:1]}, want)
    with pytest.raises(AssertionError):  # same number of elements, other shape
        meta_gradient_error({"grads": [torch.zeros(2), torch.zeros(1)]}, want)


@pytest.mark.parametrize("returncode", [0, 1])
def test_launch_fails_on_a_nonzero_exit_even_with_every_result(tmp_path, monkeypatch,
                                                                returncode):
    """Every rank wrote its result, then the job died (say, at teardown)."""
    def fake_run(cmd, **kw):
        out = tmp_path / "out"
        for r in range(2):
            torch.save({"ok": r}, out / f"s.{r}.pt")
        return subprocess.CompletedProcess(cmd, returncode, "stdout tail", "gloo aborted")
    monkeypatch.setattr(multirank.subprocess, "run", fake_run)
    if returncode:
        with pytest.raises(AssertionError, match=r"exited 1(.|\n)*gloo aborted"):
            multirank.launch(2, tmp_path / "out", ["s"], tmp_path)
    else:
        _, res = multirank.launch(2, tmp_path / "out", ["s"], tmp_path)
        assert multirank.ok(res, "s") == [0, 1]


def test_assert_same_run_fails_when_a_run_fell_back_to_the_reference():
    import shardgrok.kernels
    if shardgrok.kernels.cpu_extension() is None:
        pytest.skip(f"no kernel here: {shardgrok.kernels.unavailable_reason()}")
    want = _run()
    got = copy.deepcopy(want)
    got["record"][1]["backend"] = "reference"
    with pytest.raises(AssertionError):
        assert_same_run(got, want)
