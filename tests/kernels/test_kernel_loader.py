"""shardgrok.kernels.build.load, the one loader of both extensions: which build it takes (ahead
of time when current, else just in time), and the reason it gives for each way of failing.
Fake ops and modules stand in for the compilers: nothing here compiles."""
from __future__ import annotations

import sys
import types

import pytest

from shardgrok.kernels import build, cuda


@pytest.fixture(autouse=True)
def fresh_cache(monkeypatch):
    monkeypatch.setattr(build, "_loaded", {})


class Op(build.Op):
    """An op whose just-in-time build is ``result`` (raised when an exception), counted."""

    def jit_build(self, verbose=False):
        calls.append(self.name)
        result = RESULTS[self.name]
        if isinstance(result, BaseException):
            raise result
        return result


calls: list[str] = []
RESULTS: dict[str, object] = {}


def make_op(name, result, *, sources=build.CPU_SOURCES, aot="shardgrok._C_absent", **kw):
    calls.clear()
    RESULTS[name] = result
    return Op(name, tuple(sources), build.HEADERS, aot, ("-O3",), **kw)


def fake_module(monkeypatch, name, digest):
    mod = types.ModuleType(name)
    mod.digest = digest
    monkeypatch.setitem(sys.modules, name, mod)
    return mod


def test_just_in_time_when_nothing_was_built_ahead_of_time():
    jit = object()
    got = build.load(make_op("t_jit", jit))
    assert got == build.Loaded(jit, "just-in-time build (torch.utils.cpp_extension)", None)


def test_loaded_once_per_process():
    op = make_op("t_once", object())
    assert build.load(op) is build.load(op) and calls == ["t_once"]


def test_a_current_ahead_of_time_build_is_used_without_building(monkeypatch):
    op = make_op("t_aot", AssertionError("built"), aot="shardgrok._C_fake_current")
    mod = fake_module(monkeypatch, op.aot_module, op.digest())
    assert build.load(op) == build.Loaded(mod, "ahead-of-time build (shardgrok._C_fake_current)",
                                          None)
    assert calls == []


def test_a_stale_ahead_of_time_build_is_replaced_with_a_warning(monkeypatch):
    jit = object()
    op = make_op("t_stale", jit, aot="shardgrok._C_fake_stale")
    fake_module(monkeypatch, op.aot_module, "0123456789ab")
    with pytest.warns(UserWarning, match=r"shardgrok\._C_fake_stale was built from other sources"):
        got = build.load(op)
    assert got.ext is jit and got.origin.startswith("just-in-time")


def test_an_ahead_of_time_build_that_does_not_import_is_replaced_with_a_warning(tmp_path,
                                                                                monkeypatch):
    (tmp_path / "sg_fake_pkg").mkdir()
    (tmp_path / "sg_fake_pkg" / "__init__.py").write_text("")
    (tmp_path / "sg_fake_pkg" / "_C.py").write_text("raise ImportError('undefined symbol: x')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    jit = object()
    op = make_op("t_broken", jit, aot="sg_fake_pkg._C")
    with pytest.warns(UserWarning, match=r"sg_fake_pkg\._C does not import \(ImportError: "
                                         r"undefined symbol: x\)"):
        assert build.load(op).ext is jit


def test_missing_sources_are_named():
    op = make_op("t_missing", AssertionError("built"), sources=("cpu/dispatch.cpp", "no_such.cpp"))
    got = build.load(op)
    assert got.ext is None and calls == []
    assert got.reason == (f"no ahead-of-time build (shardgrok._C_absent) and no sources to build "
                          f"it from: {build.CSRC} lacks no_such.cpp (reinstall shardgrok: its "
                          "wheel and sdist carry them)")


def test_a_failed_build_gives_its_last_line():
    err = RuntimeError("Error building extension 't'\n[1/2] c++ ...\nplan.cpp:3: error: no\n\n")
    got = build.load(make_op("t_fail", err))
    assert got == build.Loaded(None, None, "building it failed: RuntimeError: plan.cpp:3: error: no")


def test_unavailable_here_tries_nothing(monkeypatch):
    op = make_op("t_here", AssertionError("built"), aot="shardgrok._C_fake_here",
                 unavailable_here=lambda: "no GPU here")
    fake_module(monkeypatch, op.aot_module, op.digest())
    assert build.load(op) == build.Loaded(None, None, "no GPU here") and calls == []


def test_configure_may_refuse_the_loaded_extension():
    op = make_op("t_conf", object(), configure=lambda ext: "SHARDGROK_CPU_ISA=sse9: unknown")
    got = build.load(op)
    assert got.ext is None and got.origin.startswith("just-in-time")
    assert got.reason == "SHARDGROK_CPU_ISA=sse9: unknown"


def test_the_cpu_isa_variable_is_checked_on_load(monkeypatch):
    class Ext:
        def set_isa(self, name):
            raise RuntimeError(f"unknown instruction set '{name}' (avx512, avx2 or generic)\nmore")
    monkeypatch.setenv(build.ENV_ISA, "sse9")
    assert build.CPU.configure(Ext()) == ("SHARDGROK_CPU_ISA=sse9: unknown instruction set "
                                          "'sse9' (avx512, avx2 or generic)")
    monkeypatch.delenv(build.ENV_ISA)
    assert build.CPU.configure(Ext()) is None


@pytest.mark.skipif(build.torch.cuda.is_available(), reason="checks the machines without CUDA")
def test_the_cuda_op_says_why_it_is_unavailable_without_building():
    why = build._no_cuda_here()
    assert why is not None
    assert cuda.cuda_extension() is None and cuda.unavailable_reason() == why
    assert cuda.status() == {"available": False, "origin": None, "reason": why}
