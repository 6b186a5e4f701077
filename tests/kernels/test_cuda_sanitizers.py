"""The CUDA kernels under the sanitizers, without a GPU: tests/kernels/cuda_driver.cpp (plain
C++, no torch) runs csrc/cuda/kernels.cu on the emulated target (csrc/cuda/emulated.h) and
checks every sum and every updated element bit for bit against its own host computation. It is
built three ways:

- plain, -O1 (fibers): the driver itself must pass;
- AddressSanitizer + UndefinedBehaviorSanitizer (fibers, every case): an access outside any
  array, any shared-memory variable or a fiber's stack, or undefined behaviour, aborts. -O0:
  UBSan at -O1 triples the compile time of kernels.cu for no check it would add;
- ThreadSanitizer with -DSG_EMU_OS_THREADS (each CUDA thread an OS thread, 256 a block: a few
  small launches): a missing __syncthreads() is a data race.

The mutation tests build a copy of csrc/ with one bug planted in kernels.cu and require the
driver to fail and the sanitizer to name the bug, so a sanitizer that stopped seeing anything
cannot pass silently.

The builds compile concurrently (about 15-20 s of CPU each). A compiler without a sanitizer's
runtime skips that build's tests; CI=true (CI has gcc with all three) makes it a failure.
"""
from __future__ import annotations

import concurrent.futures
import os
import re
import shlex
import shutil
import subprocess

import pytest

from tests.support.paths import ROOT

CSRC = ROOT / "csrc"
DRIVER = ROOT / "tests" / "kernels" / "cuda_driver.cpp"
CXX = shlex.split(os.environ.get("CXX") or "g++")
IN_CI = os.environ.get("CI") == "true"

FLAGS = ["-std=c++17", "-ffp-contract=off", "-g", "-Wall", "-Wextra", "-Werror",
         "-Wno-unknown-pragmas"]
FLAVORS = {
    "plain": ["-O1"],
    "asan": ["-O0", "-fsanitize=address,undefined", "-fno-sanitize-recover=all",
             "-fsanitize=alignment"],
    "tsan": ["-O1", "-fsanitize=thread", "-DSG_EMU_OS_THREADS"],
    # the portable fiber switch (ucontext), which hosts other than x86-64 take
    "ucontext": ["-O1", "-DSG_EMU_UCONTEXT"],
}
RUNTIME_OPTIONS = {
    "ASAN_OPTIONS": "detect_leaks=1:abort_on_error=0:halt_on_error=1",
    "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1",
    "TSAN_OPTIONS": "halt_on_error=1:report_signal_unsafe=0",
}

# Bugs planted in csrc/cuda/kernels.cu, as (pattern, replacement): each pattern must match
# exactly once, so a change to the kernel that moves the site fails here instead of testing
# nothing.
MUTANTS = {
    # block_tree: the tree reads slots before the threads that own them wrote them
    "no_barrier_after_block_tree_writes": (
        r"(red\[q\]\[threadIdx\.x\] = acc\[q\];\s*)__syncthreads\(\);", r"\1"),
    # block_table: one element past each of the table's arrays
    "table_copy_off_by_one": (
        r"(for \(int32_t i = threadIdx\.x; i )< t\.size(; i \+= THREADS\))", r"\1<= t.size\2"),
}

PROBE = """
#include <cstdio>
#include <thread>
int main() { int x = 0; std::thread t([&] { x = 1; }); t.join(); std::printf("%d\\n", x); }
"""


def uses(*builds):
    """The builds (flavor, or flavor+mutant) a test needs: the fixture compiles those of the
    selected tests only, all at once."""
    def mark(fn):
        fn.sanitizer_builds = builds
        return fn
    return mark


class Builds:
    def __init__(self, root, keys):
        self.root = root
        self.problems = {}  # flavor -> why it cannot build (no compiler, no runtime)
        workers = max(2, os.cpu_count() or 2)
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers)
        flavors = sorted({k.split("+")[0] for k in keys})
        probes = {f: self.pool.submit(self._probe, f) for f in flavors}
        for f, fut in probes.items():
            why = fut.result()
            if why:
                self.problems[f] = why
        self.futures = {k: self.pool.submit(self._compile, k) for k in keys
                        if k.split("+")[0] not in self.problems}

    def _probe(self, flavor):
        if shutil.which(CXX[0]) is None:
            return f"no C++ compiler ({CXX[0]!r} is not on the PATH)"
        d = self.root / f"probe-{flavor}"
        d.mkdir()
        (d / "probe.cpp").write_text(PROBE)
        sanitize = [f for f in FLAVORS[flavor] if f.startswith("-fsanitize")]
        r = subprocess.run([*CXX, "-std=c++17", *sanitize, "probe.cpp", "-o", "probe", "-pthread"],
                           cwd=d, capture_output=True, text=True, timeout=300)
        if r.returncode != 0:
            return f"{' '.join(CXX)} cannot link {' '.join(sanitize)}: {r.stderr.strip()[-500:]}"
        r = run_binary(d / "probe", [], flavor)
        if r.returncode != 0 or r.stdout.strip() != "1":
            return f"a {' '.join(sanitize)} program does not run here: {r.stderr.strip()[-500:]}"
        return None

    def _compile(self, key):
        flavor, _, mutant = key.partition("+")
        d = self.root / key
        csrc = CSRC
        if mutant:
            csrc = d / "csrc"
            shutil.copytree(CSRC, csrc)
            kernels = csrc / "cuda" / "kernels.cu"
            pattern, replacement = MUTANTS[mutant]
            text, n = re.subn(pattern, replacement, kernels.read_text())
            if n != 1:
                return None, f"mutation {mutant!r}: its pattern matched {n} times in kernels.cu"
            kernels.write_text(text)
        else:
            d.mkdir()
        exe = d / "cuda_driver"
        cmd = [*CXX, *FLAGS, *FLAVORS[flavor], f"-I{csrc}", str(DRIVER), "-o", str(exe),
               "-pthread"]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        if r.returncode != 0:
            return None, f"{shlex.join(cmd)}\n{r.stdout}{r.stderr}"
        return exe, ""

    def get(self, key):
        flavor = key.split("+")[0]
        if flavor in self.problems:
            why = self.problems[flavor]
            if IN_CI:
                pytest.fail(f"CI=true and the {flavor} build is impossible: {why}")
            pytest.skip(why)
        exe, log = self.futures[key].result()
        assert exe is not None, f"building {key} failed:\n{log[-6000:]}"
        return exe


def aslr_off():
    """setarch -R where it works: GCC 12's ASan and TSan runtimes predate kernels with more
    mmap randomization bits (vm.mmap_rnd_bits = 32) and abort on some of those layouts."""
    setarch = shutil.which("setarch")
    if setarch is None:
        return []
    cmd = [setarch, os.uname().machine, "-R"]
    ok = subprocess.run([*cmd, "true"], capture_output=True).returncode == 0
    return cmd if ok else []


_ASLR_OFF = None


def run_binary(exe, args, flavor, env=None, timeout=600):
    global _ASLR_OFF
    if _ASLR_OFF is None:
        _ASLR_OFF = aslr_off()
    prefix = _ASLR_OFF if flavor != "plain" else []
    full_env = {**os.environ, **RUNTIME_OPTIONS, **(env or {})}
    return subprocess.run([*prefix, str(exe), *args], capture_output=True, text=True,
                          timeout=timeout, env=full_env)


@pytest.fixture(scope="module")
def builds(request, tmp_path_factory):
    here = request.module.__name__
    keys = []
    for item in request.session.items:
        fn = getattr(item, "function", None)
        if fn is not None and getattr(item.module, "__name__", None) == here:
            keys += [k for k in getattr(fn, "sanitizer_builds", ()) if k not in keys]
    b = Builds(tmp_path_factory.mktemp("sanitizers"), keys)
    yield b
    b.pool.shutdown(wait=True)


def output(r):
    return r.stdout + r.stderr


def assert_clean(r, what):
    log = output(r)
    assert r.returncode == 0, f"{what}: exit status {r.returncode}\n{log[-8000:]}"
    assert "Sanitizer" not in log and "runtime error" not in log, f"{what}:\n{log[-8000:]}"
    assert re.search(r"all \d+ cases passed", r.stdout), log[-4000:]


# ---------------------------------------------------------------- the kernels under each build
@uses("plain")
def test_driver_passes_plain(builds):
    r = run_binary(builds.get("plain"), [], "plain")
    assert_clean(r, "plain build")
    assert "grokadamw/dtypes1" in r.stdout and "supergrok/table-global/dtypes1" in r.stdout
    assert "ok   launch limits, barriers and traps" in r.stdout


@uses("ucontext")
def test_driver_passes_with_the_portable_fiber_switch(builds):
    r = run_binary(builds.get("ucontext"), [], "ucontext")
    assert_clean(r, "ucontext build")
    assert "ok   launch limits, barriers and traps" in r.stdout


@uses("asan")
def test_driver_passes_under_asan_and_ubsan(builds):
    r = run_binary(builds.get("asan"), [], "asan")
    assert_clean(r, "ASan+UBSan build")


@uses("asan")
def test_fiber_switches_keep_asan_fake_stacks_consistent(builds):
    """With use-after-return detection each fiber's frames live on ASan's fake stacks, which
    the fiber switch annotations in emulated.h must hand over at every __syncthreads()."""
    r = run_binary(builds.get("asan"), ["--quick"], "asan",
                   env={"ASAN_OPTIONS": RUNTIME_OPTIONS["ASAN_OPTIONS"] +
                        ":detect_stack_use_after_return=1"})
    assert_clean(r, "ASan build, detect_stack_use_after_return=1")


@uses("tsan")
def test_driver_passes_under_tsan_with_os_threads(builds):
    r = run_binary(builds.get("tsan"), ["--quick"], "tsan")
    assert_clean(r, "TSan build (OS threads)")


# ---------------------------------------------------------------- mutation tests: a planted bug
# must make the driver fail, and the sanitizer's report must name it
@pytest.mark.mutation
@uses("plain+no_barrier_after_block_tree_writes")
def test_mutation_missing_barrier_gives_wrong_sums_on_fibers(builds):
    """Fibers run in thread order up to each barrier: without it thread t < 128 reads slot
    t + 128 before its owner wrote it, and the 0xFF fill of shared memory makes that a NaN."""
    r = run_binary(builds.get("plain+no_barrier_after_block_tree_writes"), ["--quick"], "plain")
    assert r.returncode != 0, output(r)[-4000:]
    assert re.search(r"MISMATCH quick/\S+: phase 1 tensor \d+ grad_sq: .*\(-?nan\)$", r.stderr,
                     re.M), output(r)[-4000:]


@pytest.mark.mutation
@uses("tsan+no_barrier_after_block_tree_writes")
def test_mutation_missing_barrier_is_a_data_race_under_tsan(builds):
    r = run_binary(builds.get("tsan+no_barrier_after_block_tree_writes"), ["--quick"], "tsan")
    log = output(r)
    assert r.returncode != 0, log[-4000:]
    assert "WARNING: ThreadSanitizer: data race" in log, log[-4000:]
    assert "tree_level" in log or "block_tree" in log, log[-4000:]


@pytest.mark.mutation
@uses("asan+table_copy_off_by_one")
def test_mutation_table_overrun_is_a_heap_buffer_overflow_under_asan(builds):
    r = run_binary(builds.get("asan+table_copy_off_by_one"), ["--case", "table-shared-64"], "asan")
    log = output(r)
    assert r.returncode != 0, log[-4000:]
    assert "ERROR: AddressSanitizer: heap-buffer-overflow" in log, log[-4000:]
    assert "block_table" in log, log[-4000:]
    # the element just past one of the table's arrays (the driver allocates each exactly)
    assert re.search(r"0 bytes to the right of \d+-byte region", log), log[-4000:]
