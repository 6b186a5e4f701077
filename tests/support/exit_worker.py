"""A DDP script that trains a few steps with GrokAdamW (default ``shard=None``: sharded under
DDP) and then simply ends, as a Trainer's or an accelerate user's script does: no
``destroy_process_group``, no ``shardgrok.shutdown_distributed()``. Run by
tests/distributed/test_exit.py under torchrun (gloo, CPU); it must exit 0 without "terminate called
without an active exception".

The abort it guards against (docs/distributed.md, "To leave"): gloo's worker thread drops a
finished collective's Work, and with it the tensors it was handed, a moment after the collective
returned; a tensor made in Python needs the GIL for that, and if the main thread is already
finalizing the interpreter, CPython ends the worker thread inside that destructor and the
process aborts. ``--switch-interval`` (``sys.setswitchinterval``) makes the main thread keep
the GIL longer, so a worker thread still waiting for it at the end is reached by finalization:
without the fix that aborted about 4 runs in 10 at 1.0 s on a 2-core machine.

Each rank also checks the fix's mechanism directly, whatever the timing: every tensor the
optimizer handed to a torch.distributed collective during ``step()`` (and its root, for a view)
must be back at its use count from before the collective when ``step()`` returns, i.e. no
backend thread still holds it. It prints ``exit_worker rank R: collectives C held H`` for all
steps but the last, which it takes silently just before the script ends.
"""
import argparse
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import shardgrok

ap = argparse.ArgumentParser()
ap.add_argument("--optimizer", choices=("grokadamw", "adamw"), default="grokadamw")
ap.add_argument("--steps", type=int, default=10)
ap.add_argument("--switch-interval", type=float, default=None)
ap.add_argument("--no-settle", action="store_true",
                help="experiments only: collectives return without waiting for the backend to "
                     "let go of their tensors (the behaviour before the fix)")
ap.add_argument("--then-shutdown", action="store_true",
                help="end the way the launch scripts do: drop the model and the optimizer, then "
                     "shardgrok.shutdown_distributed() (the control for torch's own exposure)")
args = ap.parse_args()

if args.no_settle:
    import shardgrok.comm
    shardgrok.comm._CAN_SETTLE = False

info = shardgrok.init_distributed(backend="gloo")
rank = info.rank

# ---------------------------------------------------------------- the mechanism check
recording = False
handed: list[tuple[torch.Tensor, int]] = []  # (tensor or its root, use count before)
n_collectives = 0


def _record(tensors):
    global n_collectives
    n_collectives += 1
    for t in tensors:
        if isinstance(t, torch.Tensor) and hasattr(t, "_use_count"):
            handed.append((t, t._use_count()))
            if t._base is not None:
                handed.append((t._base, t._base._use_count()))


def _watch(name):
    fn = getattr(dist, name, None)
    if fn is None:
        return

    def wrapper(*a, **kw):
        if recording:
            flat = []
            for x in list(a) + list(kw.values()):
                flat.extend(x if isinstance(x, (list, tuple)) else [x])
            _record(flat)
        return fn(*a, **kw)
    setattr(dist, name, wrapper)


for _name in ("all_reduce", "all_gather", "all_gather_single", "all_gather_into_tensor",
              "broadcast"):
    _watch(_name)

# ---------------------------------------------------------------- the training
if args.switch_interval:
    sys.setswitchinterval(args.switch_interval)
torch.manual_seed(0)
net = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 1))
model = DDP(net)
if args.optimizer == "grokadamw":
    opt = shardgrok.GrokAdamW(model.parameters(), lr=1e-2)
    assert opt.is_sharded
else:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
x = torch.randn(64, 16)
y = x[:, :4].sum(1, keepdim=True)


def train_step(check: bool) -> int:
    """One step; with ``check``, how many tensors handed to a collective were still held."""
    global recording
    opt.zero_grad(set_to_none=True)
    loss = nn.functional.mse_loss(model(x), y)
    loss.backward()
    recording = check
    opt.step()
    recording = False
    n_held = sum(t._use_count() > n for t, n in handed)
    handed.clear()
    return n_held


held = sum(train_step(check=True) for _ in range(args.steps - 1))
# printed before the last step: output releases the GIL, which would let a backend thread
# finish before the interpreter finalizes and hide the race this script is about
print(f"exit_worker rank {rank}: collectives {n_collectives} held {held}", flush=True)
train_step(check=False)
if args.then_shutdown:
    del model, net, opt
    shardgrok.shutdown_distributed()
# ... else the script ends right after the last step: no destroy_process_group
