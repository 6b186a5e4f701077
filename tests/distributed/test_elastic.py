"""A rank killed mid-run, as torchrun users meet it: launch/train_sharded.py under torchrun
with ``--max-restarts``, checkpointing every 10 steps with ``--checkpoint``; in the first round
rank 1 SIGKILLs itself at step 15 (tests/distributed/elastic_kill.py). The restarted round
resumes from the step-10 checkpoint and must end exactly where an uninterrupted run ends. The
same checkpoint relaunched at world sizes 1 and 4 ends where the world-2 run ends, up to the
rounding of a gradient averaged over another number of ranks.

The restart only gets through because ``shardgrok.init_distributed`` makes each round's process
group on keys of its own: torchrun keeps one store for the job, and a restarted rank otherwise
dials the previous round's addresses at gloo's connect (benchmarks/restart_repro.py measures how
often, with torch's plain ``init_process_group``: benchmarks/results/restart_repro.json)."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tests.distributed.test_launch import env, free_port
from tests.support.helpers import assert_same_tree
from tests.support.paths import ROOT

KILLER = ROOT / "tests" / "distributed" / "elastic_kill.py"
STEPS, KILL_AT, EVERY = 30, 15, 10


def torchrun(nproc: int, args: list, *, restarts: int = 0, rendezvous: str = "static",
             kill_at: int = -1, mark=None, **extra_env) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
           f"--max-restarts={restarts}"]
    # static: torchrun's default, one store on --master-port; c10d: --standalone's rendezvous
    cmd += ["--standalone"] if rendezvous == "c10d" else [f"--master-port={free_port()}"]
    cmd += [KILLER, "--steps", STEPS, "--checkpoint-every", EVERY, *args]
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=300,
                          cwd=ROOT, env=env(KILL_STEP=str(kill_at), KILLED_MARK=str(mark or ""),
                                            **extra_env))


def ok(p: subprocess.CompletedProcess) -> str:
    assert p.returncode == 0, f"exit {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}"
    return p.stdout


def load(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def flat(obj, prefix="") -> dict:
    """Every leaf of a nested checkpoint, by its path."""
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            out.update(flat(v, f"{prefix}/{k}"))
        return out
    if isinstance(obj, (list, tuple)):
        out = {}
        for i, v in enumerate(obj):
            out.update(flat(v, f"{prefix}/{i}"))
        return out
    return {prefix: obj}


#: SuperGrok's default meta learning rate: Adam moves a meta-net entry by up to about this much
#: per meta-step whatever the gradient's size
META_LR = 1e-4


def assert_same(got: dict, want: dict, exact: bool = True) -> None:
    """Every leaf equal; with ``exact=False`` floating-point leaves to rounding. The meta-net's
    entries are the exception: Adam divides a meta-gradient near zero by its own root mean
    square, so rounding a gradient averaged over another number of ranks can move such an entry
    by up to the meta learning rate per meta-step (two after the resume). The model and m, v,
    mu, which that meta-net shapes, are held to rounding."""
    if exact:
        assert_same_tree(got, want)
        return
    g, w = flat(got), flat(want)
    assert g.keys() == w.keys()
    for k, v in w.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            tol = dict(rtol=0, atol=2 * META_LR) if "/meta_net/" in k else dict(rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(g[k], v, msg=k, **tol)
        elif isinstance(v, torch.Tensor):
            assert g[k].dtype == v.dtype and torch.equal(g[k], v), k
        elif isinstance(v, float):
            assert g[k] == pytest.approx(v, rel=1e-4), k
        else:
            assert g[k] == v, k


def uninterrupted(tmp_path, args) -> dict:
    ok(torchrun(2, [*args, "--checkpoint", tmp_path / "ref_ck.pt", "--save", tmp_path / "ref.pt"]))
    return load(tmp_path / "ref.pt")


CASES = [("grokadamw", "static", None), ("supergrok", "static", None),
         ("supergrok", "c10d", None), ("grokadamw", "static", "int8"),
         ("supergrok", "static", "bfloat16")]


@pytest.mark.parametrize("optimizer,rendezvous,state_dtype", CASES,
                         ids=[f"{o}-{r}-{d or 'fp32'}" for o, r, d in CASES])
def test_a_killed_rank_restarts_from_the_last_checkpoint(tmp_path, optimizer, rendezvous,
                                                          state_dtype):
    args = ["--optimizer", optimizer] + (["--state-dtype", state_dtype] if state_dtype else [])
    want = uninterrupted(tmp_path, args)
    mark = tmp_path / "killed"
    out = ok(torchrun(2, [*args, "--checkpoint", tmp_path / "ck.pt", "--save", tmp_path / "end.pt"],
                      restarts=1, rendezvous=rendezvous, kill_at=KILL_AT, mark=mark))
    assert mark.exists(), "rank 1 was not killed"
    # the second round ran the steps after the step-10 checkpoint
    assert f"in {STEPS - EVERY} steps (global step {STEPS})" in out, out
    assert_same(load(tmp_path / "end.pt"), want)


def test_a_process_group_started_by_the_framework_restarts_with_the_documented_setting(tmp_path):
    """What a Trainer, accelerate or Lightning user who cannot call init_distributed() first
    is told to do (docs/faults.md): torchrun's c10d rendezvous with
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, so each round's ranks make a store of their own. The
    group here is started by a plain init_process_group, as those frameworks start it."""
    args = ["--optimizer", "supergrok"]
    want = uninterrupted(tmp_path, args)
    mark = tmp_path / "killed"
    ok(torchrun(2, [*args, "--checkpoint", tmp_path / "ck.pt", "--save", tmp_path / "end.pt"],
                restarts=1, rendezvous="c10d", kill_at=KILL_AT, mark=mark, PLAIN_INIT="1",
                TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1"))
    assert mark.exists(), "rank 1 was not killed"
    assert_same(load(tmp_path / "end.pt"), want)


@pytest.mark.parametrize("optimizer", ["grokadamw", "supergrok"])
def test_a_dead_job_relaunched_at_another_world_size(tmp_path, optimizer):
    args = ["--optimizer", optimizer]
    want = uninterrupted(tmp_path, args)
    mark, ck = tmp_path / "killed", tmp_path / "ck.pt"
    p = torchrun(2, [*args, "--checkpoint", ck], kill_at=KILL_AT, mark=mark)   # no restarts
    assert p.returncode != 0 and mark.exists()
    assert load(ck)["optimizer"]["param_groups"][0]["shardgrok"]["global_step"] == EVERY
    for world in (1, 4):
        resumed = tmp_path / f"ck{world}.pt"
        resumed.write_bytes(ck.read_bytes())
        out = ok(torchrun(world, [*args, "--checkpoint", resumed, "--save", tmp_path / "end.pt"]))
        assert f"in {STEPS - EVERY} steps (global step {STEPS}); world size {world}" in out, out
        assert_same(load(tmp_path / "end.pt"), want, exact=False)
