"""A short DeepSpeed training run whose optimizer comes from the config's "optimizer" entry
(``launch/ds_config.json``: SuperGrok under ZeRO stage 2):

    deepspeed --num_gpus 2 launch/train_deepspeed.py --deepspeed_config launch/ds_config.json

``import shardgrok`` is what makes ``"type": "SuperGrok"`` (or ``"GrokAdamW"``) valid; nothing
else in the config changes. SuperGrok's losses reach it through ``set_losses`` because
``engine.step()`` takes no arguments. Rank 0 prints the loss.
"""
import deepspeed
import torch
from torch import nn

import common
import shardgrok


def train(argv=None):
    ap = common.parser(__doc__, steps=40, optimizer=None, lr=None)
    ap.add_argument("--local_rank", type=int, default=-1)  # set by the deepspeed launcher
    args = deepspeed.add_config_arguments(ap).parse_args(argv)

    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    torch.manual_seed(0)
    model = common.mlp()
    engine, _, _, _ = deepspeed.initialize(args=args, model=model,
                                           model_parameters=model.parameters())
    opt = shardgrok.optimizer_of(engine)
    x, y = common.toy_data(64, torch.Generator().manual_seed(1 + common.rank()), engine.device)
    xv, yv = x[:16], y[:16]

    def step(t):
        loss = nn.functional.mse_loss(engine(x).float(), y)
        engine.backward(loss)
        if isinstance(opt, shardgrok.SuperGrok) and t % 5 == 0:
            with torch.no_grad():
                val = nn.functional.mse_loss(engine(xv).float(), yv).item()
            opt.set_losses(train_loss=loss.item(), val_loss=val)
        engine.step()
        return loss

    losses = common.run_steps(step, args.steps)
    common.report(f"{type(opt).__name__} via the DeepSpeed config (ZeRO stage "
                  f"{engine.zero_optimization_stage()})", losses, opt.get_global_step())
    return losses


if __name__ == "__main__":
    common.run(train)
