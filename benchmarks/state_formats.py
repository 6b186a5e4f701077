"""What each optimizer-state format costs on the CPU: bytes of state per parameter (measured from
the state tensors after a step), the bytes a step moves per parameter (nominal, as
step_common.bytes_per_param counts them), and the median step time with its ratio to torch
AdamW(fused=True) with fp32 state, measured in the same run.

    python benchmarks/state_formats.py                      # 1M/300 and 10M/100, 2 threads
    python benchmarks/state_formats.py --sizes 1M/300 --rounds 3 --steps 10
    python benchmarks/state_formats.py --quick              # smoke run (100k/10)
    python benchmarks/state_formats.py --json out.json

The tensors: the even split of each size, each rounded down to whole blocks of 256 elements
(``block_shapes``). Rows: AdamW (fused, fp32 state; the baseline), GrokAdamW and SuperGrok on the compiled kernel
with fp32, bf16 (stochastic rounding) and int8 (8-bit blockwise) state, and, where they import
and run on this CPU, torchao's ``AdamW8bit`` and bitsandbytes' 8-bit ``AdamW`` on the same
tensors (a row that cannot run says why). fp32 parameters and gradients throughout.

The optimizers are timed round-robin, ``--rounds`` rounds of ``--steps`` consecutive steps each,
so drift on a shared machine spreads over all rows; every output records its provenance
(command, commit, date, CPU, threads).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch

import step_common as C
import shardgrok

PROG = "benchmarks/state_formats.py"
FORMATS = {"fp32": None, "bf16": torch.bfloat16, "int8": "int8"}
BASELINE = "adamw-fused"

# Targets of the project (checked at 10M/100 only): ratio to the baseline's time.
TARGETS = [("GrokAdamW, bf16 state <= 1.1x AdamW fused at 10M/100", "grok-bf16", 1.1),
           ("GrokAdamW, int8 state <= 1.0x AdamW fused at 10M/100", "grok-int8", 1.0)]


def _nbytes(t: torch.Tensor) -> int:
    """Storage bytes of a state tensor; a tensor subclass (torchao's 8-bit state) by the plain
    tensors it is made of."""
    if type(t) is not torch.Tensor and hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(_nbytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def state_bytes(opt, params) -> float:
    """Bytes of optimizer state per parameter: every tensor in ``opt.state`` but 0-dim counters."""
    total = 0
    for p in params:
        for t in opt.state.get(p, {}).values():
            if isinstance(t, torch.Tensor) and t.dim() > 0:
                total += _nbytes(t)
    return total / sum(p.numel() for p in params)


def moved_bytes(key: str) -> float:
    """Nominal bytes a step moves per fp32 parameter (step_common.bytes_per_param's counting;
    8-bit state: a byte per code plus its share of the fp32 scales, read and written)."""
    if key in (BASELINE, "torchao-adamw8bit", "bnb-adamw8bit"):
        state = 8 if key == BASELINE else 2 * (1 + 4 / 256)  # m and v, each read and written
        return 3 * 4 + 2 * state  # p read and written, g read
    family, fmt = key.split("-")
    per_state = {"fp32": 4, "bf16": 2, "int8": 1 + 4 / 256}[fmt]
    reads_mu_twice = family == "super"  # phase 1 reads mu too
    return 2 * 4 + 2 * 4 + 2 * 3 * per_state + (per_state if reads_mu_twice else 0)


def make(key: str, params):
    """(optimizer, step function) or raises with the reason the row cannot run."""
    if key == BASELINE:
        opt = torch.optim.AdamW(params, lr=1e-3, fused=True)
        return opt, opt.step
    if key == "torchao-adamw8bit":
        from torchao.optim import AdamW8bit
        opt = AdamW8bit(params, lr=1e-3)
        return opt, opt.step
    if key == "bnb-adamw8bit":
        import bitsandbytes as bnb
        opt = bnb.optim.AdamW8bit(params, lr=1e-3)
        return opt, opt.step
    family, fmt = key.split("-")
    if family == "grok":
        opt = shardgrok.GrokAdamW(params, lr=1e-3, backend="kernel", state_dtype=FORMATS[fmt])
        return opt, opt.step
    opt = shardgrok.SuperGrok(params, lr=1e-3, warmup_steps=0, backend="kernel",
                              state_dtype=FORMATS[fmt])

    def step():
        opt.step(train_loss=1.0, val_loss=1.5)
    return opt, step


def block_shapes(n: int, count: int) -> list[tuple[int]]:
    """The even split, each tensor rounded down to whole blocks of 256 elements: torchao's 8-bit
    state applies only to tensors of such sizes (others keep fp32 state); shardgrok's takes any.
    Both keep fp32 state below 4,096 elements (1M/300: every tensor)."""
    return [(max(256, s - s % 256),) for (s,) in C.make_shapes(n, count, "even")]


def rows_for(n: int, count: int, args) -> list[dict]:
    shapes = block_shapes(n, count)
    keys = [BASELINE] + [f"{fam}-{fmt}" for fam in ("grok", "super") for fmt in FORMATS]
    keys += ["torchao-adamw8bit", "bnb-adamw8bit"]
    gen = torch.Generator().manual_seed(args.seed)
    base = [torch.randn(s, generator=gen) for s in shapes]
    grads = [torch.randn(s, generator=gen) for s in shapes]
    runs, rows = {}, []
    for key in keys:
        row = {"optimizer": key, "median_ms": None, "ratio_to_adamw_fused": None, "note": ""}
        try:
            params = [torch.nn.Parameter(b.clone()) for b in base]
            for p, g in zip(params, grads):
                p.grad = g.clone()
            opt, step = make(key, params)
            for _ in range(args.warmup):
                step()
            row["state_bytes_per_param"] = state_bytes(opt, params)
            row["moved_bytes_per_param"] = moved_bytes(key)
            runs[key] = (opt, step, [])
        except Exception as e:  # the row says why it cannot run here
            row["note"] = C.error_note("cannot run: ", e)
        rows.append(row)
    for _ in range(args.rounds):
        for key, (_, step, times) in runs.items():
            times.extend(C.timed_steps(step, args.steps))
    for row in rows:
        if row["optimizer"] in runs:
            row["median_ms"] = 1e3 * statistics.median(runs[row["optimizer"]][2])
    base_ms = rows[0]["median_ms"]
    for row in rows:
        if row["median_ms"] is not None and base_ms:
            row["ratio_to_adamw_fused"] = row["median_ms"] / base_ms
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=C.parse_sizes, default=None)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=6, help="consecutive steps per row and round")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.sizes is None:
        args.sizes = C.parse_sizes("100k/10" if args.quick else "1M/300,10M/100")
    if args.quick:
        args.rounds, args.steps, args.warmup = 1, 2, 1
    torch.set_num_threads(args.threads)
    prov = C.provenance(PROG, argv)
    print(f"{PROG}: state formats, fp32 parameters and gradients")
    print("\n".join(C.provenance_lines(prov)))
    out = {"header": prov, "sizes": []}
    for label, n, count in args.sizes:
        rows = rows_for(n, count, args)
        out["sizes"].append({"size": label, "params": n, "tensors": count, "rows": rows})
        total = sum(s[0] for s in block_shapes(n, count))
        print(f"\n{label}: {total:,} parameters in {count} tensors of whole 256-blocks, "
              f"{args.rounds} rounds x {args.steps} steps, median")
        print(f"  {'optimizer':<20} {'state B/param':>13} {'moved B/param':>13} {'ms/step':>9} "
              f"{'x AdamW':>8}  note")
        for r in rows:
            print(f"  {r['optimizer']:<20} {C.fmt(r.get('state_bytes_per_param'), '13.3f')} "
                  f"{C.fmt(r.get('moved_bytes_per_param'), '13.2f')} "
                  f"{C.fmt(r['median_ms'], '9.3f')} {C.fmt(r['ratio_to_adamw_fused'], '8.3f')}  "
                  f"{r['note']}")
        if label == "10M/100":
            by = {r["optimizer"]: r for r in rows}
            for desc, key, limit in TARGETS:
                ratio = by.get(key, {}).get("ratio_to_adamw_fused")
                verdict = "n/a" if ratio is None else ("met" if ratio <= limit else "MISSED")
                print(f"  target: {desc}: {verdict}" + ("" if ratio is None else f" ({ratio:.3f}x)"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
