"""Where a kernel step's time goes: phase 1 alone, phase 1 + phase 2 (the two kernel calls,
with a fixed scalar table), and the whole ``step()``, against torch AdamW(fused=True) in the
same run. The rest of a step (the table of decisions, the step counters, the reduction buffer)
is the whole step minus the two calls.

    python benchmarks/phases.py [--size 10M/100] [--threads N] [--state fp32|bf16|int8]
                                [--rounding stochastic|nearest]

``--state`` is the shardgrok optimizers' state format (fp32 parameters throughout) and
``--rounding`` how bf16 and 8-bit state is written (the fixed table of the two-call timings says
the same), so two runs tell what stochastic rounding's draws cost.

The output starts with its provenance (step_common.provenance: command line, git commit and
whether the tree was dirty, date, CPU model, thread count) as ``#`` lines.
"""
from __future__ import annotations

import argparse
import statistics

import torch

import step_common as C
import shardgrok
import shardgrok.reference as R


def median_ms(fn, n=15):
    fn()
    return 1e3 * statistics.median(C.timed_steps(fn, n))


def scalar_table(n, stochastic=False):
    """An ordinary row (lr 1e-3, betas (0.9, 0.999), step 1) for every tensor, the state's
    writes rounded stochastically or to nearest."""
    t = torch.zeros(n, len(R.COLUMNS), dtype=torch.float64)
    for name, v in dict(grad_scale=1.0, alpha=0.98, one_minus_alpha=0.02, amp=2.0, smart_scale=1.0,
                        beta1=0.9, one_minus_beta1=0.1, beta2=0.999, one_minus_beta2=1e-3,
                        sqrt_bc2=0.0316, eps=1e-8, decay=1 - 1e-5, step_size=-1e-2, step=1.0,
                        rounding=float(R.ROUNDING["state"] if stochastic else 0), seed=0.0).items():
        t[:, R.COL[name]] = v
    return t


STATES = {"fp32": None, "bf16": torch.bfloat16, "int8": "int8"}


def parse_size(text: str) -> tuple[str, int, int]:
    sizes = C.parse_sizes(text)
    if len(sizes) != 1:
        raise argparse.ArgumentTypeError(f"one size, e.g. 10M/100, not {text!r}")
    return sizes[0]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=parse_size, default="10M/100",
                    help="params/tensors, e.g. 10M/100 or 1M/300")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--state", choices=sorted(STATES), default="fp32",
                    help="the shardgrok optimizers' state format (%(default)s)")
    ap.add_argument("--rounding", choices=("stochastic", "nearest"), default="stochastic",
                    help="how bf16 and 8-bit state is written (%(default)s)")
    args = ap.parse_args(argv)
    fmt = dict(state_dtype=STATES[args.state], state_rounding=args.rounding)
    label, total, n = args.size
    torch.set_num_threads(args.threads)
    isa = shardgrok.kernels.status()["cpu"]["isa"]
    print("\n".join(C.provenance_lines(C.provenance("benchmarks/phases.py", argv), prefix="# ")))
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(size) * 1e-2) for size in C.split_sizes(total, n)]
    for p in ps:
        p.grad = torch.randn_like(p) * 1e-2
    print(f"{label} fp32 parameters, {args.state} state ({args.rounding}), {args.threads} threads, "
          f"kernel {isa}")
    f = torch.optim.AdamW([torch.nn.Parameter(p.detach().clone()) for p in ps], fused=True)
    for q, p in zip(f.param_groups[0]["params"], ps):
        q.grad = p.grad.clone()
    fused = median_ms(f.step)
    print(f"  torch AdamW fused step                  {fused:7.2f} ms")
    table = scalar_table(n, args.rounding == "stochastic")
    cases = [("GrokAdamW", shardgrok.GrokAdamW(ps, backend="kernel", **fmt), None)]
    for label, trained in (("SuperGrok, default init", False), ("SuperGrok, trained-like", True)):
        opt = shardgrok.SuperGrok(ps, backend="kernel", warmup_steps=0, **fmt)
        if trained:  # weights N(0, 1): ~60-70 breakpoints, a 128-entry table
            gen = torch.Generator().manual_seed(0)
            with torch.no_grad():
                for w in opt.meta_net.net.parameters():
                    w.copy_(torch.randn(w.shape, generator=gen))
        cases.append((label, opt, dict(train_loss=1.0, val_loss=1.5)))
    for label, opt, losses in cases:
        step = (lambda o=opt, kw=losses: o.step(**(kw or {})))
        step()
        plan = opt._driver.plan(opt)
        aux = opt._kernel_inputs(plan) if losses else {}
        kind = opt.KERNEL_KIND
        p1 = median_ms(lambda: (plan.resolve(), plan.plan.phase1(kind, **aux)))
        p12 = median_ms(lambda: (plan.resolve(), plan.plan.phase1(kind, **aux),
                                 plan.plan.phase2(kind, table, **aux)))
        whole = median_ms(step)
        size = f" (table of {aux['table_size']})" if "table_size" in aux else ""
        print(f"  {label + size:40s} phase 1 {p1:6.2f} ms  phase 2 {p12 - p1:6.2f} ms  "
              f"rest {whole - p12:5.2f} ms  step {whole:6.2f} ms  = {whole / fused:4.2f}x fused")


if __name__ == "__main__":
    main()
