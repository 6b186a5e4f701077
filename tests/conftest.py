import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def oracle():
    """The single-process runs of tests/scenarios.py that the multi-rank jobs are compared with
    (computed once for the whole session)."""
    import scenarios
    return {kind: scenarios.run(kind) for kind in scenarios.KINDS}
