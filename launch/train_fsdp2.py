"""A short FSDP2 training run with GrokAdamW or SuperGrok, launched by torchrun:

    torchrun --standalone --nproc-per-node=4 launch/train_fsdp2.py --optimizer supergrok
    torchrun --standalone --nproc-per-node=4 launch/train_fsdp2.py --hsdp 2      # 2 x 2 HSDP
    torchrun ... launch/train_fsdp2.py --bf16                                     # bf16 compute

Each block and the root are ``fully_shard``-ed; the optimizer steps the local shards of the
DTensor parameters and keeps m, v, mu as DTensors. ``--save DIR`` writes a
torch.distributed.checkpoint of model and optimizer at the end; ``--resume DIR`` starts from
one, at any world size. Rank 0 prints the loss.
"""
import argparse

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (get_model_state_dict,
                                                     get_optimizer_state_dict,
                                                     set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

import shardgrok


class Net(nn.Module):
    def __init__(self, width=64, depth=3):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(width, width), nn.GELU())
                                    for _ in range(depth))
        self.inp = nn.Linear(16, width)
        self.out = nn.Linear(width, 1)

    def forward(self, x):
        h = self.inp(x)
        for block in self.blocks:
            h = h + block(h)
        return self.out(h)


def train(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--optimizer", choices=("grokadamw", "supergrok"), default="supergrok")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--hsdp", type=int, default=0, metavar="REPLICAS",
                    help="HSDP with this many replicas (the world size must divide by it)")
    ap.add_argument("--bf16", action="store_true", help="bf16 compute, fp32 sharded parameters")
    ap.add_argument("--save", metavar="DIR")
    ap.add_argument("--resume", metavar="DIR")
    args = ap.parse_args(argv)

    info = shardgrok.init_distributed()
    rank, world = info.rank, info.world_size
    if not dist.is_initialized():  # one plain process: a 1-rank group, so FSDP2 still applies
        dist.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if args.hsdp:
        if world % args.hsdp:
            raise SystemExit(f"--hsdp {args.hsdp}: the world size {world} must divide by it")
        mesh = init_device_mesh(dev, (args.hsdp, world // args.hsdp),
                                mesh_dim_names=("replicate", "shard"))
    else:
        mesh = init_device_mesh(dev, (world,))

    torch.manual_seed(0)
    model = Net().to(dev)
    kw = {"mesh": mesh}
    if args.bf16:
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for block in model.blocks:
        fully_shard(block, **kw)
    fully_shard(model, **kw)

    if args.optimizer == "grokadamw":
        opt = shardgrok.GrokAdamW(model.parameters(), lr=args.lr)
    else:
        opt = shardgrok.SuperGrok(model.parameters(), lr=args.lr, warmup_steps=10)
    if args.resume:
        sd = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
        dcp.load(sd, checkpoint_id=args.resume)
        set_model_state_dict(model, sd["model"])
        set_optimizer_state_dict(model, opt, sd["optim"])

    g = torch.Generator().manual_seed(1 + rank)  # this rank's data
    x = torch.randn(256, 16, generator=g).to(dev)
    y = x[:, :4].sum(1, keepdim=True)
    xv, yv = x[:32], y[:32]
    losses = []
    start = opt.get_global_step()
    for t in range(start, start + args.steps):
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.mse_loss(model(x).float(), y)
        loss.backward()
        if args.optimizer == "supergrok":
            if t % 10 == 0:  # the meta-step evaluates the FSDP model itself
                opt.meta_step(lambda: nn.functional.mse_loss(model(xv).float(), yv))
            opt.step(train_loss=loss.item())
        else:
            opt.step()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append(mean.item() / world)

    if args.save:
        dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
                 checkpoint_id=args.save)
    summary = opt.get_state_summary()
    if rank == 0:
        print(f"{args.optimizer} on FSDP2 ({'HSDP ' + str(mesh.shape) if args.hsdp else 'mesh ' + str(mesh.shape)}"
              f"{', bf16' if args.bf16 else ''}): loss {losses[0]:.4f} -> {losses[-1]:.4f} in "
              f"{args.steps} steps (global step {summary['global_step']}); world size {world}",
              flush=True)
    return losses


def main(argv=None):
    result = train(argv)
    # after train() returned, nothing holds the process group (the model, DDP/FSDP state and
    # the optimizer are gone), so it can be destroyed without gloo aborting at exit
    shardgrok.shutdown_distributed()
    return result


if __name__ == "__main__":
    main()
