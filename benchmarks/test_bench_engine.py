"""The engine benchmark under pytest-benchmark: ``pytest benchmarks/test_bench_engine.py --benchmark-only``.

One benchmark per provider of ``bench_engine.py`` on one case, built by that script's own ``prepare`` and
``build_case`` (no second copy of any provider). A round is one optimizer step. On CUDA each call synchronises and the
harness's timing and peak memory of the same callable are attached to ``extra_info``.

Environment: ``SISS_FAST_BENCH_ENGINE_SHAPE`` (micro-batch of latents, default 2x4x64x64), ``SISS_FAST_BENCH_ENGINE_ACC``
(accumulation steps, default 1), ``SISS_FAST_BENCH_TINY=1`` (smoke: 2x4x16x16 latents, two rounds),
``SISS_FAST_BENCH_THREADS`` (CPU threads, default 1: on a loaded 2-core machine more threads stall).
"""

from __future__ import annotations

import functools
import os
import sys
import tempfile
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_engine  # noqa: E402
import harness as H  # noqa: E402

pytest.importorskip("pytest_benchmark")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")

pytestmark = pytest.mark.benchmark_kernels  # same gate as the kernel benchmarks: only with --benchmark-only

TINY = os.environ.get("SISS_FAST_BENCH_TINY", "0") == "1"
SHAPE = H.parse_shape(os.environ.get("SISS_FAST_BENCH_ENGINE_SHAPE", "2x4x16x16" if TINY else "2x4x64x64"))
ACC = int(os.environ.get("SISS_FAST_BENCH_ENGINE_ACC", "1"))
THREADS = int(os.environ.get("SISS_FAST_BENCH_THREADS", "1"))
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ROUNDS = 2 if TINY else 5


@functools.lru_cache(maxsize=None)
def _case():
    device = H.setup(DEVICE, THREADS if DEVICE == "cpu" else None)
    work = Path(tempfile.mkdtemp(prefix="siss-bench-engine-"))
    bench = bench_engine.prepare(SHAPE, ACC, device, sd_v1=False, schedule="sd", work=work)
    case, objs = bench_engine.build_case(bench, bench_engine.PROVIDERS)
    return device, case, objs


@pytest.mark.parametrize("provider", bench_engine.PROVIDERS)
def test_engine_step(benchmark, provider):
    device, case, objs = _case()
    if provider in case.skipped:
        pytest.skip(case.skipped[provider])
    fn = case.fns[provider]
    fn()  # surface errors and warm up outside the timed rounds
    benchmark.group = f"{case.op} {case.shape} {case.dtype} {case.mode}"
    benchmark.extra_info.update(op=case.op, shape=case.shape, dtype=case.dtype, mode=case.mode, provider=provider,
                                device=device.type, threads=torch.get_num_threads())
    H.pytest_benchmark(benchmark, provider, fn, device, ROUNDS)
    obj = objs[provider]
    counts = getattr(obj, "counts", None)
    if counts is not None:
        benchmark.extra_info.update(split_counts=dict(counts))
    benchmark.extra_info.update(grad_buffers=obj.grad_buffers())
