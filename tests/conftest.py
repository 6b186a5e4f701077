import pytest
import torch

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def oracle():
    """The single-process runs of tests/support/scenarios.py that the multi-rank jobs are compared
    with (computed once for the whole session)."""
    from tests.support import scenarios
    return {kind: scenarios.run(kind) for kind in scenarios.KINDS}


@pytest.fixture(scope="module")
def ext():
    """The compiled CPU extension (the kernel tests skip, naming why, where it is not built)."""
    import shardgrok.kernels as K
    e = K.cpu_extension()
    if e is None:
        pytest.skip(f"the CPU kernel is unavailable: {K.unavailable_reason()}")
    return e


@pytest.fixture
def isa_restored(ext):
    """The extension, with the instruction set put back after the test."""
    before = ext.isa()
    yield ext
    ext.set_isa(before)
