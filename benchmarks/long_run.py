"""A long sharded run: does anything grow, and does the state stay right?

    torchrun --nproc-per-node 2 benchmarks/long_run.py --json benchmarks/results/long_run.json
    python benchmarks/long_run.py --steps 600 --every 100        # one process, a smoke run

A small model's optimizer, sharded over the ranks (ZeRO-1, no DDP: every rank is given the same
gradients), steps through a fixed gradient sequence drawn from the step number: each step each
tensor has a gradient with probability 0.8 (so the set of tensors that step changes, and with
it the kernel plan's key), a param group is added at half the run, and every ``--every`` steps
the optimizer's own ``state_dict()`` is loaded back (``load_state_dict``), as a resume would.
Every ``--every`` steps it records this process's resident memory (after ``gc.collect()``) and
the most kernel plans the optimizer has cached so far (counted after every step). At the end rank 0 runs the same sequence in
one process on the reference path (``backend="reference"``, the formulas in torch) and
compares the parameters and the full optimizer state.

What it reports: resident memory growth from the sample at step ``--every`` (the first
thousand steps settle the allocator and build the plans) to the end, per rank; the most plans
ever cached against the cache's bound; the largest difference from the reference run,
relative to the largest value of each tensor.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

import psutil
import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import step_common  # noqa: E402

import shardgrok  # noqa: E402
from shardgrok.optim.step import MAX_PLANS  # noqa: E402

#: the model: the first four tensors in group 0, the rest in group 1; ADDED join at half the run
SHAPES = [(64, 32), (64,), (32, 64), (32,), (128, 16), (16,), (7, 13)]
ADDED = [(48, 24), (24,)]
PRESENT = 0.8


def tensors(shapes, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(0.1 * torch.randn(s, generator=g)) for s in shapes]


def make(name: str, params0, params1, **kw):
    groups = [{"params": params0, "weight_decay": 0.1}, {"params": params1, "weight_decay": 0.0}]
    cls = shardgrok.GrokAdamW if name == "grokadamw" else shardgrok.SuperGrok
    extra = {} if name == "grokadamw" else {"warmup_steps": 10}
    return cls(groups, lr=1e-3, **extra, **kw)


def set_grads(params: list[torch.Tensor], step: int) -> None:
    """Step ``step``'s gradients: the same on every rank and in the reference run."""
    g = torch.Generator().manual_seed(100_003 + step)
    for p in params:
        present = torch.rand((), generator=g).item() < PRESENT
        grad = 0.01 * torch.randn(p.shape, generator=g)
        p.grad = grad if present else None


def run(name: str, steps: int, every: int, reference: bool = False, on_step=None):
    """The sequence; ``on_step(step, opt)`` after every step, before that step's
    ``load_state_dict`` where it has one (a load drops the cached plans). Returns the
    parameters and the optimizer."""
    params = tensors(SHAPES, 0)
    kw = dict(backend="reference", shard=False) if reference else {}
    opt = make(name, params[:4], params[4:], **kw)
    for t in range(1, steps + 1):
        if t == steps // 2 + 1:
            added = tensors(ADDED, 1)
            opt.add_param_group({"params": added, "weight_decay": 0.05})
            params += added
        set_grads(params, t)
        if name == "supergrok":
            opt.step(train_loss=1.0 / t ** 0.5, val_loss=1.2 / t ** 0.5)
        else:
            opt.step()
        if on_step is not None:
            on_step(t, opt)
        if t % every == 0:
            opt.load_state_dict(opt.state_dict())
    return params, opt


def rss_mb() -> float:
    gc.collect()
    return psutil.Process().memory_info().rss / 2**20


def relative_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    scale = max(a.abs().max().item(), b.abs().max().item(), 1e-30)
    return (a - b).abs().max().item() / scale


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--optimizer", choices=["grokadamw", "supergrok"], default="grokadamw")
    ap.add_argument("--steps", type=int, default=20_000)
    ap.add_argument("--every", type=int, default=1_000,
                    help="load_state_dict and a memory sample every this many steps")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    if args.every < 1 or args.steps < 2 * args.every:
        ap.error(f"--every must be >= 1 and --steps at least twice it, got {args.every}, "
                 f"{args.steps}")
    torch.set_num_threads(1)
    info = shardgrok.init_distributed()
    rank, world = info.rank, info.world_size

    samples, most = [], [0]
    t0 = time.perf_counter()

    def on_step(t, opt):
        most[0] = max(most[0], len(opt._driver.plans))
        if t % args.every == 0:
            samples.append({"step": t, "rss_mb": round(rss_mb(), 2), "plans": most[0]})
    params, opt = run(args.optimizer, args.steps, args.every, on_step=on_step)
    seconds = time.perf_counter() - t0
    full = opt.full_state_dict(to=0)
    per_rank = [None] * world
    if world > 1:
        dist.all_gather_object(per_rank, samples)
    else:
        per_rank = [samples]
    if rank == 0:
        ref_params, ref_opt = run(args.optimizer, args.steps, args.every, reference=True)
        want = ref_opt.state_dict()
        diffs = {"params": max(relative_diff(p, q) for p, q in zip(params, ref_params))}
        for key in ("exp_avg", "exp_avg_sq", "mu"):
            diffs[key] = max(relative_diff(full["state"][i][key], want["state"][i][key])
                             for i in want["state"])
        diffs["step"] = max(abs(float(full["state"][i]["step"]) - float(want["state"][i]["step"]))
                            for i in want["state"])
        growth = [(s[-1]["rss_mb"] - s[0]["rss_mb"]) / s[0]["rss_mb"] for s in per_rank]
        plans = max(x["plans"] for s in per_rank for x in s)
        prov = step_common.provenance("benchmarks/long_run.py", argv)
        result = {"provenance": prov, "config": vars(args) | {"world_size": world},
                  "seconds": round(seconds, 1), "samples_per_rank": per_rank,
                  "rss_growth_after_first_sample": growth, "max_plans": plans,
                  "plan_bound": MAX_PLANS, "relative_diff_from_reference": diffs}
        print("\n".join(step_common.provenance_lines(prov)))
        print(f"{args.optimizer}: {args.steps} steps at world size {world} in {seconds:.0f} s")
        for r, (s, g) in enumerate(zip(per_rank, growth)):
            print(f"rank {r}: resident memory {s[0]['rss_mb']:.1f} MB at step {s[0]['step']}, "
                  f"{s[-1]['rss_mb']:.1f} MB at step {s[-1]['step']}: {100 * g:+.2f}%")
        print(f"kernel plans cached: at most {plans} (bound {MAX_PLANS})")
        print("largest difference from the reference path, relative to each tensor's largest "
              "value: " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)
    shardgrok.shutdown_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
