"""Checkpoints and pickled optimizers written by an older version still load and step on.

The fixtures (tests/compat/fixtures/compat_*.pt, written by tests/compat/fixtures/make_compat.py at
the commit they record) hold a state dict, a pickled optimizer and a world-2 ZeRO-1 shard pair after
three steps, and the parameters the original optimizer reached at step four: the oracle here.
"""
from __future__ import annotations

import os
import pickle

import pytest
import torch

import shardgrok
from tests.compat.fixtures.make_compat import KINDS, build, take_step

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
TOL = dict(rtol=0, atol=1e-6)


def load(kind):
    return torch.load(os.path.join(HERE, f"compat_{kind}.pt"), weights_only=False)


def step_four(kind, opt, params, data):
    take_step(kind, opt, params, data["grads"], 3)
    for got, want in zip(params, data["params4"]):
        torch.testing.assert_close(got.detach(), want, **TOL)


@pytest.mark.parametrize("kind", KINDS)
def test_pickled_optimizer_steps_on(kind):
    data = load(kind)
    opt = pickle.loads(data["pickled"])
    assert isinstance(opt, (shardgrok.GrokAdamW, shardgrok.SuperGrok))
    params = [p for g in opt.param_groups for p in g["params"]]
    for got, want in zip(params, data["params3"]):
        torch.testing.assert_close(got.detach(), want, rtol=0, atol=0)
    assert opt.get_global_step() == 3
    step_four(kind, opt, params, data)


@pytest.mark.parametrize("kind", KINDS)
def test_state_dict_loads(kind):
    data = load(kind)
    params = [p.clone().requires_grad_() for p in data["params3"]]
    opt = build(kind, params)
    opt.load_state_dict(data["state_dict"])
    assert opt.get_global_step() == 3
    step_four(kind, opt, params, data)


@pytest.mark.parametrize("kind", KINDS)
def test_zero_shards_consolidate_and_load(kind):
    data = load(kind)
    full = shardgrok.consolidate_state_dict(data["shards"])
    params = [p.clone().requires_grad_() for p in data["params3"]]
    opt = build(kind, params)
    opt.load_state_dict(full)
    step_four(kind, opt, params, data)
