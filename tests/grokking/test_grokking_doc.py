"""docs/grokking.md's tables are what benchmarks/grokking.py --report prints from the committed
JSON (benchmarks/grokking_doc.py re-renders them)."""
import subprocess
import sys

from tests.support.paths import ROOT, load_script


def test_the_grokking_page_shows_what_its_commands_print():
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "grokking_doc.py"), "--check"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr


def test_a_changed_cell_is_caught():
    grokking_doc = load_script("benchmarks/grokking_doc.py")

    lines = grokking_doc.DOC.read_text().splitlines()
    i = next(i for i, line in enumerate(lines) if "| `x*y` | `adam+ema` |" in line)
    lines[i] = lines[i].replace("| 1,040 (", "| 1,000 (", 1)
    new, stale = grokking_doc.sync(lines)
    assert len(stale) == 1 and "| 1,040 (" in new[i]


def test_a_changed_output_block_is_caught():
    grokking_doc = load_script("benchmarks/grokking_doc.py")

    lines = grokking_doc.DOC.read_text().splitlines()
    i = next(i for i, line in enumerate(lines) if line.startswith("<!-- output: python "))
    assert grokking_doc.sync(lines)[1] == []
    edited = lines[:i + 1] + ["| a figure typed by hand |"] + lines[i + 1:]
    new, stale = grokking_doc.sync(edited)
    assert stale == [lines[i][len("<!-- output: python "):-len(" -->")]] and new == lines
