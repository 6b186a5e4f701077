"""A short data-parallel training run with sharded GrokAdamW or SuperGrok, under any launcher
(torchrun, several nodes, mpirun/mpiexec, SLURM; see launch/README.md).

The model is wrapped in DistributedDataParallel (gradients are averaged over ranks); the
optimizer shards m, v and mu over the ranks (ZeRO-1) and all-gathers the updated parameters.
Each rank trains on its own slice of the data. Every rank prints where it sits; rank 0 prints
the loss and checks that the parameters are identical on every rank. ``--save`` writes the
world-size-independent checkpoint with ``shardgrok.save_checkpoint`` (a crash cannot leave it
half-written); ``--resume`` reads it at any world size.
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
    args = common.parser(
        __doc__, save="write the model and the full optimizer state here at the end",
        resume="start from a file written by --save (any world size)").parse_args(argv)
    info, device = common.init()
    rank, world = info.rank, info.world_size
    print(f"rank {rank} of {world}, local rank {info.local_rank}, launcher {info.launcher}, "
          f"host {os.uname().nodename}", flush=True)

    torch.manual_seed(0)
    net = common.mlp().to(device)
    model = DDP(net, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else net
    x, y = common.toy_data(512)
    x, y = x[rank::world].to(device), y[rank::world].to(device)   # this rank's data
    xv, yv = x[:32], y[:32]

    opt = common.make_optimizer(args.optimizer, model.parameters(), args.lr)
    if args.resume:
        ck = shardgrok.load_checkpoint(args.resume, map_location=device)
        net.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])

    def step(t):
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        # the meta-step and the validation loss evaluate the unwrapped module (no DDP hooks)
        common.optimizer_step(opt, loss, t, meta_loss=lambda: nn.functional.mse_loss(net(xv), yv),
                              val_loss=lambda: nn.functional.mse_loss(net(xv), yv))
        return loss

    losses = common.run_steps(step, args.steps, start=opt.get_global_step())
    in_sync = parameters_in_sync(net, device) if world > 1 else True
    local = sum(s["exp_avg"].numel() for s in opt.state.values())
    total = sum(p.numel() for p in net.parameters())
    full = opt.full_state_dict(to=0) if args.save else None
    common.report(args.optimizer, losses, opt.get_global_step(),
                  f"; parameters identical on all ranks: {in_sync}; rank 0 keeps state for "
                  f"{local} of {total} elements")
    if rank == 0 and args.save:
        shardgrok.save_checkpoint({"model": net.state_dict(), "optimizer": full}, args.save)
    return losses


if __name__ == "__main__":
    common.run(train)
