"""What the ``train_*.py`` scripts share: their options, the toy model and data, the optimizer by
name, the step loop with its loss averaged over the ranks, the rank-0 summary line, and the exit
that leaves the process group. Each script keeps what its setting changes (wrapping, launcher,
checkpoint format).

The scripts import it as a sibling (``import common``): Python puts a script's own folder
first on ``sys.path``, and every launcher here (python, torchrun, the deepspeed launcher,
mpiexec, srun) starts the script by its path.
"""
from __future__ import annotations

import argparse

import torch
import torch.distributed as dist
from torch import nn

import shardgrok

OPTIMIZERS = ("grokadamw", "supergrok")
FEATURES = 16


def parser(doc: str, *, steps: int = 50, optimizer: str | None = "supergrok",
           lr: float | None = 1e-2, save: str | None = None,
           resume: str | None = None) -> argparse.ArgumentParser:
    """--steps, and where given a default, --optimizer and --lr; --save and --resume with the
    script's own help (its checkpoint format)."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    if optimizer is not None:
        ap.add_argument("--optimizer", choices=OPTIMIZERS, default=optimizer)
    ap.add_argument("--steps", type=int, default=steps)
    if lr is not None:
        ap.add_argument("--lr", type=float, default=lr)
    if save is not None:
        ap.add_argument("--save", metavar="PATH", help=save)
    if resume is not None:
        ap.add_argument("--resume", metavar="PATH", help=resume)
    return ap


def init() -> tuple[shardgrok.DistInfo, torch.device]:
    """This process's place (the process group started from the launcher's environment, none
    for one plain process) and its device: the GPU of its local rank, else the CPU."""
    info = shardgrok.init_distributed()
    device = (torch.device("cuda", info.local_rank) if torch.cuda.is_available()
              else torch.device("cpu"))
    return info, device


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(FEATURES, 64), nn.ReLU(), nn.Linear(64, 1))


def toy_data(n: int, generator: torch.Generator | None = None,
             device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` random inputs and their target, the sum of the first four features: a task every
    optimizer here fits in a few dozen steps, so a run's loss shows that it trained."""
    x = torch.randn(n, FEATURES, generator=generator)
    return x.to(device), x[:, :4].sum(1, keepdim=True).to(device)


def make_optimizer(name: str, params, lr: float, **kwargs):
    if name == "grokadamw":
        return shardgrok.GrokAdamW(params, lr=lr, **kwargs)
    return shardgrok.SuperGrok(params, lr=lr, warmup_steps=10, **kwargs)


def optimizer_step(opt, loss: torch.Tensor, t: int, meta_loss=None, val_loss=None) -> None:
    """Step ``opt`` after ``loss.backward()`` at step ``t``. SuperGrok takes the training loss,
    a meta-step on the closure ``meta_loss`` every 10 steps and the validation loss
    ``val_loss()`` every 5, where given; GrokAdamW needs none of them."""
    if not isinstance(opt, shardgrok.SuperGrok):
        opt.step()
        return
    if meta_loss is not None and t % 10 == 0:
        opt.meta_step(meta_loss)
    val = None
    if val_loss is not None and t % 5 == 0:
        with torch.no_grad():
            val = val_loss().item()
    opt.step(train_loss=loss.item(), val_loss=val)


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def run_steps(step, steps: int, start: int = 0) -> list[float]:
    """``step(t)`` for t from ``start`` on, ``steps`` times; each returns its loss, kept as the
    mean over the ranks (every rank trains on its own data)."""
    losses = []
    world = world_size()
    for t in range(start, start + steps):
        mean = step(t).detach().clone()
        if world > 1:
            dist.all_reduce(mean)
        losses.append(mean.item() / world)
    return losses


def report(what: str, losses: list[float], global_step: int, extra: str = "") -> None:
    """Rank 0's summary line, the one the tests read back."""
    if rank() == 0 and not losses:
        print(f"{what}: no steps left (global step {global_step}); world size "
              f"{world_size()}{extra}", flush=True)
    elif rank() == 0:
        print(f"{what}: loss {losses[0]:.4f} -> {losses[-1]:.4f} in {len(losses)} steps (global "
              f"step {global_step}); world size {world_size()}{extra}", flush=True)


def run(train, argv: list[str] | None = None):
    """``train(argv)``, then leave the process group. Once train() has returned nothing holds the
    group (the model, DDP/FSDP state and the optimizer are gone), so it can be destroyed
    without gloo aborting at exit."""
    result = train(argv)
    shardgrok.shutdown_distributed()
    return result
