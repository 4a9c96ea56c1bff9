"""The one benchmark harness of siss_fast: result rows, the shared command line, timing of cases, JSON + markdown.

Every benchmark script (``bench_*.py``) and the pytest-benchmark wrappers (``test_bench_*.py``) time through this
module; none carries a timer of its own. It is split in four modules, all imported through this one:

* :mod:`timing` -- the timer (:class:`Timing`, :func:`measure`, :func:`peak_memory`, :func:`pytest_benchmark`):
  interleaved ``perf_counter`` samples on the CPU, ``triton.testing.do_bench`` or CUDA events on the GPU;
* :mod:`machine` -- the results header (:func:`machine_header`) and the bandwidth yardsticks (peak HBM, ``copy_``);
* this module -- rows (:class:`BenchRow`, :class:`Target`), the command line shared by every script, derived numbers
  (GB/s, speedups, targets), the tables and files, and :func:`run_cases`, which times the providers of each case;
* :mod:`kernel_bench` -- the kernel benchmarks' ``main`` (plans, providers, backends): :func:`kernel_bench.bench_main`.

Bandwidth: ``GB/s = logical bytes / median time`` (1 GB = 1e9 bytes), each input read once and each output written
once, so the figure is comparable across providers (details in :mod:`machine`).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from machine import copy_bandwidth, device_peak_bandwidth, load_average, machine_header
from timing import Timing, measure, peak_memory, pytest_benchmark

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
    "pytest_benchmark",
    "copy_bandwidth",
    "device_peak_bandwidth",
    "machine_header",
    "load_average",
    "fill_bandwidth",
    "fill_speedups",
    "check_target",
    "render_markdown",
    "print_rows",
    "write_results",
    "run_cases",
    "Case",
    "BASELINES",
]

#: The two rows every speedup is measured against, side by side in the same run.
BASELINES = ("research-eager", "compiled-ref")

REPO_ROOT = Path(__file__).resolve().parent.parent

# An installed siss_fast (e.g. the CI venv's wheel) wins; a bare source checkout is used in place.
if importlib.util.find_spec("siss_fast") is None:
    sys.path.insert(0, str(REPO_ROOT))

_load_average = load_average  # the name bench_engine.py uses


# ------------------------------------------------------------------------------------------------------------ rows


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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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

