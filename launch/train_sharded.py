"""A short data-parallel training run with sharded GrokAdamW or SuperGrok, under any launcher
(torchrun, several nodes, mpirun/mpiexec, SLURM; see launch/README.md).

The model is wrapped in DistributedDataParallel (gradients are averaged over ranks); the
optimizer shards m, v and mu over the ranks (ZeRO-1) and all-gathers the updated parameters.
Each rank trains on its own slice of the data. Every rank prints where it sits; rank 0 prints
the loss and checks that the parameters are identical on every rank.
"""
import argparse
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import shardgrok


def train(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--optimizer", choices=("grokadamw", "supergrok"), default="supergrok")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--save", help="write the model and the full optimizer state here at the end")
    ap.add_argument("--resume", help="start from a file written by --save (any world size)")
    args = ap.parse_args(argv)

    info = shardgrok.init_distributed()
    rank, world = info.rank, info.world_size
    device = (torch.device("cuda", info.local_rank) if torch.cuda.is_available()
              else torch.device("cpu"))
    print(f"rank {rank} of {world}, local rank {info.local_rank}, launcher {info.launcher}, "
          f"host {os.uname().nodename}", flush=True)

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 1)).to(device)
    model = DDP(net, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else net
    x = torch.randn(512, 16)
    y = x[:, :4].sum(1, keepdim=True)
    x, y = x[rank::world].to(device), y[rank::world].to(device)   # this rank's data
    xv, yv = x[:32], y[:32]

    if args.optimizer == "grokadamw":
        opt = shardgrok.GrokAdamW(model.parameters(), lr=args.lr)
    else:
        opt = shardgrok.SuperGrok(model.parameters(), lr=args.lr, warmup_steps=10)
    start = 0
    if args.resume:
        ck = torch.load(args.resume, map_location=device, weights_only=True)
        net.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        start = opt.get_global_step()

    losses = []
    for t in range(start, start + args.steps):
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        if args.optimizer == "supergrok":
            if t % 10 == 0:  # the meta-step evaluates the unwrapped module (no DDP hooks)
                opt.meta_step(lambda: nn.functional.mse_loss(net(xv), yv))
            with torch.no_grad():
                val = nn.functional.mse_loss(net(xv), yv).item() if t % 5 == 0 else None
            opt.step(train_loss=loss.item(), val_loss=val)
        else:
            opt.step()
        mean = loss.detach().clone()
        if world > 1:
            dist.all_reduce(mean)
        losses.append(mean.item() / world)

    in_sync = True
    if world > 1:
        for p in net.parameters():
            hi = p.detach().clone()
            dist.all_reduce(hi, op=dist.ReduceOp.MAX)
            in_sync &= torch.equal(hi, p.detach())
        flag = torch.tensor([float(in_sync)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        in_sync = bool(flag.item())
    local = sum(s["exp_avg"].numel() for s in opt.state.values())
    total = sum(p.numel() for p in net.parameters())
    summary = opt.get_state_summary()
    full = opt.full_state_dict(to=0) if args.save else None
    if rank == 0:
        print(f"{args.optimizer}: loss {losses[0]:.4f} -> {losses[-1]:.4f} in {args.steps} steps "
              f"(global step {summary['global_step']}); world size {world}; parameters identical "
              f"on all ranks: {in_sync}; rank 0 keeps state for {local} of {total} elements",
              flush=True)
        if args.save:
            torch.save({"model": net.state_dict(), "optimizer": full}, args.save)
    return losses


def main(argv=None):
    result = train(argv)
    # after train() returned, nothing holds the process group (the model, DDP/FSDP state and
    # the optimizer are gone), so it can be destroyed without gloo aborting at exit
    shardgrok.shutdown_distributed()
    return result


if __name__ == "__main__":
    main()
