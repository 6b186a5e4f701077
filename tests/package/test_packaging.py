"""What a wheel and an sdist carry: every C++ and CUDA source the just-in-time build compiles (in
the package as shardgrok/_csrc, byte for byte the checkout's csrc/), found there by an installed
copy. Built from a copy of the checkout's files, without compiling anything (a few seconds).

.ci/wheel_check.sh goes further, as CI runs it: it installs the wheel and the sdist into a fresh
virtual environment and steps with the kernel that installed copy builds."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile

import pytest

from shardgrok.kernels import build
from tests.support.paths import ROOT

SOURCES = sorted(set(build.CPU.sources + build.CPU.headers + build.CUDA.sources
                     + build.CUDA.headers))


def _run(cmd, **kw):
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kw)
    assert r.returncode == 0, f"{cmd}:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
    return r


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
    """{"sdist": path, "wheel": wheel built in the tree, "wheel_from_sdist": path}."""
    tmp = tmp_path_factory.mktemp("packaging")
    files = _run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                 cwd=ROOT).stdout.split()
    src = tmp / "src"
    for f in files:
        if (ROOT / f).is_file():
            (src / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(ROOT / f, src / f)
    out = {}
    _run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp / "sdist")], cwd=src)
    out["sdist"], = (tmp / "sdist").glob("shardgrok-*.tar.gz")
    wheel = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
    _run(wheel + ["-w", str(tmp / "wheel"), str(src)])
    out["wheel"], = (tmp / "wheel").glob("shardgrok-*.whl")
    with tarfile.open(out["sdist"]) as t:
        # the "data" filter where this Python has it (3.11.4 on; CI's may be older)
        kw = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        t.extractall(tmp / "unpacked", **kw)
    unpacked, = (tmp / "unpacked").iterdir()
    _run(wheel + ["-w", str(tmp / "wheel_from_sdist"), str(unpacked)])
    out["wheel_from_sdist"], = (tmp / "wheel_from_sdist").glob("shardgrok-*.whl")
    return out


def test_the_sdist_carries_csrc(dist):
    with tarfile.open(dist["sdist"]) as t:
        names = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
        for f in SOURCES:
            assert f"csrc/{f}" in names, f"the sdist lacks csrc/{f}"


@pytest.mark.parametrize("which", ["wheel", "wheel_from_sdist"])
def test_the_wheel_carries_every_source_in_the_package(dist, which):
    with zipfile.ZipFile(dist[which]) as z:
        names = set(z.namelist())
        for f in SOURCES:
            assert f"shardgrok/_csrc/{f}" in names, f"the {which} lacks shardgrok/_csrc/{f}"
            assert z.read(f"shardgrok/_csrc/{f}") == (ROOT / "csrc" / f).read_bytes(), f
        assert not any(n.startswith("csrc/") for n in names)  # only inside the package
        assert "shardgrok/kernels/header.py" in names


def test_an_unpacked_wheel_finds_its_sources_and_builds_the_same_extension(dist, tmp_path):
    """The same digest as the checkout: an installed copy compiles the same extension (and
    shares a cache with it)."""
    site = tmp_path / "site"
    with zipfile.ZipFile(dist["wheel"]) as z:
        z.extractall(site)
    code = ("import json, shardgrok.kernels.build as b; print(json.dumps({'csrc': str(b.CSRC), "
            "'missing': b.CPU.missing() + b.CUDA.missing() + b.CUDA_EMULATED.missing(), 'digest': b.CPU.digest(), "
            "'file': b.__file__}))")
    env = dict(os.environ, PYTHONPATH=str(site))
    got = json.loads(_run([sys.executable, "-c", code], cwd=tmp_path, env=env).stdout)
    assert got["file"].startswith(str(site))
    assert got["csrc"] == str(site / "shardgrok" / "_csrc") and got["missing"] == []
    assert got["digest"] == build.CPU.digest()
