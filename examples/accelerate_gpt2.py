"""A tiny GPT-2 trained with Hugging Face accelerate and GrokAdamW or SuperGrok.

    python examples/accelerate_gpt2.py --optimizer supergrok
    torchrun --nproc-per-node 2 examples/accelerate_gpt2.py --save-at 3 --output-dir ckpt
    torchrun --nproc-per-node 2 examples/accelerate_gpt2.py --resume ckpt

``accelerator.prepare`` wraps the optimizer in accelerate's ``AcceleratedOptimizer``, whose
``step()`` takes no loss: SuperGrok gets its losses through ``shardgrok.optimizer_of(opt)
.set_losses(...)`` before ``opt.step()``. Under torchrun the optimizer keeps only this rank's
share of its state (ZeRO-1); accelerate's ``save_state`` keeps rank 0's ``state_dict()``, so
every rank calls ``consolidate_state_dict()`` first and the saved optimizer state is whole.

Each step trains on one global batch (``--batch-size`` sequences) split evenly over the ranks,
so one process and N processes train the same steps.
"""
from __future__ import annotations

import argparse

import torch
from accelerate import Accelerator
from transformers import GPT2Config, GPT2LMHeadModel

import shardgrok

VOCAB, LENGTH = 32, 16


def batch(step: int, size: int, seed: int = 1) -> torch.Tensor:
    """The global batch of ``step``: periodic sequences ``start, start + k, ...`` mod VOCAB."""
    g = torch.Generator().manual_seed(seed * 100003 + step)
    start = torch.randint(0, VOCAB, (size, 1), generator=g)
    k = torch.randint(1, 4, (size, 1), generator=g)
    return (start + k * torch.arange(LENGTH)) % VOCAB


class LastEvaluation:
    """The latest validation loss, saved with the checkpoint (register_for_checkpointing):
    SuperGrok's signal after a resume uses the same one as the uninterrupted run."""

    def __init__(self):
        self.val_loss = None

    def state_dict(self):
        return {"val_loss": self.val_loss}

    def load_state_dict(self, sd):
        self.val_loss = sd["val_loss"]


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--optimizer", choices=["grokadamw", "supergrok"], default="grokadamw")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=8, help="global, split over the ranks")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    ap.add_argument("--output-dir", default="accelerate_ckpt")
    ap.add_argument("--save-at", type=int, default=None, help="save_state after this step")
    ap.add_argument("--resume", default=None, help="a save_state folder to continue from")
    ap.add_argument("--result", default=None,
                    help="save each rank's final weights, losses and optimizer summary to "
                         "RESULT.rank<r>.pt")
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    a = parse(argv)
    accelerator = Accelerator(cpu=True)  # on GPUs: Accelerator()
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=LENGTH, n_embd=32,
                                       n_layer=2, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0,
                                       attn_pdrop=0.0, bos_token_id=0, eos_token_id=0))
    model.to(getattr(torch, a.dtype))
    # built after Accelerator(), which starts torch.distributed: the state is then sharded
    if a.optimizer == "grokadamw":
        opt = shardgrok.GrokAdamW(model.parameters(), lr=a.lr, weight_decay=0.1)
    else:
        opt = shardgrok.SuperGrok(model.parameters(), lr=a.lr, weight_decay=0.1, warmup_steps=2)
    model, opt = accelerator.prepare(model, opt)
    grok = shardgrok.optimizer_of(opt)  # the GrokAdamW / SuperGrok inside accelerate's wrapper

    last = LastEvaluation()
    accelerator.register_for_checkpointing(last)
    start = 0
    if a.resume:
        accelerator.load_state(a.resume)
        start = grok.get_global_step()
    world, rank = accelerator.num_processes, accelerator.process_index
    if a.batch_size % world:
        raise ValueError(f"--batch-size {a.batch_size} must be a multiple of the {world} ranks")
    per_rank = a.batch_size // world
    losses = []
    for step in range(start, a.steps):
        ids = batch(step, a.batch_size)[rank * per_rank:(rank + 1) * per_rank]
        loss = model(input_ids=ids, labels=ids).loss
        accelerator.backward(loss)
        if a.optimizer == "supergrok":  # averaged over the ranks; val: the last evaluation's
            grok.set_losses(train_loss=loss.detach(), val_loss=last.val_loss)
        opt.step()
        opt.zero_grad()
        losses.append(float(accelerator.reduce(loss.detach(), reduction="mean")))
        if step % 2 == 1:  # evaluate every other step, on a held-out batch
            with torch.no_grad():
                ids = batch(step, a.batch_size, seed=2)[rank * per_rank:(rank + 1) * per_rank]
                last.val_loss = float(accelerator.reduce(model(input_ids=ids, labels=ids).loss,
                                                         reduction="mean"))
        if a.save_at is not None and step + 1 == a.save_at:
            grok.consolidate_state_dict()  # every rank: rank 0's state_dict() is then whole
            accelerator.save_state(a.output_dir)
    weights = {k: v.detach().clone()
               for k, v in accelerator.unwrap_model(model).state_dict().items()}
    out = {"weights": weights, "losses": losses, "summary": grok.get_state_summary()}
    if a.result:
        torch.save(out, f"{a.result}.rank{rank}.pt")
    if accelerator.is_main_process:
        print(f"step {out['summary']['global_step']}: loss {losses[-1]:.4f}")
    accelerator.end_training()  # destroys the process group
    return out


if __name__ == "__main__":
    main()
