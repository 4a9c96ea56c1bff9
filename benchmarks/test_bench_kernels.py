"""The kernel benchmarks under pytest-benchmark: ``pytest benchmarks/ --benchmark-only``.

One benchmark per (op, mode, provider) on one case, built by the benchmark scripts' own ``build_cases`` (no second
copy of any provider). pytest-benchmark times wall-clock calls through ``benchmark.pedantic``; on CUDA the call
synchronises and the harness's CUDA-event / do_bench timing of the same callable is attached to ``extra_info``
(``harness_median_ms``, ``harness_iqr_ms``, ``gbps``, ``peak_mem_mb``), which is the figure to quote.

Environment: ``SISS_FAST_BENCH_SHAPE`` (default 16x4x64x64), ``SISS_FAST_BENCH_DTYPE`` (default fp32),
``SISS_FAST_BENCH_TINY=1`` (smoke: 3x4x17x23, torch.compile with the aot_eager backend, two rounds).
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_mixture_noise  # noqa: E402
import bench_siss_loss  # noqa: E402
import harness as H  # noqa: E402
import kernel_bench as K  # noqa: E402

pytest.importorskip("pytest_benchmark")

pytestmark = pytest.mark.benchmark_kernels

TINY = os.environ.get("SISS_FAST_BENCH_TINY", "0") == "1"
SHAPE = H.parse_shape(os.environ.get("SISS_FAST_BENCH_SHAPE", "3x4x17x23" if TINY else "16x4x64x64"))
DTYPE = H.parse_dtype(os.environ.get("SISS_FAST_BENCH_DTYPE", "fp32"))
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ROUNDS = 2 if TINY else 10

BENCHES = {"siss_loss": bench_siss_loss, "mixture_noise": bench_mixture_noise}
PARAMS = [(op, mode, prov) for op, mod in BENCHES.items() for mode in mod.MODES for prov in mod.PROVIDERS]


@functools.lru_cache(maxsize=None)
def _device() -> torch.device:
    return H.setup(DEVICE, None)


@functools.lru_cache(maxsize=None)
def _cases(op: str):
    module = BENCHES[op]
    device = _device()
    plan = K.Plan(device=device, shapes=[SHAPE], dtypes=[DTYPE], modes=list(module.MODES),
                  providers=list(module.PROVIDERS), repeats=3 if TINY else 15,
                  compile_backend="aot_eager" if TINY else "inductor", min_sample_ms=1.0 if TINY else 20.0,
                  rep_ms=20.0 if TINY else 100.0, tiny=TINY)
    K.configure_compile()
    return {case.mode: case for case in module.build_cases(SHAPE, DTYPE, plan)}


@pytest.mark.parametrize("op,mode,provider", PARAMS, ids=["-".join(p) for p in PARAMS])
def test_kernel(benchmark, op, mode, provider):
    case = _cases(op)[mode]
    if provider in case.skipped:
        pytest.skip(case.skipped[provider])
    if provider in case.interpreted and not TINY:
        pytest.skip("Triton runs under TRITON_INTERPRET=1 here: not a speed figure (runs with SISS_FAST_BENCH_TINY=1)")
    device = _device()
    fn = case.fns[provider]
    fn()  # compile / autotune / surface errors outside the timed rounds

    benchmark.group = f"{op} {case.shape} {case.dtype} {mode}"
    benchmark.extra_info.update(op=op, shape=case.shape, dtype=case.dtype, mode=mode, provider=provider,
                                device=device.type, logical_bytes=case.logical_bytes,
                                interpreter=provider in case.interpreted)
    H.pytest_benchmark(benchmark, provider, fn, device, ROUNDS, logical_bytes=case.logical_bytes)
