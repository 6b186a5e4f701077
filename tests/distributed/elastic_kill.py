"""launch/train_sharded.py with one fault injected: in torchrun's first round
(``TORCHELASTIC_RESTART_COUNT`` 0) rank 1 SIGKILLs itself at step ``KILL_STEP``, after the
backward pass and before the optimizer step, and first touches ``KILLED_MARK`` so the test
knows the fault happened. Every other round, and every other rank, runs the script unchanged.

With ``PLAIN_INIT=1`` the process group is started as HF Trainer, accelerate and Lightning
start it, by ``torch.distributed.init_process_group`` before the script's own
``shardgrok.init_distributed()`` (which then finds it and reports it)."""
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "launch"))

import common  # noqa: E402
import train_sharded  # noqa: E402

_step = common.optimizer_step


def optimizer_step(opt, loss, t, **kwargs):
    if (t == int(os.environ["KILL_STEP"]) and common.rank() == 1
            and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"):
        Path(os.environ["KILLED_MARK"]).touch()
        os.kill(os.getpid(), signal.SIGKILL)
    _step(opt, loss, t, **kwargs)


common.optimizer_step = optimizer_step

if __name__ == "__main__":
    if os.environ.get("PLAIN_INIT") == "1":
        import torch.distributed as dist
        dist.init_process_group("gloo")
    common.run(train_sharded.train)
