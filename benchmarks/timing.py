"""Timing of the benchmarks: the one timer every benchmark goes through (via :mod:`harness`).

* CPU: ``time.perf_counter`` around ``inner`` back-to-back calls (``inner`` chosen so that one sample lasts at least
  ``min_sample_ms``), ``repeats`` samples per callable. The callables of one case are timed **interleaved** (round
  robin, rotating the start), so a load spike on a shared machine hits every provider alike and the ratios between
  them stay meaningful. ``torch.set_num_threads`` is set by :func:`harness.setup` and recorded in the header.
* CUDA: ``triton.testing.do_bench(return_mode="all")`` when triton imports (it flushes the L2 cache before every
  run, so small shapes are measured cold), else CUDA events with the same L2 flush. Peak memory comes from
  ``torch.cuda.max_memory_allocated`` around one call.
* Median, interquartile range and min/max of the samples are reported (:class:`Timing`).
* :func:`pytest_benchmark`: the same timing attached to a pytest-benchmark run.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

__all__ = ["Timing", "measure", "peak_memory", "pytest_benchmark"]


@dataclasses.dataclass
class Timing:
    """Summary of the timed samples of one callable, in milliseconds per call."""

    median_ms: float
    q25_ms: float
    q75_ms: float
    min_ms: float
    max_ms: float
    samples: int
    inner: int = 1  # calls per sample (CPU); 1 on CUDA

    @property
    def iqr_ms(self) -> float:
        return self.q75_ms - self.q25_ms

    @classmethod
    def from_samples(cls, samples_ms: Sequence[float], inner: int = 1) -> "Timing":
        xs = sorted(float(x) for x in samples_ms)
        if not xs:
            raise ValueError("samples_ms: expected at least one sample, got none")
        if len(xs) >= 4:
            q = statistics.quantiles(xs, n=4, method="inclusive")
            q25, q75 = q[0], q[2]
        else:
            q25, q75 = xs[0], xs[-1]
        return cls(statistics.median(xs), q25, q75, xs[0], xs[-1], len(xs), inner)


def _time_cpu_interleaved(
    fns: Dict[str, Callable[[], object]], warmup: int, repeats: int, min_sample_ms: float
) -> Dict[str, Timing]:
    names = list(fns)
    inner: Dict[str, int] = {}
    for name in names:  # warm up, then size the inner loop so that one sample lasts >= min_sample_ms
        fn = fns[name]
        for _ in range(max(1, warmup)):
            fn()
        t0 = time.perf_counter()
        fn()
        one_ms = (time.perf_counter() - t0) * 1e3
        inner[name] = max(1, min(1000, math.ceil(min_sample_ms / max(one_ms, 1e-3))))
    samples: Dict[str, List[float]] = {n: [] for n in names}
    for r in range(repeats):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            fn, k = fns[name], inner[name]
            t0 = time.perf_counter()
            for _ in range(k):
                fn()
            samples[name].append((time.perf_counter() - t0) * 1e3 / k)
    return {n: Timing.from_samples(samples[n], inner[n]) for n in names}


_L2_FLUSH: Dict[int, torch.Tensor] = {}


def _time_cuda_events(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> Timing:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    flush = _L2_FLUSH.get(idx)
    if flush is None:
        flush = _L2_FLUSH[idx] = torch.empty(256 * 1024 * 1024, dtype=torch.int8, device=device)
    for _ in range(max(1, warmup)):
        fn()
    torch.cuda.synchronize(device)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    for i in range(repeats):
        flush.zero_()
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize(device)
    return Timing.from_samples([s.elapsed_time(e) for s, e in zip(starts, ends)])


def _time_cuda(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int, rep_ms: float) -> Timing:
    try:
        from triton.testing import do_bench
    except Exception:  # noqa: BLE001 - no (working) triton: CUDA events do the same job
        do_bench = None
    if do_bench is not None:
        try:
            fn()  # autotuning / lazy init outside the measured window
            torch.cuda.synchronize(device)
            times = do_bench(fn, warmup=max(25, warmup), rep=rep_ms, return_mode="all")
            if isinstance(times, (list, tuple)) and times:
                return Timing.from_samples(times)
        except (TypeError, AssertionError):  # an old triton without return_mode="all"
            pass
    return _time_cuda_events(fn, device, warmup, max(repeats, 50))


def measure(
    fns: Dict[str, Callable[[], object]],
    device: torch.device,
    *,
    warmup: int = 3,
    repeats: int = 15,
    min_sample_ms: float = 20.0,
    rep_ms: float = 100.0,
) -> Dict[str, Timing]:
    """Time each callable of one case; returns ``{name: Timing}`` (ms per call).

    CPU: interleaved, ``repeats`` samples of ``inner`` calls each. CUDA: each callable alone through do_bench (about
    ``rep_ms`` of runs, L2 flushed before each) or CUDA events (``repeats`` runs).
    """
    if device.type == "cpu":
        return _time_cpu_interleaved(fns, warmup, repeats, min_sample_ms)
    return {name: _time_cuda(fn, device, warmup, repeats, rep_ms) for name, fn in fns.items()}


def peak_memory(fn: Callable[[], object], device: torch.device) -> Tuple[Optional[float], Optional[float]]:
    """``(peak_mb, extra_mb)`` of one call on CUDA: ``max_memory_allocated`` (inputs included) and the same minus the
    memory allocated before the call. ``(None, None)`` on the CPU (the CPU allocator keeps no such statistics)."""
    if device.type != "cuda":
        return None, None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    out = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    del out
    return peak / 2**20, (peak - before) / 2**20


def pytest_benchmark(benchmark, name: str, fn: Callable[[], object], device: torch.device, rounds: int,
                     logical_bytes: Optional[int] = None) -> None:
    """Time ``fn`` with pytest-benchmark (``benchmark.pedantic``, one warmup round); on CUDA the calls synchronise,
    and ``benchmark.extra_info`` gets this harness's median and IQR, the GB/s of ``logical_bytes`` (if given) and
    the peak memory."""
    if device.type != "cuda":
        benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=1)
        return
    timing = measure({name: fn}, device, rep_ms=50.0)[name]
    peak, extra = peak_memory(fn, device)
    info: Dict[str, object] = {"harness_median_ms": timing.median_ms, "harness_iqr_ms": [timing.q25_ms, timing.q75_ms]}
    if logical_bytes is not None:
        info["gbps"] = logical_bytes / (timing.median_ms * 1e-3) / 1e9
    benchmark.extra_info.update(info, peak_mem_mb=peak, extra_mem_mb=extra)

    def synchronized():
        fn()
        torch.cuda.synchronize(device)

    benchmark.pedantic(synchronized, rounds=rounds, iterations=1, warmup_rounds=1)
