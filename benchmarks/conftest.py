"""pytest-benchmark integration of the kernel benchmarks (``pytest benchmarks/ --benchmark-only``).

Benchmarks never run in the default test run: the repository's ``testpaths`` is ``tests``, and even when this folder
is collected explicitly every item is skipped unless ``--benchmark-only`` is given.
"""

import os

import pytest
import torch

# The Triton interpreter must be chosen before triton is first imported (a CPU build of torch runs Triton no other way).
if torch.version.cuda is None or not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "benchmark_kernels: a kernel benchmark (runs only with --benchmark-only)")


def pytest_collection_modifyitems(config, items):
    try:
        only = bool(config.getoption("benchmark_only"))
    except ValueError:  # pytest-benchmark is not installed: nothing here can run
        only = False
    skip = pytest.mark.skip(reason="kernel benchmarks run only with `pytest benchmarks/ --benchmark-only` "
                                   "(needs pytest-benchmark)")
    for item in items:
        if "benchmark_kernels" in item.keywords and not only:
            item.add_marker(skip)
