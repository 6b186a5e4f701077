"""No import cycle anywhere in the package, counting every import statement wherever it sits
(inside functions, under ``if TYPE_CHECKING``): a deferred import that closes a loop still ties
the modules of the loop together.

The graph is read from the source with :mod:`ast`, so it sees every import whether or not it
runs. An import of ``a.b.c`` from module ``m`` is an edge to ``a.b.c`` and to each package
above it (Python runs those packages' ``__init__`` first), except the packages ``m`` itself
sits in: they have started before ``m`` can, so importing them starts nothing.
"""
from __future__ import annotations

import ast
import pathlib

import shardgrok

ROOT = pathlib.Path(shardgrok.__file__).resolve().parent
PACKAGE = "shardgrok"


def modules() -> dict[str, pathlib.Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join([PACKAGE, *parts])] = path
    return out


def _is_package(name: str, mods: dict[str, pathlib.Path]) -> bool:
    return name in mods and mods[name].name == "__init__.py"


def imports_of(name: str, path: pathlib.Path, mods: dict[str, pathlib.Path]) -> set[str]:
    """The package's own modules that ``name`` imports, by the rule in this file's docstring."""
    here = name if _is_package(name, mods) else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here.split(".")
                base = base[:len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            targets.add(module)
            # ``from pkg import sub`` imports the submodule ``pkg.sub``
            targets.update(f"{module}.{a.name}" for a in node.names if f"{module}.{a.name}" in mods)
    def around(package):  # ``name`` itself or a package it sits in: running already
        return name == package or name.startswith(package + ".")

    edges = set()
    for t in targets:
        if t not in mods:
            continue
        parts = t.split(".")
        edges.update(p for p in (".".join(parts[:i]) for i in range(1, len(parts) + 1))
                     if not around(p))
    return edges


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports_of(name, path, mods) for name, path in mods.items()}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(g.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def test_the_walk_finds_a_known_cycle():
    """The detector itself: a loop through a deferred import and a package's __init__."""
    g = {"p": {"p.a"}, "p.a": {"p.b"}, "p.b": {"p"}, "p.c": set()}
    assert cycles(g) == [["p", "p.a", "p.b"]]
    mods = modules()
    assert "shardgrok.optim.step" in graph()["shardgrok.optim.supergrok"]
    assert imports_of("shardgrok.optim.base", mods["shardgrok.optim.base"], mods) >= {
        "shardgrok.layouts", "shardgrok.layouts.select", "shardgrok.kernels.plan",
        "shardgrok.kernels"}


def test_no_import_cycle():
    found = cycles(graph())
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def test_optim_never_imports_integrations():
    g = graph()
    bad = {m: sorted(t for t in ts if t.startswith("shardgrok.integrations"))
           for m, ts in g.items() if m.startswith("shardgrok.optim")}
    assert not any(bad.values()), bad
