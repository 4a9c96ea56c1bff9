"""Backend registry: which implementation runs the ``siss_fast::`` ops.

Names: ``"auto"`` (default), ``"torch"`` (pure-PyTorch reference, any device), ``"cpp"`` (compiled extension, CPU
tensors), ``"cuda"`` (compiled extension, CUDA tensors), ``"triton"`` (Triton kernels: CUDA tensors, or CPU tensors
under ``TRITON_INTERPRET=1``). The initial choice comes from the environment variable ``SISS_FAST_BACKEND``.

``auto`` picks, per device, the compiled extension, then Triton, then the reference; when it falls back it says why,
once. An explicitly requested backend that is unavailable, or that cannot run on the tensors' device, raises
:class:`BackendUnavailableError` naming what is missing. Nothing here probes the GPU or imports Triton at import time.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import threading
import warnings
from pathlib import Path
from types import ModuleType
from typing import Dict, Optional, Tuple

import torch

from . import reference

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "set_backend",
    "get_backend",
    "resolve",
    "backend_module",
    "availability",
]

BACKENDS = ("auto", "torch", "cpp", "triton", "cuda")
ENV_VAR = "SISS_FAST_BACKEND"


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run here; the message names what is missing."""


_lock = threading.Lock()
_requested: Optional[str] = None  # None: not set yet, read SISS_FAST_BACKEND on first use
_resolved: Dict[str, Tuple[str, ModuleType]] = {}  # device type -> (backend name, module), for "auto"
_warned: set = set()
_triton: Optional[Tuple[Optional[ModuleType], Optional[str]]] = None


def _validate_name(name: object, source: str) -> str:
    if not isinstance(name, str) or name.lower() not in BACKENDS:
        raise ValueError(f"{source}: expected one of {BACKENDS}, got {name!r}")
    return name.lower()


def get_backend() -> str:
    """The requested backend name: ``"auto"`` unless set by :func:`set_backend` or ``SISS_FAST_BACKEND``."""
    global _requested
    if _requested is None:
        _requested = _validate_name(os.environ.get(ENV_VAR, "auto"), ENV_VAR)
    return _requested


def set_backend(name: str) -> None:
    """Select the backend for every following op call (process-wide).

    An explicit backend is checked now: if it cannot run in this process (extension not built, Triton missing, no
    CUDA device) a :class:`BackendUnavailableError` says what is missing and the previous choice stays.
    """
    global _requested
    name = _validate_name(name, "name")
    if name != "auto":
        ok, why = availability(name)
        if not ok:
            raise BackendUnavailableError(f"backend {name!r} is unavailable: {why}")
    with _lock:
        _requested = name
        _resolved.clear()


# ---------------------------------------------------------------------------------------------------------------
# availability of each backend


def _extension() -> ModuleType:
    from . import _extension

    return _extension


def _load_triton() -> Tuple[Optional[ModuleType], Optional[str]]:
    """Import the Triton kernels once; returns (module, None) or (None, reason)."""
    global _triton
    if _triton is not None:
        return _triton
    if importlib.util.find_spec("triton") is None:
        _triton = (None, "the triton package is not installed (pip install triton)")
        return _triton
    try:
        module = importlib.import_module("siss_fast.kernels")
    except ImportError as exc:
        module = _load_source_tree_kernels()
        if module is None:
            _triton = (None, f"siss_fast.kernels failed to import: {exc}")
            return _triton
    except Exception as exc:  # a broken triton install raises all sorts of errors
        _triton = (None, f"siss_fast.kernels failed to import: {type(exc).__name__}: {exc}")
        return _triton
    _triton = (module, None)
    return _triton


def _load_source_tree_kernels() -> Optional[ModuleType]:
    """In a source checkout that was not installed, ``kernels/`` sits beside ``siss_fast/``: load it as
    ``siss_fast.kernels`` (an installed wheel maps it there through setup.py)."""
    init = Path(__file__).resolve().parent.parent / "kernels" / "__init__.py"
    if not init.is_file():
        return None
    spec = importlib.util.spec_from_file_location("siss_fast.kernels", init, submodule_search_locations=[str(init.parent)])
    if spec is None or spec.loader is None:
        return None
    module = importlib.util.module_from_spec(spec)
    sys.modules["siss_fast.kernels"] = module
    try:
        spec.loader.exec_module(module)
    except Exception:
        del sys.modules["siss_fast.kernels"]
        raise
    return module


def _triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def availability(name: str, device_type: Optional[str] = None) -> Tuple[bool, str]:
    """Whether backend ``name`` can run (on ``device_type`` if given), and if not, why."""
    if name == "torch":
        return True, "pure PyTorch"
    if name in ("cpp", "cuda"):
        ext = _extension()
        if not ext.available():
            return False, f"the compiled extension siss_fast._C is not built ({ext.failure_reason()})"
        if name == "cuda":
            if not ext.cuda_available():
                return False, "siss_fast._C was built without CUDA kernels (build with a CUDA torch and nvcc)"
            if device_type is None and not torch.cuda.is_available():
                return False, "no CUDA device is available"
        if device_type is not None and device_type != ("cuda" if name == "cuda" else "cpu"):
            want = "CUDA" if name == "cuda" else "CPU"
            return False, f"backend {name!r} runs on {want} tensors, got tensors on {device_type}"
        return True, "compiled extension"
    if name == "triton":
        module, why = _load_triton()
        if module is None:
            return False, why or "unknown"
        if device_type == "cpu" or (device_type is None and not torch.cuda.is_available()):
            if not _triton_interpreted():
                return False, "Triton runs on CUDA tensors; on the CPU only with TRITON_INTERPRET=1 set before import"
            return True, "Triton interpreter (TRITON_INTERPRET=1)"
        if device_type not in (None, "cuda"):
            return False, f"Triton runs on CUDA tensors, got tensors on {device_type}"
        return True, "Triton"
    raise ValueError(f"name: expected one of {BACKENDS}, got {name!r}")


def backend_module(name: str) -> ModuleType:
    """The module implementing backend ``name`` (reference contract: see :mod:`siss_fast.reference`)."""
    if name == "torch":
        return reference
    if name in ("cpp", "cuda"):
        return _extension()
    if name == "triton":
        module, why = _load_triton()
        if module is None:
            raise BackendUnavailableError(f"backend 'triton' is unavailable: {why}")
        return module
    raise ValueError(f"name: expected one of {BACKENDS}, got {name!r}")


def _auto_order(device_type: str) -> Tuple[str, ...]:
    if device_type == "cuda":
        return ("cuda", "triton", "torch")
    if device_type == "cpu":
        return ("cpp", "torch")
    return ("torch",)


def resolve(device: torch.device) -> Tuple[str, ModuleType]:
    """The backend that runs ops on ``device``: ``(name, module)``."""
    requested = get_backend()
    device_type = device.type
    if requested != "auto":
        ok, why = availability(requested, device_type)
        if not ok:
            raise BackendUnavailableError(f"backend {requested!r} cannot run here: {why}")
        return requested, backend_module(requested)
    cached = _resolved.get(device_type)
    if cached is not None:
        return cached
    reasons = []
    for name in _auto_order(device_type):
        ok, why = availability(name, device_type)
        if ok:
            break
        reasons.append(f"{name}: {why}")
    choice = (name, backend_module(name))
    with _lock:
        _resolved[device_type] = choice
    if reasons and device_type not in _warned:
        _warned.add(device_type)
        warnings.warn(
            f"siss_fast: backend 'auto' uses {name!r} on {device_type} tensors because " + "; ".join(reasons),
            RuntimeWarning,
            stacklevel=3,
        )
    return choice
