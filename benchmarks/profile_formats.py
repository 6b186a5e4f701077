"""Where a compiled step's work goes, per state format: x86 instructions per element of the two
kernel calls, by function and by source line, counted by valgrind's callgrind on one thread.

    python benchmarks/profile_formats.py [--configs grok:fp32,grok:bfloat16,grok:int8,super:fp32,super:int8]
                                         [--numel 524288] [--steps 3] [--top 14] [--jobs 2]

Each configuration (optimizer:state format) runs ``--steps`` steps of GrokAdamW or SuperGrok
(default meta-net) over two fp32 tensors of ``--numel / 2`` elements, stochastic rounding on
(the default), in a child process under ``valgrind --tool=callgrind`` that counts only inside
the plan's ``phase1`` and ``phase2`` calls (the kernels, nothing of Python). The CPU kernels are
built with debug information (``SHARDGROK_DEBUG_INFO=1``: ``-g``, the same code otherwise) so
that counts land on source lines. Instructions are not time: a vector instruction does 8
elements' work on AVX2 and a 32-bit multiply costs more than an add; benchmarks/phases.py gives
the time per phase. What this adds is *which* lines the compute-bound paths spend on.

Needs valgrind (``callgrind_annotate`` too); a few minutes per configuration. The output
starts with its provenance (step_common.provenance) as ``#`` lines.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import step_common as C  # the repository root on sys.path, and the provenance lines

PROG = "benchmarks/profile_formats.py"
ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ("grok:fp32", "grok:bfloat16", "grok:int8", "super:fp32", "super:int8")
SOURCES = ("csrc/grok_math.h", "csrc/cpu/loops.h")


def child(kind: str, fmt: str, numel: int, steps: int) -> None:
    """The profiled run (in the valgrind child)."""
    import torch

    import shardgrok
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(numel // 2, generator=gen)) for _ in range(2)]
    state_dtype = None if fmt == "fp32" else fmt
    if kind == "grok":
        opt = shardgrok.GrokAdamW(params, state_dtype=state_dtype, lr=1e-3)
    else:
        opt = shardgrok.SuperGrok(params, state_dtype=state_dtype, lr=1e-3, warmup_steps=0)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step(**({} if kind == "grok" else {"train_loss": 1.0, "val_loss": 1.2}))
    if opt.get_state_summary()["backend"] != "kernel":
        raise SystemExit("the step did not run on the compiled kernel")


def profile(config: str, args, tmp: Path) -> tuple[str, int, str, str]:
    kind, fmt = config.split(":")
    out = tmp / f"{kind}-{fmt}.callgrind"
    env = {**os.environ, "SHARDGROK_DEBUG_INFO": "1", "SHARDGROK_REQUIRE_KERNEL": "1",
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
           "--toggle-collect=*Plan::phase1*", "--toggle-collect=*Plan::phase2*",
           sys.executable, __file__, "--child", kind, fmt, str(args.numel), str(args.steps)]
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if run.returncode != 0:
        raise RuntimeError(f"{config}: exit {run.returncode}\n{run.stderr[-3000:]}")
    funcs = subprocess.run(["callgrind_annotate", "--inclusive=no", str(out)],
                           capture_output=True, text=True, check=True).stdout
    lines = subprocess.run(["callgrind_annotate", "--auto=yes", str(out)],
                           capture_output=True, text=True, check=True).stdout
    total = int(re.search(r"([\d,]+) \([ \d.]+%\)\s+PROGRAM TOTALS", funcs).group(1).replace(",", ""))
    return config, total, funcs, lines


def top_functions(funcs: str, total: int, elements: int, top: int) -> list[str]:
    rows = []
    for m in re.finditer(r"^\s*([\d,]+) \(\s*[\d.]+%\)\s+(\S+?):(.+)$", funcs, re.M):
        count = int(m.group(1).replace(",", ""))
        name = re.sub(r"\(anonymous namespace\)::|sg::cpu::|sg::|\[[^]]*\]|\(.*", "", m.group(3)).strip()
        rows.append((count, f"{Path(m.group(2)).name}: {name}"))
    merged: dict[str, int] = {}
    for count, name in rows:
        merged[name] = merged.get(name, 0) + count
    best = sorted(merged.items(), key=lambda kv: -kv[1])[:top]
    return [f"    {100 * c / total:5.1f}%  {c / elements:6.2f}/elem  {n}" for n, c in best]


def top_lines(lines: str, total: int, elements: int, top: int) -> list[str]:
    """The source lines of SOURCES with the most instructions (callgrind_annotate sums every
    inlined copy of a line), as ``file:line: text``."""
    counts: dict[str, int] = {}
    section, lineno = None, 0
    for raw in lines.splitlines():
        head = re.match(r"-- (?:Auto|User)-annotated source: (.+)$", raw)
        if head:
            path = os.path.normpath(head.group(1).strip())  # csrc/cpu/../grok_math.h
            section = Path(path).name if any(path.endswith(s) for s in SOURCES) else None
            continue
        at = re.match(r"-- line (\d+) -+", raw)
        if at:
            lineno = int(at.group(1))
            continue
        if section is None or raw.startswith("--"):
            continue
        m = re.match(r"^\s*([\d,]+|\.)(?: \(\s*[\d.]+%\))?(?:\s(.*))?$", raw)
        if not m:
            continue
        text = (m.group(2) or "").strip()
        if text.startswith("=>"):
            continue  # a call's cost, counted in its callee's lines
        if text == "events annotated":
            continue
        if m.group(1) != ".":
            key = f"{section}:{lineno}: {text}"
            counts[key] = counts.get(key, 0) + int(m.group(1).replace(",", ""))
        lineno += 1
    best = sorted(counts.items(), key=lambda kv: -kv[1])[:top]
    return [f"    {100 * c / total:5.1f}%  {c / elements:6.2f}/elem  {line[:110]}" for line, c in best]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        kind, fmt, numel, steps = argv[1], argv[2], int(argv[3]), int(argv[4])
        child(kind, fmt, numel, steps)
        return 0
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", default=",".join(CONFIGS),
                    help=f"comma list of optimizer:format (default {','.join(CONFIGS)})")
    ap.add_argument("--numel", type=int, default=524288, help="elements in all (two tensors)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--top", type=int, default=14, help="functions and lines shown per config")
    ap.add_argument("--jobs", type=int, default=2, help="valgrind runs at a time")
    args = ap.parse_args(argv)
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    bad = [c for c in configs if c.split(":")[0] not in ("grok", "super") or ":" not in c]
    if bad or args.numel < 2 or args.steps < 1:
        ap.error(f"bad --configs {bad}, --numel or --steps")
    for tool in ("valgrind", "callgrind_annotate"):
        if shutil.which(tool) is None:
            print(f"{tool} is not on PATH: nothing profiled", file=sys.stderr)
            return 2
    import torch
    torch.set_num_threads(1)
    print(f"{PROG}: instructions per element of the kernel calls, by function and source line")
    print("\n".join(C.provenance_lines(C.provenance(PROG, argv), prefix="# ")))
    elements = args.numel * args.steps
    print(f"# {args.numel:,} fp32 parameters in two tensors, {args.steps} steps, 1 thread, "
          f"stochastic rounding; {elements:,} element-steps")
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(lambda c: profile(c, args, Path(tmp)), configs))
    for config, total, funcs, lines in results:
        print(f"\n{config}: {total / elements:.2f} instructions per element "
              f"({total:,} in the two kernel calls)")
        print("  by function (exclusive):")
        print("\n".join(top_functions(funcs, total, elements, args.top)))
        print("  by source line (csrc/grok_math.h, csrc/cpu/loops.h; inlined copies summed):")
        print("\n".join(top_lines(lines, total, elements, args.top)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
