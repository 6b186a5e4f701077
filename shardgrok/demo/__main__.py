"""``python -m shardgrok.demo``: how fast do AdamW, GrokAdamW and SuperGrok grok x*y mod 97?

The task is Grokfast's modular multiplication: all 97*97 pairs as sequences ``[x, op, y, eq]``
(vocabulary 99), split at random into three disjoint parts: half for training, a tenth for
validation (read only by SuperGrok's grokking signal and meta-step) and the rest for test (every
accuracy the demo reports), the answer
read from the last position of a decoder-only transformer (2 layers, width 128, 4 heads, pre-LN,
4x GELU MLP, causal attention); batch 512, lr 1e-3, betas (0.9, 0.98), a 10-step warm-up. The
optimizers are trained one after another from the same initial weights on the same batch
sequence; each run stops as soon as test accuracy reaches 95% (checked every
``--eval-every`` steps, without autograd) or at the step budget.

Each optimizer runs at the settings recommended by the study in docs/grokking.md
(``shardgrok/demo/recipes.py``, ``RECOMMENDED``); ``--opt SPEC`` runs other settings, in the
syntax of benchmarks/grokking.py. ``--nproc N`` runs the same training data-parallel on N CPU
ranks under torchrun: DistributedDataParallel, each rank one of the N micro-batches of every
batch, optimizer state sharded (GrokAdamW and SuperGrok by themselves, AdamW through torch's
ZeroRedundancyOptimizer). One process averages the gradients of the same micro-batches
(``--micro-batches``, default 2), and each process runs one torch thread by default (float sums
depend on the thread count), so ``--nproc 2`` takes the same steps as the plain demo, its
curves equal bit for bit (the reported fp64 clipping coefficient aside, whose per-tensor sums are
added over the shards in another order); a meta-step's gradient is summed over the ranks'
shards in another order and agrees to rounding.

Output: a progress bar per optimizer, a table of the steps and wall time to 95%, a PNG of
training and test accuracy against step (``--png``, needs matplotlib from the ``demo``
extra) and, with ``--json``, every result and curve as JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from .recipes import RECOMMENDED
from .task import OPTIMIZERS, DemoConfig, run

SCHEMA = "shardgrok.demo/1"


def build_parser() -> argparse.ArgumentParser:
    d = DemoConfig()
    ap = argparse.ArgumentParser(
        prog="python -m shardgrok.demo",
        description="Train x*y mod 97 (Grokfast's grokking task) with AdamW, GrokAdamW and "
                    "SuperGrok at their recommended settings from the same initial weights and "
                    "report the step and wall time at which each reaches 95%% test "
                    "accuracy.")
    ap.add_argument("--steps", type=int, default=d.steps, help="step budget per optimizer (%(default)s)")
    ap.add_argument("--optimizers", default=",".join(OPTIMIZERS),
                    help="comma-separated names from " + ",".join(RECOMMENDED) + ", each at its "
                         "recommended settings (%(default)s)")
    ap.add_argument("--opt", action="append", metavar="SPEC",
                    help='an optimizer spec instead of --optimizers, repeatable, e.g. '
                         '"grokadamw:weight_decay=1.0" (a bare name is the optimizer\'s own '
                         'defaults; syntax: shardgrok/demo/recipes.py)')
    ap.add_argument("--op", default=d.op, help='the operation, a formula in x and y (%(default)s)')
    ap.add_argument("--p", type=int, default=d.p, help="the modulus (%(default)s)")
    ap.add_argument("--seed", type=int, default=d.seed, help="data split, weights, batches (%(default)s)")
    ap.add_argument("--lr", type=float, default=d.lr, help="learning rate, all optimizers (%(default)s)")
    ap.add_argument("--weight-decay", type=float, default=d.weight_decay,
                    help="weight decay of the specs that do not set one (%(default)s)")
    ap.add_argument("--betas", type=float, nargs=2, default=d.betas, metavar=("BETA1", "BETA2"),
                    help="Adam betas, all optimizers (%(default)s)")
    ap.add_argument("--lr-warmup", type=int, default=d.lr_warmup,
                    help="linear learning-rate warmup steps (%(default)s)")
    ap.add_argument("--batch-size", type=int, default=d.batch_size,
                    help="global training batch size, 0 = full batch (%(default)s)")
    ap.add_argument("--eval-every", type=int, default=d.eval_every,
                    help="validate every K steps (%(default)s)")
    ap.add_argument("--target", type=float, default=d.target,
                    help="test accuracy to reach (%(default)s)")
    ap.add_argument("--train-fraction", type=float, default=d.train_fraction,
                    help="share of the pairs used for training (%(default)s)")
    ap.add_argument("--width", type=int, default=d.width, help=argparse.SUPPRESS)
    ap.add_argument("--heads", type=int, default=d.heads, help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=d.threads,
                    help="torch CPU threads per process, each rank's with --nproc (%(default)s; "
                         "a process's float sums depend on its thread count, so one process and "
                         "the ranks train the same steps only with the same count)")
    ap.add_argument("--device", default=d.device, help="torch device (%(default)s)")
    ap.add_argument("--micro-batches", type=int, default=None,
                    help="split each batch into this many equal micro-batches and average their "
                         "gradients (default: --nproc, or 2 for one process): one process and "
                         "--nproc M ranks then train the same steps bit for bit")
    ap.add_argument("--nproc", type=int, default=1,
                    help="data-parallel ranks on this machine, launched with torchrun; the "
                         "optimizer state is sharded over them (%(default)s)")
    ap.add_argument("--png", default="grokking_demo.png", metavar="PATH",
                    help="plot of training and test accuracy against step (%(default)s)")
    ap.add_argument("--no-png", action="store_true", help="no plot")
    ap.add_argument("--json", nargs="?", const="-", metavar="PATH",
                    help="write every result and curve as JSON to PATH (no PATH: stdout, "
                         "instead of the table)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar or progress lines")
    ap.add_argument("--worker-result", help=argparse.SUPPRESS)  # set for the torchrun ranks
    return ap


def parse_args(argv=None) -> tuple[DemoConfig, argparse.Namespace]:
    ap = build_parser()
    a = ap.parse_args(argv)
    if a.nproc < 1:
        ap.error(f"--nproc must be >= 1, got {a.nproc}")
    if a.opt:
        specs = tuple(a.opt)
    else:
        specs = tuple(o.strip() for o in a.optimizers.split(",") if o.strip())
        bad = [o for o in specs if o not in RECOMMENDED]
        if bad:
            ap.error(f"--optimizers takes names from {', '.join(RECOMMENDED)} (got "
                     f"{', '.join(bad)}); give other settings with --opt SPEC")
        specs = tuple(RECOMMENDED[o] for o in specs)
    micro = a.micro_batches if a.micro_batches is not None else (a.nproc if a.nproc > 1 else 2)
    if a.nproc > 1 and micro != a.nproc:
        ap.error(f"--nproc {a.nproc} takes one micro-batch per rank: --micro-batches must be "
                 f"{a.nproc} (got {micro})")
    try:
        cfg = DemoConfig(steps=a.steps, micro_batches=micro, optimizers=specs, op=a.op, p=a.p, seed=a.seed, lr=a.lr,
                         weight_decay=a.weight_decay, betas=tuple(a.betas),
                         lr_warmup=a.lr_warmup, batch_size=a.batch_size,
                         eval_every=a.eval_every, target=a.target,
                         train_fraction=a.train_fraction, width=a.width, heads=a.heads,
                         threads=a.threads, device=a.device,
                         progress=not (a.no_progress or a.json == "-"))
    except ValueError as e:
        ap.error(str(e))
    return cfg, a


# ------------------------------------------------------------------------------------ output
def table(results: dict, cfg: DemoConfig) -> str:
    pct = f"{100 * cfg.target:g}%"
    rows = [("optimizer", f"steps to {pct}", f"time to {pct}", "final test acc", "steps run",
             "wall time")]
    for label, r in results.items():
        reached = r["reached_step"] is not None
        rows.append((label, str(r["reached_step"]) if reached else f"> {cfg.steps}",
                     f"{r['seconds_to'][str(cfg.target)]:.1f} s" if reached else "-",
                     f"{100 * r['final_test_acc']:.1f}%", str(r["steps_run"]),
                     f"{r['wall_time_s']:.1f} s"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in
                       enumerate(zip(row, widths))) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    base = results.get("adamw")
    if base and base["reached_step"]:
        for label, r in results.items():
            if label != "adamw" and r["reached_step"]:
                t = str(cfg.target)
                lines.append(f"{label}: AdamW's steps to {pct} / its own = "
                             f"{base['reached_step'] / r['reached_step']:.2f}x, AdamW's time / its "
                             f"own = {base['seconds_to'][t] / r['seconds_to'][t]:.2f}x "
                             "(above 1: faster than AdamW)")
    lines.append("settings: " + "; ".join(f"{label} = {r['spec']}" for label, r in results.items()))
    return "\n".join(lines)


def plot(results: dict, cfg: DemoConfig, world: int, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, (label, r) in enumerate(results.items()):
        h = r["history"]
        c = f"C{i}"
        ax.plot([e["step"] for e in h], [e["test_acc"] for e in h], color=c, lw=1.6,
                label=f"{label} test")
        ax.plot([e["step"] for e in h if e["train_acc"] is not None],
                [e["train_acc"] for e in h if e["train_acc"] is not None], color=c, lw=1,
                ls="--", label=f"{label} training")
        if r["reached_step"] is not None:
            ax.axvline(r["reached_step"], color=c, lw=0.6, ls=":")
    ax.axhline(cfg.target, color="grey", lw=0.6, ls=":")
    ax.set_xlabel("step")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.02)
    ranks = f", {world} data-parallel ranks" if world > 1 else ""
    ax.set_title(f"{cfg.op} mod {cfg.p}, seed {cfg.seed}{ranks} (training: mean over the "
                 f"batches of each {cfg.eval_every} steps)", fontsize=9)
    ax.legend(fontsize=8, loc="lower right", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def jsonable(results: dict) -> dict:
    """The results with string target keys (JSON has no float keys)."""
    out = {}
    for label, r in results.items():
        r = dict(r)
        r["reached"] = {str(t): s for t, s in r["reached"].items()}
        r["seconds_to"] = {str(t): s for t, s in r["seconds_to"].items()}
        out[label] = r
    return out


# ------------------------------------------------------------------------------------ running
def _torchrun(argv: list[str], nproc: int) -> dict:
    """Run this command on ``nproc`` ranks under torchrun and return rank 0's results."""
    rest, skip = [], False
    for i, tok in enumerate(argv):   # everything but --nproc, which the ranks must not see
        if skip:
            skip = False
        elif tok == "--nproc":
            skip = True
        elif not tok.startswith("--nproc="):
            rest.append(tok)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={nproc}", "-m", "shardgrok.demo", *rest, "--worker-result", out]
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        rc = subprocess.run(cmd, env=env, stdout=sys.stderr).returncode
        if rc != 0 or not os.path.exists(out):
            raise SystemExit(f"python -m shardgrok.demo: the torchrun job failed (exit {rc})")
        with open(out) as f:
            return json.load(f)


def _worker(cfg: DemoConfig, result_path: str) -> int:
    """One torchrun rank: train data-parallel; rank 0 writes the results."""
    import torch
    import torch.distributed as dist

    import shardgrok

    info = shardgrok.init_distributed()
    try:
        t0 = time.perf_counter()
        results = run(cfg)
        if info.rank == 0:
            with open(result_path, "w") as f:
                json.dump({"world_size": info.world_size, "wall_time_s": time.perf_counter() - t0,
                           "results": jsonable(results)}, f)
        torch.distributed.barrier()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()   # gloo aborts at exit otherwise
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg, a = parse_args(argv)
    if a.worker_result:
        return _worker(cfg, a.worker_result)
    to_stdout = a.json == "-"
    if not to_stdout:
        ranks = f"; {a.nproc} data-parallel ranks (torchrun)" if a.nproc > 1 else ""
        print(f"{cfg.op} mod {cfg.p}, {100 * cfg.train_fraction:g}% of pairs for training; "
              f"{cfg.depth}-layer width-{cfg.width} {cfg.heads}-head transformer; batch "
              f"{cfg.batch_size or 'full'}, lr {cfg.lr:g}, betas {cfg.betas}, budget "
              f"{cfg.steps} steps per optimizer{ranks}", flush=True)
    t0 = time.perf_counter()
    if a.nproc > 1:
        got = _torchrun(argv, a.nproc)
        results, world = got["results"], got["world_size"]
    else:
        results, world = jsonable(run(cfg)), 1
    total = time.perf_counter() - t0
    out = {"schema": SCHEMA, "config": {k: v for k, v in vars(cfg).items()},
           "world_size": world, "total_wall_time_s": total, "results": results}
    if to_stdout:
        json.dump(out, sys.stdout, default=list)
        print()
        return 0
    print()
    print(table(results, cfg))
    print(f"total wall time {total:.1f} s")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1, default=list)
        print(f"JSON: {a.json}")
    if not a.no_png:
        try:
            plot(results, cfg, world, a.png)
            print(f"plot: {os.path.abspath(a.png)}")
        except ImportError:
            print("plot skipped: matplotlib is not installed (pip install -e .[demo])")
    return 0


if __name__ == "__main__":
    sys.exit(main())
