"""What the step benchmarks (``step_cpu.py``, ``step_cuda.py``) share, and the provenance every
benchmark under ``benchmarks/`` writes with its results.

- the optimizer rows: their keys, labels, aliases and how each is built (:func:`make_stepper`);
- the bytes a step moves per parameter (:func:`bytes_per_param`, :data:`BYTES_PER_PARAM`);
- the model's shapes (:func:`make_shapes`: an even split, or a transformer-like mix);
- the command-line options both step programs take, and their resolution;
- :func:`provenance`: the command line, git commit (and whether the tree was dirty), date, CPU
  model, thread count and, on CUDA, the GPU of a run; :func:`provenance_lines` prints it,
  :func:`write_json` writes a results file.

The bytes one step moves per parameter, for an ideal implementation, from the element sizes
P, G of the parameter and its gradient and M, V, MU of the state tensors the optimizer holds::

    AdamW      reads p, g, m, v; writes p, m, v                         2P +  G + 2M + 2V
    GrokAdamW  phase 1 reads g; phase 2 reads p, g, m, v, mu, writes
               p, m, v, mu                                               2P + 2G + 2M + 2V + 2MU
    SuperGrok  phase 1 reads g, mu; phase 2 as GrokAdamW                2P + 2G + 2M + 2V + 3MU

fp32 everything: 28, 40 and 44 B; bf16 parameters with fp32 state: 22, 32 and 36 B.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import logging
import math
import os
import platform
import shlex
import subprocess
import sys
import time
import warnings

import torch

# The benchmarks run from a checkout without installing: the repository root goes on the path
# here, once, for every script that imports this module.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import shardgrok  # noqa: E402

GiB = 1024**3

# Nominal bytes moved per parameter by one step, at fp32 (4 B per element access): the fp32 case
# of bytes_per_param, per row.
BYTES_PER_PARAM = {
    # fused AdamW: reads p, g, m, v and writes p, m, v -> 7 x 4 B
    "adamw-fused": 28,
    "adamw-foreach": 28,  # same traffic in the ideal; foreach makes several passes in practice
    # two-phase GrokAdamW kernel: phase 1 reads g (norm, partial sums); phase 2 reads
    # p, g, m, v, mu and writes p, m, v, mu -> (1 + 5 + 4) x 4 B
    "grok-kernel": 40,
    # SuperGrok kernel: phase 1 reads g and mu (norms, cosine-gate dot products) -> (2 + 5 + 4) x 4 B
    "super-kernel": 44,
    "super-kernel-trained": 44,
    # reference paths: the same nominal budget as their kernel counterparts
    "grok-ref": 40,
    "super-ref": 44,
    # the grokadamw package: the same algorithm as GrokAdamW, so the same nominal budget
    "grokadamw-pkg": 40,
    # the backend="auto" rows: the same budget
    "grok": 40,
    "super": 44,
    "super-trained": 44,
}

# key -> display label, in table order (the CPU run's default rows)
OPTIMIZERS = {
    "adamw-fused": "torch AdamW fused",
    "adamw-foreach": "torch AdamW foreach",
    "grok-kernel": "shardgrok GrokAdamW kernel",
    "grok-ref": "shardgrok GrokAdamW reference",
    "super-kernel": "shardgrok SuperGrok kernel",
    "super-kernel-trained": "shardgrok SuperGrok kernel, trained-like net",
    "super-ref": "shardgrok SuperGrok reference",
    "grokadamw-pkg": "grokadamw 0.1.2 GrokAdamW",
}
# The same optimizers with ``backend`` left to their own rule (``"auto"``, or SHARDGROK_BACKEND):
# the compiled kernel where it takes the tensors (the CPU kernel; on CUDA the CUDA kernel once it
# is built), else the reference path. The CUDA run's default rows; the backend a step used is
# printed with each row.
AUTO_OPTIMIZERS = {
    "grok": "shardgrok GrokAdamW",
    "super": "shardgrok SuperGrok",
    "super-trained": "shardgrok SuperGrok, trained-like net",
}
# every key, in table order (OPTIMIZERS keep their order)
ALL_OPTIMIZERS = {"adamw-fused": OPTIMIZERS["adamw-fused"],
                  "adamw-foreach": OPTIMIZERS["adamw-foreach"],
                  **AUTO_OPTIMIZERS, **OPTIMIZERS}
# which update each key runs, for the bytes it moves (bytes_per_param)
FAMILY = {"adamw-fused": "adamw", "adamw-foreach": "adamw",
          "grok": "grok", "grok-kernel": "grok", "grok-ref": "grok", "grokadamw-pkg": "grok",
          "super": "super", "super-trained": "super", "super-kernel": "super",
          "super-kernel-trained": "super", "super-ref": "super"}
ALIASES = {
    "supergrok": "super", "grokadamw-auto": "grok", "supergrok-auto": "super",
    "super-auto": "super", "grok-auto": "grok", "supergrok-trained": "super-trained",
    "fused": "adamw-fused", "adamw_fused": "adamw-fused",
    "foreach": "adamw-foreach", "adamw_foreach": "adamw-foreach",
    "grokadamw-kernel": "grok-kernel", "grokadamw-reference": "grok-ref", "grok-reference": "grok-ref",
    "supergrok-kernel": "super-kernel", "supergrok-reference": "super-ref",
    "super-reference": "super-ref",
    "grokadamw": "grokadamw-pkg", "package": "grokadamw-pkg", "grokadamw-0.1.2": "grokadamw-pkg",
    "pkg": "grokadamw-pkg",
}
BASELINE = "adamw-fused"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
LAYOUTS = ("even", "transformer")
# state key -> the name bytes_per_param gives it (grokadamw 0.1.2 calls mu "grok_ema")
STATE_NAMES = {"exp_avg": "m", "exp_avg_sq": "v", "mu": "mu", "grok_ema": "mu"}
BYTES_PER_PARAM_FORMULA = {"adamw": "2P + G + 2M + 2V", "grokadamw": "2P + 2G + 2M + 2V + 2MU",
                           "supergrok": "2P + 2G + 2M + 2V + 3MU"}


# ---------------------------------------------------------------------------------------------
# arguments

def parse_count(text: str) -> int:
    """'100k' -> 100_000, '1M' -> 1_000_000, '1.5M', '2G' or '2B' (2 x 10^9), '12345'."""
    t = text.strip()
    mult = {"k": 10**3, "m": 10**6, "g": 10**9, "b": 10**9}.get(t[-1:].lower(), 1)
    if mult != 1:
        t = t[:-1]
    try:
        value = float(t) * mult
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 100k, 1M, 10M)") from None
    if value < 1 or value != int(value):
        raise argparse.ArgumentTypeError(f"not a positive whole size: {text!r}")
    return int(value)


def parse_sizes(text: str) -> list[tuple[str, int, int]]:
    """'1M/300,10M/100' -> [('1M/300', 1000000, 300), ('10M/100', 10000000, 100)]."""
    out = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        if "/" not in item:
            raise argparse.ArgumentTypeError(f"size {item!r}: expected PARAMS/TENSORS, e.g. 1M/300")
        n_text, c_text = item.split("/", 1)
        n, c = parse_count(n_text), parse_count(c_text)
        if c > n:
            raise argparse.ArgumentTypeError(f"size {item!r}: more tensors than parameters")
        out.append((f"{n_text.strip()}/{c_text.strip()}", n, c))
    if not out:
        raise argparse.ArgumentTypeError("no sizes given")
    return out


def parse_only(text: str) -> list[str]:
    keys = []
    for name in text.split(","):
        name = name.strip().lower()
        if not name:
            continue
        key = ALIASES.get(name, name)
        if key not in ALL_OPTIMIZERS:
            raise argparse.ArgumentTypeError(
                f"unknown optimizer {name!r}; choose from {', '.join(ALL_OPTIMIZERS)}")
        if key not in keys:
            keys.append(key)
    return keys


def build_parser(prog: str, doc: str, default_rows, *, sizes: str, quick_sizes: str,
                 layout: str, steps: str, warmup: str, quick: str,
                 dtype: str = "") -> argparse.ArgumentParser:
    """The options both step programs take; the strings name each program's own defaults."""
    p = argparse.ArgumentParser(
        prog=prog, description=doc.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="optimizers (--only): " + ", ".join(ALL_OPTIMIZERS) + "\n(default rows: "
               + ", ".join(default_rows) + ")")
    p.add_argument("--sizes", type=parse_sizes, default=None,
                   help=f"comma list of PARAMS/TENSORS (default {sizes}; --quick: {quick_sizes})")
    p.add_argument("--layout", choices=LAYOUTS, default=None,
                   help="the tensors' shapes: even (1-D tensors of equal size) or transformer (an "
                        f"embedding, per block 4 matrices and 8 vectors) (default {layout})")
    p.add_argument("--steps", type=int, default=None, help=steps)
    p.add_argument("--warmup", type=int, default=None, help=warmup)
    p.add_argument("--max-seconds", type=float, default=15.0,
                   help="time box per optimizer and size, warm-up included; a slower optimizer "
                        "times fewer steps (default 15)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (default torch.get_num_threads() = "
                        f"{torch.get_num_threads()})")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                   help="parameter dtype (default fp32)" + dtype)
    p.add_argument("--only", type=parse_only, default=None,
                   help="comma list of optimizers to run; AdamW fused is added as the baseline of the ratios")
    p.add_argument("--quick", action="store_true", help=f"tiny smoke run ({quick})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="PATH", default=None, help="also write the results as JSON")
    return p


def resolve_args(args, parser, defaults: dict, at_least_one=("steps",)) -> None:
    """Fill the options left unset: ``defaults`` maps an option to (its value, its --quick
    value); check the counts in ``at_least_one`` and --threads, and apply --threads."""
    for name, (normal, quick) in defaults.items():
        if getattr(args, name) is None:
            value = quick if args.quick else normal
            setattr(args, name, parse_sizes(value) if name == "sizes" else value)
    for name in at_least_one:
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.threads is not None:
        if args.threads < 1:
            parser.error("--threads must be >= 1")
        torch.set_num_threads(args.threads)


def row_keys(only: list[str] | None, default) -> list[str]:
    """The rows to run, in table order, always with the baseline of the ratios."""
    keys = list(default) if only is None else list(only)
    if BASELINE not in keys:
        keys.insert(0, BASELINE)
    return [k for k in ALL_OPTIMIZERS if k in keys]


# ---------------------------------------------------------------------------------------------
# model and optimizers

def split_sizes(n: int, count: int) -> list[int]:
    base, extra = divmod(n, count)
    return [base + (1 if i < extra else 0) for i in range(count)]


def transformer_shapes(n: int, count: int) -> list[tuple[int, ...]]:
    """``count`` shapes of ``n`` elements in all, shaped like a transformer's parameters: an
    embedding matrix (V, d) first; then L = (count - 3) // 12 blocks of four matrices (3d, d),
    (d, d), (4d, d), (d, 4d) and eight vectors (two layer norms' weight and bias, the four
    biases); the (count - 3) % 12 tensors left over as extra (d,) vectors; a final layer norm
    (d,), (d + r,) whose bias absorbs the r < d elements the embedding's whole rows leave, so
    the total is exact. d (a multiple of 64 where it can be) puts about 85% of the parameters
    in the blocks' matrices and the rest mostly in the embedding: a few large matrices and many
    small vectors. Fewer than 15 tensors (no room for a block) fall back to the even split."""
    if count < 15:
        return [(s,) for s in split_sizes(n, count)]
    blocks = (count - 3) // 12
    extra = count - 3 - 12 * blocks

    def fixed(d):  # every element but the embedding's
        return 12 * blocks * d * d + 13 * blocks * d + 2 * d + extra * d

    d = max(64, round(math.sqrt(0.85 * n / (12 * blocks)) / 64) * 64)
    while d > 1 and fixed(d) + d > n:  # at least one embedding row
        d = d - 64 if d > 128 else d - 1
    if fixed(d) + d > n:
        return [(s,) for s in split_sizes(n, count)]
    rows, r = divmod(n - fixed(d), d)
    shapes: list[tuple[int, ...]] = [(rows, d)]
    for _ in range(blocks):
        shapes += [(d,), (d,), (3 * d, d), (3 * d,), (d, d), (d,),        # ln1, qkv, out
                   (d,), (d,), (4 * d, d), (4 * d,), (d, 4 * d), (d,)]    # ln2, fc1, fc2
    shapes += [(d,)] * extra + [(d,), (d + r,)]
    assert len(shapes) == count and sum(math.prod(s) for s in shapes) == n
    return shapes


def make_shapes(n: int, count: int, layout: str) -> list[tuple[int, ...]]:
    if layout == "transformer":
        return transformer_shapes(n, count)
    return [(s,) for s in split_sizes(n, count)]


def describe_shapes(shapes: list[tuple[int, ...]]) -> str:
    """'10000' or '3333-3334' (an even split), else the mix: '64 matrices, largest ...'."""
    if all(len(s) == 1 for s in shapes):
        sizes = sorted((s[0] for s in shapes), reverse=True)
        return f"{sizes[0]}" if sizes[0] == sizes[-1] else f"{sizes[-1]}-{sizes[0]}"
    mats = [s for s in shapes if len(s) > 1]
    vecs = [s for s in shapes if len(s) == 1]
    big = max(mats, key=math.prod)
    return (f"{len(mats)} matrices, largest {big[0]}x{big[1]}, and {len(vecs)} vectors of "
            f"{min(v[0] for v in vecs)}-{max(v[0] for v in vecs)}")


def import_grokadamw():
    """The reference package's GrokAdamW, or None. Its import calls logging.basicConfig(INFO);
    undo that so it does not change this script's (or a test's) logging."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from grokadamw import GrokAdamW
    except Exception:
        return None
    finally:
        for h in list(root.handlers):
            if h not in handlers:
                root.removeHandler(h)
        root.setLevel(level)
    return GrokAdamW


def make_stepper(key: str, params, package_cls, kernel_backend: str | None = None):
    """(optimizer, step function) for one optimizer key; raises when it cannot be had.
    ``kernel_backend`` (e.g. ``"cuda-emulated"``) replaces the backend of the rows that ask for
    the kernel or leave it to the optimizers' rule; the reference rows keep theirs."""
    if key == "adamw-fused":
        opt = torch.optim.AdamW(params, lr=1e-3, fused=True)
        return opt, opt.step
    if key == "adamw-foreach":
        opt = torch.optim.AdamW(params, lr=1e-3, foreach=True)
        return opt, opt.step
    if key in ("grok-kernel", "grok-ref", "grok"):
        # "grok": backend left to the optimizer's rule (the kernel when it takes the tensors)
        backend = {"grok-kernel": "kernel", "grok-ref": "reference"}.get(key)
        if kernel_backend is not None and backend != "reference":
            backend = kernel_backend
        opt = shardgrok.GrokAdamW(params, lr=1e-3, backend=backend)
        return opt, opt.step
    if key in ("super-kernel", "super-kernel-trained", "super-ref", "super", "super-trained"):
        # warmup_steps=0: the cosine gate is live from the first step, as after warm-up
        backend = {"super-ref": "reference", "super-kernel": "kernel",
                   "super-kernel-trained": "kernel"}.get(key)
        if kernel_backend is not None and backend != "reference":
            backend = kernel_backend
        opt = shardgrok.SuperGrok(params, lr=1e-3, warmup_steps=0, backend=backend)
        if key in ("super-kernel-trained", "super-trained"):
            # The default initialisation has zero biases: one breakpoint, a 2-entry table. A
            # trained net's kinks spread out: weights drawn N(0, 1) give ~60-70 breakpoints, a
            # 128-entry table, 7 search steps per element instead of 1.
            gen = torch.Generator().manual_seed(0)
            with torch.no_grad():
                for w in opt.meta_net.net.parameters():
                    w.copy_(torch.randn(w.shape, generator=gen))

        def step():  # the losses make the signal (alpha) path run every step
            opt.step(train_loss=1.0, val_loss=1.5)
        return opt, step
    if key == "grokadamw-pkg":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt = package_cls(params, lr=1e-3)

        def step():  # silence its autocast (CUDA-only) warnings
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                opt.step()
        return opt, step
    raise KeyError(key)


# ---------------------------------------------------------------------------------------------
# bytes per parameter

def elem_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def bytes_per_param(key: str, param_dtype: torch.dtype, grad_dtype: torch.dtype | None = None,
                    state_dtypes: torch.dtype | dict | None = None) -> int:
    """Bytes one step of optimizer ``key`` moves per parameter in an ideal implementation (each
    tensor read once per pass that needs it, each written once), from the element sizes P of the
    parameter, G of its gradient (default: the parameter's dtype) and M, V, MU of its exp_avg,
    exp_avg_sq and mu state. ``state_dtypes``: one dtype for all three, or a dict keyed by state
    key (``exp_avg``, ``exp_avg_sq``, ``mu``) or by ``m``, ``v``, ``mu``, as
    :func:`read_state_dtypes` gives it; what it leaves out has the parameter's dtype.

        AdamW (fused, foreach):  reads p, g, m, v; writes p, m, v          2P +  G + 2M + 2V
        GrokAdamW:  phase 1 reads g; phase 2 reads p, g, m, v, mu and
                    writes p, m, v, mu                                     2P + 2G + 2M + 2V + 2MU
        SuperGrok:  phase 1 reads g, mu; phase 2 as GrokAdamW             2P + 2G + 2M + 2V + 3MU

    fp32 everything: 28, 40, 44 (BYTES_PER_PARAM); bf16 everything: 14, 20, 22; bf16
    parameters and gradients with fp32 state (shardgrok's ``state_dtype=None`` default for bf16
    parameters): 22, 32, 36.
    """
    family = FAMILY[key]
    p = elem_size(param_dtype)
    g = elem_size(grad_dtype if grad_dtype is not None else param_dtype)
    if state_dtypes is None or isinstance(state_dtypes, torch.dtype):
        m = v = mu = elem_size(state_dtypes if state_dtypes is not None else param_dtype)
    else:
        named = {STATE_NAMES.get(k, k): d for k, d in state_dtypes.items()}
        m, v, mu = (elem_size(named.get(name, param_dtype)) for name in ("m", "v", "mu"))
    if family == "adamw":
        return 2 * p + g + 2 * m + 2 * v
    if family == "grok":
        return 2 * p + 2 * g + 2 * m + 2 * v + 2 * mu
    return 2 * p + 2 * g + 2 * m + 2 * v + 3 * mu


def read_state_dtypes(opt, params) -> dict[str, torch.dtype]:
    """{'m': dtype, 'v': dtype, 'mu': dtype} of the state the optimizer holds for its first
    parameter that has any (read after a step: the optimizer chose them, not this script)."""
    for p in params:
        st = opt.state.get(p)
        if not st:
            continue
        out = {}
        for k, name in STATE_NAMES.items():
            t = st.get(k)
            if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dim() > 0:
                out[name] = t.dtype
        if out:
            return out
    return {}


# ---------------------------------------------------------------------------------------------
# timing and rows

@contextlib.contextmanager
def gc_paused():
    """No garbage collection inside a timed region (a collection there is not the step's)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def timed_steps(step, n: int) -> list[float]:
    """Seconds of each of ``n`` consecutive ``step()`` calls, by perf_counter."""
    times = []
    with gc_paused():
        for _ in range(n):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
    return times


def warm_up(measure_one, warmup: int, max_seconds: float) -> tuple[list[float], float]:
    """``warmup`` calls of ``measure_one()`` (at least 1: the first step allocates the state), cut
    short once past a quarter of the time box; (what each returned, the seconds they took)."""
    warm, t_start = [], time.perf_counter()
    for _ in range(max(1, warmup)):
        warm.append(measure_one())
        if time.perf_counter() - t_start > max_seconds / 4:
            break
    return warm, time.perf_counter() - t_start


def step_estimate(warm: list[float]) -> float:
    """One step's time from the warm-up: the fastest after the first (which allocates), so a lone
    slow step on a busy machine does not cut a fast optimizer's steps."""
    return min(warm[1:] if len(warm) > 1 else warm)


def error_note(prefix: str, e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{prefix}{type(e).__name__}: {msg[0] if msg else ''}"[:200]


def set_ratios(rows) -> None:
    """Each timed row's ``ratio_to_adamw_fused``: its median over the baseline's, same run."""
    rows = list(rows)
    base = next((r["median_ms"] for r in rows if r["optimizer"] == BASELINE), None)
    for row in rows:
        if base and row["median_ms"] is not None:
            row["ratio_to_adamw_fused"] = row["median_ms"] / base


def fmt(x, spec, none="-"):
    return none if x is None else format(x, spec)


# ---------------------------------------------------------------------------------------------
# provenance and results files

def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def git_state(root: str = ROOT) -> tuple[str | None, bool | None]:
    """(HEAD's commit, whether a tracked file differs from it) of the checkout at ``root``;
    (None, None) outside a git checkout or without git. Untracked files do not count: a new
    results file would otherwise make every later run dirty."""
    def git(*args):
        return subprocess.run(["git", "-C", root, *args], capture_output=True, text=True,
                              timeout=30, check=True).stdout.strip()
    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None, None
    return commit, dirty


# Environment variables that change what a benchmark measures, recorded in front of its command.
_ENV_PREFIXES = ("SHARDGROK_",)
_ENV_NAMES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "CUDA_VISIBLE_DEVICES")


def command_line(prog: str, argv: list[str] | None, launcher: list[str] | None = None) -> str:
    """The run's command, to paste into a shell: the settings from the environment that change
    what is measured, the launcher (``launcher`` when given; else the interpreter, under torchrun
    as ``python -m torch.distributed.run`` with its process counts), the script (as started, or
    ``prog`` when ``main()`` was called with ``argv``) and its arguments."""
    env = [f"{k}={os.environ[k]}" for k in sorted(os.environ)
           if k.startswith(_ENV_PREFIXES) or k in _ENV_NAMES]
    if launcher is None:
        launcher = [sys.executable]
        if "TORCHELASTIC_RUN_ID" in os.environ:
            per_node = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
            launcher += ["-m", "torch.distributed.run", f"--nproc-per-node={per_node}"]
            nodes = int(os.environ.get("WORLD_SIZE", per_node)) // max(1, per_node)
            if nodes > 1:
                launcher.append(f"--nnodes={nodes}")
    args = [*sys.argv] if argv is None else [prog, *argv]
    return " ".join(shlex.quote(a) for a in env + launcher + args)


def provenance(prog: str, argv: list[str] | None = None, *, gpu: str | None = None,
               threads: int | None = None, launcher: list[str] | None = None) -> dict:
    """Where a results file came from: ``command`` (:func:`command_line`), ``git_commit`` and
    ``git_dirty`` (:func:`git_state`), ``date`` (local time with its offset), ``cpu`` (the
    model) and ``cpu_count``, ``threads`` (torch's, unless the work runs elsewhere with
    ``threads``), and ``gpu`` (the CUDA device's name, for a GPU run; else None). Call it after
    the thread count is set."""
    commit, dirty = git_state()
    return {
        "command": command_line(prog, argv, launcher),
        "git_commit": commit,
        "git_dirty": dirty,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads() if threads is None else threads,
        "gpu": gpu,
    }


def provenance_lines(prov: dict, prefix: str = "  ") -> list[str]:
    """:func:`provenance` as the header lines of a text results file."""
    if prov["git_commit"] is None:
        commit = "unknown (not a git checkout)"
    else:
        commit = prov["git_commit"] + (" (dirty: tracked files differ from it)" if prov["git_dirty"]
                                       else " (clean)")
    lines = [("date", prov["date"]), ("command", prov["command"]), ("commit", commit),
             ("cpu", f"{prov['cpu']} ({prov['cpu_count']} logical CPUs), threads {prov['threads']}")]
    if prov.get("gpu"):
        lines.append(("gpu", prov["gpu"]))
    return [f"{prefix}{name + ':':<10}{value}" for name, value in lines]


def versions(package_cls) -> dict:
    """The versions a step benchmark's numbers depend on."""
    return {"torch": torch.__version__, "shardgrok": shardgrok.__version__,
            "grokadamw": (getattr(sys.modules.get("grokadamw"), "__version__", None)
                          if package_cls else None),
            "python": platform.python_version()}


def write_json(path: str, doc: dict) -> None:
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)


def main(argv: list[str] | None = None) -> int:
    """``python benchmarks/step_common.py LAUNCHER SCRIPT [ARGS...]``: the provenance lines of a
    run of a script that is not Python (gpu_check.sh), with the GPU's name where CUDA is
    available, for the top of its results files."""
    words = sys.argv[1:] if argv is None else argv
    if len(words) < 2:
        raise SystemExit("usage: step_common.py LAUNCHER SCRIPT [ARGS...]")
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    print("\n".join(provenance_lines(provenance(words[1], words[2:], gpu=gpu,
                                                   launcher=words[:1]))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
