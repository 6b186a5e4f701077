"""The constants Python reads from the C++ headers' text (shardgrok/kernels/header.py): held to
the compiled extension's own view of the same enums (values from the compiler), to hand-written
C++ in the parser's tests, and found wherever the package is (a checkout, an installed copy)
without a compiler."""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import textwrap

import pytest

import shardgrok.reference as R
from shardgrok.kernels import header
from tests.support.paths import ROOT

HEADER_PY = ROOT / "shardgrok" / "kernels" / "header.py"


# ---------------------------------------------------------------- against the compiler
def test_kinds_match_the_extension(ext):
    assert header.KERNEL_KINDS == ext.KIND_INDEX
    assert header.KERNEL_KINDS == {"grokadamw": ext.GROKADAMW, "supergrok": ext.SUPERGROK}


def test_columns_match_the_extension_by_name_and_index(ext):
    assert len(header.COLUMNS) == ext.N_COLUMNS == len(ext.COLUMN_INDEX)
    assert {name: i for i, name in enumerate(header.COLUMNS)} == ext.COLUMN_INDEX


def test_rounding_flags_and_draws_match_the_extension(ext):
    assert header.ROUNDING == ext.ROUNDING_INDEX == {"state": 1, "param": 2}
    assert header.DRAWS == ext.DRAW_INDEX
    assert sorted(header.DRAWS.values()) == [0, 1, 2, 3]


def test_stats_match_the_extension_by_name_and_index(ext):
    assert len(header.STATS) == ext.N_STATS == len(ext.STAT_INDEX)
    assert {name: i for i, name in enumerate(header.STATS)} == ext.STAT_INDEX


def test_the_reference_takes_the_headers_names():
    assert R.COLUMNS is header.COLUMNS
    assert R.COL == {name: i for i, name in enumerate(header.COLUMNS)}
    # StepScalars.from_row reads a row positionally: its fields must be the columns, in order
    assert tuple(f.name for f in dataclasses.fields(R.StepScalars)) == header.COLUMNS


def test_the_reference_sums_land_under_the_headers_stat_names():
    """The reference's phase 1 returns its sums by position; the header names the positions.
    With vectors whose inner products all differ, each name must hold its own product."""
    import torch
    g, h, mu = (torch.tensor(v, dtype=torch.float64) for v in
                ([1.0, 2.0, 0.0], [0.5, -1.0, 3.0], [2.0, 0.0, -4.0]))
    got = dict(zip(R.SUPERGROK_STATS, R.supergrok_partial_stats(g, h, mu).tolist(), strict=True))
    want = {"grad_sq": g @ g, "h_sq": h @ h, "h_mu": h @ mu, "h_grad": h @ g, "mu_sq": mu @ mu,
            "mu_grad": mu @ g}
    assert set(want) == set(header.STATS)
    assert len({float(v) for v in want.values()}) == len(want)  # the check can tell them apart
    assert got == {k: float(v) for k, v in want.items()}
    assert dict(zip(R.GROKADAMW_STATS, R.grokadamw_partial_stats(g).tolist(), strict=True)) == {
        "grad_sq": float(g @ g)}


# ---------------------------------------------------------------- the parser
def test_parse_enum_values_comments_and_forms():
    text = header._strip_comments(textwrap.dedent("""
        enum Other { X };  // not this one
        /* enum Kind { DECOY = 9 }; */
        enum class Kind : int32_t {
          A = 0,      // a comment, with a comma
          B,          /* another */
          C = 0x10,
          D,
          E = 7u,
        };
    """))
    assert header.parse_enum(text, "Kind") == {"A": 0, "B": 1, "C": 16, "D": 17, "E": 7}
    assert header.parse_enum("enum Kind{P,Q};", "Kind") == {"P": 0, "Q": 1}


@pytest.mark.parametrize("text,error", [
    ("enum Other { A };", "expected one definition of enum Kind, found 0"),
    ("enum Kind { A }; enum Kind { B };", "found 2"),
    ("enum Kind { A = 1 << 2 };", "A = '1 << 2' is not an integer literal"),
    ("enum Kind { A, A };", "A appears twice"),
    ("enum Kind { 3A };", "'3A' is not an enumerator"),
    ("enum Kind { };", "enum Kind has no enumerators"),
])
def test_parse_enum_rejects_what_it_cannot_read(text, error):
    with pytest.raises(ValueError, match=r"^h\.h: .*" + re.escape(error)):
        header.parse_enum(text, "Kind", "h.h")


@pytest.mark.parametrize("enum,error", [
    ({"COL_A": 0, "COL_B": 1}, "must end with its count N"),
    ({"COL_A": 0, "COL_B": 2, "N": 2}, "must number its entries 0, 1, ... in order"),
    ({"COL_A": 0, "COL_B": 1, "N": 3}, "must number its entries"),
    ({"COL_A": 0, "B": 1, "N": 2}, "B lacks the prefix 'COL_'"),
])
def test_table_enums_must_be_dense_and_prefixed(enum, error):
    with pytest.raises(ValueError, match=r"^h\.h: enum Column.*" + re.escape(error)):
        header._names(enum, "Column", "COL_", "N", "h.h")


# ---------------------------------------------------------------- where the header is found
PROBE = textwrap.dedent("""
    import importlib.util, json, sys
    spec = importlib.util.spec_from_file_location("probe_header", sys.argv[1])
    h = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(h)
        out = {"csrc": str(h.find_csrc()), "kinds": h.KERNEL_KINDS, "columns": list(h.COLUMNS)}
    except FileNotFoundError as e:
        out = {"error": str(e)}
    out["imported"] = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "shardgrok"))
    print(json.dumps(out))
""")


def _tree(tmp_path, *, packaged: bool, checkout: bool) -> pathlib.Path:
    """A copy of the package's header.py with the sources in the package (an installed wheel or
    sdist), next to it (a checkout), both or neither."""
    pkg = tmp_path / "shardgrok"
    (pkg / "kernels").mkdir(parents=True)
    shutil.copy(HEADER_PY, pkg / "kernels" / "header.py")
    if packaged:
        shutil.copytree(ROOT / "csrc", pkg / "_csrc")
    if checkout:
        shutil.copytree(ROOT / "csrc", tmp_path / "csrc")
        (tmp_path / "pyproject.toml").write_text("")
    return pkg / "kernels" / "header.py"


def _probe(path: pathlib.Path) -> dict:
    # -S: no site-packages, so an import of torch or shardgrok would fail rather than pass unseen
    r = subprocess.run([sys.executable, "-S", "-c", PROBE, str(path)], capture_output=True,
                       text=True, timeout=60, cwd=path.parents[2])
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.mark.parametrize("packaged,checkout,where", [(True, False, "shardgrok/_csrc"),
                                                     (False, True, "csrc"),
                                                     (True, True, "csrc")])
def test_found_in_an_installed_package_and_a_checkout_with_the_standard_library_only(
        tmp_path, packaged, checkout, where):
    got = _probe(_tree(tmp_path, packaged=packaged, checkout=checkout))
    assert got["csrc"] == str(tmp_path / where)
    assert got["kinds"] == header.KERNEL_KINDS and tuple(got["columns"]) == header.COLUMNS
    assert got["imported"] == []


def test_a_copy_without_sources_says_where_it_looked(tmp_path):
    got = _probe(_tree(tmp_path, packaged=False, checkout=False))
    assert "C++ headers are missing" in got["error"]
    assert str(tmp_path / "shardgrok" / "_csrc") in got["error"]
    assert str(tmp_path / "csrc") in got["error"]


def test_importing_the_reference_builds_nothing(tmp_path):
    """The reference path needs the headers' names, never a compiler."""
    code = ("import shardgrok.reference as R, shardgrok.kernels.build as b; "
            "print(len(R.COLUMNS), sorted(b._loaded))")
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"), CXX=str(tmp_path / "no-cxx"))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [str(len(header.COLUMNS)), "[]"]
    assert not (tmp_path / "ext").exists()
