"""Damaged and mismatched checkpoints: a clear error naming what is wrong, and the optimizer's
state as it was (the oracle: an untouched twin that steps on equal). And checkpoint files a
killed writer cannot leave half-written (the oracle: plain torch.save, which can)."""
from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import shardgrok
from shardgrok import GrokAdamW, SuperGrok, load_checkpoint, save_checkpoint
from shardgrok.metanet import SimpleMetaNet
from tests.compat.fixtures.make_compat import KINDS, build
from tests.compat.test_compat import load as load_fixture
from tests.support.helpers import assert_same_tree

OPTS = {"grokadamw": GrokAdamW, "supergrok": SuperGrok}


def model(hidden=16, layers=2):
    torch.manual_seed(0)
    mods = [torch.nn.Linear(8, hidden)] + [torch.nn.Linear(hidden, 4)] * (layers > 1)
    return torch.nn.Sequential(*mods)


def trained(kind, net=None, steps=2, **kw):
    net = net or model()
    opt = OPTS[kind](net.parameters(), lr=1e-2, **kw)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        step(opt, net, g)
    return net, opt


def step(opt, net, g):
    opt.zero_grad()
    loss = net(torch.randn(3, 8, generator=g)).pow(2).mean()
    loss.backward()
    if isinstance(opt, SuperGrok):
        opt.set_losses(train_loss=loss.item(), val_loss=loss.item() * 1.5)
    opt.step()


def refused(kind, bad, match, **kw):
    """Loading ``bad`` raises ``match``; the optimizer's state_dict is what it was, and it
    steps on exactly as an untouched twin does."""
    net, opt = trained(kind, **kw)
    twin_net, twin = trained(kind, **kw)
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(bad)
    assert_same_tree(opt.state_dict(), before)
    g, h = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    step(opt, net, g)
    step(twin, twin_net, h)
    for p, q in zip(net.parameters(), twin_net.parameters()):
        assert torch.equal(p, q)


def saved(kind, **kw):
    return copy.deepcopy(trained(kind, **kw)[1].state_dict())


@pytest.mark.parametrize("kind", list(OPTS))
def test_another_models_checkpoint_is_refused(kind):
    sd = saved(kind)
    missing = copy.deepcopy(sd)
    del missing["state"][3]
    refused(kind, missing, r"no entry for parameter\(s\) \[3\] of 4")
    extra = copy.deepcopy(sd)
    extra["state"][7] = copy.deepcopy(sd["state"][0])
    refused(kind, extra, r"entries \['7'\] for parameters its param groups do not list \(they "
                         r"list 4\)")
    refused(kind, saved(kind, net=model(hidden=12)),
            r"\['exp_avg'\] has shape \(12, 8\) but parameter 0 has shape \(16, 8\)")
    refused(kind, saved(kind, net=model(layers=1)), r"param groups of \[2\] tensors; this "
                                                    r"optimizer's have \[4\]")
    flat = copy.deepcopy(sd)
    flat["state"][0]["exp_avg_sq"] = flat["state"][0]["exp_avg_sq"].reshape(-1)
    refused(kind, flat, r"\['exp_avg_sq'\] has shape \(128,\) but parameter 0 has shape")
    lacking = copy.deepcopy(sd)
    del lacking["state"][2]["mu"]
    refused(kind, lacking, r"state_dict\['state'\]\[2\] lacks \['mu'\]")
    wrong_id = copy.deepcopy(sd)
    wrong_id["state"]["w.0"] = wrong_id["state"].pop(0)   # names where the groups list indices
    refused(kind, wrong_id, r"entries \['w.0'\] for parameters its param groups do not list")


@pytest.mark.parametrize("kind", list(OPTS))
def test_another_optimizers_checkpoint_is_refused(kind):
    other = "supergrok" if kind == "grokadamw" else "grokadamw"
    theirs = saved(other)
    name = type(trained(other, steps=0)[1]).__name__
    refused(kind, theirs, f"saved by {name}; this optimizer is {OPTS[kind].__name__}")
    net = model()
    adamw = torch.optim.AdamW(net.parameters())
    net(torch.randn(2, 8)).sum().backward()
    adamw.step()
    refused(kind, adamw.state_dict(), "no param_groups\\[0\\]\\['shardgrok'\\] entry")
    future = copy.deepcopy(saved(kind))
    future["param_groups"][0]["shardgrok"]["format"] = 99
    refused(kind, future, "checkpoint format 99; this version reads format 1")


def test_an_old_checkpoint_of_the_other_optimizer_is_refused():
    """Checkpoints written before the optimizer's class was recorded (the compat fixture):
    GrokAdamW's lacks the state SuperGrok keeps, so SuperGrok refuses it before loading."""
    old = load_fixture("grokadamw")["state_dict"]
    assert "optimizer" not in old["param_groups"][0]["shardgrok"]
    net, opt = trained("supergrok", net=None)
    params = [p.clone().requires_grad_() for p in load_fixture("supergrok")["params3"]]
    sg = build("supergrok", params)
    before = copy.deepcopy(sg.state_dict())
    with pytest.raises(ValueError, match="no 'cached_signal', 'meta_net', 'meta_optimizer' in "
                                         "its 'shardgrok' entry, which SuperGrok keeps"):
        sg.load_state_dict(old)
    assert_same_tree(sg.state_dict(), before)


def test_another_meta_net_is_refused():
    """A SuperGrok checkpoint whose meta-net differs from this SuperGrok's (a custom one)."""
    sd = saved("supergrok", meta_net=SimpleMetaNet(hidden_dim=8))
    refused("supergrok", sd, "state_dict's meta-net has tensors .*construct SuperGrok with the "
                             "meta_net the checkpoint was saved with")


@pytest.mark.parametrize("kind", KINDS)
def test_a_shard_set_missing_a_rank_is_refused(kind):
    shards = load_fixture(kind)["shards"]
    with pytest.raises(ValueError, match=r"one shard from each of the 2 ranks of one "
                                         r"checkpoint; got ranks \[1\]"):
        shardgrok.consolidate_state_dict(shards[1:])
    with pytest.raises(ValueError, match=r"got ranks \[0, 0\]"):
        shardgrok.consolidate_state_dict([shards[0], shards[0]])


# ---------------------------------------------------------------- files
def test_save_and_load_checkpoint_round_trip(tmp_path):
    _, opt = trained("supergrok")
    path = tmp_path / "ckpt.pt"
    save_checkpoint({"optimizer": opt.state_dict(), "step": 2}, path)
    assert_same_tree(load_checkpoint(path), {"optimizer": opt.state_dict(), "step": 2})
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt"]   # no temporary file left
    with pytest.raises(FileNotFoundError, match="the folder of path .*nowhere.* does not exist"):
        save_checkpoint({}, tmp_path / "nowhere" / "ckpt.pt")


def test_a_failed_write_keeps_the_previous_checkpoint(tmp_path):
    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("cannot pickle this")

    path = tmp_path / "ckpt.pt"
    save_checkpoint({"version": 1, "t": torch.arange(10)}, path)
    with pytest.raises(RuntimeError, match="cannot pickle this"):
        save_checkpoint({"t": torch.zeros(1000), "bad": Unpicklable()}, path)
    assert load_checkpoint(path, weights_only=True)["version"] == 1
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt"]


def test_damaged_files_are_named(tmp_path):
    path = tmp_path / "ckpt.pt"
    save_checkpoint({"w": torch.randn(1000)}, path)
    data = path.read_bytes()
    for name, content in (("truncated.pt", data[:len(data) // 2]), ("empty.pt", b""),
                          ("text.pt", b"not a checkpoint\n")):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError, match=f"'{tmp_path / name}' \\({len(content)} bytes\\) is "
                                             "not a whole checkpoint: it is truncated"):
            load_checkpoint(tmp_path / name)
    with pytest.raises(FileNotFoundError, match="no checkpoint file at"):
        load_checkpoint(tmp_path / "absent.pt")
    torch.save({"opaque": Opaque()}, tmp_path / "opaque.pt")   # whole, but not weights only
    with pytest.raises(ValueError, match="holds objects that weights_only=True does not load"):
        load_checkpoint(tmp_path / "opaque.pt")
    assert isinstance(load_checkpoint(tmp_path / "opaque.pt", weights_only=False)["opaque"], Opaque)


class Opaque:
    pass


WRITER = r"""
import sys, torch
from shardgrok import save_checkpoint
path, atomic = sys.argv[1], sys.argv[2] == "1"
big = torch.arange(4_000_000, dtype=torch.float32)
for version in range(1_000_000):
    obj = {"version": version, "big": big + version}
    if atomic:
        save_checkpoint(obj, path)
    else:
        torch.save(obj, path)
    print(f"saved {version}", flush=True)
"""


def killed_writer_leaves(tmp_path, atomic: bool, kills: int = 5) -> list[str]:
    """Kill (SIGKILL) a process that keeps rewriting a 16 MB checkpoint, ``kills`` times, each
    at another moment after its first whole save; what each kill left: "whole" or the error."""
    out = []
    path = tmp_path / "ckpt.pt"
    for k in range(kills):
        path.unlink(missing_ok=True)
        p = subprocess.Popen([sys.executable, "-c", WRITER, str(path), "1" if atomic else "0"],
                             stdout=subprocess.PIPE, text=True)
        assert p.stdout.readline().strip() == "saved 0"
        time.sleep(0.013 * (k + 1))   # somewhere inside a later write (each takes tens of ms)
        p.send_signal(signal.SIGKILL)
        p.wait()
        try:
            d = load_checkpoint(path)
            whole = torch.equal(d["big"], torch.arange(4_000_000, dtype=torch.float32)
                                + d["version"])
            out.append("whole" if whole else f"version {d['version']} holds other values")
        except ValueError as e:
            out.append(str(e))
    return out


def test_a_killed_writer_leaves_the_last_whole_checkpoint(tmp_path):
    got = killed_writer_leaves(tmp_path, atomic=True)
    assert got == ["whole"] * len(got), got
