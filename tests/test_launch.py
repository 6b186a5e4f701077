import pathlib
import re
import subprocess
import sys

import pytest

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "launch" / "train_single.py"


@pytest.mark.parametrize("opt", ["grokadamw", "supergrok"])
def test_single_process_script_trains(opt):
    out = subprocess.run([sys.executable, str(SCRIPT), "--optimizer", opt, "--steps", "60"],
                         capture_output=True, text=True, timeout=300, check=True).stdout
    first, last = map(float, re.search(r"loss ([\d.]+) -> ([\d.]+)", out).groups())
    assert last < 0.5 * first
