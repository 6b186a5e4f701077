"""The CUDA kernel without a GPU: nvcc compiles every .cu file for sm_80 and sm_90 with warnings
as errors and no register spills; the glue links and imports; and what the kernel reads or sums
in a fixed order is checked on the host (the chunk table, the per-tensor chunk index, the
segment records, the summation order of csrc/cuda/order.h).

CI has nvcc and no GPU: there these tests must run (CI=true makes a missing nvcc a failure).
The per-element math the kernel shares with the CPU kernel (csrc/grok_math.h) is tested against
the reference in test_kernel.py and test_kernel_header.py.
"""
from __future__ import annotations

import math
import os
import re
import shutil
import struct
import subprocess
import sys
import sysconfig

import pytest
import torch
import torch.utils.cpp_extension

from shardgrok.kernels import build

NVCC = shutil.which("nvcc")
needs_nvcc = pytest.mark.skipif(NVCC is None and os.environ.get("CI") != "true",
                                reason="nvcc is not on the PATH (CI has it: there this fails)")

CU_FILES = sorted(str(p.relative_to(build.CSRC)) for p in (build.CSRC / "cuda").glob("*.cu"))


def test_the_cuda_sources_are_what_build_uses():
    assert CU_FILES and set(CU_FILES) <= set(build.CUDA_SOURCES)
    assert build.cuda_sources_present()


@pytest.fixture(scope="module")
def objects(tmp_path_factory):
    """Each .cu file compiled for each CI architecture: {(file, arch): (object path, output)}."""
    if NVCC is None:
        pytest.fail("nvcc is not on the PATH")
    out_dir = tmp_path_factory.mktemp("nvcc")
    done = {}
    for source in CU_FILES:
        for arch in build.CI_ARCHS:
            obj = out_dir / f"{source.replace('/', '_')}.sm_{arch}.o"
            cmd = build.nvcc_check_command(source, arch, str(obj)) + ["-Xcompiler", "-fPIC"]
            r = subprocess.run(cmd, capture_output=True, text=True)
            done[(source, arch)] = (obj, r.returncode, r.stdout + r.stderr)
    return done


@needs_nvcc
@pytest.mark.parametrize("arch", build.CI_ARCHS)
@pytest.mark.parametrize("source", CU_FILES)
def test_cu_compiles_with_no_warnings_and_no_spills(objects, source, arch):
    obj, rc, log = objects[(source, arch)]
    assert rc == 0, f"nvcc failed for {source} sm_{arch}:\n{log}"
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    kernels = re.findall(r"Function properties for (\S+)", log)
    # both kinds' phase-1, reduction and phase-2 kernels: six entry points
    assert len(kernels) >= 6, log
    assert len(spills) == len(kernels), log
    assert all(s == ("0", "0") for s in spills), f"register spills in {source} sm_{arch}:\n{log}"


@needs_nvcc
def test_cuda_glue_links_and_imports_without_a_gpu(objects, tmp_path, ext):
    """The whole CUDA extension (glue + kernels) links against the CUDA runtime and imports;
    without a GPU it says so by a clear error instead of crashing."""
    obj = objects[("cuda/kernels.cu", build.CI_ARCHS[0])][0]
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    so = tmp_path / f"shardgrok_cuda_check{suffix}"
    includes = [f"-I{p}" for p in (build.CSRC, sysconfig.get_paths()["include"],
                                   *torch.utils.cpp_extension.include_paths())]
    cmd = [NVCC, "-shared", "-Xcompiler", "-fPIC,-Wall,-Wextra,-Werror", "-Werror",
           "all-warnings", *build.CUDA_FLAGS, *includes, str(build.CSRC / "cuda/bindings.cpp"),
           str(obj), "-o", str(so), f"-gencode=arch=compute_{build.CI_ARCHS[0]},code=sm_{build.CI_ARCHS[0]}"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    probe = (
        "import json, shardgrok_cuda_check as m\n"
        "out = dict(seg=m.SEGMENT_BYTES, chunk=m.CHUNK_BYTES, CHUNK=m.CHUNK, n=m.device_count())\n"
        "try:\n"
        "    m.phase2(0, 16, 16, 1, 1, 16)\n"  # addresses never read: no device to launch on
        "    out['error'] = None\n"
        "except RuntimeError as e:\n"
        "    out['error'] = str(e)\n"
        "try:\n"
        "    m.phase1(7, 0, 0, 0, 0, 0, 0, 0, 0)\n"
        "except ValueError as e:\n"
        "    out['kind_error'] = str(e)\n"
        "print(json.dumps(out))\n")
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                       cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    import json
    got = json.loads(r.stdout.strip().splitlines()[-1])
    # the two extensions agree on the records the plan writes and the kernels read
    assert (got["seg"], got["chunk"], got["CHUNK"]) == (ext.SEGMENT_BYTES, ext.CHUNK_BYTES, ext.CHUNK)
    if not torch.cuda.is_available():
        assert got["n"] == 0
        assert got["error"] and got["error"].startswith("shardgrok CUDA phase 2: cuda")
    assert "kind must be" in got["kind_error"]


# ---------------------------------------------------------------------------- the sum order
def _model_sum(terms: list[float], group: int, threads: int) -> float:
    """order.h's rule, written independently: element i to thread (i // group) % threads, each
    thread adding its terms in order, then the pairwise tree (slot t takes slot t + width)."""
    acc = [0.0] * threads
    for i, x in enumerate(terms):
        acc[(i // group) % threads] += x
    width = threads // 2
    while width:
        for t in range(width):
            acc[t] = acc[t] + acc[t + width]
        width //= 2
    return acc[0]


@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 255, 2048, 2049, 16384, 40000])
@pytest.mark.parametrize("group", [1, 8])
def test_order_model_matches_the_header_bitwise(ext, n, group):
    g = torch.Generator().manual_seed(n * 31 + group)
    x = torch.randn(n, generator=g, dtype=torch.float64) * torch.logspace(-8, 8, max(n, 1), dtype=torch.float64)[:n]
    terms = (x * x).tolist()
    got = ext.cuda_order_sum(torch.tensor(terms, dtype=torch.float64), group)
    want = _model_sum(terms, group, ext.CUDA_THREADS)
    assert struct.pack("<d", got) == struct.pack("<d", want)
    if terms:
        assert math.isclose(got, math.fsum(terms), rel_tol=1e-13)


# ---------------------------------------------------------------------------- the tables
def _plan(ext, numels, with_grad):
    params = [torch.randn(n) for n in numels]
    for p, g in zip(params, with_grad):
        if g:
            p.grad = torch.randn_like(p)
    state = [[torch.zeros(n) for n in numels] for _ in range(3)]
    steps = [torch.tensor(0.0) for _ in numels]
    # each piece starting somewhere in its tensor (the segment record carries it)
    rows = torch.tensor([[i, i, 0, n, 1000 * i + 3] for i, n in enumerate(numels)],
                        dtype=torch.long).reshape(-1, 5)
    plan = ext.Plan(len(numels), params, rows, params, *state, steps,
                    torch.arange(len(numels), dtype=torch.long))
    return plan, params, state


def _chunks(raw: torch.Tensor, size: int):
    data = bytes(raw.numpy().tobytes()) if raw.numel() else b""
    # struct Chunk { int32 segment; int64 begin, size; }: 4 bytes of padding after segment
    return [struct.unpack_from("<i4xqq", data, o) for o in range(0, len(data), size)]


def test_chunk_table_and_per_tensor_index(ext):
    numels = [0, 1, ext.CHUNK, ext.CHUNK + 1, 3 * ext.CHUNK - 5, 17]
    plan, _, _ = _plan(ext, numels, [True] * len(numels))
    chunks = _chunks(plan.chunk_table(), ext.CHUNK_BYTES)
    want = [(i, b, min(ext.CHUNK, n - b)) for i, n in enumerate(numels)
            for b in range(0, n, ext.CHUNK)]
    assert chunks == want and plan.n_chunks == len(want)
    offsets, index = plan.chunks_by_tensor()
    assert offsets.dtype == torch.long and index.dtype == torch.int32
    for t in range(len(numels)):
        mine = index[offsets[t]:offsets[t + 1]].tolist()
        assert mine == [c for c, ch in enumerate(chunks) if ch[0] == t]  # chunk order


def test_segment_records_carry_this_steps_gradients(ext):
    numels = [5, 300, 2]
    plan, params, state = _plan(ext, numels, [True, False, True])
    assert plan.resolve()
    raw, present = plan.segment_table()
    assert present.tolist() == [1.0, 0.0, 1.0]
    data = bytes(raw.numpy().tobytes())
    assert len(data) == len(numels) * ext.SEGMENT_BYTES
    for i, p in enumerate(params):
        # struct Segment { void* param, grad, exp_avg, exp_avg_sq, mu; const float* h;
        #                  float* exp_avg_scale, exp_avg_sq_scale, mu_scale;
        #                  int64 numel, offset; int32 tensor, param_dtype, grad_dtype,
        #                  state_dtype; }
        ptr, grad, m, v, mu, h, s1, s2, s3, numel, start, tensor, pd, gd, sd = struct.unpack_from(
            "<9Qqq4i", data, i * ext.SEGMENT_BYTES)
        assert (numel, start, tensor, h, s1, s2, s3) == (numels[i], 1000 * i + 3, i, 0, 0, 0, 0)
        if p.grad is None:
            assert grad == 0 and ptr == 0
            continue
        assert (ptr, grad) == (p.data_ptr(), p.grad.data_ptr())
        assert (m, v, mu) == tuple(s[i].data_ptr() for s in state)
        assert (pd, gd, sd) == (0, 0, 0)
    # a new gradient tensor after zero_grad(set_to_none=True) is picked up by the next resolve
    plan.release()
    params[0].grad = torch.randn(5)
    assert plan.resolve()
    grad0 = struct.unpack_from("<9Qqq4i", bytes(plan.segment_table()[0].numpy().tobytes()), 0)[1]
    assert grad0 == params[0].grad.data_ptr()
