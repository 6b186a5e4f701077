"""The checkout under test, and its scripts as modules: benchmarks/ and examples/ are folders of
scripts, not packages, and the tests import them without putting those folders on sys.path."""
from __future__ import annotations

import importlib.util
import pathlib
import subprocess
import sys
import types

ROOT = pathlib.Path(__file__).resolve().parents[2]


def load_script(relpath: str, name: str | None = None) -> types.ModuleType:
    """``ROOT/relpath`` imported as the module ``name`` (its file name by default). Registered
    in sys.modules before it runs, as an import would: pickle and dataclasses look it up there."""
    path = ROOT / relpath
    name = name or path.stem
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def head_commit() -> str | None:
    """The checkout's HEAD (None outside a git checkout): what provenance lines must name."""
    try:
        return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
