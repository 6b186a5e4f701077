"""A short single-process training run with GrokAdamW or SuperGrok (the template the distributed
launchers build on). Prints the first and last training loss."""
import argparse

import torch
from torch import nn

import shardgrok


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--optimizer", choices=("grokadamw", "supergrok"), default="grokadamw")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--lr", type=float, default=1e-2)
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 1))
    x = torch.randn(256, 16)
    y = x[:, :4].sum(1, keepdim=True)
    if args.optimizer == "grokadamw":
        opt = shardgrok.GrokAdamW(model.parameters(), lr=args.lr)
    else:
        opt = shardgrok.SuperGrok(model.parameters(), lr=args.lr, warmup_steps=10)
    losses = []
    for _ in range(args.steps):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step() if args.optimizer == "grokadamw" else opt.step(train_loss=loss.item())
        losses.append(loss.item())
    print(f"{args.optimizer}: loss {losses[0]:.4f} -> {losses[-1]:.4f} in {args.steps} steps")
    return losses


if __name__ == "__main__":
    main()
