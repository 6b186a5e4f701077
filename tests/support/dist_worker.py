"""One rank of a multi-rank test job, launched by tests/distributed/test_distributed.py through
torchrun (tests/support/multirank.py), from the checkout's root or with it on PYTHONPATH:

    python -m torch.distributed.run --standalone --nproc-per-node N -m tests.support.dist_worker \\
        --out DIR --ckpt DIR --scenarios a,b,c [--timeout S]
        [--dist-backend gloo|nccl] [--device cpu|cuda] [--kernel-backend B] [--steps N]

``--device``, ``--kernel-backend`` and ``--steps`` are read by the scenarios of
tests/support/device_ranks.py only (the ``ranks_`` ones): where the model lives and the
optimizers' ``backend``.

Each scenario runs on every rank and its result (or traceback) is saved to
``DIR/<scenario>.<rank>.pt``; the pytest side compares them with the single-process oracle.
"""
from __future__ import annotations

import argparse
import copy
import gc
import os
import time
import traceback
import warnings
import weakref
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

import shardgrok
from tests.support import scenarios as S
from tests.support.helpers import backward, toy
from tests.support.worker_registry import SCENARIOS, Ctx, collective_calls, scenario

RANK = WORLD = 0


# ---------------------------------------------------------------- exactness, memory, collectives
@scenario
def exact_grokadamw(args):
    return S.run("grokadamw", RANK, WORLD, shard=True)


@scenario
def exact_supergrok(args):
    return S.run("supergrok", RANK, WORLD, shard=True)


@scenario
def exact_supergrok_nometa(args):
    """Without meta-steps, which tests/support/oracle.py does not model: the run it is compared
    with."""
    return S.run("supergrok", RANK, WORLD, shard=True, meta=False)


@scenario
def reference_grokadamw(args):
    """The reference backend sharded: the oracle path's own segments (pieces with gradients)
    under ZeRO-1, which the kernel runs (a cached plan) do not go through."""
    return S.run("grokadamw", RANK, WORLD, shard=True, backend="reference")


@scenario
def reference_supergrok(args):
    return S.run("supergrok", RANK, WORLD, shard=True, meta=False, backend="reference")


@scenario
def emulated_grokadamw(args):
    """The CUDA kernels and their glue (shardgrok/kernels/cuda.py) under ZeRO-1, built for the
    host (backend="cuda-emulated"): each rank's plan covers only the pieces it owns."""
    return S.run("grokadamw", RANK, WORLD, shard=True, backend="cuda-emulated")


@scenario
def emulated_supergrok(args):
    return S.run("supergrok", RANK, WORLD, shard=True, backend="cuda-emulated")


@scenario
def bf16_default_state(args):
    """bf16 parameters, default state dtype (fp32 m, v, mu) under ZeRO-1
    (tests/math/test_state_dtype.py)."""
    return {kind: S.bf16_run(kind, RANK, WORLD, shard=True) for kind in S.KINDS}


@scenario
def collectives(args):
    counts = {}
    for kind in S.KINDS:
        model = toy(S.DTYPE)
        opt = S.make(kind, model, RANK, WORLD, shard=True)
        S.train(kind, model, opt, range(2), RANK, WORLD)
        tl = backward(model, 2)
        with collective_calls() as calls:
            if kind == "grokadamw":
                opt.step()
            else:
                opt.step(train_loss=tl + RANK, val_loss=tl * 2)
        counts[kind] = {name: sum(c[0] == name for c in calls) for name, _ in calls}
        counts[kind + "_cached_alpha"] = opt.get_cached_alpha() if kind == "supergrok" else opt.get_alpha()
    return counts


@scenario
def subgroups(args):
    """process_group=: ranks {0, 1} and {2, 3} each shard over their own pair."""
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]  # every rank creates both
    pg = pairs[RANK // 2]
    rank, world = dist.get_rank(pg), dist.get_world_size(pg)
    out = {kind: S.run(kind, rank, world, shard=True, process_group=pg) for kind in S.KINDS}
    model = toy(S.DTYPE)
    opt = S.make("grokadamw", model, rank, world, shard=True, process_group=pg)
    out["elements"] = sum(st["exp_avg"].numel() for st in opt.state.values())
    return out


@scenario
def unsharded(args):
    """shard=False in a distributed job: no collective at all, whole state on every rank."""
    model = toy(S.DTYPE)
    opt = S.make("supergrok", model, RANK, WORLD, shard=False)
    backward(model, 0)
    with collective_calls() as calls:
        opt.step(train_loss=1.0, val_loss=2.0)
        opt.get_state_summary()
    return {"collectives": [name for name, _ in calls], "sharded": opt.is_sharded,
            "elements": sum(st["exp_avg"].numel() for st in opt.state.values())}


@scenario
def memory(args):
    out = {}
    for kind in S.KINDS:
        model = toy(S.DTYPE)
        opt = S.make(kind, model, RANK, WORLD, shard=True)
        S.train(kind, model, opt, range(1), RANK, WORLD)
        elems = sum(st[k].numel() for st in opt.state.values() for k in ("exp_avg", "exp_avg_sq", "mu"))
        nbytes = sum(st[k].numel() * st[k].element_size()
                     for st in opt.state.values() for k in ("exp_avg", "exp_avg_sq", "mu"))
        out[kind] = {"elements": elems, "bytes": nbytes,
                     "group_totals": [sum(p.numel() for p in g["params"]) for g in opt.param_groups],
                     "spans": [opt._layout.span(p) if opt._layout.owns(p) else None
                               for g in opt.param_groups for p in g["params"]],
                     "numels": [p.numel() for g in opt.param_groups for p in g["params"]]}
    return out


# ---------------------------------------------------------------- memory bounds (docs/distributed.md)
class AllocationTracker(TorchDispatchMode):
    """Every tensor storage allocated inside the block (an op's output that shares no storage
    with its inputs) and when it was freed, so the temporaries of a call can be measured
    whatever code allocates them."""

    def __init__(self):
        super().__init__()
        self.events: list[tuple] = []  # ("+", key, nbytes, data_ptr) and ("-", key)
        self._count = 0
        self._final: list[tuple] | None = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        given = {t.untyped_storage().data_ptr()
                 for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in pytree.tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if storage.nbytes() and ptr not in given:
                given.add(ptr)
                key, self._count = self._count, self._count + 1
                self.events.append(("+", key, storage.nbytes(), ptr))
                weakref.finalize(storage, self.events.append, ("-", key))
        return out

    def __exit__(self, *exc):
        self._final = list(self.events)
        return super().__exit__(*exc)

    def measure(self, keep=()) -> dict:
        """``peak``: most bytes alive at once inside the block, and ``largest``: the largest
        single allocation, leaving out what is still alive at its end in a storage of ``keep``
        (tensors the call returns)."""
        events = self._final if self._final is not None else list(self.events)
        freed = {e[1] for e in events if e[0] == "-"}
        kept_ptrs = {t.untyped_storage().data_ptr() for t in keep}
        skip = {e[1] for e in events if e[0] == "+" and e[1] not in freed and e[3] in kept_ptrs}
        live, peak, largest, sizes = 0, 0, 0, {}
        for e in events:
            if e[1] in skip:
                continue
            if e[0] == "+":
                sizes[e[1]] = e[2]
                live += e[2]
                largest = max(largest, e[2])
                peak = max(peak, live)
            else:
                live -= sizes.pop(e[1], 0)
        return {"peak": peak, "largest": largest}


def _state_tensors(sd) -> list[torch.Tensor]:
    return [] if sd is None else [v for st in sd["state"].values() for v in st.values()
                                  if isinstance(v, torch.Tensor)]


@scenario
def small_buckets(args):
    """ZeRO-1 with a gather bucket a fifth of the model's bytes: several all-gathers per
    gather, tensors straddling them. The 20-step runs (for parity with one process; the
    meta-steps' averages of validation gradients go through buckets that small too), one
    post-step gather and one full state measured, the full state at both bucket sizes."""
    import shardgrok.comm as C
    from shardgrok.layouts.zero import ZeroLayout
    model_bytes = sum(p.numel() * p.element_size() for p in toy(S.DTYPE).parameters())
    bucket = model_bytes // 5
    out = {"bucket": bucket, "model_bytes": model_bytes}
    ZeroLayout.gather_bucket_bytes = bucket
    os.environ[C.BUCKET_ENV] = str(bucket / (1 << 20))
    try:
        for kind in S.KINDS:
            out[kind] = S.run(kind, RANK, WORLD, shard=True)
        model = toy(S.DTYPE)
        opt = S.make("supergrok", model, RANK, WORLD, shard=True)
        S.train("supergrok", model, opt, range(4), RANK, WORLD)
        layout = opt._layout
        keys: dict = {}
        for b in layout._buckets:
            keys[b.key] = keys.get(b.key, 0) + b.share
        before = S.params(model)
        with collective_calls() as calls:
            layout.post_step(opt)
        # measured apart: under collective_calls' wrappers gloo's buffers are freed late
        with AllocationTracker() as track:
            layout.post_step(opt)
        out["post_step"] = {**track.measure(), "widths": list(keys.values()),
                            "itemsize": S.DTYPE.itemsize,
                            "gathers": sum(name == "all_gather_single" for name, _ in calls),
                            "unchanged": all(torch.equal(a, b) for a, b in
                                             zip(before, S.params(model), strict=True))}
        sd = opt.state_dict()
        with AllocationTracker() as track:
            full = layout.full_state(opt, sd, 0)
        out["full_state"] = {**track.measure(keep=_state_tensors(full)),
                             "returned": full is not None,
                             "on_cpu": all(t.device.type == "cpu" for t in _state_tensors(full))}
        out["full_small"] = opt.full_state_dict(to=None)
        ZeroLayout.gather_bucket_bytes = None
        os.environ.pop(C.BUCKET_ENV, None)
        out["full_default"] = opt.full_state_dict(to=None)
    finally:
        ZeroLayout.gather_bucket_bytes = None
        os.environ.pop(C.BUCKET_ENV, None)
    return out


# ---------------------------------------------------------------- meta-net
@scenario
def meta(args):
    return S.meta_gradient(RANK, WORLD, shard=True)


# ---------------------------------------------------------------- checkpoints
@scenario
def checkpoint_save(args):
    return {kind: S.save_checkpoint(kind, args.ckpt, RANK, WORLD, shard=True) for kind in S.KINDS}


@scenario
def resume(args):
    out = {}
    for source in args.resume_from.split(","):
        for kind in S.KINDS:
            out[f"{kind}.{source}"] = S.resume(kind, args.ckpt, source, RANK, WORLD, shard=True)
    return out


@scenario
def load_wrong_shard(args):
    """Another rank's shard must be refused with a clear error (it would load silently wrong)."""
    model = toy(S.DTYPE)
    opt = S.make("grokadamw", model, RANK, WORLD, shard=True)
    other = (RANK + 1) % WORLD
    sd = torch.load(os.path.join(args.ckpt, f"grokadamw.w{WORLD}.shard{other}.pt"),
                    weights_only=True)
    try:
        opt.load_state_dict(sd)
    except ValueError as e:
        return {"error": str(e)}
    return {"error": None}


# ---------------------------------------------------------------- faults and bad input
@scenario
def fault_in_step(args):
    """Rank 1's closure raises: rank 1 gets its own error, the others a RuntimeError, at once."""
    model = toy(S.DTYPE)
    opt = S.make("supergrok", model, RANK, WORLD, shard=True)
    S.train("supergrok", model, opt, range(2), RANK, WORLD)
    before = S.params(model)

    def closure():
        if RANK == 1:
            raise ValueError("data loader broke on rank 1")
        return backward(model, 2)
    t0 = time.monotonic()
    try:
        opt.step(closure)
        err = None
    except Exception as e:
        err = (type(e).__name__, str(e))
    elapsed = time.monotonic() - t0
    unchanged = all(torch.equal(a, b) for a, b in zip(before, S.params(model), strict=True))
    step_after = opt.get_global_step()
    S.train("supergrok", model, opt, range(2, 3), RANK, WORLD)  # the job can go on
    return {"error": err, "elapsed": elapsed, "unchanged": unchanged, "step_after": step_after,
            "step_final": opt.get_global_step()}


@scenario
def nonfinite(args):
    out = {}
    for policy in ("skip", "raise"):
        model = toy(S.DTYPE)
        opt = S.make("grokadamw", model, RANK, WORLD, shard=True, nonfinite=policy)
        S.train("grokadamw", model, opt, range(2), RANK, WORLD)
        backward(model, 2)
        w = model.a.weight
        a, e = opt._layout.span(w)
        if RANK == 1:  # only rank 1's copy of the gradient, inside the range rank 1 owns
            assert e > a, "rank 1 must own part of a.weight"
            w.grad.view(-1)[a] = float("nan")
        before = S.params(model)
        state_before = {k: v.clone() for k, v in opt.state[w].items()}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                opt.step()
                err = None
            except Exception as ex:
                err = type(ex).__name__
        out[policy] = {
            "error": err, "warned": any(issubclass(c.category, RuntimeWarning) for c in caught),
            "unchanged": all(torch.equal(x, y)
                             for x, y in zip(before, S.params(model), strict=True)),
            "state_unchanged": all(torch.equal(v, opt.state[w][k]) for k, v in state_before.items()),
            "global_step": opt.get_global_step(), "skipped": opt.get_state_summary()["skipped_steps"]}
    return out


@scenario
def mismatch(args):
    model = toy(S.DTYPE)
    params = list(model.parameters())
    if RANK == 1:
        params.append(torch.nn.Parameter(torch.zeros(3)))
    try:
        shardgrok.GrokAdamW(params, shard=True)
        return {"error": None}
    except ValueError as e:
        return {"error": str(e)}


@scenario
def stuck_rank(args):
    """Rank 1 stops answering (sleeps past the process group timeout): rank 0's step must end in
    an error after about the timeout, not hang."""
    model = toy(S.DTYPE)
    opt = S.make("grokadamw", model, RANK, WORLD, shard=True)
    backward(model, 0)
    if RANK == 1:
        time.sleep(3 * args.timeout)
    t0 = time.monotonic()
    try:
        opt.step()
        err = None
    except Exception as e:
        err = type(e).__name__ + ": " + str(e)[:300]
    return {"error": err, "elapsed": time.monotonic() - t0}


@scenario
def suspended_rank(args):
    """Rank 1 is suspended (SIGSTOP) inside ``step()``, after phase 1 and before the step's
    all-reduce; it never comes back (the test kills it). Rank 0 must raise after about the
    timeout with an error naming the step and the collective, its parameters as before the
    step, and the checkpoint it saved before must load with the state it held then."""
    return _suspended(args, "reduce")


@scenario
def suspended_rank_gather(args):
    """The same, rank 1 suspended after its update and before the all-gather of the updated
    parameters (ZeRO-1's post-step): rank 0 has updated its part and must say so."""
    return _suspended(args, "gather")


def _suspended(args, where: str):
    import signal
    # torchrun starts each worker in a session of its own: the test kills the ranks by pid
    with open(os.path.join(args.out, f"{where}.pid.{RANK}"), "w") as f:
        f.write(str(os.getpid()))
    model = toy(S.DTYPE)
    opt = S.make("supergrok", model, RANK, WORLD, shard=True)
    S.train("supergrok", model, opt, range(2), RANK, WORLD)
    # a copy: like torch.optim's state_dict(), it holds the live state tensors where it can
    full = copy.deepcopy(opt.full_state_dict(to=0))
    path = os.path.join(args.out, f"{where}_before_step.pt")
    if RANK == 0:
        shardgrok.save_checkpoint(full, path)
    dist.barrier()
    backward(model, 2)
    if RANK == 1:
        owner, name = ((opt._layout.reducer, "all_reduce_") if where == "reduce"
                       else (opt._layout, "post_step"))
        real = getattr(owner, name)

        def suspended(*a, **kw):
            os.kill(os.getpid(), signal.SIGSTOP)
            return real(*a, **kw)
        setattr(owner, name, suspended)
    before = S.params(model)
    t0 = time.monotonic()
    try:
        opt.step(train_loss=1.0)
        err = None
    except Exception as e:
        err = str(e)
    elapsed = time.monotonic() - t0
    fresh = S.make("supergrok", toy(S.DTYPE), shard=False)
    fresh.load_state_dict(shardgrok.load_checkpoint(path))
    loaded = fresh.state_dict()
    same_state = all(torch.equal(loaded["state"][i][k], full["state"][i][k])
                     for i in full["state"] for k in full["state"][i])
    return {"error": err, "elapsed": elapsed, "same_state": same_state,
            "loaded_step": fresh.get_global_step(), "step": opt.get_global_step(),
            "unchanged": all(torch.equal(a, b) for a, b in zip(before, S.params(model), strict=True))}


def main():
    global RANK, WORLD
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--ckpt", default="")
    ap.add_argument("--scenarios", required=True)
    ap.add_argument("--resume-from", default="")
    ap.add_argument("--timeout", type=float, default=60.0)
    ap.add_argument("--dist-backend", default="gloo", choices=("gloo", "nccl"))
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--kernel-backend", default=None)
    ap.add_argument("--steps", type=int, default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    info = shardgrok.init_distributed(backend=args.dist_backend,
                                      timeout=timedelta(seconds=args.timeout))
    RANK, WORLD = info.rank, info.world_size
    Ctx.rank, Ctx.world = RANK, WORLD
    from tests.support import fsdp_cases  # noqa: F401  (registers the FSDP scenarios)
    if any(n.startswith("ds_") for n in args.scenarios.split(",")):
        from tests.support import ds_cases  # noqa: F401  (DeepSpeed: imported only when asked for)
    if any(n.startswith("ranks_") for n in args.scenarios.split(",")):
        from tests.support import device_ranks  # noqa: F401  (two ranks on one device)
    if any(n.startswith("int8_") for n in args.scenarios.split(",")):
        from tests.support import int8_cases  # noqa: F401  (8-bit state)
    if any(n.startswith("rounding_") for n in args.scenarios.split(",")):
        from tests.support import rounding_cases  # noqa: F401  (stochastic rounding)
    if any(n.startswith("ds_offload") for n in args.scenarios.split(",")):
        from tests.support import ds_offload_cases  # noqa: F401  (ZeRO-Offload)
    for name in args.scenarios.split(","):
        try:
            result = {"ok": SCENARIOS[name](args)}
        except Exception:
            result = {"traceback": traceback.format_exc()}
        torch.save(result, os.path.join(args.out, f"{name}.{RANK}.pt"))
    if "suspended_rank" in args.scenarios:
        return   # rank 1 never resumes: the test kills the job
    if "stuck_rank" in args.scenarios:
        # The group is broken on purpose, so no barrier can pass; gloo must still be torn down
        # before the interpreter exits, or a rank can abort at exit ("terminate called without
        # an active exception", seen once in a full CI run).
        gc.collect()
        dist.destroy_process_group()
        return
    shardgrok.shutdown_distributed()


if __name__ == "__main__":
    main()
