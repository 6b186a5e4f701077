"""The constants Python shares with the compiled step, read from the C++ headers' text.

The kernel kinds (``enum Kind`` in csrc/job.h), the columns of the per-tensor scalar table
(``enum Column`` in csrc/grok_math.h) and the per-tensor statistics (``enum Stat``) are defined
once, in C++. The reference path needs them without a compiler, so this module parses the
headers instead of asking the extension; it uses the standard library only and imports nothing
else from shardgrok, so it works wherever the package is importable. tests/kernels/test_kernel_constants.py
holds the parse to the compiled extension's own view of the same enums.

The sources are found in the package (``shardgrok/_csrc``, copied there when a wheel or an
sdist install is built) or in the source checkout next to the package (``csrc/``, an editable
install); :func:`find_csrc` says which.
"""
from __future__ import annotations

import pathlib
import re

_PACKAGE = pathlib.Path(__file__).resolve().parents[1]
#: where an installed package carries the C++ and CUDA sources (setup.py's build_py copies them)
PACKAGED_CSRC = _PACKAGE / "_csrc"
#: where they are in a source checkout
CHECKOUT_CSRC = _PACKAGE.parent / "csrc"
#: a file every copy of the sources has, and that nothing else is likely to ship
MARKER = "grok_math.h"


def find_csrc() -> pathlib.Path | None:
    """The directory of the C++ sources: the checkout's when this package is imported from a
    source checkout (the files a developer edits), else the copy inside the package; None when
    neither holds them."""
    checkout = (_PACKAGE.parent / "pyproject.toml").is_file() and (CHECKOUT_CSRC / MARKER).is_file()
    if checkout:
        return CHECKOUT_CSRC
    if (PACKAGED_CSRC / MARKER).is_file():
        return PACKAGED_CSRC
    return None


def _read(name: str) -> tuple[str, str]:
    """The text of header ``name`` (relative to csrc/) with its comments removed, and its path."""
    root = find_csrc()
    if root is None:
        raise FileNotFoundError(
            f"shardgrok's C++ headers are missing: neither {PACKAGED_CSRC} nor {CHECKOUT_CSRC} "
            f"holds {MARKER} (a broken install: reinstall shardgrok)")
    path = root / name
    try:
        text = path.read_text()
    except OSError as e:
        raise FileNotFoundError(f"cannot read the C++ header {path}: {e.strerror}") from e
    return _strip_comments(text), str(path)


def _strip_comments(text: str) -> str:
    return re.sub(r"//[^\n]*", "", re.sub(r"/\*.*?\*/", " ", text, flags=re.S))


_IDENT = re.compile(r"[A-Za-z_]\w*")


def parse_enum(text: str, name: str, where: str = "<text>") -> dict[str, int]:
    """Every enumerator of ``enum name`` (plain or scoped, with or without an underlying type) in
    the comment-free C++ ``text``, with its value: an integer literal where one is written,
    else one more than the previous one. Raises ValueError naming the header and what is wrong."""
    found = re.findall(rf"\benum\s+(?:class\s+|struct\s+)?{name}\b[^{{;]*\{{([^}}]*)\}}", text)
    if len(found) != 1:
        raise ValueError(f"{where}: expected one definition of enum {name}, found {len(found)}")
    out: dict[str, int] = {}
    value = -1
    for entry in (e.strip() for e in found[0].split(",")):
        if not entry:
            continue  # a trailing comma
        key, sep, literal = (s.strip() for s in entry.partition("="))
        if not _IDENT.fullmatch(key):
            raise ValueError(f"{where}: enum {name}: {entry!r} is not an enumerator")
        if sep:
            try:
                value = int(literal.rstrip("uUlL"), 0)
            except ValueError:
                raise ValueError(f"{where}: enum {name}: {key} = {literal!r} is not an integer "
                                 "literal (the parser evaluates no expressions)") from None
        else:
            value += 1
        if key in out:
            raise ValueError(f"{where}: enum {name}: {key} appears twice")
        out[key] = value
    if not out:
        raise ValueError(f"{where}: enum {name} has no enumerators")
    return out


def parse_constant(text: str, name: str, where: str = "<text>") -> int:
    """The integer literal of ``constexpr <type> name = <literal>;`` in the comment-free ``text``."""
    found = re.findall(rf"\bconstexpr\s+[\w:]+\s+{name}\s*=\s*([0-9xXa-fA-F]+)[uUlL]*\s*;", text)
    if len(found) != 1:
        raise ValueError(f"{where}: expected one constexpr integer {name}, found {len(found)}")
    return int(found[0], 0)


def _names(values: dict[str, int], enum: str, prefix: str, count: str | None,
           where: str) -> dict[str, int]:
    """``values`` keyed by lower-case names without ``prefix``; with ``count``, that last
    enumerator must equal the number of the others, and the others must be 0, 1, ... in order
    (they index a table)."""
    items = list(values.items())
    if count is not None:
        if not items or items[-1][0] != count:
            raise ValueError(f"{where}: enum {enum} must end with its count {count}")
        items = items[:-1]
        got = [v for _, v in items]
        if got != list(range(len(items))) or values[count] != len(items):
            raise ValueError(f"{where}: enum {enum} must number its entries 0, 1, ... in order, "
                             f"then {count}; got {dict(values)}")
    out = {}
    for key, v in items:
        if not key.startswith(prefix) or key == prefix:
            raise ValueError(f"{where}: enum {enum}: {key} lacks the prefix {prefix!r}")
        out[key[len(prefix):].lower()] = v
    return out


def _load() -> tuple:
    job, where = _read("job.h")
    kinds = _names(parse_enum(job, "Kind", where), "Kind", "", None, where)
    math, where = _read(MARKER)
    columns = _names(parse_enum(math, "Column", where), "Column", "COL_", "N_COLUMNS", where)
    stats = _names(parse_enum(math, "Stat", where), "Stat", "ST_", "N_STATS", where)
    rounding = _names(parse_enum(math, "Rounding", where), "Rounding", "ROUND_", None, where)
    draws = _names(parse_enum(math, "RoundingWhich", where), "RoundingWhich", "DRAW_", None, where)
    quant = _names(parse_enum(math, "QuantBias", where), "QuantBias", "QBIAS_", None, where)
    quant.update(block=parse_constant(math, "QBLOCK", where),
                 min_numel=parse_constant(math, "QMIN_NUMEL", where))
    return kinds, tuple(columns), tuple(stats), rounding, draws, quant


# KERNEL_KINDS: the kernel kind of each optimizer, {"grokadamw": 0, "supergrok": 1};
# COLUMNS: the scalar table's columns in index order; STATS: SuperGrok's phase-1 sums in order
# (GrokAdamW's phase 1 computes the first only); ROUNDING: the flags of the rounding column,
# {"state": 1, "param": 2}; DRAWS: which value a stochastic rounding draw is for,
# {"exp_avg": 0, "exp_avg_sq": 1, "mu": 2, "param": 3}; QUANT: the 8-bit state's constants,
# {"signed": 15, "unsigned": 31, "block": 256, "min_numel": 4096}.
KERNEL_KINDS, COLUMNS, STATS, ROUNDING, DRAWS, QUANT = _load()
