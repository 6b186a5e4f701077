"""The Grokfast modular-arithmetic task, its transformer and the training loop of the demo.

See ``shardgrok/demo/__main__.py`` for the command line and the reasons behind the defaults.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, replace
from typing import Any, Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .recipes import RECOMMENDED, parse_spec, recipe_for

OPTIMIZERS = ("adamw", "grokadamw", "supergrok")   # the demo's three, at RECOMMENDED settings


@dataclass
class DemoConfig:
    """Everything a run depends on. ``run(DemoConfig(steps=50))`` is a quick smoke run."""

    p: int = 97                     # modulus: the task is op(x, y) mod p
    op: str = "x*y"                 # the operation, a formula (demo/ops.py)
    train_fraction: float = 0.5     # share of the examples used for training
    # share held out as validation: SuperGrok's grokking signal and meta-step read it, nothing
    # is scored on it; the rest (0.4 by default) is the test split every accuracy is read from
    val_fraction: float = 0.1
    steps: int = 3000               # step budget per optimizer
    # optimizer specs (demo/recipes.py; a bare name is the optimizer at the seeds' defaults)
    optimizers: tuple[str, ...] = tuple(RECOMMENDED[o] for o in OPTIMIZERS)
    seed: int = 0                   # data split, initial weights, batch order
    lr: float = 1e-3
    weight_decay: float = 0.005     # for specs that do not set their own (Grokfast's value)
    betas: tuple[float, float] = (0.9, 0.98)
    lr_warmup: int = 10             # linear learning-rate warmup (steps)
    batch_size: int = 512           # 0 = full batch; the global batch when data-parallel
    # the global batch as this many equal micro-batches, each one rank's share when
    # data-parallel: one process and `micro_batches` ranks then take the same steps bit for bit
    micro_batches: int = 1
    eval_every: int = 20            # validation and test every K steps
    target: float = 0.95            # test accuracy that counts as "grokked"
    stop_at_target: bool = True     # False: train to the step budget even after the target
    width: int = 128
    depth: int = 2
    heads: int = 4
    threads: int | None = 1         # torch.set_num_threads per process; None: torch's choice
    device: str = "cpu"
    progress: bool = True           # tqdm bar (or plain prints without tqdm)

    def __post_init__(self):
        if isinstance(self.optimizers, str):
            raise TypeError("optimizers must be a tuple of optimizer specs, not a string")
        self.optimizers = tuple(self.optimizers)
        if not self.optimizers:
            raise ValueError("optimizers must name at least one optimizer spec (demo/recipes.py), "
                             f"e.g. {', '.join(OPTIMIZERS)}")
        for spec in self.optimizers:
            parse_spec(spec)  # an unknown name or a malformed override fails here, naming it
        self.betas = tuple(float(b) for b in self.betas)
        if self.p < 2:
            raise ValueError(f"p must be >= 2, got {self.p}")
        from .ops import parse_op
        parse_op(self.op, self.p)  # a bad formula fails here, naming what is wrong
        if not 0.0 < self.train_fraction < 1.0:
            raise ValueError(f"train_fraction must be in (0, 1), got {self.train_fraction}")
        if not 0.0 < self.val_fraction < 1.0 - self.train_fraction:
            raise ValueError(f"val_fraction must be in (0, 1 - train_fraction = "
                             f"{1.0 - self.train_fraction:g}): the test split is the rest; got "
                             f"{self.val_fraction}")
        for name in ("steps", "eval_every", "width", "depth", "heads", "micro_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_size < 0:
            raise ValueError(f"batch_size must be >= 0 (0 = full batch), got {self.batch_size}")
        if self.width % self.heads:
            raise ValueError(f"width ({self.width}) must be divisible by heads ({self.heads})")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")


# ---------------------------------------------------------------------------------------- data
class TaskData(NamedTuple):
    """The three disjoint splits of a task: inputs ``x_*`` (rows of tokens) and labels ``y_*``.
    Training trains on ``train``; ``val`` is read only by what the optimizer adapts to (the
    grokking signal's validation loss, SuperGrok's meta-step); ``test`` scores the run."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def seq_len(op: str, p: int) -> int:
    """Tokens per example: each operand followed by the operation sign, the last by ``eq``."""
    from .ops import parse_op
    return 2 * len(parse_op(op, p).variables)


def make_data(p: int, train_fraction: float, seed: int, op: str = "x*y",
              val_fraction: float = 0.1) -> TaskData:
    """Every tuple of operands as a sequence ``[x, op, y, eq]`` (``[a, op, b, op, ..., e, eq]``
    with more operands) labelled with the formula's value mod p, split at random into
    ``train_fraction`` for training, ``val_fraction`` for validation and the rest for test.

    ``op`` is a formula (:mod:`shardgrok.demo.ops`; ``/`` is the modular inverse and tuples
    dividing by 0 are left out). Tokens ``0..p-1`` are the numbers, ``p`` is the operation sign
    and ``p + 1`` is ``eq``. The training split of a seed does not depend on ``val_fraction``.
    """
    from .ops import parse_op

    fn = parse_op(op, p)
    n = len(fn.variables)
    grid = torch.cartesian_prod(*[torch.arange(p)] * n)   # the first operand varies slowest
    labels, defined = fn(*grid.unbind(1))
    grid, labels = grid[defined], labels[defined]
    inputs = torch.empty(len(labels), 2 * n, dtype=torch.long)
    inputs[:, 0::2] = grid
    inputs[:, 1::2] = p
    inputs[:, -1] = p + 1
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(labels), generator=gen)
    n_train = int(round(train_fraction * len(labels)))
    n_val = int(round(val_fraction * len(labels)))
    if not (0 < n_train and 0 < n_val and n_train + n_val < len(labels)):
        raise ValueError(f"{len(labels)} examples do not split into train ({train_fraction}), "
                         f"val ({val_fraction}) and a non-empty test split")
    tr, va, te = perm[:n_train], perm[n_train:n_train + n_val], perm[n_train + n_val:]
    return TaskData(inputs[tr], labels[tr], inputs[va], labels[va], inputs[te], labels[te])


# ---------------------------------------------------------------------------------------- model
class Block(nn.Module):
    """Pre-LN transformer block: causal multi-head self-attention and a 4x GELU MLP."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.ln2 = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, 4 * width)
        self.fc2 = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        bsz, seq, width = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(width, dim=-1)
        k = k.view(bsz, seq, self.heads, -1).transpose(1, 2)
        v = v.view(bsz, seq, self.heads, -1).transpose(1, 2)
        if last_only:
            # Only the last position is read out after this block, and under the causal mask
            # it sees every position: same result as the full causal block, less work.
            x = x[:, -1:]
            q = q[:, -1:].reshape(bsz, 1, self.heads, -1).transpose(1, 2)
            a = F.scaled_dot_product_attention(q, k, v)
        else:
            q = q.reshape(bsz, seq, self.heads, -1).transpose(1, 2)
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(bsz, x.shape[1], width))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class Transformer(nn.Module):
    """Decoder-only transformer as in Grokfast: token + position embeddings, ``depth`` blocks,
    final LayerNorm and a linear head; the prediction is read from the last position."""

    def __init__(self, vocab: int, n_classes: int, seq_len: int = 4, width: int = 128,
                 depth: int = 2, heads: int = 4):
        super().__init__()
        self.tok = nn.Embedding(vocab, width)
        self.pos = nn.Embedding(seq_len, width)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(depth))
        self.ln_f = nn.LayerNorm(width)
        self.head = nn.Linear(width, n_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.tok(tokens) + self.pos.weight[: tokens.shape[1]]
        for i, block in enumerate(self.blocks):
            x = block(x, last_only=i == len(self.blocks) - 1)
        return self.head(self.ln_f(x[:, -1]))


def make_model(cfg: DemoConfig) -> Transformer:
    torch.manual_seed(cfg.seed)
    return Transformer(cfg.p + 2, cfg.p, seq_len(cfg.op, cfg.p), cfg.width, cfg.depth, cfg.heads)


# ---------------------------------------------------------------------------------------- training
def _world() -> tuple[int, int]:
    """(rank, world size) of the default process group, (0, 1) without one."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@torch.no_grad()
def _sums(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(summed loss, number correct) over a set, without autograd."""
    model.eval()
    logits = model(x)
    model.train()
    return (F.cross_entropy(logits, y, reduction="sum").item(),
            (logits.argmax(-1) == y).sum().item())


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(mean loss, accuracy) on the whole set, without autograd."""
    loss, correct = _sums(model, x, y)
    return loss / len(y), correct / len(y)


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, leave=True, dynamic_ncols=True, file=sys.stderr)


def _num(x: float) -> float | None:
    return None if x != x else x


# gradient values at which a SuperGrok run records its meta-net's log-mask f(g): what the
# bilevel step has taught it to amplify or damp (f = 0 everywhere: no change to the gradient)
MASK_PROBES = (-1e-1, -1e-2, -1e-3, -1e-4, 0.0, 1e-4, 1e-3, 1e-2, 1e-1)


def _diagnostics(opt, meta_loss: float | None = None) -> dict[str, Any]:
    """What the last step of GrokAdamW / SuperGrok decided: the EMA's alpha, the clipping
    coefficient (1: no clipping), SuperGrok's share of tensors whose cosine gate let the slow
    gradient in; with meta-steps, the last look-ahead validation loss, the meta-net's log-mask
    at :data:`MASK_PROBES`, its ``rescale``, and the kinks of its piecewise-linear table (the
    compiled step's form of the net: ``breakpoints`` counts them, ``breakpoints_near`` lists
    those in [-1, 1] to 4 digits). Empty for torch's optimizers."""
    if not hasattr(opt, "get_state_summary"):
        return {}
    s = opt.get_state_summary()
    out = {"alpha": s.get("alpha", s.get("cached_alpha")), "clip_coef": s.get("last_clip_coef")}
    if "gate_engaged_fraction" in s:
        out["gate"] = s["gate_engaged_fraction"]
    out = {k: float(v) for k, v in out.items() if v is not None}
    if meta_loss is not None:
        from ..metanet.net import log_mask, net_device_dtype, rescale_of
        net = opt.meta_net
        device, dtype = net_device_dtype(net)
        with torch.no_grad():
            f = log_mask(net, torch.tensor(MASK_PROBES, dtype=dtype, device=device))
        out.update(meta_loss=float(meta_loss), log_mask=[float(v) for v in f],
                   rescale=float(torch.as_tensor(rescale_of(net)).detach()))
        from ..metanet.table import build_table, is_tabulable
        if is_tabulable(net):
            bp = build_table(net).breakpoints
            out.update(breakpoints=bp.numel(),
                       breakpoints_near=[float(f"{v:.4g}") for v in bp[bp.abs() <= 1].tolist()])
    return out


def train_one(spec: str, cfg: DemoConfig, data, init_state: dict[str, torch.Tensor],
              log: Callable[[str], None] = print,
              targets: tuple[float, ...] | None = None) -> dict[str, Any]:
    """Train one optimizer spec (demo/recipes.py) from ``init_state`` until test accuracy
    reaches every one of ``targets`` (default: ``cfg.target``) or the step budget runs out
    (with ``cfg.stop_at_target`` False: until the budget runs out).

    ``data`` is a :class:`TaskData`. At every evaluation the validation split gives the loss
    the grokking signal ``(val - train) / train`` reads (SuperGrok's, and GrokAdamW's with
    ``signal=True``), and SuperGrok's meta-step trains on its first batch; the test split gives
    every accuracy and loss this returns and every step a target was reached at.

    The batch is split into ``cfg.micro_batches`` equal parts whose mean gradient is the step's.
    In a process group of several ranks (torchrun; one rank per micro-batch) the run is
    data-parallel: the model is wrapped in DistributedDataParallel, rank r takes part r of every
    batch (the same batches as one process), the optimizer shards its state, and each rank
    evaluates its part of the validation and test sets; the sums are added in the same order as one
    process adds them, so every rank sees the same accuracy, stops at the same step, and (at the
    same thread count) trains what one process trains bit for bit."""
    name = parse_spec(spec)[0]
    recipe = recipe_for(spec, cfg)
    targets = tuple(sorted(targets)) if targets else (cfg.target,)
    rank, world = _world()
    device = torch.device(cfg.device)
    x_tr, y_tr, x_va, y_va, x_te, y_te = (t.to(device) for t in data)
    model = make_model(cfg).to(device)
    model.load_state_dict(init_state)
    net = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP
        net = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    latest = {"train": None, "val": None}

    def grokking_signal():
        if latest["val"] is None or not latest["train"]:
            return None
        return (latest["val"] - latest["train"]) / latest["train"]

    opt = recipe.make_opt(model, grokking_signal)
    from ..optim.supergrok import SuperGrok
    takes_losses = isinstance(opt, SuperGrok)
    warmup = max(cfg.lr_warmup, 0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)

    n_train = x_tr.shape[0]
    bs = n_train if cfg.batch_size == 0 else min(cfg.batch_size, n_train)
    micro = cfg.micro_batches
    if world > 1 and world != micro:
        raise ValueError(f"micro_batches ({micro}) must equal the number of ranks ({world}) in a "
                         "data-parallel run: each rank takes one micro-batch of every batch")
    if bs % micro:
        raise ValueError(f"the batch ({bs} examples) must divide into micro_batches ({micro}) "
                         "equal parts")
    gen = torch.Generator().manual_seed(cfg.seed + 1)   # same batch order for every optimizer
    order, pos = torch.randperm(n_train, generator=gen), 0
    # Sums are kept per micro-batch (one row each; a rank fills its own) and added row by row
    # after the all-reduce, so one process and the ranks add the same numbers in the same order.
    eval_parts = [(x_va[k::micro], y_va[k::micro], x_te[k::micro], y_te[k::micro])
                  for k in range(micro)]
    rows = range(micro) if world == 1 else [rank]

    bar = _progress(cfg.steps, f"{name:>9}", cfg.progress and rank == 0)
    plain = cfg.progress and rank == 0 and bar is None
    val_loss, val_acc, train_loss, train_acc = float("nan"), 0.0, float("nan"), float("nan")
    test_loss, test_acc = float("nan"), 0.0
    since = torch.zeros(micro, 3, dtype=torch.float64)   # training loss sum, correct, examples
    reached: dict[float, tuple[int, float]] = {}   # target -> (step, seconds) it was first met
    meta_batch = (x_va[:bs], y_va[:bs])   # from the validation split: never scored
    t0 = time.perf_counter()
    meta_loss = None             # the latest meta-step's look-ahead validation loss
    step = 0                     # optimizer updates taken so far
    history = []                 # one dict per evaluation
    while True:
        evaluated = step % cfg.eval_every == 0 or step == cfg.steps
        if evaluated:
            # Validation and test at the current weights, i.e. after `step` updates; training
            # loss and accuracy are the means over the batches since the previous evaluation.
            counts = torch.zeros(micro, 9, dtype=torch.float64)
            for k in rows:
                xv, yv, xt, yt = eval_parts[k]
                counts[k] = torch.tensor([*_sums(model, xv, yv), len(yv), *_sums(model, xt, yt),
                                          len(yt), *since[k].tolist()], dtype=torch.float64)
            if world > 1:
                torch.distributed.all_reduce(counts)
            vl, vc, vn, el, ec, en, tl, tc, tn = [sum(col) for col in zip(*counts.tolist())]
            val_loss, val_acc = vl / vn, vc / vn
            test_loss, test_acc = el / en, ec / en
            if tn:
                train_loss, train_acc = tl / tn, tc / tn
            since.zero_()
            history.append({"step": step, "test_acc": test_acc, "test_loss": test_loss,
                            "val_acc": val_acc, "val_loss": val_loss,
                            "train_loss": _num(train_loss), "train_acc": _num(train_acc),
                            **(_diagnostics(opt, meta_loss) if step else {})})
            if bar is not None:
                bar.set_postfix_str(f"train acc {100 * train_acc:5.1f}%  test acc "
                                    f"{100 * test_acc:5.1f}%  test loss {test_loss:.3g}",
                                    refresh=False)
            elif plain and step % (cfg.eval_every * 25) == 0:
                log(f"  {name:>9} step {step:>6}: train acc {100 * train_acc:5.1f}%  test acc "
                    f"{100 * test_acc:5.1f}%  test loss {test_loss:.3g}  "
                    f"({time.perf_counter() - t0:.0f} s)")
            for tgt in targets:
                if test_acc >= tgt and tgt not in reached:
                    reached[tgt] = (step, time.perf_counter() - t0)
            if cfg.stop_at_target and len(reached) == len(targets):
                break
        if step == cfg.steps:
            break
        if bs == n_train:
            idx = torch.arange(n_train)
        else:
            if pos + bs > n_train:
                order, pos = torch.randperm(n_train, generator=gen), 0
            idx = order[pos:pos + bs]
            pos += bs
        parts = idx.chunk(micro)
        mine = parts[rank:rank + 1] if world > 1 else parts   # this rank's share of the batch
        opt.zero_grad(set_to_none=True)
        batch_loss = 0.0
        for k, part in zip(rows, mine):
            part = part.to(device)
            xb, yb = x_tr[part], y_tr[part]
            logits = net(xb)
            loss = F.cross_entropy(logits, yb)
            # One process scales each micro-batch's loss by 1/micro and sums the gradients; DDP
            # scales each rank's by 1/world and sums them: the same products and one sum, so
            # the same bits (the 1/micro scaling is exact for powers of two).
            (loss / len(mine)).backward()
            value = loss.item()
            batch_loss += value
            since[k] += torch.tensor([value * len(yb),
                                      (logits.detach().argmax(-1) == yb).sum().item(), len(yb)],
                                     dtype=torch.float64)
        batch_loss /= len(mine)   # sum, then divide: as SuperGrok averages the ranks' losses
        if evaluated:
            # Both losses at the same weights: the grokking signal (val - train) / train, of
            # the whole batch's loss (every rank computes the same signal).
            train = batch_loss
            if world > 1:
                t = torch.tensor([batch_loss], dtype=torch.float64)
                torch.distributed.all_reduce(t)
                train = t.item() / world
            latest["train"], latest["val"] = train, val_loss
        if recipe.after_backward is not None:
            recipe.after_backward(model)
        if recipe.meta_every and takes_losses and step % recipe.meta_every == 0:
            xm, ym = meta_batch   # the unwrapped module: no DDP hooks in the look-ahead
            meta_loss = opt.meta_step(lambda: F.cross_entropy(model(xm), ym))
        if takes_losses:
            opt.step(train_loss=batch_loss, val_loss=val_loss if evaluated else None)
        else:
            opt.step()
        sched.step()
        step += 1
        if bar is not None:
            bar.update(1)
    wall = time.perf_counter() - t0
    if bar is not None:
        bar.close()
    first = reached.get(targets[0])
    # the lowest test accuracy from the evaluation that first reached each target to the end:
    # whether a run that got there stayed there
    held = {t: (min(h["test_acc"] for h in history if h["step"] >= reached[t][0])
                if t in reached else None) for t in targets}
    return {"optimizer": name, "spec": spec, "reached_step": first[0] if first else None,
            "reached": {t: reached.get(t, (None, None))[0] for t in targets},
            "seconds_to": {t: reached.get(t, (None, None))[1] for t in targets},
            "lowest_after": held,
            "steps_run": step, "world_size": world,
            "final_test_acc": test_acc, "final_test_loss": test_loss,
            "final_val_loss": val_loss, "final_train_loss": train_loss,
            "final_train_acc": train_acc, "wall_time_s": wall, "history": history}


def labels(specs: tuple[str, ...]) -> list[str]:
    """A short name per spec: the optimizer's name where it is unique, else the whole spec."""
    names = [parse_spec(s)[0] for s in specs]
    return [n if names.count(n) == 1 else s for n, s in zip(names, specs)]


def run(config: DemoConfig | dict | None = None, log: Callable[[str], None] = print
        ) -> dict[str, dict[str, Any]]:
    """Train every optimizer of ``config`` from the same initial weights, one after another.

    ``config`` is a :class:`DemoConfig`, a dict of its fields, or None (the defaults). Returns
    ``{label: {"reached_step": int | None, "final_test_acc": float, "wall_time_s": float,
    "steps_run": int, "history": [...], ...}}`` in the order trained (label: see
    :func:`labels`); ``reached_step`` is the number of updates after which test accuracy
    first reached ``config.target`` (None: not within ``config.steps``).
    """
    if config is None:
        cfg = DemoConfig()
    elif isinstance(config, DemoConfig):
        cfg = replace(config)
    else:
        cfg = DemoConfig(**config)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    data = make_data(cfg.p, cfg.train_fraction, cfg.seed, cfg.op, cfg.val_fraction)
    init_state = {k: v.clone() for k, v in make_model(cfg).state_dict().items()}
    results = {}
    for label, spec in zip(labels(cfg.optimizers), cfg.optimizers):
        res = train_one(spec, cfg, data, init_state, log=log)
        res["label"] = label
        results[label] = res
        if cfg.progress and _world()[0] == 0:
            log(describe(res, cfg))
    return results


def describe(res: dict[str, Any], cfg: DemoConfig) -> str:
    """One line: when the optimizer reached the target, or that it did not."""
    pct = f"{100 * cfg.target:g}%"
    who = res.get("label", res["optimizer"])
    if res["reached_step"] is not None:
        return (f"{who}: reached {pct} test accuracy at step {res['reached_step']} "
                f"({res['seconds_to'][cfg.target]:.1f} s)")
    return (f"{who}: did not reach {pct} within {cfg.steps} steps (final "
            f"test accuracy {100 * res['final_test_acc']:.1f}%, {res['wall_time_s']:.1f} s)")
