"""PyTorch Lightning with GrokAdamW and SuperGrok: examples/lightning_mlp.py under
``strategy="ddp"`` on two CPU processes, through the Trainer and through Fabric, saved at step
10 and resumed to 20, against the uninterrupted run; and shardgrok.integrations.lightning's
GrokCallback in one process: the losses it feeds SuperGrok, its clipping warning."""
from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch

pytest.importorskip("lightning")
import lightning as L  # noqa: E402

from shardgrok.integrations.lightning import GrokCallback  # noqa: E402
from tests.support.helpers import assert_same_tree  # noqa: E402
from tests.support.multirank import worker_env  # noqa: E402
from tests.support.paths import ROOT, load_script  # noqa: E402

EXAMPLE = ROOT / "examples" / "lightning_mlp.py"


def run(tmp_path, *args) -> None:
    p = subprocess.run([sys.executable, str(EXAMPLE), *map(str, args)], capture_output=True,
                       text=True, timeout=300, cwd=tmp_path, env=worker_env())
    assert p.returncode == 0, f"{args} exited {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}"


def load(path) -> dict:
    # Lightning's checkpoints hold its own objects (hyperparameters, loop state)
    return torch.load(path, map_location="cpu", weights_only=False)


def full_state(opt_state: dict, model_state: dict) -> None:
    """The checkpoint's optimizer state is whole (consolidated), not rank 0's shard."""
    shapes = [tuple(v.shape) for v in model_state.values()]
    assert [tuple(s["exp_avg"].shape) for s in opt_state["state"].values()] == shapes


@pytest.mark.parametrize("optimizer", ["grokadamw", "supergrok"])
def test_trainer_ddp_resume_equals_the_uninterrupted_run(tmp_path, optimizer):
    common = ["--optimizer", optimizer, "--devices", 2, "--steps", 20]
    run(tmp_path, *common, "--checkpoint-every", 10, "--checkpoint-dir", "ck", "--save", "ref.ckpt")
    run(tmp_path, *common, "--resume", "ck/step=10.ckpt", "--save", "end.ckpt")
    half, want, got = (load(tmp_path / f) for f in ("ck/step=10.ckpt", "ref.ckpt", "end.ckpt"))
    full_state(half["optimizer_states"][0], half["state_dict"])
    assert half["global_step"] == 10 and got["global_step"] == want["global_step"] == 20
    assert_same_tree(got["state_dict"], want["state_dict"])
    assert_same_tree(got["optimizer_states"], want["optimizer_states"])
    # the latest validation loss SuperGrok is fed travels in the callback's own state
    assert got["callbacks"]["GrokCallback"] == want["callbacks"]["GrokCallback"]
    assert want["callbacks"]["GrokCallback"]["val_loss"] is not None


@pytest.mark.parametrize("optimizer", ["grokadamw", "supergrok"])
def test_fabric_ddp_resume_equals_the_uninterrupted_run(tmp_path, optimizer):
    common = ["--engine", "fabric", "--optimizer", optimizer, "--devices", 2, "--steps", 20]
    run(tmp_path, *common, "--checkpoint-every", 10, "--checkpoint-dir", "ck", "--save", "ref.ckpt")
    run(tmp_path, *common, "--resume", "ck/step=10.ckpt", "--save", "end.ckpt")
    half, want, got = (load(tmp_path / f) for f in ("ck/step=10.ckpt", "ref.ckpt", "end.ckpt"))
    full_state(half["optimizer"], half["model"])
    assert half["step"] == 10 and got["step"] == want["step"] == 20
    assert_same_tree(got["model"], want["model"])
    assert_same_tree(got["optimizer"], want["optimizer"])


# ---------------------------------------------------------------- the callback, in one process
mlp = load_script("examples/lightning_mlp.py", "lightning_mlp_example")


class Recording(mlp.Regression):
    """The example's module, keeping every training loss it returns, every validation loss it
    logs outside the sanity check, and the losses SuperGrok was given before each step."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.train_losses, self.val_losses, self.fed = [], [], []

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.train_losses.append(float(loss))
        return loss

    def validation_step(self, batch, batch_idx):
        super().validation_step(batch, batch_idx)
        if not self.trainer.sanity_checking:   # one batch: the epoch's logged mean is this
            x, y = batch
            self.val_losses.append(float(torch.nn.functional.mse_loss(self.net(x), y)))

    def configure_optimizers(self):
        opt = super().configure_optimizers()
        set_losses = opt.set_losses

        def recording(train_loss=None, val_loss=None):
            self.fed.append((None if train_loss is None else float(train_loss), val_loss))
            set_losses(train_loss=train_loss, val_loss=val_loss)
        opt.set_losses = recording
        return opt


def fit(model, **trainer_kw) -> L.Trainer:
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, **trainer_kw)
    train, val = mlp.loaders(1)
    trainer.fit(model, train, val)
    return trainer


def test_the_callback_feeds_supergrok_the_step_loss_and_the_latest_validation_loss():
    torch.manual_seed(0)
    model = Recording(optimizer="supergrok")
    cb = GrokCallback()
    # an epoch is 5 micro-batches: with 5 accumulated per step, one step per epoch, each
    # followed by a validation; the sanity check's validation is not fed
    fit(model, max_steps=4, accumulate_grad_batches=5, callbacks=[cb], num_sanity_val_steps=1)
    assert len(model.fed) == 4 and len(model.train_losses) == 20
    for t, (train, val) in enumerate(model.fed):
        # the step's training loss: the mean of its micro-batches' losses
        assert train == pytest.approx(sum(model.train_losses[5 * t:5 * t + 5]) / 5, rel=1e-6)
        # the validation loss: the one after the previous epoch (none before the first)
        assert val == (None if t == 0 else pytest.approx(model.val_losses[t - 1], rel=1e-6))
    assert len(set(model.val_losses)) == 4 and cb.val_loss == pytest.approx(model.val_losses[-1])
    assert model.optimizers().optimizer.get_global_step() == 4


def test_the_callback_warns_about_clipping_twice_and_refuses_other_optimizers():
    model = mlp.Regression(optimizer="grokadamw")
    with pytest.warns(UserWarning, match="gradient_clip_val=1.0.*GrokAdamW clips"):
        fit(model, max_steps=1, gradient_clip_val=1.0, callbacks=[GrokCallback()],
            num_sanity_val_steps=0, limit_val_batches=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)   # the optimizer's own clipping alone: quiet
        fit(mlp.Regression(optimizer="grokadamw"), max_steps=1, callbacks=[GrokCallback()],
            num_sanity_val_steps=0, limit_val_batches=0)

    class AdamModule(mlp.Regression):
        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters())
    with pytest.raises(TypeError, match="GrokCallback drives GrokAdamW or SuperGrok.*AdamW"):
        fit(AdamModule(), max_steps=1, callbacks=[GrokCallback()], num_sanity_val_steps=0)
    with pytest.raises(ValueError, match="val_loss_key"):
        GrokCallback(val_loss_key="")
