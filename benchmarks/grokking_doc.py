"""Keep docs/grokking.md's tables and figures, and the README's statement of the study's
result, what the report commands print.

Two forms. Each ``grokking.py --report`` command in a ```bash block of the page is run (without
``--png``) and the first markdown table after the block is replaced by its output (kept at the
table's indentation). And everything between ``<!-- output: python benchmarks/SCRIPT ARGS -->``
and ``<!-- end output -->`` is replaced by what that command prints (tables, and the prose whose
figures come from the results files); the README has output blocks only. ``--check`` changes
nothing and exits 1 when a table or an output block differs from its command's output, which the
tests use.

    python benchmarks/grokking_doc.py            # rewrite the tables
    python benchmarks/grokking_doc.py --check    # are they current?
"""
from __future__ import annotations

import argparse
import pathlib
import re
import shlex
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "grokking.md"
PAGES = (DOC, ROOT / "README.md")


def report_commands(block: list[str]) -> list[list[str]]:
    """The ``--report`` commands of one bash block, as argument lists without ``--png``."""
    text = "\n".join(line.strip() for line in block)
    text = text.replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.split(" # ")[0].strip()
        if line.startswith("#") or "benchmarks/grokking.py" not in line or "--report" not in line:
            continue
        args = []
        for arg in shlex.split(line)[2:]:   # after "python benchmarks/grokking.py"
            args += sorted(str(p.relative_to(ROOT)) for p in ROOT.glob(arg)) if "*" in arg else [arg]
        while "--png" in args:
            i = args.index("--png")
            del args[i:i + 2]
        out.append(args)
    return out


def render(args: list[str]) -> list[str]:
    cmd = [sys.executable, str(ROOT / "benchmarks" / "grokking.py"), *args]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"{' '.join(args)} failed:\n{r.stderr}")
    return [line for line in r.stdout.splitlines() if line.startswith("|")]


BEGIN = re.compile(r"^<!-- output: python (benchmarks/\S+\.py)(.*) -->$")
END = "<!-- end output -->"


def run_script(script: str, args: list[str]) -> list[str]:
    r = subprocess.run([sys.executable, str(ROOT / script), *args], cwd=ROOT, capture_output=True,
                       text=True)
    if r.returncode:
        raise SystemExit(f"{script} {' '.join(args)} failed:\n{r.stderr}")
    return r.stdout.rstrip("\n").splitlines()


def sync(lines: list[str], page: str = "docs/grokking.md") -> tuple[list[str], list[str]]:
    """(the page with its tables and output blocks re-rendered, the commands whose output
    differed)."""
    out, stale, i = [], [], 0
    while i < len(lines):
        line = lines[i]
        out.append(line)
        i += 1
        m = BEGIN.match(line.strip())
        if m:
            start = i
            while i < len(lines) and lines[i].strip() != END:
                i += 1
            if i == len(lines):
                raise SystemExit(f"{page}: {line.strip()} has no {END}")
            new = run_script(m.group(1), shlex.split(m.group(2)))
            if new != lines[start:i]:
                stale.append(f"{m.group(1)}{m.group(2)}")
            out.extend(new)
            continue
        if line.strip() != "```bash":
            continue
        block = []
        while i < len(lines) and lines[i].strip() != "```":
            block.append(lines[i])
            out.append(lines[i])
            i += 1
        cmds = report_commands(block)
        if not cmds:
            continue
        if len(cmds) > 1:
            raise SystemExit(f"{page}: one --report command per block, got {len(cmds)}")
        # copy up to the next table, then replace the table
        while i < len(lines) and not lines[i].lstrip().startswith("|"):
            out.append(lines[i])
            i += 1
        start = i
        while i < len(lines) and lines[i].lstrip().startswith("|"):
            i += 1
        old = lines[start:i]
        indent = re.match(r"\s*", old[0]).group(0) if old else ""
        new = [indent + row for row in render(cmds[0])]
        if new != old:
            stale.append("benchmarks/grokking.py " + " ".join(cmds[0]))
        out.extend(new)
    return out, stale


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if a table is stale")
    a = ap.parse_args(argv)
    failed = False
    for path in PAGES:
        name = str(path.relative_to(ROOT))
        new, stale = sync(path.read_text().splitlines(), name)
        if a.check:
            for cmd in stale:
                print(f"stale in {name}: {cmd}")
            failed |= bool(stale)
            continue
        path.write_text("\n".join(new) + "\n")
        print(f"{name}: {len(stale)} table(s) or block(s) rewritten")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
