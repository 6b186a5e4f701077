"""A short data-parallel training run with sharded GrokAdamW or SuperGrok, under any launcher
(torchrun, several nodes, mpirun/mpiexec, SLURM; see launch/README.md).

The model is wrapped in DistributedDataParallel (gradients are averaged over ranks); the
optimizer shards m, v and mu over the ranks (ZeRO-1) and all-gathers the updated parameters.
Each rank trains on its own slice of the data. Every rank prints where it sits; rank 0 prints
the loss and checks that the parameters are identical on every rank. ``--save`` writes the
world-size-independent checkpoint with ``shardgrok.save_checkpoint`` (a crash cannot leave it
half-written); ``--resume`` reads it at any world size.

``--checkpoint PATH --checkpoint-every N`` is the pattern for torchrun's ``--max-restarts``
(``MAX_RESTARTS=3 launch/torchrun_single_node.sh --checkpoint ck.pt --checkpoint-every 10``):
start from PATH if it exists, rewrite it every N steps; a restarted round resumes from the last
one, at the same or another world size.
"""
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import common
import shardgrok


def parameters_in_sync(net: nn.Module, device) -> bool:
    """Whether every rank holds the same parameters (the all-gather after each step's update)."""
    same = True
    for p in net.parameters():
        hi = p.detach().clone()
        dist.all_reduce(hi, op=dist.ReduceOp.MAX)
        same &= torch.equal(hi, p.detach())
    flag = torch.tensor([float(same)], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def train(argv=None):
    ap = common.parser(
        __doc__, save="write the model and the full optimizer state here at the end",
        resume="start from a file written by --save (any world size)")
    ap.add_argument("--checkpoint", metavar="PATH",
                    help="start from PATH if it exists, and rewrite it every --checkpoint-every "
                         "steps (what a restart under torchrun --max-restarts resumes from)")
    ap.add_argument("--checkpoint-every", type=int, default=10, metavar="N")
    ap.add_argument("--state-dtype", default=None,
                    help="the optimizer's state format (state_dtype=): int8, bfloat16, ...")
    args = ap.parse_args(argv)
    if args.checkpoint_every < 1:
        ap.error(f"--checkpoint-every must be >= 1, got {args.checkpoint_every}")
    info, device = common.init()
    rank, world = info.rank, info.world_size
    print(f"rank {rank} of {world}, local rank {info.local_rank}, launcher {info.launcher}, "
          f"host {os.uname().nodename}", flush=True)

    torch.manual_seed(0)
    net = common.mlp().to(device)
    model = DDP(net, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else net
    x, y = common.toy_data(512)
    # SuperGrok's validation batch is the same on every rank, so a run resumed at another
    # world size sees the same signal; the training data is split over the ranks
    xv, yv = x[:32].to(device), y[:32].to(device)
    x, y = x[rank::world].to(device), y[rank::world].to(device)   # this rank's data

    opt = common.make_optimizer(args.optimizer, model.parameters(), args.lr,
                                state_dtype=args.state_dtype)
    resume = args.resume
    if args.checkpoint and os.path.exists(args.checkpoint):
        resume = args.checkpoint
    if resume:
        ck = shardgrok.load_checkpoint(resume, map_location=device)
        net.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])

    def save(path):
        full = opt.full_state_dict(to=0)     # collective: every rank takes part
        if rank == 0:
            shardgrok.save_checkpoint({"model": net.state_dict(), "optimizer": full}, path)

    def step(t):
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        # the meta-step and the validation loss evaluate the unwrapped module (no DDP hooks)
        common.optimizer_step(opt, loss, t, meta_loss=lambda: nn.functional.mse_loss(net(xv), yv),
                              val_loss=lambda: nn.functional.mse_loss(net(xv), yv))
        if args.checkpoint and (t + 1) % args.checkpoint_every == 0:
            save(args.checkpoint)
        return loss

    # --steps counts from 0 with --checkpoint (the job's length, whatever round this is), from
    # the resumed step with --resume (more steps on top of a finished run)
    start = opt.get_global_step()
    steps = max(args.steps - start, 0) if args.checkpoint else args.steps
    losses = common.run_steps(step, steps, start=start)
    in_sync = parameters_in_sync(net, device) if world > 1 else True
    local = sum(s["exp_avg"].numel() for s in opt.state.values())
    total = sum(p.numel() for p in net.parameters())
    if args.save:
        save(args.save)
    common.report(args.optimizer, losses, opt.get_global_step(),
                  f"; parameters identical on all ranks: {in_sync}; rank 0 keeps state for "
                  f"{local} of {total} elements")
    return losses


if __name__ == "__main__":
    common.run(train)
