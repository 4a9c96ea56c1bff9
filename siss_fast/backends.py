"""Backend registry: which implementation runs the ``siss_fast::`` ops.

Names: ``"auto"`` (default), ``"torch"`` (pure-PyTorch reference, any device), ``"cpp"`` (compiled extension, CPU
tensors), ``"cuda"`` (compiled extension, CUDA tensors), ``"triton"`` (Triton kernels: CUDA tensors, or CPU tensors
under ``TRITON_INTERPRET=1``). The initial choice comes from the environment variable ``SISS_FAST_BACKEND``.

``auto`` picks, per device, the compiled extension, then Triton, then the reference; when it falls back it says why,
once. An explicitly requested backend that is unavailable, or that cannot run on the tensors' device, raises
:class:`BackendUnavailableError` naming what is missing. Nothing here probes the GPU or imports Triton at import time.

Each backend is a :class:`Backend` record (name, devices, availability check with its reason, the op
implementations, where ``auto`` considers it); tests (tests/conftest.py) and benchmarks (benchmarks/kernel_bench.py)
enumerate :func:`backend_names`. Adding a backend is its module plus one :func:`register_backend` call::

    register_backend(Backend("mine", ("cuda",), check=lambda device_type: (True, "mine"), load=lambda: my_module,
                             auto_devices=("cuda",), priority=5))
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
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple

import torch

from . import reference

__all__ = [
    "Backend",
    "BackendUnavailableError",
    "availability",
    "backend_module",
    "backend_names",
    "get_backend",
    "register_backend",
    "resolve",
    "set_backend",
    "unregister_backend",
]

ENV_VAR = "SISS_FAST_BACKEND"


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run here; the message names what is missing."""


@dataclass(frozen=True)
class Backend:
    """One backend: a small record the registry, the tests and the benchmarks enumerate.

    Attributes:
        name: what :func:`set_backend` and ``SISS_FAST_BACKEND`` take.
        devices: the device types whose tensors it can run on (``"*"``: any).
        check: ``device_type or None -> (ok, why)``: whether it can run in this process (on tensors of that device
            type when given), and the reason either way. Never imports Triton or touches CUDA unless asked.
        load: ``() -> ops``: an object with the three backend functions of the contract of
            :mod:`siss_fast.reference` (``mixture_noise``, ``siss_loss_forward``, ``siss_loss_backward``); called
            only after ``check`` said yes.
        auto_devices: the device types on which ``auto`` considers it (``"*"``: any), in ``priority`` order
            (lower first).
    """

    name: str
    devices: Tuple[str, ...]
    check: Callable[[Optional[str]], Tuple[bool, str]]
    load: Callable[[], Any]
    auto_devices: Tuple[str, ...] = ()
    priority: int = 50

    def runs_on(self, device_type: str) -> bool:
        return "*" in self.devices or device_type in self.devices


_lock = threading.RLock()
_BACKENDS: Dict[str, Backend] = {}
_requested: Optional[str] = None  # None: not set yet, read SISS_FAST_BACKEND on first use
_resolved: Dict[str, Tuple[str, Any]] = {}  # device type -> (backend name, ops), for "auto"
_warned: set = set()
_triton: Optional[Tuple[Optional[ModuleType], Optional[str]]] = None


def register_backend(backend: Backend, *, replace: bool = False) -> Backend:
    """Add ``backend`` to the registry (ValueError if the name is taken, unless ``replace``); returns it."""
    if not isinstance(backend, Backend):
        raise TypeError(f"backend: expected a Backend record, got {type(backend).__name__}")
    if backend.name == "auto":
        raise ValueError("backend: 'auto' is reserved for the automatic choice")
    with _lock:
        if backend.name in _BACKENDS and not replace:
            raise ValueError(f"backend {backend.name!r} is already registered (pass replace=True to replace it)")
        _BACKENDS[backend.name] = backend
        _resolved.clear()
    return backend


def unregister_backend(name: str) -> None:
    """Remove a backend (KeyError if it is not registered); ``set_backend("auto")`` first if it is the current one."""
    global _requested
    with _lock:
        del _BACKENDS[name]
        _resolved.clear()
        if _requested == name:
            _requested = "auto"


def backend_names(device_type: Optional[str] = None) -> Tuple[str, ...]:
    """The registered backends (those that can run on ``device_type`` tensors, if given), in registration order;
    ``"auto"`` is not among them."""
    return tuple(n for n, b in _BACKENDS.items() if device_type is None or b.runs_on(device_type))


def _validate_name(name: object, source: str) -> str:
    names = ("auto",) + backend_names()
    if not isinstance(name, str) or name.lower() not in names:
        raise ValueError(f"{source}: expected one of {names}, got {name!r}")
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
# the built-in backends


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


def _check_torch(device_type: Optional[str]) -> Tuple[bool, str]:
    return True, "pure PyTorch"


def _check_extension(name: str, device_type: Optional[str]) -> Tuple[bool, str]:
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


def _check_triton(device_type: Optional[str]) -> Tuple[bool, str]:
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


def _triton_ops() -> ModuleType:
    module, why = _load_triton()
    if module is None:
        raise BackendUnavailableError(f"backend 'triton' is unavailable: {why}")
    return module


for _backend in (
    Backend("torch", ("*",), _check_torch, lambda: reference, auto_devices=("*",), priority=100),
    Backend("cpp", ("cpu",), lambda d: _check_extension("cpp", d), lambda: _extension().ops(), ("cpu",), 10),
    Backend("triton", ("cuda", "cpu"), _check_triton, _triton_ops, ("cuda",), 20),
    Backend("cuda", ("cuda",), lambda d: _check_extension("cuda", d), lambda: _extension().ops(), ("cuda",), 10),
):
    register_backend(_backend)
del _backend


# ---------------------------------------------------------------------------------------------------------------
# choosing one


def _get(name: str) -> Backend:
    backend = _BACKENDS.get(name)
    if backend is None:
        raise ValueError(f"name: expected one of {('auto',) + backend_names()}, got {name!r}")
    return backend


def availability(name: str, device_type: Optional[str] = None) -> Tuple[bool, str]:
    """Whether backend ``name`` can run (on ``device_type`` if given), and if not, why."""
    return _get(name).check(device_type)


def backend_module(name: str) -> Any:
    """The op implementations of backend ``name`` (an object with the functions of :mod:`siss_fast.reference`)."""
    return _get(name).load()


def _auto_order(device_type: str) -> Tuple[str, ...]:
    candidates = [b for b in _BACKENDS.values() if "*" in b.auto_devices or device_type in b.auto_devices]
    return tuple(b.name for b in sorted(candidates, key=lambda b: b.priority))


def resolve(device: torch.device) -> Tuple[str, Any]:
    """The backend that runs ops on ``device``: ``(name, its op implementations)``."""
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
    else:
        raise BackendUnavailableError(f"no registered backend runs on {device_type} tensors: " + "; ".join(reasons))
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
