"""The one benchmark harness of siss_fast: timing, bandwidth, peak memory, result rows, header, JSON + markdown.

Every benchmark script (``bench_*.py``) and the pytest-benchmark wrapper (``test_bench_kernels.py``) time through this
module; none carries a timer of its own.

Timing
    * CPU: ``time.perf_counter`` around ``inner`` back-to-back calls (``inner`` chosen so that one sample lasts at least
      ``min_sample_ms``), ``repeats`` samples per callable. The callables of one case are timed **interleaved** (round
      robin, rotating the start), so a load spike on a shared machine hits every provider alike and the ratios between
      them stay meaningful. ``torch.set_num_threads`` is set by :func:`setup` and recorded in the header.
    * CUDA: ``triton.testing.do_bench(return_mode="all")`` when triton imports (it flushes the L2 cache before every
      run, so small shapes are measured cold), else CUDA events with the same L2 flush. Peak memory comes from
      ``torch.cuda.max_memory_allocated`` around one call.
    * Median, interquartile range and min/max of the samples are reported.

Bandwidth
    ``GB/s = logical bytes / median time`` (1 GB = 1e9 bytes). Logical bytes count each input read once and each output
    written once (what a perfectly fused kernel has to move), so the figure is comparable across providers. On the GPU
    it is also given as a share of the device's peak HBM bandwidth (stated in the header) and of a device-to-device
    ``copy_`` measured in the same run; on the CPU as a share of the measured ``copy_`` only.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

__all__ = [
    "Timing",
    "BenchRow",
    "Target",
    "setup",
    "common_parser",
    "parse_shape",
    "parse_dtype",
    "dtype_name",
    "measure",
    "peak_memory",
    "copy_bandwidth",
    "device_peak_bandwidth",
    "machine_header",
    "fill_bandwidth",
    "fill_speedups",
    "check_target",
    "render_markdown",
    "print_rows",
    "write_results",
    "run_cases",
    "Case",
    "Plan",
    "backend_status",
    "bench_main",
    "BASELINES",
]

#: The two rows every speedup is measured against, side by side in the same run.
BASELINES = ("research-eager", "compiled-ref")

REPO_ROOT = Path(__file__).resolve().parent.parent

# An installed siss_fast (e.g. the CI venv's wheel) wins; a bare source checkout is used in place.
if importlib.util.find_spec("siss_fast") is None:
    sys.path.insert(0, str(REPO_ROOT))

# Peak HBM bandwidth (GB/s, vendor figures) by a substring of torch.cuda.get_device_name(); the first match wins.
_PEAK_BANDWIDTH_GBS = (
    ("H200", 4800.0),  # HBM3e, NVIDIA H200 SXM datasheet
    ("H100 NVL", 3900.0),
    ("H100 PCIe", 2000.0),
    ("H100", 3350.0),  # SXM5
    ("GH200", 4000.0),
    ("B200", 8000.0),
    ("A100-SXM4-80GB", 2039.0),
    ("A100 80GB PCIe", 1935.0),
    ("A100", 1555.0),
    ("L40S", 864.0),
    ("L4", 300.0),
    ("A10G", 600.0),
    ("V100", 900.0),
    ("T4", 320.0),
    ("RTX 4090", 1008.0),
    ("RTX 3090", 936.0),
)


# ------------------------------------------------------------------------------------------------------------ rows


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


@dataclasses.dataclass
class BenchRow:
    """One line of a result table. ``status`` is "ok", "skipped", "error", "interpreter" or "not measured"; numbers
    are None unless measured. Speedups are ``baseline median / this median`` (> 1: this row is faster)."""

    op: str
    shape: str
    dtype: str
    mode: str  # "forward" | "backward" | "forward+backward"
    provider: str
    device: str
    status: str = "ok"
    note: str = ""
    median_ms: Optional[float] = None
    q25_ms: Optional[float] = None
    q75_ms: Optional[float] = None
    min_ms: Optional[float] = None
    max_ms: Optional[float] = None
    samples: Optional[int] = None
    logical_bytes: Optional[int] = None
    gbps: Optional[float] = None
    pct_peak: Optional[float] = None
    pct_copy: Optional[float] = None
    speedup_vs_eager: Optional[float] = None
    speedup_vs_compiled: Optional[float] = None
    peak_mem_mb: Optional[float] = None  # max_memory_allocated during one call (inputs included), CUDA only
    extra_mem_mb: Optional[float] = None  # the same minus what was allocated before the call, CUDA only

    @property
    def key(self) -> Tuple[str, str, str, str]:
        return (self.op, self.shape, self.dtype, self.mode)

    @property
    def timed(self) -> bool:
        return self.status in ("ok", "interpreter") and self.median_ms is not None

    def set_timing(self, t: Timing) -> None:
        self.median_ms, self.q25_ms, self.q75_ms = t.median_ms, t.q25_ms, t.q75_ms
        self.min_ms, self.max_ms, self.samples = t.min_ms, t.max_ms, t.samples


@dataclasses.dataclass
class Target:
    """A speed target: ``provider`` at least ``min_ratio`` times faster than ``baseline`` on one case."""

    op: str
    shape: str
    dtype: str
    mode: str
    provider: str
    baseline: str
    min_ratio: float
    device: str = "cpu"
    threads: Optional[int] = None


# ----------------------------------------------------------------------------------------------------- environment


def setup(device: str, threads: Optional[int] = None, *, value_checks: bool = True) -> torch.device:
    """Prepare the process for benchmarking on ``device`` ("cpu" or "cuda"); call before anything imports triton.

    CPU: ``torch.set_num_threads(threads)`` (default: every core) and ``TRITON_INTERPRET=1`` when torch has no CUDA
    (the only way Triton runs there). CUDA: checks a device exists. ``value_checks=False`` sets
    ``SISS_FAST_VALUE_CHECKS=0`` (skips the data-dependent argument checks, which synchronise a GPU once per call).
    """
    if not value_checks:
        os.environ["SISS_FAST_VALUE_CHECKS"] = "0"
    if device == "cpu":
        if torch.version.cuda is None or not torch.cuda.is_available():
            os.environ.setdefault("TRITON_INTERPRET", "1")
        torch.set_num_threads(int(threads) if threads else (os.cpu_count() or 1))
        return torch.device("cpu")
    if device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device is available (torch %s)" % torch.__version__)
        if threads:
            torch.set_num_threads(int(threads))
        return torch.device("cuda")
    raise SystemExit(f"--device: expected cpu or cuda, got {device!r}")


def common_parser(description: str) -> argparse.ArgumentParser:
    """The command line shared by every benchmark script."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="where to run (default: cuda if available, else cpu)")
    p.add_argument("--quick", action="store_true", help="fewer shapes and repeats (a minute or two)")
    p.add_argument("--full", action="store_true", help="CPU: also the large shape (>= 64 MB per input tensor)")
    p.add_argument("--tiny", action="store_true", help="smoke pass: tiny shapes, two repeats (seconds)")
    p.add_argument("--out", type=Path, default=None, help="write results as JSON (and the same name with .md)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: all cores)")
    p.add_argument("--repeats", type=int, default=None, help="timed samples per provider")
    p.add_argument("--min-sample-ms", type=float, default=None,
                   help="CPU: shortest timed sample (default 20 ms; shorter samples dodge preemption on a loaded "
                        "machine, use more --repeats with them)")
    p.add_argument("--providers", default=None, help="comma-separated subset of the providers")
    p.add_argument("--shapes", default=None, help="comma-separated shapes, e.g. 16x4x64x64,3x4x17x23")
    p.add_argument("--dtypes", default=None, help="comma-separated dtypes: fp32,bf16,fp16")
    p.add_argument("--modes", default=None, help="comma-separated modes: forward,backward,forward+backward")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows (compile time is long)")
    p.add_argument("--no-value-checks", action="store_true",
                   help="SISS_FAST_VALUE_CHECKS=0: skip the data-dependent argument checks (a GPU sync per call)")
    return p


def resolve_device_arg(args: argparse.Namespace) -> str:
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return args.device


def split_list(text: Optional[str]) -> Optional[List[str]]:
    if text is None:
        return None
    return [t.strip() for t in text.split(",") if t.strip()]


def parse_shape(text: str) -> Tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in text.lower().split("x"))
    except ValueError:
        raise SystemExit(f"shape: expected e.g. 16x4x64x64, got {text!r}") from None
    if len(shape) < 2 or min(shape) < 1:
        raise SystemExit(f"shape: expected (B, ...) with every size >= 1, got {text!r}")
    return shape


def shape_name(shape: Sequence[int]) -> str:
    return "x".join(str(s) for s in shape)


_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}


def parse_dtype(text: str) -> torch.dtype:
    try:
        return _DTYPES[text.lower()]
    except KeyError:
        raise SystemExit(f"dtype: expected one of {sorted(_DTYPES)}, got {text!r}") from None


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in _DTYPES.items()}[dtype]


# ---------------------------------------------------------------------------------------------------------- timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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


def copy_bandwidth(device: torch.device, nbytes: Optional[int] = None) -> Dict[str, float]:
    """Bandwidth of a large ``dst.copy_(src)`` on ``device`` (read + write counted), in GB/s.

    Sizes: 1 GiB per buffer on CUDA, 128 MiB on the CPU (well beyond the last-level cache).
    """
    if nbytes is None:
        nbytes = 2**30 if device.type == "cuda" else 2**27
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    t = measure({"copy": lambda: dst.copy_(src)}, device, warmup=3, repeats=9, min_sample_ms=50.0)["copy"]
    gbps = 2 * src.numel() * src.element_size() / (t.median_ms * 1e-3) / 1e9
    del src, dst
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"copy_gbps": gbps, "copy_bytes_per_buffer": nbytes, "copy_median_ms": t.median_ms}


def device_peak_bandwidth(device: torch.device) -> Tuple[Optional[float], str]:
    """``(GB/s, source)`` of the device's peak memory bandwidth; ``(None, why)`` on the CPU."""
    if device.type != "cuda":
        return None, "no peak figure on the CPU (the measured copy_ bandwidth is the yardstick)"
    name = torch.cuda.get_device_name(device)
    for key, gbps in _PEAK_BANDWIDTH_GBS:
        if key in name:
            return gbps, f"vendor figure for {key} ({gbps:.0f} GB/s), matched on device name {name!r}"
    props = torch.cuda.get_device_properties(device)
    clock_khz = getattr(props, "memory_clock_rate", None)
    bus_bits = getattr(props, "memory_bus_width", None)
    if clock_khz and bus_bits:
        gbps = 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9
        return gbps, f"2 x memory clock ({clock_khz} kHz) x bus width ({bus_bits} bit) from device properties"
    return None, f"unknown peak bandwidth for {name!r}"


# ---------------------------------------------------------------------------------------------------------- header


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _load_average() -> Optional[str]:
    """1/5/15-minute load averages: on a shared machine, the first thing to read beside a CPU number."""
    try:
        return "/".join(f"{x:.2f}" for x in os.getloadavg())
    except (OSError, AttributeError):
        return None


def _oversubscription_warning(device: torch.device) -> Optional[str]:
    """A warning when other processes compete for the cores (5-minute load average above the core count)."""
    if device.type != "cpu" or not hasattr(os, "getloadavg"):
        return None
    load5 = os.getloadavg()[1]
    cores = os.cpu_count() or 1
    if load5 <= cores:
        return None
    return (f"the machine was oversubscribed (5-minute load {load5:.1f} on {cores} cores): every thread can be "
            "preempted for a scheduler quantum, multi-threaded regions stall on their slowest thread, and times "
            "jump in steps of ~10-20 ms. Treat absolute times and ratios here as indicative only; rerun on a quiet "
            "machine (the ratio of minimums is the least disturbed figure).")


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _git_revision() -> Dict[str, str]:
    def git(*args: str) -> Optional[str]:
        try:
            out = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    rev = git("rev-parse", "HEAD") or "unknown"
    status = git("status", "--porcelain")
    dirty = "unknown" if status is None else ("yes" if status else "no")
    return {"git_revision": rev, "git_dirty": dirty}


def machine_header(device: torch.device, *, copy: Optional[Dict[str, float]] = None) -> Dict[str, object]:
    """Machine, library versions, git revision, date, backends and bandwidth yardsticks of this run."""
    import siss_fast as sf
    from siss_fast import backends

    header: Dict[str, object] = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": device.type,
        "cpu_model": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_at_start": _load_average(),
        "process_niceness": os.nice(0) if hasattr(os, "nice") else None,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _version("triton"),
        "siss_fast": getattr(sf, "__version__", "unknown"),
        "siss_fast_path": str(Path(sf.__file__).resolve().parent),
        "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "0"),
        "value_checks": os.environ.get("SISS_FAST_VALUE_CHECKS", "1") != "0",
        "timer": ("perf_counter, interleaved providers" if device.type == "cpu"
                  else "triton.testing.do_bench (L2 flushed) or CUDA events"),
        **_git_revision(),
    }
    backend_state = {}
    for name in backends.backend_names():
        ok, why = backends.availability(name, device.type)
        backend_state[name] = "available" if ok else f"unavailable: {why}"
        if ok and name == "triton" and device.type == "cpu":
            backend_state[name] = "interpreter only (TRITON_INTERPRET=1): not a speed figure"
    header["backends"] = backend_state
    try:  # which SIMD build of the cpp kernels runs (the extension dispatches on the CPU's capability)
        from siss_fast import _extension

        cap = getattr(_extension._C, "cpu_capability", None)
        header["cpp_cpu_capability"] = cap() if callable(cap) else "not reported by this build"
        so = getattr(_extension._C, "__file__", None)
        if so:  # which build of the extension was measured
            import hashlib

            stat = Path(so).stat()
            header["extension_build"] = (
                f"{Path(so).name}, sha256 {hashlib.sha256(Path(so).read_bytes()).hexdigest()[:12]}, modified "
                + _dt.datetime.fromtimestamp(stat.st_mtime, _dt.timezone.utc).isoformat(timespec="seconds"))
    except Exception:  # noqa: BLE001
        header["cpp_cpu_capability"] = "unavailable"
    peak, source = device_peak_bandwidth(device)
    header["peak_bandwidth_gbps"] = peak
    header["peak_bandwidth_source"] = source
    if copy is not None:
        header.update(copy)
    return header


# ----------------------------------------------------------------------------------------------- derived numbers


def fill_bandwidth(rows: Iterable[BenchRow], header: Dict[str, object]) -> None:
    """GB/s from logical bytes, and its share of the device peak and of the measured copy bandwidth."""
    peak = header.get("peak_bandwidth_gbps")
    copy = header.get("copy_gbps")
    for row in rows:
        if not row.timed or not row.logical_bytes or row.status == "interpreter":
            continue
        row.gbps = row.logical_bytes / (row.median_ms * 1e-3) / 1e9
        if peak:
            row.pct_peak = 100.0 * row.gbps / float(peak)
        if copy:
            row.pct_copy = 100.0 * row.gbps / float(copy)


def fill_speedups(rows: List[BenchRow]) -> None:
    """``speedup_vs_eager`` / ``speedup_vs_compiled`` = baseline median / row median, within one (op, shape, dtype,
    mode) case of the same run. Interpreter rows get none (they are not speed figures)."""
    base: Dict[Tuple[Tuple[str, str, str, str], str], float] = {}
    for row in rows:
        if row.provider in BASELINES and row.status == "ok" and row.median_ms:
            base[(row.key, row.provider)] = row.median_ms
    for row in rows:
        if row.status != "ok" or not row.median_ms:
            continue
        eager = base.get((row.key, "research-eager"))
        compiled = base.get((row.key, "compiled-ref"))
        row.speedup_vs_eager = eager / row.median_ms if eager else None
        row.speedup_vs_compiled = compiled / row.median_ms if compiled else None


def check_target(rows: Sequence[BenchRow], target: Target) -> Dict[str, object]:
    """Evaluate one speed target on the rows of this run: verdict "target met", "MISSED" or "not measured"."""
    key = (target.op, target.shape, target.dtype, target.mode)
    found = {r.provider: r for r in rows if r.key == key and r.status == "ok" and r.median_ms}
    mine, theirs = found.get(target.provider), found.get(target.baseline)
    result: Dict[str, object] = dataclasses.asdict(target)
    if mine is None or theirs is None:
        missing = [p for p, r in ((target.provider, mine), (target.baseline, theirs)) if r is None]
        result.update(ratio=None, verdict="not measured", why=f"no timed row for {', '.join(missing)}")
        return result
    ratio = theirs.median_ms / mine.median_ms
    # the ratio's spread: worst and best pairing of the two rows' quartiles
    lo = theirs.q25_ms / mine.q75_ms if mine.q75_ms and theirs.q25_ms else None
    hi = theirs.q75_ms / mine.q25_ms if mine.q25_ms and theirs.q75_ms else None
    ratio_min = theirs.min_ms / mine.min_ms if mine.min_ms and theirs.min_ms else None  # least disturbed by load
    result.update(ratio=ratio, ratio_iqr=[lo, hi], ratio_of_minimums=ratio_min,
                  verdict="target met" if ratio >= target.min_ratio else "MISSED")
    return result


def target_line(result: Dict[str, object]) -> str:
    ratio = result.get("ratio")
    head = (f"{result['op']} {result['mode']} {result['shape']} {result['dtype']} on {result['device']}"
            + (f" ({result['threads']} threads)" if result.get("threads") else "")
            + f": {result['provider']} vs {result['baseline']} >= {result['min_ratio']:g}x")
    if ratio is None:
        return f"{head}: not measured ({result.get('why', '')})"
    iqr = result.get("ratio_iqr") or [None, None]
    spread = f" [IQR pairing {iqr[0]:.2f}-{iqr[1]:.2f}]" if iqr[0] and iqr[1] else ""
    rmin = result.get("ratio_of_minimums")
    spread += f" [ratio of minimums {rmin:.2f}x]" if rmin else ""
    return f"{head}: {ratio:.2f}x (medians){spread} -> {result['verdict']}"


# --------------------------------------------------------------------------------------------------------- output


def _fmt(x: Optional[float], spec: str) -> str:
    return "—" if x is None else format(x, spec)


_COLUMNS = ("op", "shape", "dtype", "mode", "provider", "median ms", "IQR ms", "min-max ms", "GB/s", "% peak",
            "% copy", "vs eager", "vs compiled", "peak MB", "extra MB", "note")


def _cells(row: BenchRow) -> List[str]:
    if row.timed:
        iqr = f"{row.q25_ms:.4g}-{row.q75_ms:.4g}"
        mm = f"{row.min_ms:.4g}-{row.max_ms:.4g}"
        med = f"{row.median_ms:.4g}"
    else:
        iqr = mm = "—"
        med = row.status
    note = row.note if row.status in ("ok", "interpreter") else f"{row.status}: {row.note}".rstrip(": ")
    return [row.op, row.shape, row.dtype, row.mode, row.provider, med, iqr, mm, _fmt(row.gbps, ".1f"),
            _fmt(row.pct_peak, ".1f"), _fmt(row.pct_copy, ".1f"),
            _fmt(row.speedup_vs_eager, ".2f") + ("x" if row.speedup_vs_eager else ""),
            _fmt(row.speedup_vs_compiled, ".2f") + ("x" if row.speedup_vs_compiled else ""),
            _fmt(row.peak_mem_mb, ".1f"), _fmt(row.extra_mem_mb, ".1f"), note.replace("|", "/")]


def render_markdown(title: str, header: Dict[str, object], rows: Sequence[BenchRow],
                    targets: Sequence[Dict[str, object]] = (), command: Optional[str] = None) -> str:
    lines = [f"# {title}", ""]
    if command:
        lines += ["Command: `" + command + "`", ""]
    for k, v in header.items():
        if isinstance(v, dict):
            lines.append(f"- **{k}**:")
            lines += [f"  - {kk}: {vv}" for kk, vv in v.items()]
        elif isinstance(v, float):
            lines.append(f"- **{k}**: {v:.4g}")
        else:
            lines.append(f"- **{k}**: {v}")
    lines += [
        "",
        "Times are medians per call (ms); IQR = 25th-75th percentile of the samples. GB/s = logical bytes / median "
        "(inputs read once, outputs written once). \"vs eager\" / \"vs compiled\" = research-eager / compiled-ref "
        "median divided by the row's median, measured side by side in this run (> 1: faster). Peak/extra MB: CUDA "
        "max_memory_allocated during one call, with and without the memory held before it.",
        "",
    ]
    if targets:
        lines += ["## Targets", ""] + [f"- {target_line(t)}" for t in targets] + [""]
    lines += ["## Results", "", "| " + " | ".join(_COLUMNS) + " |", "|" + "---|" * len(_COLUMNS)]
    lines += ["| " + " | ".join(_cells(r)) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def print_rows(rows: Sequence[BenchRow], file=None) -> None:
    """A fixed-width table on stdout (the same columns as the markdown table)."""
    file = file or sys.stdout
    table = [list(_COLUMNS)] + [_cells(r) for r in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(_COLUMNS) - 1)]
    for r in table:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1], file=file)
    file.flush()


def write_results(path: Path, title: str, header: Dict[str, object], rows: Sequence[BenchRow],
                  targets: Sequence[Dict[str, object]] = (), command: Optional[str] = None) -> Tuple[Path, Path]:
    """Write ``path`` (JSON: header, rows, targets) and the markdown table next to it (same stem, ``.md``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"title": title, "command": command, "header": header,
           "targets": list(targets), "rows": [dataclasses.asdict(r) for r in rows]}
    path.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    md = path.with_suffix(".md")
    md.write_text(render_markdown(title, header, rows, targets, command))
    return path, md


# ----------------------------------------------------------------------------------------------------- the driver


@dataclasses.dataclass
class Case:
    """One (op, shape, dtype, mode) case: the callables of every provider and the rows to fill.

    ``fns`` maps a provider to a zero-argument callable; ``skipped`` maps a provider to the reason it has no row;
    ``interpreted`` names providers whose time is not a speed figure (Triton interpreter)."""

    op: str
    shape: str
    dtype: str
    mode: str
    logical_bytes: int
    fns: Dict[str, Callable[[], object]]
    skipped: Dict[str, str] = dataclasses.field(default_factory=dict)
    interpreted: Tuple[str, ...] = ()
    notes: Dict[str, str] = dataclasses.field(default_factory=dict)


def run_cases(
    cases: Iterable[Case],
    device: torch.device,
    providers: Sequence[str],
    *,
    repeats: int,
    warmup: int = 3,
    min_sample_ms: float = 20.0,
    rep_ms: float = 100.0,
    verbose: bool = True,
) -> List[BenchRow]:
    """Time every case (providers of a case interleaved on the CPU) and return one row per (case, provider), in
    ``providers`` order. A provider that raises gets an "error" row with the exception; the run goes on."""
    rows: List[BenchRow] = []
    for case in cases:
        case_rows: Dict[str, BenchRow] = {}
        runnable: Dict[str, Callable[[], object]] = {}
        for prov in providers:
            row = BenchRow(case.op, case.shape, case.dtype, case.mode, prov, device.type,
                           logical_bytes=case.logical_bytes, note=case.notes.get(prov, ""))
            case_rows[prov] = row
            if prov in case.skipped:
                row.status, row.note = "skipped", case.skipped[prov]
            elif prov not in case.fns:
                row.status, row.note = "skipped", "not part of this benchmark"
            else:
                fn = case.fns[prov]
                try:  # one call first: it surfaces errors (and compiles) before anything is timed
                    fn()
                    _sync(device)
                except Exception as exc:  # noqa: BLE001 - report it in the table, keep going
                    row.status, row.note = "error", f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
                    continue
                runnable[prov] = fn
        timed_fast = {p: f for p, f in runnable.items() if p not in case.interpreted}
        timed_slow = {p: f for p, f in runnable.items() if p in case.interpreted}
        results: Dict[str, Timing] = {}
        try:
            if timed_fast:
                results.update(measure(timed_fast, device, warmup=warmup, repeats=repeats,
                                       min_sample_ms=min_sample_ms, rep_ms=rep_ms))
            if timed_slow:  # the interpreter: a couple of calls, only to show it runs
                results.update(measure(timed_slow, device, warmup=0, repeats=2, min_sample_ms=0.0, rep_ms=rep_ms))
        except Exception as exc:  # noqa: BLE001
            for p in runnable:
                if p not in results:
                    case_rows[p].status, case_rows[p].note = "error", f"{type(exc).__name__}: {exc}"[:200]
        for prov, t in results.items():
            row = case_rows[prov]
            row.set_timing(t)
            if prov in case.interpreted:
                row.status = "interpreter"
                row.note = "TRITON_INTERPRET=1 interpreter, not a speed figure"
            if device.type == "cuda":
                try:
                    row.peak_mem_mb, row.extra_mem_mb = peak_memory(runnable[prov], device)
                except Exception:  # noqa: BLE001 - memory statistics are a bonus
                    pass
        ordered = [case_rows[p] for p in providers]
        rows.extend(ordered)
        if verbose:
            best = ", ".join(f"{r.provider} {r.median_ms:.4g} ms" for r in ordered if r.timed)
            print(f"  {case.op} {case.shape} {case.dtype} {case.mode}: {best}", flush=True)
    return rows


# ------------------------------------------------------------------------------------------- plans and the main loop

#: Shapes (B, C, H, W): Stable Diffusion latents, pixel space, one large (64 MiB per fp32 input), one awkward.
SHAPES = {
    "cpu": ("16x4x64x64", "64x4x64x64", "4x3x256x256", "3x4x17x23"),
    "cpu-full": ("16x4x64x64", "64x4x64x64", "4x3x256x256", "64x4x256x256", "3x4x17x23"),
    "cuda": ("16x4x64x64", "64x4x64x64", "4x3x256x256", "64x4x256x256", "3x4x17x23"),
    "cpu-quick": ("16x4x64x64", "3x4x17x23"),
    "cuda-quick": ("16x4x64x64", "64x4x256x256", "3x4x17x23"),
    "tiny": ("2x4x8x8", "3x4x17x23"),
}
DTYPES = {
    "cpu": ("fp32", "bf16"),
    "cuda": ("fp32", "bf16", "fp16"),
    "cpu-quick": ("fp32",),
    "cuda-quick": ("fp32", "bf16"),
    "tiny": ("fp32", "bf16"),
}
#: Under TRITON_INTERPRET=1 every program instance costs about a millisecond: only tiny cases get a triton row.
TRITON_INTERPRETER_MAX_NUMEL = 16384


@dataclasses.dataclass
class Plan:
    """What one run measures (from the command line and the device)."""

    device: torch.device
    shapes: List[Tuple[int, ...]]
    dtypes: List[torch.dtype]
    modes: List[str]
    providers: List[str]
    repeats: int
    compile_backend: Optional[str]  # "inductor", "aot_eager" (smoke: exercises tracing, not a speed figure) or None
    min_sample_ms: float
    rep_ms: float
    tiny: bool


def make_plan(args: argparse.Namespace, device: torch.device, providers: Sequence[str], modes: Sequence[str]) -> Plan:
    dev = device.type
    if args.tiny:
        shapes, dtypes, repeats, min_ms, rep_ms = SHAPES["tiny"], DTYPES["tiny"], 3, 1.0, 10.0
    elif args.quick:
        shapes, dtypes, repeats, min_ms, rep_ms = SHAPES[f"{dev}-quick"], DTYPES[f"{dev}-quick"], 9, 10.0, 50.0
    else:
        key = "cpu-full" if (dev == "cpu" and args.full) else dev
        shapes, dtypes, repeats, min_ms, rep_ms = SHAPES[key], DTYPES[dev], 15, 20.0, 100.0
    shapes = split_list(args.shapes) or list(shapes)
    dtypes = split_list(args.dtypes) or list(dtypes)
    chosen_modes = split_list(args.modes) or list(modes)
    bad = [m for m in chosen_modes if m not in modes]
    if bad:
        raise SystemExit(f"--modes: expected a subset of {list(modes)}, got {bad}")
    chosen = split_list(args.providers) or list(providers)
    bad = [p for p in chosen if p not in providers]
    if bad:
        raise SystemExit(f"--providers: expected a subset of {list(providers)}, got {bad}")
    if args.no_compile and "compiled-ref" in chosen:
        chosen.remove("compiled-ref")
    return Plan(
        device=device,
        shapes=[parse_shape(s) for s in shapes],
        dtypes=[parse_dtype(d) for d in dtypes],
        modes=chosen_modes,
        providers=chosen,
        repeats=args.repeats or repeats,
        compile_backend=None if args.no_compile else ("aot_eager" if args.tiny else "inductor"),
        min_sample_ms=args.min_sample_ms if args.min_sample_ms is not None else min_ms,
        rep_ms=rep_ms,
        tiny=bool(args.tiny),
    )


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


def kernel_providers() -> Tuple[str, ...]:
    """The providers of a kernel benchmark: the research code's eager formulation, ``torch.compile`` of the
    reference, then every registered siss_fast backend (:func:`siss_fast.backends.backend_names`)."""
    from siss_fast.backends import backend_names

    return ("research-eager", "compiled-ref") + backend_names()


def compiled_reference(fn: Callable, plan: "Plan", notes: Dict[str, str]) -> Callable:
    """``torch.compile(fn)`` with the plan's compile backend (the ``compiled-ref`` provider); notes a smoke run."""
    compiled = torch.compile(fn, backend=plan.compile_backend, dynamic=False)
    if plan.compile_backend != "inductor":
        notes["compiled-ref"] = f"torch.compile backend={plan.compile_backend} (smoke), not a speed figure"
    return compiled


def admit_backend(name: str, device: torch.device, numel: int, skipped: Dict[str, str],
                  interpreted: List[str]) -> bool:
    """Whether backend provider ``name`` runs in this case; records why not in ``skipped`` and an interpreted run
    (no speed figure) in ``interpreted``."""
    ok, why, interp = backend_status(name, device, numel)
    if not ok:
        skipped[name] = why
    elif interp:
        interpreted.append(name)
    return ok


def backend_status(name: str, device: torch.device, numel: int) -> Tuple[bool, str, bool]:
    """``(runnable, reason, interpreted)`` for a siss_fast backend on tensors of ``numel`` elements on ``device``."""
    from siss_fast import backends

    ok, why = backends.availability(name, device.type)
    if not ok:
        if name == "cuda" and device.type == "cpu":
            why = f"GPU: not measured in a CPU run ({why})"
        return False, why, False
    interpreted = name == "triton" and device.type == "cpu"
    if interpreted and numel > TRITON_INTERPRETER_MAX_NUMEL:
        return False, (f"TRITON_INTERPRET=1 interpreter only on this machine; too slow above "
                       f"{TRITON_INTERPRETER_MAX_NUMEL} elements (see the 3x4x17x23 row)"), True
    return True, why, interpreted


def use_backend(name: str) -> None:
    """Select a siss_fast backend, cheaply when it is already the current one (called inside timed callables so
    that interleaved providers each run on their own backend)."""
    import siss_fast as sf

    if sf.get_backend() != name:
        sf.set_backend(name)


def configure_compile() -> None:
    """Room for one compiled graph per (shape, dtype, requires_grad) case without hitting dynamo's recompile limit."""
    import torch._dynamo.config as dynamo_config

    for attr in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo_config, attr):
            setattr(dynamo_config, attr, max(getattr(dynamo_config, attr), 256))


def bench_main(
    title: str,
    stem: str,
    providers: Sequence[str],
    modes: Sequence[str],
    build_cases: Callable[[Tuple[int, ...], torch.dtype, Plan], List[Case]],
    targets: Sequence[Target] = (),
    argv: Optional[Sequence[str]] = None,
) -> int:
    """The ``main`` of every benchmark script: parse, plan, measure every (shape, dtype), print, write, check targets.

    Returns the exit status: 1 when any row errored, else 0. With ``--out`` the JSON (+ .md) is rewritten after every
    (shape, dtype) group, so a run cut short by a time limit still leaves its finished rows.
    """
    args = common_parser(title).parse_args(argv)
    device = setup(resolve_device_arg(args), args.threads, value_checks=not args.no_value_checks)
    plan = make_plan(args, device, providers, modes)
    if plan.compile_backend is not None:
        configure_compile()
    command = "python " + " ".join([os.path.relpath(sys.argv[0], os.getcwd()) if sys.argv else stem,
                                    *(argv if argv is not None else sys.argv[1:])])
    copy = copy_bandwidth(device, 2**24 if plan.tiny else None)
    header = machine_header(device, copy=copy)
    header["compile_backend"] = plan.compile_backend or "skipped (--no-compile)"
    if _oversubscription_warning(device):
        print("WARNING: " + _oversubscription_warning(device), flush=True)
    print(f"== {title} on {device.type}: {header['cpu_model']}, {header['torch_threads']} threads"
          + (f", {header['gpu']}" if header["gpu"] else "")
          + f"; torch {header['torch']}, triton {header['triton']}; copy_ {copy['copy_gbps']:.1f} GB/s", flush=True)
    rows: List[BenchRow] = []
    evaluated: List[Dict[str, object]] = []

    def finish(final: bool) -> None:
        fill_bandwidth(rows, header)
        fill_speedups(rows)
        header["load_average_at_end"] = _load_average()
        warning = _oversubscription_warning(device)
        if warning:
            header["WARNING"] = warning
        evaluated.clear()
        planned = {(H_shape, H_dtype, m) for H_shape in map(shape_name, plan.shapes)
                   for H_dtype in map(dtype_name, plan.dtypes) for m in plan.modes}
        for target in targets:
            if target.device == device.type and (target.shape, target.dtype, target.mode) in planned:
                t = dataclasses.replace(target, threads=torch.get_num_threads() if device.type == "cpu" else None)
                evaluated.append(check_target(rows, t))
        if args.out is not None:
            write_results(args.out, title, header, rows, evaluated, command)

    for shape in plan.shapes:
        for dtype in plan.dtypes:
            cases = build_cases(shape, dtype, plan)
            rows.extend(run_cases(cases, device, plan.providers, repeats=plan.repeats, min_sample_ms=plan.min_sample_ms,
                                  rep_ms=plan.rep_ms))
            del cases
            if device.type == "cuda":
                torch.cuda.empty_cache()
            finish(final=False)
    finish(final=True)
    print()
    print_rows(rows)
    if evaluated:
        print()
        for t in evaluated:
            print(target_line(t))
    if args.out is not None:
        print(f"\nwrote {args.out} and {Path(args.out).with_suffix('.md')}")
    errors = [r for r in rows if r.status == "error"]
    if errors:
        print(f"\n{len(errors)} row(s) errored:", file=sys.stderr)
        for r in errors:
            print(f"  {r.op} {r.shape} {r.dtype} {r.mode} {r.provider}: {r.note}", file=sys.stderr)
        return 1
    return 0
