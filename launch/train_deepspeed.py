"""A short DeepSpeed training run whose optimizer comes from the config's "optimizer" entry
(``launch/ds_config.json``: SuperGrok under ZeRO stage 2):

    deepspeed --num_gpus 2 launch/train_deepspeed.py --deepspeed_config launch/ds_config.json

``import shardgrok`` is what makes ``"type": "SuperGrok"`` (or ``"GrokAdamW"``) valid; nothing
else in the config changes. SuperGrok's losses reach it through ``set_losses`` because
``engine.step()`` takes no arguments. Rank 0 prints the loss.
"""
import argparse

import deepspeed
import torch
import torch.distributed as dist
from torch import nn

import shardgrok


def train(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--local_rank", type=int, default=-1)  # set by the deepspeed launcher
    ap = deepspeed.add_config_arguments(ap)
    args = ap.parse_args(argv)

    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 1))
    engine, _, _, _ = deepspeed.initialize(args=args, model=model,
                                           model_parameters=model.parameters())
    opt = shardgrok.optimizer_of(engine)
    g = torch.Generator().manual_seed(1 + rank)
    x = torch.randn(64, 16, generator=g).to(engine.device)
    y = x[:, :4].sum(1, keepdim=True)
    xv, yv = x[:16], y[:16]
    losses = []
    for t in range(args.steps):
        loss = nn.functional.mse_loss(engine(x).float(), y)
        engine.backward(loss)
        if isinstance(opt, shardgrok.SuperGrok) and t % 5 == 0:
            with torch.no_grad():
                val = nn.functional.mse_loss(engine(xv).float(), yv).item()
            opt.set_losses(train_loss=loss.item(), val_loss=val)
        engine.step()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append(mean.item() / world)
    if rank == 0:
        print(f"{type(opt).__name__} via the DeepSpeed config (ZeRO stage "
              f"{engine.zero_optimization_stage()}): loss {losses[0]:.4f} -> {losses[-1]:.4f} in "
              f"{args.steps} steps (global step {opt.get_global_step()}); world size {world}",
              flush=True)


def main(argv=None):
    result = train(argv)
    # after train() returned, nothing holds the process group (the model, DDP/FSDP state and
    # the optimizer are gone), so it can be destroyed without gloo aborting at exit
    shardgrok.shutdown_distributed()
    return result


if __name__ == "__main__":
    main()
