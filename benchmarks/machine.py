"""The machine side of a benchmark run: the results header (machine, versions, git revision, backends) and the
bandwidth yardsticks.

Bandwidth
    ``GB/s = logical bytes / median time`` (1 GB = 1e9 bytes). Logical bytes count each input read once and each output
    written once (what a perfectly fused kernel has to move), so the figure is comparable across providers. On the GPU
    it is also given as a share of the device's peak HBM bandwidth (stated in the header, :func:`device_peak_bandwidth`)
    and of a device-to-device ``copy_`` measured in the same run (:func:`copy_bandwidth`); on the CPU as a share of the
    measured ``copy_`` only.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch

from timing import measure

__all__ = ["copy_bandwidth", "device_peak_bandwidth", "machine_header"]

REPO_ROOT = Path(__file__).resolve().parent.parent

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


def copy_bandwidth(device: torch.device, nbytes: Optional[int] = None) -> Dict[str, float]:
    """Bandwidth of a large ``dst.copy_(src)`` on ``device`` (read + write counted), in GB/s.

    Sizes: 1 GiB per buffer on CUDA, 128 MiB on the CPU (well beyond the last-level cache).
    """
    if nbytes is None:
        nbytes = 2**30 if device.type == "cuda" else 2**27
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    t = measure({"copy": lambda d=dst, s=src: d.copy_(s)}, device, warmup=3, repeats=9, min_sample_ms=50.0)["copy"]
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


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> Optional[str]:
    """1/5/15-minute load averages: on a shared machine, the first thing to read beside a CPU number."""
    try:
        return "/".join(f"{x:.2f}" for x in os.getloadavg())
    except (OSError, AttributeError):
        return None


def oversubscription_warning(device: torch.device) -> Optional[str]:
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
        "load_average_at_start": load_average(),
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
