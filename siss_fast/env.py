"""``env_report()``: what is installed, what was compiled (and why not), which devices and backends are in use."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys
from typing import List

import torch

from . import backends

__all__ = ["env_report"]


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def env_report() -> str:
    """A plain-text report: versions, compiled extension, Triton, devices, requested and resolved backends.

    Calling it may initialise CUDA (it lists devices); importing siss_fast never does.
    """
    from . import __version__, _extension

    lines: List[str] = [f"siss_fast {__version__}"]
    lines.append(f"python {sys.version.split()[0]} ({platform.platform()})")
    cuda_build = torch.version.cuda or "none (CPU build)"
    lines.append(f"torch {torch.__version__} (CUDA build: {cuda_build})")
    for dist in ("triton", "numpy", "diffusers", "transformers", "accelerate", "safetensors"):
        lines.append(f"{dist} {_version(dist)}")

    lines.append("")
    if _extension.available():
        info = _extension.build_info()
        kinds = "CPU + CUDA kernels" if _extension.cuda_available() else "CPU kernels only"
        lines.append(f"extension siss_fast._C: built ({kinds}); {info}")
    else:
        lines.append(f"extension siss_fast._C: not available ({_extension.failure_reason()})")
    interp = os.environ.get("TRITON_INTERPRET", "0") == "1"
    lines.append(f"TRITON_INTERPRET={'1 (kernels run on the CPU interpreter)' if interp else '0'}")

    lines.append("")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            lines.append(f"cuda:{i} {props.name}, {props.total_memory / 2**30:.1f} GiB, sm_{props.major}{props.minor}")
    else:
        lines.append("CUDA devices: none")
    lines.append(f"CPU threads: {torch.get_num_threads()}")

    lines.append("")
    lines.append(f"backend requested: {backends.get_backend()} (env {backends.ENV_VAR}="
                 f"{os.environ.get(backends.ENV_VAR, '<unset>')})")
    for name in backends.backend_names():
        ok, why = backends.availability(name)
        lines.append(f"  {name:7s} {'available' if ok else 'unavailable'}: {why}")
    device_types = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device_type in device_types:
        try:
            name, _ = backends.resolve(torch.device(device_type))
            lines.append(f"  ops on {device_type} tensors run on: {name}")
        except backends.BackendUnavailableError as exc:
            lines.append(f"  ops on {device_type} tensors: {exc}")
    return "\n".join(lines)
