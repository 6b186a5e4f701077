"""Why torchrun's restarts fail without shardgrok's store prefix: the reproduction behind
docs/faults.md, with no optimizer in it.

    python benchmarks/restart_repro.py --tries 4 --json benchmarks/results/restart_repro.json

Each try is ``torchrun --nproc-per-node 2 --max-restarts 1`` of this script's worker: a loop of
30 all-reduces over gloo in which rank 1 SIGKILLs itself at the 15th in the first round, so
torchrun restarts both ranks. A try got through when the second round finished its loop. The
process group is started either as a framework starts it (``init_process_group("gloo")``) or
by ``shardgrok.init_distributed()``; under torchrun's default (static) rendezvous and under
``--standalone`` (c10d).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
from datetime import timedelta

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def worker(init: str, done: str) -> None:
    import torch
    import torch.distributed as dist
    timeout = timedelta(seconds=30)
    if init == "plain":
        dist.init_process_group("gloo", timeout=timeout)
    else:
        import shardgrok
        shardgrok.init_distributed(timeout=timeout)
    rank, round_ = dist.get_rank(), int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))
    t = torch.ones(4)
    for i in range(30):
        dist.all_reduce(t)
        if i == 15 and rank == 1 and round_ == 0:
            os.kill(os.getpid(), signal.SIGKILL)
    if rank == 0 and round_ > 0:
        with open(done, "a") as f:
            f.write("done\n")
    dist.destroy_process_group()


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_try(rendezvous: str, init: str) -> bool:
    with tempfile.TemporaryDirectory() as d:
        done = os.path.join(d, "done")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
               "--max-restarts=1"]
        cmd += ["--standalone"] if rendezvous == "c10d" else [f"--master-port={free_port()}"]
        cmd += [os.path.abspath(__file__), "--worker", init, done]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
        return p.returncode == 0 and os.path.exists(done)


def main(argv=None) -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], sys.argv[3])
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tries", type=int, default=4)
    ap.add_argument("--inits", default="plain,shardgrok",
                    help="which process group starts to try, comma-separated")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    if args.tries < 1:
        ap.error(f"--tries must be >= 1, got {args.tries}")
    inits = args.inits.split(",")
    if not inits or any(i not in ("plain", "shardgrok") for i in inits):
        ap.error(f"--inits must name plain and/or shardgrok, got {args.inits!r}")
    import step_common
    rows = []
    for rendezvous in ("static", "c10d"):
        for init in inits:
            ok = sum(one_try(rendezvous, init) for _ in range(args.tries))
            rows.append({"rendezvous": rendezvous, "init": init, "tries": args.tries,
                         "got_through": ok})
            print(f"{rendezvous:>6} rendezvous, {init:>9} init: {ok} of {args.tries} restarts "
                  "got through", flush=True)
    prov = step_common.provenance("benchmarks/restart_repro.py", argv)
    print("\n".join(step_common.provenance_lines(prov)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"provenance": prov, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
