"""A short FSDP2 training run with GrokAdamW or SuperGrok, launched by torchrun:

    torchrun --standalone --nproc-per-node=4 launch/train_fsdp2.py --optimizer supergrok
    torchrun --standalone --nproc-per-node=4 launch/train_fsdp2.py --hsdp 2      # 2 x 2 HSDP
    torchrun ... launch/train_fsdp2.py --bf16                                     # bf16 compute

Each block and the root are ``fully_shard``-ed; the optimizer steps the local shards of the
DTensor parameters and keeps m, v, mu as DTensors. ``--save DIR`` writes a
torch.distributed.checkpoint of model and optimizer at the end; ``--resume DIR`` starts from
one, at any world size. Rank 0 prints the loss.
"""
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (get_model_state_dict,
                                                     get_optimizer_state_dict,
                                                     set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

import common


class Net(nn.Module):
    def __init__(self, width=64, depth=3):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(width, width), nn.GELU())
                                    for _ in range(depth))
        self.inp = nn.Linear(common.FEATURES, width)
        self.out = nn.Linear(width, 1)

    def forward(self, x):
        h = self.inp(x)
        for block in self.blocks:
            h = h + block(h)
        return self.out(h)


def train(argv=None):
    ap = common.parser(__doc__, lr=3e-3, save="write a torch.distributed.checkpoint here at the end",
                       resume="start from a checkpoint written by --save (any world size)")
    ap.add_argument("--hsdp", type=int, default=0, metavar="REPLICAS",
                    help="HSDP with this many replicas (the world size must divide by it)")
    ap.add_argument("--bf16", action="store_true", help="bf16 compute, fp32 sharded parameters")
    args = ap.parse_args(argv)

    info, dev = common.init()
    rank, world = info.rank, info.world_size
    if not dist.is_initialized():  # one plain process: a 1-rank group, so FSDP2 still applies
        dist.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)
    if args.hsdp:
        if world % args.hsdp:
            raise SystemExit(f"--hsdp {args.hsdp}: the world size {world} must divide by it")
        mesh = init_device_mesh(dev.type, (args.hsdp, world // args.hsdp),
                                mesh_dim_names=("replicate", "shard"))
    else:
        mesh = init_device_mesh(dev.type, (world,))

    torch.manual_seed(0)
    model = Net().to(dev)
    kw = {"mesh": mesh}
    if args.bf16:
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for block in model.blocks:
        fully_shard(block, **kw)
    fully_shard(model, **kw)

    opt = common.make_optimizer(args.optimizer, model.parameters(), args.lr)
    if args.resume:
        sd = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
        dcp.load(sd, checkpoint_id=args.resume)
        set_model_state_dict(model, sd["model"])
        set_optimizer_state_dict(model, opt, sd["optim"])

    x, y = common.toy_data(256, torch.Generator().manual_seed(1 + rank), dev)  # this rank's data
    xv, yv = x[:32], y[:32]

    def step(t):
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.mse_loss(model(x).float(), y)
        loss.backward()
        # the meta-step evaluates the FSDP model itself
        common.optimizer_step(opt, loss, t, meta_loss=lambda: nn.functional.mse_loss(model(xv).float(), yv))
        return loss

    losses = common.run_steps(step, args.steps, start=opt.get_global_step())
    if args.save:
        dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
                 checkpoint_id=args.save)
    layout = f"HSDP {mesh.shape}" if args.hsdp else f"mesh {mesh.shape}"
    common.report(f"{args.optimizer} on FSDP2 ({layout}{', bf16' if args.bf16 else ''})", losses,
                  opt.get_global_step())
    return losses


if __name__ == "__main__":
    common.run(train)
