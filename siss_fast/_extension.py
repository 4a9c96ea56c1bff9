"""Loader of the compiled extension ``siss_fast._C`` (backends ``cpp`` and ``cuda``).

Loads like torchao's ops: try the import once, record why it failed as a string, never raise at import time,
never touch CUDA. Importing ``siss_fast._C`` registers the ``siss_fast::*_ext`` operators (csrc/ops.cpp):

* ``siss_fast::mixture_noise_ext(x0, a0, noise, gamma, sigma, mask) -> Tensor``
* ``siss_fast::siss_loss_forward_ext(pred, noisy, x0, a0, gamma, sigma, lambd, weight_clip) -> (ell_x, ell_a, w_x, w_a)``
* ``siss_fast::siss_loss_backward_ext(grad_ell_x, grad_ell_a, w_x, w_a, pred, noisy, x0, a0, gamma, sigma) -> Tensor``

with CPU kernels always and CUDA kernels when the extension was compiled with them. :func:`ops` returns them under
the names and with the contract of :mod:`siss_fast.reference`; arguments reach them validated by
:mod:`siss_fast._checks`.

The CPU kernels are compiled once per CPU capability (``default``; on x86-64 also ``avx2`` and ``avx512``); the
``avx2`` build runs when the CPU has AVX2, else ``default`` (AVX-512 is no faster for these memory-bound kernels;
csrc/cpu/dispatch.cpp). ``SISS_FAST_CPU_CAPABILITY=default|avx2|avx512`` selects the build at import time;
:func:`set_cpu_capability` switches it at run time (tests, benchmarks). Results are bitwise
independent of the thread count for one capability; capabilities agree to rounding.
"""

from __future__ import annotations

import importlib
from types import SimpleNamespace
from typing import Any, Dict, Optional, Tuple

import torch

__all__ = [
    "available",
    "cuda_available",
    "failure_reason",
    "build_info",
    "cpu_capability",
    "supported_cpu_capabilities",
    "set_cpu_capability",
    "ops",
]

OP_NAMES = ("mixture_noise_ext", "siss_loss_forward_ext", "siss_loss_backward_ext")

_C: Any = None
_FAILURE: Optional[str] = None


def _load() -> None:
    global _C, _FAILURE
    try:
        module = importlib.import_module("siss_fast._C")
    except ModuleNotFoundError as exc:
        if exc.name != "siss_fast._C":
            _FAILURE = f"siss_fast._C failed to load ({type(exc).__name__}: {exc})"
        else:
            _FAILURE = ("the compiled extension siss_fast._C is not built (install with a C++ compiler and "
                        "`pip install --no-build-isolation .`, or run `python setup.py build_ext --inplace`)")
        return
    except Exception as exc:  # noqa: BLE001 - a broken build (e.g. an ABI mismatch) must never break the import
        _FAILURE = f"siss_fast._C failed to load ({type(exc).__name__}: {exc})"
        return
    missing = [name for name in OP_NAMES if not hasattr(torch.ops.siss_fast, name)]
    if missing:
        _FAILURE = f"siss_fast._C loaded but did not register {', '.join('siss_fast::' + n for n in missing)}"
        return
    _C = module


_load()


def available() -> bool:
    """True when ``siss_fast._C`` loaded and registered its operators (the ``cpp`` backend)."""
    return _C is not None


def cuda_available() -> bool:
    """True when the loaded extension was compiled with its CUDA kernels (says nothing about a GPU being present)."""
    return _C is not None and bool(getattr(_C, "with_cuda", 0))


def failure_reason() -> Optional[str]:
    """Why the extension is unavailable, or None when it loaded."""
    return None if _C is not None else _FAILURE


def build_info() -> Dict[str, Any]:
    """Facts about the compiled extension: whether it loaded, with CUDA kernels, and what it was built against."""
    info: Dict[str, Any] = {
        "available": available(),
        "with_cuda": cuda_available(),
        "failure_reason": failure_reason(),
        "path": getattr(_C, "__file__", None),
        "built_against_torch": getattr(_C, "torch_version", None),
        "running_torch": torch.__version__,
        "cuda_runtime_version": None,
        "cpu_capability": cpu_capability(),
        "cpu_capabilities": supported_cpu_capabilities(),
    }
    cuda_version = int(getattr(_C, "cuda_runtime_version", 0) or 0)
    if cuda_version:
        info["cuda_runtime_version"] = f"{cuda_version // 1000}.{(cuda_version % 1000) // 10}"
    built = info["built_against_torch"]
    info["torch_mismatch"] = bool(built) and built != torch.__version__.split("+")[0]
    return info


def cpu_capability() -> Optional[str]:
    """The CPU kernel build in use (``"default"``, ``"avx2"`` or ``"avx512"``), or None without the extension."""
    return _C.cpu_capability() if _C is not None else None


def supported_cpu_capabilities() -> Tuple[str, ...]:
    """The CPU kernel builds compiled in that this CPU can run, lowest first (empty without the extension)."""
    return tuple(_C.supported_cpu_capabilities()) if _C is not None else ()


def set_cpu_capability(name: str) -> None:
    """Run the CPU kernels of ``name`` from now on (process-wide); ValueError if it is not supported here."""
    _require()
    _C.set_cpu_capability(str(name))


def _require() -> None:
    if _C is None:
        raise RuntimeError(f"siss_fast compiled extension unavailable: {_FAILURE}")


_OPS: Optional[SimpleNamespace] = None


def ops() -> SimpleNamespace:
    """The backend functions of ``cpp`` and ``cuda``: the ``siss_fast::*_ext`` operators under the names and with
    the contract of :mod:`siss_fast.reference` (``mixture_noise``, ``siss_loss_forward``, ``siss_loss_backward``;
    the C++ kernels pick the CPU or CUDA implementation by the tensors' device)."""
    global _OPS
    _require()
    if _OPS is None:
        ext = torch.ops.siss_fast
        _OPS = SimpleNamespace(mixture_noise=ext.mixture_noise_ext, siss_loss_forward=ext.siss_loss_forward_ext,
                               siss_loss_backward=ext.siss_loss_backward_ext)
    return _OPS
