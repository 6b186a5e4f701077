"""Every ```python block in README.md and docs/usage.md runs as written (each in a fresh
namespace): the examples a reader copies first."""
import re

import pytest

from tests.support.paths import ROOT

PAGES = ("README.md", "docs/usage.md")
BLOCKS = [(page, i, block) for page in PAGES
          for i, block in enumerate(re.findall(r"```python\n(.*?)```", (ROOT / page).read_text(),
                                               re.S))]


def test_readme_has_examples():
    assert sum(page == "README.md" for page, _, _ in BLOCKS) >= 5


@pytest.mark.parametrize("page,i,block", BLOCKS, ids=[f"{p}[{i}]" for p, i, _ in BLOCKS])
def test_readme_block_runs(page, i, block):
    exec(compile(block, f"{page}[python block {i}]", "exec"), {"__name__": "readme"})
