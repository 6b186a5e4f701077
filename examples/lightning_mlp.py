"""A small regression model trained with PyTorch Lightning and GrokAdamW or SuperGrok, through
Lightning's Trainer or through Fabric.

    python examples/lightning_mlp.py --optimizer supergrok --steps 20 --save end.ckpt
    python examples/lightning_mlp.py --devices 2 --steps 20 --checkpoint-every 10 --checkpoint-dir ck
    python examples/lightning_mlp.py --devices 2 --steps 20 --resume ck/step=10.ckpt --save end.ckpt
    python examples/lightning_mlp.py --engine fabric --devices 2 --steps 20 --checkpoint-every 10 \
        --checkpoint-dir ck

``--devices 2`` runs ``strategy="ddp"`` on the CPU (gloo): Lightning starts the second process
itself by running this script again. The optimizer comes from ``configure_optimizers``;
:class:`shardgrok.integrations.lightning.GrokCallback` feeds SuperGrok its training and
validation losses and checks the clipping. Under DDP the optimizer keeps only this rank's share
of its state (ZeRO-1), and Lightning's checkpoint (``trainer.save_checkpoint``,
``fabric.save``) calls its ``consolidate_state_dict()`` first, so the file holds the whole state
and resumes at any number of devices.

One epoch is 5 optimizer steps at any number of devices (the batch is split over them).
``--checkpoint-every N`` (a multiple of 5) writes ``step=N.ckpt``, ``step=2N.ckpt``, ... into
``--checkpoint-dir`` while training: with the Trainer, Lightning's ``ModelCheckpoint`` after
the epoch's validation (a checkpoint taken before it would resume into the next epoch without
that validation, and SuperGrok would be fed an older validation loss than in the uninterrupted
run); with Fabric, ``fabric.save``.
"""
from __future__ import annotations

import argparse

import os

import lightning as L
import torch
from torch import nn
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import shardgrok
from shardgrok.integrations.lightning import GrokCallback

FEATURES, N, VAL, STEPS_PER_EPOCH = 16, 160, 32, 5


def data() -> tuple[TensorDataset, TensorDataset]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N + VAL, FEATURES, generator=g)
    y = x[:, :4].sum(1, keepdim=True) + 0.1 * torch.randn(N + VAL, 1, generator=g)
    return TensorDataset(x[:N], y[:N]), TensorDataset(x[N:], y[N:])


def make_optimizer(name: str, params, lr: float):
    if name == "grokadamw":
        return shardgrok.GrokAdamW(params, lr=lr)
    return shardgrok.SuperGrok(params, lr=lr, warmup_steps=5)


class Regression(L.LightningModule):
    def __init__(self, optimizer: str = "supergrok", lr: float = 1e-2):
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(FEATURES, 64), nn.ReLU(), nn.Linear(64, 1))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self.net(x), y), sync_dist=True)

    def configure_optimizers(self):
        return make_optimizer(self.hparams.optimizer, self.parameters(), self.hparams.lr)


def loaders(devices: int, rank: int | None = None):
    """The training and validation loaders, the batch split over ``devices``. Given ``rank``,
    that rank's part in a fixed order (the Trainer's loaders, below); without it, Fabric's
    ``setup_dataloaders`` adds its own sampler."""
    train, val = data()
    per_device = N // STEPS_PER_EPOCH // devices
    if rank is None:
        return (DataLoader(train, batch_size=per_device, shuffle=False),
                DataLoader(val, batch_size=VAL // devices, shuffle=False))
    return tuple(DataLoader(d, batch_size=b, sampler=DistributedSampler(
                     d, num_replicas=devices, rank=rank, shuffle=False))
                 for d, b in ((train, per_device), (val, VAL // devices)))


class WithData(Regression):
    """The module with its loaders, made once Lightning has started the processes. Their order
    does not depend on the epoch: the DistributedSampler Lightning puts in otherwise shuffles by
    epoch, and a run resumed from a checkpoint written after an epoch's validation had it count
    one epoch ahead of the uninterrupted run (Lightning 2.6.6), so the two saw other batches."""

    def train_dataloader(self):
        return loaders(self.trainer.world_size, self.trainer.global_rank)[0]

    def val_dataloader(self):
        return loaders(self.trainer.world_size, self.trainer.global_rank)[1]


def with_trainer(args) -> None:
    torch.manual_seed(0)
    model = WithData(args.optimizer, args.lr)
    callbacks = [GrokCallback()]
    if args.checkpoint_every:
        # at the end of an epoch, after its validation: the checkpoint then holds the
        # validation loss SuperGrok is fed next, and a resume starts the next epoch
        callbacks.append(ModelCheckpoint(dirpath=args.checkpoint_dir, filename="{step}",
                                         every_n_epochs=args.checkpoint_every // STEPS_PER_EPOCH,
                                         save_top_k=-1))
    trainer = L.Trainer(accelerator="cpu", devices=args.devices,
                        strategy=args.strategy or ("ddp" if args.devices > 1 else "auto"),
                        max_steps=args.steps,
                        callbacks=callbacks, logger=False,
                        enable_checkpointing=bool(args.checkpoint_every),
                        enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, use_distributed_sampler=False)
    trainer.fit(model, ckpt_path=args.resume)
    if args.save:
        trainer.save_checkpoint(args.save)   # every rank: the optimizer consolidates first


def with_fabric(args) -> None:
    fabric = L.Fabric(accelerator="cpu", devices=args.devices,
                      strategy=args.strategy or ("ddp" if args.devices > 1 else "auto"))
    fabric.launch()
    torch.manual_seed(0)
    model = Regression(args.optimizer, args.lr)
    opt = make_optimizer(args.optimizer, model.parameters(), args.lr)
    model, opt = fabric.setup(model, opt)
    train, val = loaders(args.devices)
    train, val = fabric.setup_dataloaders(train, val, use_distributed_sampler=True)
    state = {"model": model, "optimizer": opt, "step": 0, "val_loss": None}
    if args.resume:
        fabric.load(args.resume, state)
    step = state["step"]
    while step < args.steps:
        for x, y in train:
            loss = nn.functional.mse_loss(model(x), y)
            fabric.backward(loss)
            if args.optimizer == "supergrok":   # Fabric's optimizer wrapper's step() takes none
                shardgrok.optimizer_of(opt).set_losses(train_loss=loss.detach(),
                                                       val_loss=state["val_loss"])
            opt.step()
            opt.zero_grad()
            step += 1
            if args.checkpoint_every and step % args.checkpoint_every == 0:
                state["step"] = step
                fabric.save(os.path.join(args.checkpoint_dir, f"step={step}.ckpt"), state)
            if step >= args.steps:
                break
        if step % STEPS_PER_EPOCH == 0:
            with torch.no_grad():
                losses = torch.stack([nn.functional.mse_loss(model(x), y) for x, y in val])
            state["val_loss"] = fabric.all_reduce(losses.mean(), reduce_op="mean").item()
    state["step"] = step
    if args.save:
        fabric.save(args.save, state)    # every rank: the optimizer consolidates first


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--engine", choices=["trainer", "fabric"], default="trainer")
    ap.add_argument("--optimizer", choices=["grokadamw", "supergrok"], default="supergrok")
    ap.add_argument("--devices", type=int, default=1)
    ap.add_argument("--strategy", default=None,
                    help="Lightning's strategy (ddp when --devices > 1; on the CPU Lightning "
                         "refuses fsdp and deepspeed, docs/integrations.md)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--save", help="write a checkpoint here at the end")
    ap.add_argument("--checkpoint-every", type=int, default=0, metavar="N",
                    help="write step=N.ckpt, step=2N.ckpt, ... into --checkpoint-dir; N a "
                         f"multiple of {STEPS_PER_EPOCH}, the steps of an epoch")
    ap.add_argument("--checkpoint-dir", default="checkpoints")
    ap.add_argument("--resume", help="continue from a checkpoint written by --save")
    args = ap.parse_args(argv)
    if args.checkpoint_every % STEPS_PER_EPOCH:
        ap.error(f"--checkpoint-every must be a multiple of {STEPS_PER_EPOCH} (an epoch), got "
                 f"{args.checkpoint_every}")
    (with_trainer if args.engine == "trainer" else with_fabric)(args)


if __name__ == "__main__":
    main()
