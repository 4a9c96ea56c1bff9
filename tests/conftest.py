"""Shared fixtures. Collection never touches CUDA; Triton runs under its CPU interpreter when no GPU torch exists."""

import os

import pytest
import torch

# The interpreter must be chosen before triton is first imported. A CPU build of torch cannot run Triton any other
# way, so enable it there (a CUDA build keeps compiled kernels unless the user set the variable).
if torch.version.cuda is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import siss_fast as sf  # noqa: E402
from siss_fast import backends  # noqa: E402

CPU_BACKENDS = backends.backend_names("cpu")  # every registered backend that can run on CPU tensors


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA device (skipped without one)")
    config.addinivalue_line("markers", "slow: long-running (deselect with -m 'not slow')")


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if "cuda" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(autouse=True)
def _ieee_denormals():
    """Every test starts with IEEE subnormals (no flush-to-zero), whatever an earlier test or library set."""
    torch.set_flush_denormal(False)
    yield


@pytest.fixture(params=CPU_BACKENDS)
def backend(request):
    """Run the test once per backend available for CPU tensors; restore the previous choice afterwards."""
    name = request.param
    ok, why = backends.availability(name, "cpu")
    if not ok:
        pytest.skip(f"backend {name!r} unavailable: {why}")
    previous = sf.get_backend()
    sf.set_backend(name)
    yield name
    sf.set_backend(previous)
