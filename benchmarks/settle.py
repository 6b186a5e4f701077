"""What waiting for gloo to let go of a collective's tensors (shardgrok.comm.settle,
docs/distributed.md "To leave") costs a sharded step: the median GrokAdamW step with it and
without it, in alternating blocks of the same run.

    torchrun --standalone --nproc-per-node=2 benchmarks/settle.py [--blocks 6] [--steps 20]

Rank 0's output starts with its provenance (step_common.provenance: command line, git commit
and whether the tree was dirty, date, CPU model, thread count per rank) as ``#`` lines.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist

import step_common
import shardgrok
import shardgrok.comm as C


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--blocks", type=int, default=6, help="blocks per mode, alternating")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per block")
    args = ap.parse_args(argv)
    info = shardgrok.init_distributed(backend="gloo")
    if info.rank == 0:
        prov = step_common.provenance("benchmarks/settle.py", argv)
        print("\n".join(step_common.provenance_lines(prov, prefix="# ")), flush=True)
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(n)) for n in [100_000] * 10 + [1000] * 50]
    opt = shardgrok.GrokAdamW(params, lr=1e-3, shard=True)
    for p in params:
        p.grad = torch.randn_like(p)
    for _ in range(5):
        opt.step()
    can = C._CAN_SETTLE
    waited = []  # seconds spent inside settle(), per call, while it is on
    inner = C.settle

    def timed_settle(pairs, backend=""):
        t = time.perf_counter()
        inner(pairs, backend)
        if pairs:  # empty while it is off
            waited.append(time.perf_counter() - t)
    C.settle = timed_settle
    times = {True: [], False: []}
    for block in range(2 * args.blocks):
        settle = block % 2 == 0
        C._CAN_SETTLE = can and settle
        for _ in range(args.steps):
            dist.barrier()
            t = time.perf_counter()
            opt.step()
            times[settle].append(time.perf_counter() - t)
    C._CAN_SETTLE, C.settle = can, inner
    if info.rank == 0:
        n = sum(p.numel() for p in params)
        print(f"torch {torch.__version__}, "
              f"{info.world_size} ranks over gloo, {n / 1e6:.2f}M parameters in {len(params)} "
              f"tensors, {args.blocks} alternating blocks of {args.steps} steps per mode")
        for settle in (True, False):
            label = "with settle" if settle else "without settle"
            print(f"  median sharded GrokAdamW step {label:15s} "
                  f"{1e3 * statistics.median(times[settle]):7.3f} ms")
        calls = len(waited) / (args.blocks * args.steps)
        print(f"  inside settle(): {1e6 * sum(waited) / (args.blocks * args.steps):.1f} us per "
              f"step ({calls:g} calls per step), at most {1e6 * max(waited, default=0):.1f} us "
              "in one call")
        if not can:
            print("  (this torch has no Tensor._use_count: settle is off in both)")
    del opt, params
    shardgrok.shutdown_distributed()


if __name__ == "__main__":
    main()
