"""The demo: its data is the stated task, and a short run trains all three optimizers."""
import json
import subprocess
import sys

import torch

from shardgrok.demo import DemoConfig, run
from shardgrok.demo.task import make_data


def test_data_is_x_times_y_mod_p_split_in_half():
    x_tr, y_tr, x_va, y_va = make_data(11, 0.5, seed=0)
    x, y = torch.cat([x_tr, x_va]), torch.cat([y_tr, y_va])
    assert len(x) == 121 and abs(len(x_tr) - 60.5) <= 1
    assert torch.equal(y, (x[:, 0] * x[:, 2]) % 11)
    assert (x[:, 1] == 11).all() and (x[:, 3] == 12).all()
    assert len({tuple(r) for r in x.tolist()}) == 121  # every pair once


def test_short_run_trains_every_optimizer():
    cfg = DemoConfig(p=11, steps=30, eval_every=10, width=32, heads=2, progress=False,
                     lr=3e-3, supergrok_warmup=5)
    out = run(cfg, log=lambda s: None)
    assert list(out) == ["adamw", "grokadamw", "supergrok"]
    for name, r in out.items():
        assert r["steps_run"] == 30 or r["reached_step"] is not None, name
        assert r["final_train_loss"] < 2.4, (name, r)  # below log(11): it learned something


def test_command_line_json():
    cmd = [sys.executable, "-m", "shardgrok.demo", "--steps", "5", "--eval-every", "5",
           "--optimizers", "grokadamw", "--json", "--no-progress"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=True).stdout
    result = json.loads(out[out.index("{"):])
    assert "grokadamw" in json.dumps(result)
