"""A few steps of GrokAdamW and SuperGrok on the CUDA kernel, small enough to run under
``compute-sanitizer`` (memcheck, racecheck): the cases that reach each path of the kernels.

    python benchmarks/gpu_sanitize_cases.py                       # every case, on the GPU
    compute-sanitizer --tool racecheck python benchmarks/gpu_sanitize_cases.py \\
        --cases super-shared,super-global --no-compare
    python benchmarks/gpu_sanitize_cases.py --emulated --tiny     # no GPU: the emulated target

Cases (``--cases``, default all):

- ``grok``: GrokAdamW over tensors of 1, 17, 2 chunks + 5 and 3 elements (phase 1's per-chunk
  and per-tensor reductions, phase 2 without a table);
- ``super-shared``: SuperGrok with a 32-wide ``SimpleMetaNet`` (nn.Linear's initialisation):
  a breakpoint table of at most ``SHARED_TABLE_MAX`` (2,048) entries, copied into shared memory
  by every block;
- ``super-global``: SuperGrok with a 1,024-wide ``SimpleMetaNet``: a table of more than 2,048
  entries, read from global memory;
- ``super-user``: SuperGrok with a user's meta-net (not a ``SimpleMetaNet``): PyTorch computes
  h on the device and the kernel reads it.

Each case runs ``--steps`` steps (default 3; the cosine gate live from the first,
``train_loss``/``val_loss`` given) with ``backend="kernel"`` on CUDA tensors, or, with
``--emulated``, ``backend="cuda-emulated"`` on CPU tensors (the same kernels compiled for the
host: CI's check of this script). Unless ``--no-compare``, the same steps with
``backend="reference"`` follow, and parameters, m, v and mu must agree within the fp32
tolerances of tests/kernels/test_kernel.py (FP32_RTOL 1e-6; 1e-5 for the 1,024-wide net, whose
fp32 MLP rounds differently from the exact table). ``--tiny`` shrinks the tensors (no
multi-chunk tensor) for a slow emulated run. Exit status: 0 when every case ran on the
requested backend (and agreed), 1 otherwise, 2 for bad arguments.
"""
from __future__ import annotations

import argparse
import copy
import sys
import time

import torch
from torch import nn

import step_common as C  # the repository root on sys.path, and the provenance lines
import shardgrok
from shardgrok.kernels import cuda as kcuda
from shardgrok.metanet.table import build_table, is_tabulable, kernel_arrays

PROG = "benchmarks/gpu_sanitize_cases.py"
CASES = ("grok", "super-shared", "super-global", "super-user")
FP32_RTOL = 1e-6       # tests/kernels/test_kernel.py's FP32_RTOL
WIDE_RTOL = 1e-5       # its FP32_RTOL_TRAINED: an fp32 MLP with many terms against the table
CHUNK = 16384          # csrc/job.h's CHUNK (the extension's own value is used when it loads)
SHARED_TABLE_MAX = 2048  # csrc/cuda/launch.h's (likewise)


def parse_cases(text: str) -> list[str]:
    out = [c.strip() for c in text.split(",") if c.strip()]
    bad = [c for c in out if c not in CASES]
    if bad or not out:
        raise argparse.ArgumentTypeError(f"unknown case(s) {bad}; choose from {', '.join(CASES)}")
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", type=parse_cases, default=list(CASES),
                   help=f"comma list of {', '.join(CASES)} (default all)")
    p.add_argument("--steps", type=int, default=3, help="steps per case (default 3)")
    p.add_argument("--emulated", action="store_true",
                   help="no GPU: CPU tensors, backend='cuda-emulated'")
    p.add_argument("--tiny", action="store_true", help="small tensors only (no multi-chunk one)")
    p.add_argument("--no-compare", action="store_true",
                   help="skip the reference run (under a sanitizer: its kernels are not ours)")
    return p


def sizes_for(case: str, tiny: bool, chunk: int) -> list[int]:
    if case == "super-global":  # the table is what matters; the reference MLP is 1,024 wide
        return [1, 17, 300] if tiny else [1, 17, chunk + 5]
    return [1, 17, 300, 3] if tiny else [1, 17, 2 * chunk + 5, 3]


def make_net(case: str) -> nn.Module | None:
    torch.manual_seed(0)
    if case == "grok":
        return None
    if case == "super-user":
        return nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1))
    net = shardgrok.SimpleMetaNet(32 if case == "super-shared" else 1024)
    with torch.no_grad():  # nn.Linear's initialisation: kinks spread where the gradients are
        for m in net.net:
            if isinstance(m, nn.Linear):
                m.reset_parameters()
    return net


def table_entries(opt, net: nn.Module | None) -> int | None:
    """The size of the breakpoint table the kernel got (None: no table): the optimizer's cached
    table after its steps, else the table built here from ``net``."""
    if net is None or not is_tabulable(net):
        return None
    cached = getattr(opt, "_table_cache", None)
    if cached is not None:
        return cached[1].breakpoints.numel()
    return kernel_arrays(build_table(net)).breakpoints.numel()


def run_case(case: str, backend: str, device: torch.device, sizes: list[int], steps: int,
             net: nn.Module | None):
    gen = torch.Generator().manual_seed(0)
    params = [nn.Parameter(torch.randn(n, generator=gen).to(device)) for n in sizes]
    if case == "grok":
        opt = shardgrok.GrokAdamW(params, lr=1e-2, backend=backend)
    else:
        opt = shardgrok.SuperGrok(params, lr=1e-2, warmup_steps=0, backend=backend,
                                  meta_net=copy.deepcopy(net).to(device))
    for t in range(steps):
        g = torch.Generator().manual_seed(1000 + t)
        for p in params:
            p.grad = torch.randn(p.shape, generator=g).to(device)
        if case == "grok":
            opt.step()
        else:
            opt.step(train_loss=1.0, val_loss=1.5)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return params, opt


def worst_difference(a, b) -> float:
    """Over parameters, m, v and mu: max |a - b| over the largest |b| of that quantity."""
    (pa, oa), (pb, ob) = a, b
    worst = 0.0
    for key in ("param", "exp_avg", "exp_avg_sq", "mu"):
        xs = [(p.detach() if key == "param" else oa.state[p][key]) for p in pa]
        ys = [(q.detach() if key == "param" else ob.state[q][key]) for q in pb]
        scale = max((float(y.double().abs().max()) for y in ys if y.numel()), default=0.0)
        for x, y in zip(xs, ys, strict=True):
            if not x.numel():
                continue
            x, y = x.double().cpu(), y.double().cpu()
            if not (bool(torch.isfinite(x).all()) and bool(torch.isfinite(y).all())):
                return float("inf")
            d = float((x - y).abs().max())
            worst = max(worst, d / scale if scale else (0.0 if d == 0 else float("inf")))
    return worst


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be >= 1")
    if args.emulated:
        backend, device = "cuda-emulated", torch.device("cpu")
        ext = kcuda.emulated_extension()
        reason = kcuda.emulated_unavailable_reason()
    else:
        if not torch.cuda.is_available():
            parser.error("CUDA is not available here; --emulated runs these cases on the "
                         "emulated CUDA target (CPU tensors)")
        backend, device = "kernel", torch.device("cuda", torch.cuda.current_device())
        ext = kcuda.cuda_extension()
        reason = kcuda.unavailable_reason()
    gpu = None if args.emulated else torch.cuda.get_device_name(device)
    print(f"shardgrok sanitizer cases ({'emulated CUDA target, CPU tensors' if args.emulated else 'CUDA'})")
    print("\n".join(C.provenance_lines(C.provenance(PROG, argv, gpu=gpu))))
    if ext is None:
        print(f"FAIL  the {'emulated target' if args.emulated else 'CUDA kernel'} is "
              f"unavailable: {reason}")
        return 1
    chunk = int(getattr(ext, "CHUNK", CHUNK))
    shared_max = int(getattr(ext, "SHARED_TABLE_MAX", SHARED_TABLE_MAX))
    print(f"  backend {backend!r} on {device}; CHUNK {chunk}, SHARED_TABLE_MAX {shared_max}; "
          f"{args.steps} steps per case{'' if args.no_compare else ', then the reference'}")
    sys.stdout.flush()
    failed = 0
    for case in args.cases:
        t0 = time.perf_counter()
        net = make_net(case)
        sizes = sizes_for(case, args.tiny, chunk)
        problems, entries, diff = [], None, None
        try:
            got = run_case(case, backend, device, sizes, args.steps, net)
            used = got[1].get_state_summary()["backend"]
            if used != backend:
                problems.append(f"its steps used backend {used!r}")
            entries = table_entries(got[1], net)
            if case == "super-shared" and (entries is None or entries > shared_max):
                problems.append(f"the table has {entries} entries: not the shared-memory case")
            if case == "super-global" and (entries is None or entries <= shared_max):
                problems.append(f"the table has {entries} entries: not the global-memory case")
            if not args.no_compare:
                want = run_case(case, "reference", device, sizes, args.steps, net)
                diff = worst_difference(got, want)
                tol = WIDE_RTOL if case == "super-global" else FP32_RTOL
                if not diff <= tol:
                    problems.append(f"differs from the reference by {diff:.3g} > {tol:g}")
        except Exception as e:  # a launch error, an unsupported tensor: the case fails
            problems.append(C.error_note("error: ", e))
        where = ("no table" if case == "grok" else
                 "user meta-net: h from PyTorch" if case == "super-user" else
                 "table not built" if entries is None else
                 f"{entries}-entry table in {'shared' if entries <= shared_max else 'global'} memory")
        detail = f"sizes {sizes}, {where}"
        if diff is not None:
            detail += f", worst difference from the reference {diff:.2e}"
        status = "FAIL" if problems else "ok  "
        print(f"{status}  {case}: {detail} ({time.perf_counter() - t0:.1f} s)"
              + ("".join(f"\n      {p}" for p in problems)))
        sys.stdout.flush()
        failed += bool(problems)
    print(f"{len(args.cases) - failed} of {len(args.cases)} cases ok")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
