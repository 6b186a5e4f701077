"""A tiny GPT-2 trained by Hugging Face Trainer with GrokAdamW or SuperGrok.

    python examples/trainer_gpt2.py --optimizer supergrok --output-dir out
    torchrun --nproc-per-node 2 examples/trainer_gpt2.py --output-dir out        # DDP, ZeRO-1 state
    torchrun --nproc-per-node 2 examples/trainer_gpt2.py --output-dir out2 --resume out/checkpoint-3
    torchrun --nproc-per-node 2 examples/trainer_gpt2.py --deepspeed ds.json ...  # config "optimizer"

The model is built from a config (no download) and the data is synthetic: a periodic token
sequence the model can learn. What shardgrok adds to a Trainer script is two lines: the
optimizer, and ``GrokCallback()`` (sharded checkpoints, SuperGrok's losses, the clipping
warning). With ``--deepspeed`` the optimizer comes from the config's ``"optimizer"`` entry
(``"type": "GrokAdamW"`` or ``"SuperGrok"``, ``"auto"`` values filled in by Trainer).
"""
from __future__ import annotations

import argparse

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

import shardgrok
from shardgrok.integrations.transformers import GrokCallback

VOCAB, LENGTH = 32, 16


class Periodic(torch.utils.data.Dataset):
    """Sequences ``start, start + step, ...`` mod VOCAB: next-token prediction is learnable."""

    def __init__(self, n: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.start = torch.randint(0, VOCAB, (n,), generator=g)
        self.step = torch.randint(1, 4, (n,), generator=g)

    def __len__(self):
        return len(self.start)

    def __getitem__(self, i):
        ids = (self.start[i] + self.step[i] * torch.arange(LENGTH)) % VOCAB
        return {"input_ids": ids, "labels": ids}


def build_model(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=VOCAB, n_positions=LENGTH, n_embd=32, n_layer=2, n_head=2,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg)


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--optimizer", choices=["grokadamw", "supergrok"], default="grokadamw")
    ap.add_argument("--output-dir", required=True)
    ap.add_argument("--max-steps", type=int, default=6)
    ap.add_argument("--save-steps", type=int, default=3)
    ap.add_argument("--eval-steps", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=4, help="per device")
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--resume", default=None, help="a checkpoint folder, or 'latest'")
    ap.add_argument("--deepspeed", default=None, help="a DeepSpeed JSON config")
    ap.add_argument("--state-dtype", default=None,
                    help='format of m, v, mu: "int8" (8-bit blockwise), "bfloat16", ...')
    ap.add_argument("--grokadamw-signal", action="store_true",
                    help="give GrokAdamW SuperGrok's (val - train) / train signal")
    ap.add_argument("--no-callback", action="store_true",
                    help="leave GrokCallback out (to see what it does)")
    return ap.parse_args(argv)


def main(argv=None, callbacks=()) -> Trainer:
    """Train as the command line says; ``callbacks`` are added after GrokCallback."""
    a = parse(argv)
    # Trainer's arguments first: they start torch.distributed under torchrun, and the optimizer
    # shards its state over the ranks only if the process group exists when it is built.
    args = TrainingArguments(
        output_dir=a.output_dir, max_steps=a.max_steps, per_device_train_batch_size=a.batch_size,
        per_device_eval_batch_size=8, gradient_accumulation_steps=a.grad_accum,
        learning_rate=a.lr, weight_decay=0.1, lr_scheduler_type="constant",
        # The optimizer clips (gradient_clipping=1.0); Trainer would clip before it. Under
        # DeepSpeed, GrokAdamW's clipping is DeepSpeed's ("gradient_clipping": "auto", from
        # max_grad_norm), which must equal GrokAdamW's own.
        max_grad_norm=1.0 if a.deepspeed and a.optimizer == "grokadamw" else 0.0,
        logging_steps=1, eval_strategy="steps", eval_steps=a.eval_steps,
        save_strategy="steps", save_steps=a.save_steps, report_to="none", use_cpu=True,
        seed=0, disable_tqdm=True, ddp_find_unused_parameters=False, deepspeed=a.deepspeed)
    model = build_model()
    optimizers = (None, None)
    if a.deepspeed is None:  # otherwise the config's "optimizer" entry builds it
        cls = {"grokadamw": shardgrok.GrokAdamW, "supergrok": shardgrok.SuperGrok}[a.optimizer]
        extra = {"warmup_steps": 2} if a.optimizer == "supergrok" else {}
        if a.state_dtype is not None:
            extra["state_dtype"] = a.state_dtype
        optimizers = (cls(model.parameters(), lr=a.lr, weight_decay=0.1, **extra), None)
    trainer = Trainer(model=model, args=args, train_dataset=Periodic(256, seed=1),
                      eval_dataset=Periodic(32, seed=2), optimizers=optimizers,
                      callbacks=([] if a.no_callback else
                                 [GrokCallback(grokadamw_signal=a.grokadamw_signal)]) + list(callbacks))
    resume = True if a.resume == "latest" else a.resume
    trainer.train(resume_from_checkpoint=resume)
    return trainer


if __name__ == "__main__":
    main()
