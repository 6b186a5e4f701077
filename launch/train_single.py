"""A short single-process training run with GrokAdamW or SuperGrok (the template the distributed
launchers build on). Prints the first and last training loss."""
import torch
from torch import nn

import common


def train(argv=None):
    args = common.parser(__doc__, optimizer="grokadamw").parse_args(argv)
    torch.manual_seed(0)
    model = common.mlp()
    x, y = common.toy_data(256)
    opt = common.make_optimizer(args.optimizer, model.parameters(), args.lr)

    def step(t):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        common.optimizer_step(opt, loss, t)
        return loss

    losses = common.run_steps(step, args.steps)
    common.report(args.optimizer, losses, opt.get_global_step())
    return losses


if __name__ == "__main__":
    common.run(train)
