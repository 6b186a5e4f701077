"""Hugging Face Trainer runs for tests/integrations/test_transformers.py: examples/trainer_gpt2.py
driven in one process group (torchrun, gloo) or one process, each rank's results saved to
``--out/rank<r>.pt``.

``--mode ddp``: for both optimizers (and GrokAdamW with 8-bit state) an uninterrupted run
(saving at step 3) and a run resumed from its checkpoint-3, the losses the callback fed against Trainer's own log, and a checkpoint
saved without the callback (which the other ranks must refuse). ``--mode deepspeed``: the same
resume through DeepSpeed's config ``"optimizer"`` entry with ``"auto"`` values (ZeRO 2).
``--mode single``: the clipping warning and the losses on one process.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import traceback
import warnings

import torch

from transformers import TrainerCallback

import shardgrok
from tests.support.paths import load_script

ex = load_script("examples/trainer_gpt2.py")

RANK = int(os.environ.get("RANK", 0))


class Record(TrainerCallback):
    """Per optimizer step: the signal the optimizer used (get_state_summary, on every rank)."""

    def __init__(self):
        self.steps = []

    def on_step_end(self, args, state, control, optimizer=None, **kw):
        s = shardgrok.optimizer_of(optimizer).get_state_summary()
        self.steps.append({"step": state.global_step, "cached_signal": s.get("cached_signal"),
                           "grokking_signal": s.get("grokking_signal"),
                           "global_step": s["global_step"]})


def weights(trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def run(argv, callbacks=()):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = ex.main(argv, callbacks)
    return trainer, [str(w.message) for w in caught]


def resume_pair(tmp: pathlib.Path, name: str, common: list[str]) -> dict:
    rec = Record()
    full, _ = run(common + ["--output-dir", str(tmp / f"{name}.full")], [rec])
    resumed, _ = run(common + ["--output-dir", str(tmp / f"{name}.resumed"),
                               "--resume", str(tmp / f"{name}.full" / "checkpoint-3")])
    sd = torch.load(tmp / f"{name}.full" / "checkpoint-3" / "optimizer.pt", weights_only=True) \
        if (tmp / f"{name}.full" / "checkpoint-3" / "optimizer.pt").exists() else None
    return {"full": weights(full), "resumed": weights(resumed),
            "full_log": full.state.log_history, "resumed_log": resumed.state.log_history,
            "record": rec.steps, "saved_sharding": None if sd is None else
            sd["param_groups"][0]["shardgrok"].get("sharding") is not None,
            "saved_int8": None if sd is None else
            sum("exp_avg_scale" in st for st in sd["state"].values())}


def mode_ddp(tmp: pathlib.Path) -> dict:
    out = {}
    for kind in ("grokadamw", "supergrok"):
        extra = ["--grokadamw-signal"] if kind == "grokadamw" else []
        out[kind] = resume_pair(tmp, kind, ["--optimizer", kind, "--grad-accum", "2"] + extra)
    # 8-bit state: the callback consolidates the codes and scales like any state
    out["grokadamw_int8"] = resume_pair(tmp, "grokadamw_int8", ["--optimizer", "grokadamw",
                                                                "--state-dtype", "int8"])
    # without the callback rank 0 saves its own shard: the others must refuse it
    bare, _ = run(["--optimizer", "grokadamw", "--output-dir", str(tmp / "bare"),
                   "--max-steps", "3", "--no-callback"])
    sd = torch.load(tmp / "bare" / "checkpoint-3" / "optimizer.pt", weights_only=True)
    opt = shardgrok.GrokAdamW(ex.build_model().parameters())
    try:
        opt.load_state_dict(sd)
        out["bare_error"] = None
    except ValueError as e:
        out["bare_error"] = str(e)
    out["sharded"] = opt.is_sharded
    return out


def mode_deepspeed(tmp: pathlib.Path) -> dict:
    out = {}
    for kind, name in (("grokadamw", "GrokAdamW"), ("supergrok", "SuperGrok")):
        params = {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"}
        if kind == "supergrok":
            params["warmup_steps"] = 2
        cfg = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
               "train_batch_size": "auto", "gradient_clipping": "auto",
               "zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": True,
               "optimizer": {"type": name, "params": params}}
        path = tmp / f"ds_{kind}.rank{RANK}.json"  # one per rank: no process group yet
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(cfg))
        out[kind] = resume_pair(tmp, f"ds_{kind}", ["--optimizer", kind, "--deepspeed", str(path)])
    return out


def mode_single(tmp: pathlib.Path) -> dict:
    out = {}
    rec = Record()
    trainer, msgs = run(["--optimizer", "supergrok", "--output-dir", str(tmp / "single"),
                         "--max-steps", "5"], [rec])
    out["supergrok"] = {"log": trainer.state.log_history, "record": rec.steps, "warnings": msgs}
    # Trainer's default max_grad_norm=1.0 on top of the optimizer's clipping
    from transformers import Trainer, TrainingArguments
    from shardgrok.integrations.transformers import GrokCallback
    model = ex.build_model()
    args = TrainingArguments(output_dir=str(tmp / "clip"), max_steps=1, report_to="none",
                             use_cpu=True, disable_tqdm=True, save_strategy="no")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Trainer(model=model, args=args, train_dataset=ex.Periodic(8, 0),
                optimizers=(shardgrok.GrokAdamW(model.parameters()), None),
                callbacks=[GrokCallback()]).train()
    out["clip_warnings"] = [str(w.message) for w in caught]
    try:
        Trainer(model=model, args=args, train_dataset=ex.Periodic(8, 0),
                optimizers=(torch.optim.AdamW(model.parameters()), None),
                callbacks=[GrokCallback()]).train()
        out["adamw_error"] = None
    except TypeError as e:
        out["adamw_error"] = str(e)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=["ddp", "deepspeed", "single"], required=True)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    out = pathlib.Path(a.out)
    tmp = out / "runs"
    try:
        res = {"ok": globals()[f"mode_{a.mode}"](tmp)}
    except Exception:
        res = {"traceback": traceback.format_exc()}
    torch.save(res, out / f"rank{RANK}.pt")
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
