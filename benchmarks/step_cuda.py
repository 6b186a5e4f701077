"""Median optimizer-step time on a CUDA GPU: shardgrok's GrokAdamW and SuperGrok against torch
AdamW (fused, foreach), with each row's effective bandwidth against the device's copy bandwidth.

    python benchmarks/step_cuda.py --json benchmarks/results/step_<gpu>.json
    python benchmarks/step_cuda.py --quick              # smoke run (10M/50, 3 steps x 3 repeats)
    python benchmarks/step_cuda.py --dtype bf16 --json benchmarks/results/step_<gpu>_bf16.json
    python benchmarks/step_cuda.py --sizes 1B/200 --only grok,super
    python benchmarks/step_cuda.py --emulated --sizes 20k/10 --steps 1 --repeats 1  # no GPU

``--device`` is the CUDA device the model and the optimizers live on: ``cuda`` (the default:
torch's current device) or ``cuda:N``. Without CUDA the program exits with status 2 and says
so; the CPU run is ``benchmarks/step_cpu.py``.

``--emulated`` runs the same code path without a GPU, for CI and ``gpu_check.sh --dry-run``:
the rows on CPU tensors, shardgrok's with ``backend="cuda-emulated"`` (the CUDA kernels
compiled for the host), torch AdamW on the CPU, times by ``perf_counter``, no copy bandwidth
(its columns print ``-``), no peak memory. Its times are those of the emulation, never GPU
figures.

The model (default 100M/200 and 1B/200) is a transformer-like mix of shapes (``--layout
transformer``: an embedding matrix and, per block, four weight matrices and eight vectors) on
the device. The optimizers run one after the other, each on a fresh copy of the model, and each
one's parameters, gradients and state are let go (they live in one function call; then
``gc.collect()`` and ``torch.cuda.empty_cache()``) before the next is built; the memory each
needs is estimated and printed first, and a row (or a whole size) that would not fit in
``torch.cuda.mem_get_info()`` is skipped, saying so. A row's time is the median over
``--repeats`` repeats of a ``torch.cuda.Event`` pair around ``--steps`` consecutive steps (after
warm-up), divided by the steps; ``torch.cuda.synchronize()`` runs only outside the timed
region. The shardgrok rows are built as in the CPU run (``backend`` left to the optimizers' own
rule: the CUDA kernel when it is built, else the reference path) and print the backend their
steps used.

The same run measures the device-to-device copy bandwidth (``dst.copy_(src)`` of a
``--copy-mib`` MiB tensor, 2 x nbytes moved per copy, median of repeats) and reports each row's
effective bandwidth (``bytes_per_param`` in step_common.py, from the dtypes of the parameter,
its gradient and the state the optimizer holds after its first step) as a fraction of it.

Every output records its provenance (step_common.provenance: command line, git commit and
whether the tree was dirty, date, CPU model, thread count, GPU name): the header lines of the
printed tables, and the JSON's ``header``.
"""
from __future__ import annotations

import argparse
import gc
import math
import statistics
import sys
import time
import warnings

import torch

import step_common as C
from shardgrok import kernels

PROG = "benchmarks/step_cuda.py"
CUDA_DEFAULT = ["adamw-fused", "adamw-foreach", "grok", "super", "super-trained"]
CUDA_DEFAULT_SIZES = "100M/200,1B/200"
CUDA_QUICK_SIZES = "10M/50"
EMULATED_SIZES = "20k/10"  # --emulated: every CUDA thread is a fiber on the CPU
_NO_DEVICE = object()  # --device not given (not a string: argparse would parse it)

# The CUDA targets, at 1B parameters (printed as PASS/FAIL, never asserted):
# (description, row keys in order of preference, kind, limit). "ratio": step time over AdamW
# fused's <= limit; "copy": effective bandwidth at the row's bytes per parameter >= limit x the
# measured device-to-device copy bandwidth.
CUDA_TARGET_PARAMS = 10**9
CUDA_TARGETS = [
    ("GrokAdamW <= 1.45x AdamW fused at 1B params", ("grok", "grok-kernel"), "ratio", 1.45),
    ("SuperGrok (default meta-net) <= 2x AdamW fused at 1B params", ("super", "super-kernel"),
     "ratio", 2.0),
    ("GrokAdamW >= 80% of the copy bandwidth at its bytes/param, 1B params",
     ("grok", "grok-kernel"), "copy", 0.80),
    ("SuperGrok (default meta-net) >= 80% of the copy bandwidth at its bytes/param, 1B params",
     ("super", "super-kernel"), "copy", 0.80),
]


def parse_device(text: str) -> int | None:
    """'cuda' -> None (torch's current device), 'cuda:N' -> N."""
    t = text.strip().lower()
    if t == "cuda":
        return None
    if t.startswith("cuda:") and t[5:].isdigit():
        return int(t[5:])
    hint = " (the CPU run is benchmarks/step_cpu.py)" if t in ("cpu", "auto") else ""
    raise argparse.ArgumentTypeError(f"{text!r}: expected cuda or cuda:N{hint}")


def build_parser() -> argparse.ArgumentParser:
    p = C.build_parser(
        PROG, __doc__, CUDA_DEFAULT, sizes=CUDA_DEFAULT_SIZES, quick_sizes=CUDA_QUICK_SIZES,
        layout="transformer",
        steps="timed steps per repeat (default 10; --quick: 3)",
        warmup="untimed warm-up steps (default 3; --quick: 1)",
        quick=f"{CUDA_QUICK_SIZES}, 3 steps x 3 repeats")
    p.add_argument("--device", type=parse_device, default=_NO_DEVICE, metavar="{cuda,cuda:N}",
                   help="the CUDA device (default cuda: torch's current device)")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed repeats of --steps steps per optimizer, the median reported "
                        "(default 5; --quick: 3; the time box keeps at least 3)")
    p.add_argument("--copy-mib", type=float, default=None,
                   help="size of the tensor the copy bandwidth is measured with, MiB "
                        "(default 1024; --quick: 64)")
    p.add_argument("--emulated", action="store_true",
                   help="no GPU: the rows on CPU tensors, shardgrok's on the emulated CUDA target "
                        "(backend='cuda-emulated'), torch AdamW on the CPU; no copy bandwidth; "
                        "its times are not GPU figures (a check of this script, for CI). "
                        f"Defaults: {EMULATED_SIZES}, 3 steps x 3 repeats after 1 warm-up "
                        "(--quick: 1 x 1)")
    return p


# ---------------------------------------------------------------------------------------------
# the device

def memory_estimate(key: str, shapes: list[tuple[int, ...]], dtype: torch.dtype) -> dict[str, int]:
    """Device bytes row ``key`` needs at most, estimated before anything is allocated: its own
    copy of the parameters and gradients, its state, the temporaries of its step, and slack
    for the allocator (256 MiB + 3%). shardgrok's state is counted as fp32 for low-precision
    parameters (its ``state_dtype=None`` default; the worst case either way), torch AdamW's in
    the parameters' dtype. Temporaries: AdamW foreach makes sqrt(v) of every tensor at once;
    the shardgrok reference path works tensor by tensor (fp64 copies for its sums, fp32 work
    copies: 24 B per element of the largest tensor) and SuperGrok's keeps h = exp(f(g)) g of
    every tensor in fp32 from phase 1 to phase 2. A row whose backend is left to the
    optimizer is counted as the reference (what it falls back to)."""
    n = sum(math.prod(s) for s in shapes)
    big = max(math.prod(s) for s in shapes)
    p = C.elem_size(dtype)
    family = C.FAMILY[key]
    model = 2 * n * p
    if family == "adamw":
        state = 2 * n * p
        temp = n * p if key == "adamw-foreach" else 0
    elif key == "grokadamw-pkg":
        state = 0  # kept on the host and moved to the device tensor by tensor
        temp = big * (3 * p + 24)
    else:
        state = 3 * n * max(p, 4)
        temp = 24 * big
        if family == "super" and key not in ("super-kernel", "super-kernel-trained"):
            temp += 4 * n
    slack = 256 * 1024**2 + (model + state + temp) * 3 // 100
    return {"model": model, "state": state, "temporaries": temp, "slack": slack,
            "total": model + state + temp + slack}


class CudaDevice:
    """What the CUDA run asks of the device, in one place (the tests stand a CPU double in)."""

    def __init__(self, index: int | None = None):
        self.device = torch.device("cuda", torch.cuda.current_device() if index is None else index)

    def describe(self) -> dict:
        props = torch.cuda.get_device_properties(self.device)
        free, total = self.mem_get_info()
        return {"device_name": torch.cuda.get_device_name(self.device),
                "device": str(self.device), "capability": f"{props.major}.{props.minor}",
                "multiprocessors": props.multi_processor_count, "cuda": torch.version.cuda,
                "memory_total_bytes": total, "memory_free_bytes_at_start": free}

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)

    def elapsed_ms(self, fn, n: int) -> float:
        """Milliseconds of ``n`` consecutive ``fn()`` calls, between a pair of CUDA events;
        synchronised before and after, outside the events."""
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        self.synchronize()
        start.record()
        for _ in range(n):
            fn()
        end.record()
        self.synchronize()
        return start.elapsed_time(end)

    def mem_get_info(self) -> tuple[int, int]:
        return torch.cuda.mem_get_info(self.device)

    def free_cache(self) -> None:
        gc.collect()
        torch.cuda.empty_cache()

    def reset_peak(self) -> None:
        torch.cuda.reset_peak_memory_stats(self.device)

    def peak_bytes(self) -> int:
        return torch.cuda.max_memory_allocated(self.device)

    def generator(self, seed: int) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(seed)


class EmulatedDevice:
    """``--emulated``: what the run asks of the device, answered on the CPU for the emulated CUDA
    target (CPU tensors, ``backend="cuda-emulated"``). Times are ``perf_counter``; free memory is
    the host's MemAvailable; no peak memory is tracked."""

    kernel_backend = "cuda-emulated"

    def __init__(self):
        self.device = torch.device("cpu")

    def describe(self) -> dict:
        free, total = self.mem_get_info()
        return {"device_name": f"emulated CUDA target on the CPU ({C.cpu_model()})",
                "device": "cpu", "capability": None, "multiprocessors": None,
                "cuda": torch.version.cuda, "memory_total_bytes": total,
                "memory_free_bytes_at_start": free}

    def synchronize(self) -> None:
        pass

    def elapsed_ms(self, fn, n: int) -> float:
        t = time.perf_counter()
        for _ in range(n):
            fn()
        return (time.perf_counter() - t) * 1e3

    def mem_get_info(self) -> tuple[int, int]:
        info = {}
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    name, _, rest = line.partition(":")
                    info[name] = int(rest.split()[0]) * 1024
        except (OSError, ValueError, IndexError):
            pass
        total = info.get("MemTotal", 64 * C.GiB)
        return info.get("MemAvailable", total // 2), total

    def free_cache(self) -> None:
        gc.collect()

    def reset_peak(self) -> None:
        pass

    def peak_bytes(self) -> None:
        return None

    def generator(self, seed: int) -> torch.Generator:
        return torch.Generator().manual_seed(seed)


def copy_bandwidth(dev, nbytes: int, repeats: int, copies: int = 10) -> dict:
    """Device-to-device copy bandwidth: ``dst.copy_(src)`` of an fp32 tensor of ``nbytes``,
    ``copies`` per timed repeat; 2 x nbytes move per copy (read + write); the median repeat."""
    numel = max(1, int(nbytes) // 4)
    src = torch.empty(numel, dtype=torch.float32, device=dev.device).fill_(1.0)
    dst = torch.empty_like(src)
    try:
        dst.copy_(src)  # warm-up
        with C.gc_paused():
            times = [dev.elapsed_ms(lambda: dst.copy_(src), copies) / copies for _ in range(repeats)]
    finally:
        del src, dst
        dev.free_cache()
    med = statistics.median(times)
    moved = 2 * numel * 4
    return {"tensor_bytes": numel * 4, "bytes_per_copy": moved, "copies_per_repeat": copies,
            "repeats": repeats, "times_ms": times, "median_ms": med,
            "bytes_per_s": moved / (med * 1e-3), "gbps": moved / (med * 1e-3) / 1e9}


def emulated_kernel_status() -> str:
    """shardgrok's word on the emulated CUDA target (``--emulated``), for the header."""
    try:
        emu = kernels.status(emulated=True).get("cuda_emulated") or {}
    except Exception as e:
        return f"unknown ({type(e).__name__}: {e})"
    if emu.get("available"):
        return "available" + (f" ({emu['origin']})" if emu.get("origin") else "")
    return f"unavailable ({emu.get('reason') or 'no reason given'})"


def cuda_kernel_status() -> str:
    """shardgrok's own word on its CUDA kernel (python -m shardgrok.kernels), for the header."""
    try:
        cuda = kernels.status().get("cuda") or {}
    except Exception as e:
        return f"unknown ({type(e).__name__}: {e})"
    if cuda.get("available"):
        return "available" + (f" ({cuda['origin']})" if cuda.get("origin") else "")
    return f"unavailable ({cuda.get('reason') or 'no reason given'})"


# ---------------------------------------------------------------------------------------------
# rows

def backend_of(key: str, opt) -> str:
    """The backend the row's last step used: shardgrok's own report, else what torch runs."""
    if key == "adamw-fused":
        return "torch fused"
    if key == "adamw-foreach":
        return "torch foreach"
    if key == "grokadamw-pkg":
        return "grokadamw"
    backend = None
    try:
        backend = opt.get_state_summary().get("backend")
    except Exception:
        pass
    if backend is None:
        backend = getattr(opt, "_last_report", {}).get("backend")
    return "?" if backend is None else str(backend)


def run_row(key: str, shapes, dtype, args, package_cls, dev, row: dict) -> None:
    """Build row ``key``'s model and optimizer on the device, warm up, time; fill ``row``.
    Everything it allocates is local: it is freed when this returns (or raises)."""
    gen = dev.generator(args.seed)  # every row starts from the same model
    params = []
    for shape in shapes:
        p = torch.empty(shape, dtype=dtype, device=dev.device).normal_(0.0, 0.02, generator=gen)
        g = torch.empty_like(p).normal_(0.0, 1e-3, generator=gen)
        p = torch.nn.Parameter(p)
        p.grad = g
        params.append(p)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt, step = C.make_stepper(key, params, package_cls,
                                   kernel_backend=getattr(dev, "kernel_backend", None))
        warm, warm_s = C.warm_up(lambda: dev.elapsed_ms(step, 1), args.warmup, args.max_seconds)
    fallback = [str(w.message) for w in caught if "reference" in str(w.message).lower()]
    state_dtypes = C.read_state_dtypes(opt, params)
    row["backend"] = backend_of(key, opt)
    row["state_dtypes"] = {k: str(d).replace("torch.", "") for k, d in state_dtypes.items()}
    row["bytes_per_param"] = C.bytes_per_param(key, params[0].dtype, params[0].grad.dtype,
                                               state_dtypes or None)
    row["warmup_steps"] = len(warm)
    if fallback:
        row["note"] = f"fallback: {fallback[0]}"[:200]
    # time box (warm-up included): fewer steps per repeat, then fewer repeats (at least 3)
    est = C.step_estimate(warm)
    box = max(args.max_seconds - warm_s, 0.0) * 1e3
    steps, repeats = args.steps, args.repeats
    if est * steps * repeats > box:
        steps = max(1, min(steps, int(box / max(est * repeats, 1e-9))))
        if est * steps * repeats > box:
            repeats = max(min(3, repeats), min(repeats, int(box / max(est * steps, 1e-9))))
    try:
        with C.gc_paused():
            times = [dev.elapsed_ms(step, steps) / steps for _ in range(repeats)]
    except Exception as e:
        row["note"] = C.error_note("error while timing: ", e)
        times = []
    row["peak_memory_bytes"] = dev.peak_bytes()
    row["steps_per_repeat"], row["repeats"], row["times_ms"] = steps, repeats, times
    if times:
        row["median_ms"] = statistics.median(times)
        if (steps < args.steps or repeats < args.repeats) and row["note"] is None:
            row["note"] = (f"time-boxed: {repeats} x {steps} of {args.repeats} x {args.steps} "
                           "steps")


def bench_size(label: str, n: int, count: int, keys: list[str], args, package_cls, dev,
               copy: dict | None) -> dict:
    dtype = C.DTYPES[args.dtype]
    shapes = C.make_shapes(n, count, args.layout)
    dev.free_cache()
    free, total = dev.mem_get_info()
    est = {k: memory_estimate(k, shapes, dtype) for k in keys}
    info = {"size": label, "params": n, "tensors": count, "layout": args.layout,
            "shapes": C.describe_shapes(shapes), "largest_tensor": max(math.prod(s) for s in shapes),
            "memory_free_bytes": free, "memory_total_bytes": total, "skipped": None, "results": []}
    print(f"\n== {label}: {n:,} params in {count} tensors ({info['shapes']}), {args.dtype} ==")
    source = "host MemAvailable" if isinstance(dev, EmulatedDevice) else "torch.cuda.mem_get_info"
    print(f"memory: {free / C.GiB:.1f} GiB free of {total / C.GiB:.1f} GiB ({source}); "
          "needed per row, one row at a time, estimated before allocating:")
    for k in keys:
        e = est[k]
        print(f"  {C.ALL_OPTIMIZERS[k]:<42} {e['total'] / C.GiB:6.2f} GiB = params+grads "
              f"{e['model'] / C.GiB:.2f} + state {e['state'] / C.GiB:.2f} + temporaries "
              f"{e['temporaries'] / C.GiB:.2f} + slack {e['slack'] / C.GiB:.2f}")
    sys.stdout.flush()
    base = C.BASELINE
    if est[base]["total"] > free:
        info["skipped"] = (f"size {label} skipped: it does not fit; even {C.ALL_OPTIMIZERS[base]} "
                           f"needs {est[base]['total'] / C.GiB:.2f} GiB and "
                           f"{free / C.GiB:.2f} GiB are free")
        print(info["skipped"])
        return info

    rows: dict[str, dict] = {}
    for key in keys:
        row = {"optimizer": key, "label": C.ALL_OPTIMIZERS[key], "backend": None, "median_ms": None,
               "steps_per_repeat": 0, "repeats": 0, "warmup_steps": 0, "bytes_per_param": None,
               "state_dtypes": None, "bytes_per_s": None, "gbps": None, "fraction_of_copy": None,
               "ratio_to_adamw_fused": None, "memory_estimate_bytes": est[key]["total"],
               "peak_memory_bytes": None, "note": None, "times_ms": []}
        rows[key] = row
        if key == "grokadamw-pkg" and package_cls is None:
            row["note"] = "not installed"
            continue
        dev.free_cache()  # the previous row's model and state are gone
        free_now = dev.mem_get_info()[0]
        if est[key]["total"] > free_now:
            row["note"] = (f"skipped: needs {est[key]['total'] / C.GiB:.2f} GiB, "
                           f"{free_now / C.GiB:.2f} GiB free")
            continue
        dev.reset_peak()
        try:
            run_row(key, shapes, dtype, args, package_cls, dev, row)
        except Exception as e:  # torch.cuda.OutOfMemoryError among others
            row["note"] = C.error_note("error: ", e)
        dev.free_cache()  # after the except block: the exception's traceback held the tensors

    for row in rows.values():
        if row["median_ms"] is not None:
            row["bytes_per_s"] = row["bytes_per_param"] * n / (row["median_ms"] * 1e-3)
            row["gbps"] = row["bytes_per_s"] / 1e9
            row["fraction_of_copy"] = row["gbps"] / copy["gbps"] if copy else None
    C.set_ratios(rows.values())
    info["results"] = [rows[k] for k in keys]
    print_table(info["results"])
    return info


# ---------------------------------------------------------------------------------------------
# report

def print_table(rows: list[dict]) -> None:
    head = (f"{'optimizer':<42} {'backend':<13} {'median ms':>10} {'x fused':>8} {'B/param':>8} "
            f"{'GB/s':>8} {'% copy':>7} {'peak GiB':>9} {'steps':>7}  note")
    print(head)
    print("-" * len(head))
    for r in rows:
        steps = f"{r['repeats']}x{r['steps_per_repeat']}" if r["times_ms"] else "-"
        frac = None if r["fraction_of_copy"] is None else 100 * r["fraction_of_copy"]
        peak = None if r["peak_memory_bytes"] is None else r["peak_memory_bytes"] / C.GiB
        print(f"{r['label']:<42} {r['backend'] or '-':<13} {C.fmt(r['median_ms'], '10.3f'):>10} "
              f"{C.fmt(r['ratio_to_adamw_fused'], '8.2f'):>8} {C.fmt(r['bytes_per_param'], '8.0f'):>8} "
              f"{C.fmt(r['gbps'], '8.1f'):>8} {C.fmt(frac, '7.1f'):>7} {C.fmt(peak, '9.2f'):>9} "
              f"{steps:>7}  {r['note'] or ''}")


def check_targets(sizes: list[dict], copy: dict | None, dtype: str) -> list[dict]:
    """The CUDA targets as PASS / FAIL / n/a lines, at the run's 1B-parameter size."""
    at = [s for s in sizes if s["params"] == CUDA_TARGET_PARAMS and s["results"]]
    out = []
    for desc, prefs, kind, limit in CUDA_TARGETS:
        entry = {"target": desc, "kind": kind, "limit": limit, "size": None, "optimizer": None,
                 "backend": None, "value": None, "passed": None, "dtype": dtype}
        if not at:
            entry["line"] = f"n/a   {desc}: no 1B-parameter size timed in this run"
        else:
            size = at[-1]
            by_key = {r["optimizer"]: r for r in size["results"]}
            base = by_key[C.BASELINE]
            row = next((by_key[k] for k in prefs if k in by_key and by_key[k]["median_ms"] is not None), None)
            entry["size"] = size["size"]
            if row is None or (kind == "ratio" and base["median_ms"] is None):
                entry["line"] = f"n/a   {desc}: not timed in this run"
            elif kind == "copy" and (copy is None or row["fraction_of_copy"] is None):
                entry["line"] = f"n/a   {desc}: no copy bandwidth measured in this run"
            else:
                who = f"{row['label']} [{row['backend']}]"
                entry.update(optimizer=row["optimizer"], backend=row["backend"])
                if kind == "ratio":
                    value = row["ratio_to_adamw_fused"]
                    passed = value <= limit
                    detail = (f"{who} {row['median_ms']:.3f} ms vs AdamW fused "
                              f"{base['median_ms']:.3f} ms: {value:.2f}x (need <= {limit:g}x)")
                else:
                    value = row["fraction_of_copy"]
                    passed = value >= limit
                    detail = (f"{who} {row['gbps']:.1f} GB/s at {row['bytes_per_param']:.0f} B/param "
                              f"= {100 * value:.1f}% of the copy bandwidth {copy['gbps']:.1f} GB/s "
                              f"(need >= {100 * limit:.0f}%)")
                entry.update(value=value, passed=passed)
                entry["line"] = f"{'PASS' if passed else 'FAIL'}  {desc}: {detail}"
        if dtype != "fp32":
            entry["line"] += f" [{dtype} run; the targets are stated for fp32]"
        out.append(entry)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    device_given = args.device is not _NO_DEVICE
    if not device_given:
        args.device = None
    if args.emulated and device_given:
        parser.error("--emulated runs on CPU tensors: it takes no --device")
    if not args.emulated and not torch.cuda.is_available():
        why = (f"this torch ({torch.__version__}) is built without CUDA" if torch.version.cuda is None
               else f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU")
        parser.error(f"--device cuda: CUDA is not available: {why}; run it on a machine with a "
                     "GPU, or run the CPU benchmark, benchmarks/step_cpu.py")
    if args.emulated:
        defaults = {"sizes": (EMULATED_SIZES, EMULATED_SIZES),
                    "layout": ("transformer", "transformer"), "steps": (3, 1), "warmup": (1, 1),
                    "repeats": (3, 1), "copy_mib": (1, 1)}
    else:
        defaults = {"sizes": (CUDA_DEFAULT_SIZES, CUDA_QUICK_SIZES),
                    "layout": ("transformer", "transformer"), "steps": (10, 3),
                    "warmup": (3, 1), "repeats": (5, 3), "copy_mib": (1024, 64)}
    C.resolve_args(args, parser, defaults, at_least_one=("steps", "repeats"))
    if args.copy_mib <= 0:
        parser.error("--copy-mib must be > 0")
    if args.device is not None and args.device >= torch.cuda.device_count():
        parser.error(f"--device cuda:{args.device}: torch sees {torch.cuda.device_count()} GPU(s)")
    keys = C.row_keys(args.only, CUDA_DEFAULT)

    dev = EmulatedDevice() if args.emulated else CudaDevice(args.device)
    package_cls = C.import_grokadamw() if "grokadamw-pkg" in keys else None
    gpu = dev.describe()
    kernel = emulated_kernel_status() if args.emulated else cuda_kernel_status()
    # the provenance's gpu: the GPU a run was on (none for the emulated target)
    prov = C.provenance(PROG, argv, gpu=None if args.emulated else gpu["device_name"])
    header = {
        **prov,
        **gpu,
        **C.versions(package_cls),
        "cuda_kernel": kernel,
        "dtype": args.dtype, "layout": args.layout,
        "steps": args.steps, "warmup": args.warmup, "repeats": args.repeats,
        "max_seconds": args.max_seconds,
        "emulated": args.emulated,
        "bytes_per_param_formula": C.BYTES_PER_PARAM_FORMULA,
    }
    if args.emulated:
        print("shardgrok step benchmark (CUDA code path on the emulated target: CPU tensors, "
              "backend='cuda-emulated'; no GPU, so no time below is a GPU figure)")
    else:
        print("shardgrok step benchmark (CUDA)")
    print("\n".join(C.provenance_lines(prov)))
    print(f"  torch {header['torch']} (CUDA {gpu['cuda']}), shardgrok {header['shardgrok']}, "
          f"grokadamw {header['grokadamw'] or 'not installed'}, python {header['python']}")
    if args.emulated:
        print(f"  device:   {gpu['device_name']}, {gpu['memory_total_bytes'] / C.GiB:.1f} GiB, "
              f"{gpu['memory_free_bytes_at_start'] / C.GiB:.1f} GiB available")
        print(f"  shardgrok emulated CUDA target: {kernel}; each row prints the backend its "
              "steps used")
        print(f"  timing:   median over {args.repeats} repeats of perf_counter around "
              f"{args.steps} consecutive steps, per step, after {args.warmup} warm-up; one "
              f"optimizer at a time, time box {args.max_seconds:g} s each")
    else:
        print(f"  device:   {gpu['device']}, compute capability {gpu['capability']}, "
              f"{gpu['multiprocessors']} SMs, {gpu['memory_total_bytes'] / C.GiB:.1f} GiB, "
              f"{gpu['memory_free_bytes_at_start'] / C.GiB:.1f} GiB free")
        print(f"  shardgrok CUDA kernel: {kernel}; each row prints the backend its steps used")
        print(f"  timing:   median over {args.repeats} repeats of a torch.cuda.Event pair around "
              f"{args.steps} consecutive steps, per step, after {args.warmup} warm-up; synchronize "
              f"outside the timed region; one optimizer at a time, time box {args.max_seconds:g} s each")
    sys.stdout.flush()

    t0 = time.perf_counter()
    dev.free_cache()
    if args.emulated:
        copy = None
        print("\ncopy bandwidth: not measured (--emulated: no device memory); GB/s below is "
              "the emulation's, % copy is empty")
    else:
        copy_bytes = int(args.copy_mib * 1024**2)
        free = dev.mem_get_info()[0]
        if 2 * copy_bytes > free // 2:  # src and dst in at most half of what is free
            copy_bytes = max(4, free // 4)
        copy = copy_bandwidth(dev, copy_bytes, max(5, args.repeats))
        print(f"\ncopy bandwidth: dst.copy_(src) of {copy['tensor_bytes'] / 1024**2:.0f} MiB, "
              f"2 x {copy['tensor_bytes'] / 1e9:.3f} GB moved per copy, median of {copy['repeats']} "
              f"repeats of {copy['copies_per_repeat']} copies: {copy['median_ms']:.3f} ms, "
              f"{copy['gbps']:.1f} GB/s")
    sys.stdout.flush()

    sizes = []
    for label, n, count in args.sizes:
        sizes.append(bench_size(label, n, count, keys, args, package_cls, dev, copy))
        sys.stdout.flush()
    print("\nB/param: bytes an ideal step moves per parameter, from the element sizes of the "
          "parameter (P), gradient (G) and the state the optimizer holds (M, V, MU): AdamW "
          "2P+G+2M+2V, GrokAdamW 2P+2G+2M+2V+2MU, SuperGrok 2P+2G+2M+2V+3MU. GB/s: B/param x "
          "params / median step time. % copy: that over the copy bandwidth above.")

    targets = check_targets(sizes, copy, args.dtype)
    print("\ntargets (at 1B params; printed, not asserted):")
    for t in targets:
        print(f"  {t['line']}")
    elapsed = time.perf_counter() - t0
    print(f"\n(total {elapsed:.0f} s)")

    if args.json:
        C.write_json(args.json, {"header": header, "elapsed_s": elapsed, "copy_bandwidth": copy,
                                 "targets": targets, "sizes": sizes})
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
