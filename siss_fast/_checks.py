"""Argument checks of the public functions (SPEC §8).

Every check runs before any kernel does. A violation raises ``TypeError`` (wrong kind or dtype) or ``ValueError``
(wrong shape, device or value) whose message names the argument, what was expected and what was given.

Value checks that need the data (``sigma > 0``, timesteps in range) read the tensor, which synchronises a CUDA
device; they are skipped while ``torch.compile`` traces and can be switched off with ``SISS_FAST_VALUE_CHECKS=0``.
"""

from __future__ import annotations

import math
import numbers
import os
from typing import Dict, Optional, Sequence

import torch
from torch import Tensor

__all__ = [
    "check_tensor",
    "check_same_shape",
    "check_per_sample",
    "check_mask",
    "check_same_device",
    "check_lambd",
    "check_weight_clip",
    "check_reduction",
    "check_sigma_positive",
    "check_timesteps",
    "value_checks_enabled",
]

REDUCTIONS = ("mean", "sum", "none")


def value_checks_enabled() -> bool:
    """Data-dependent checks run unless tracing under torch.compile or disabled by ``SISS_FAST_VALUE_CHECKS=0``."""
    if os.environ.get("SISS_FAST_VALUE_CHECKS", "1") == "0":
        return False
    return not torch.compiler.is_compiling()


def _describe(x: object) -> str:
    if isinstance(x, Tensor):
        return f"a {x.dtype} tensor of shape {tuple(x.shape)} on {x.device}"
    return f"{type(x).__name__} {x!r}"[:200]


def check_tensor(name: str, x: object, *, floating: bool = True) -> Tensor:
    """``x`` must be a tensor (floating point unless ``floating=False``)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {_describe(x)}")
    if floating and not x.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor (float16, bfloat16, float32, float64), got {x.dtype}")
    return x


def check_same_shape(tensors: Dict[str, Tensor]) -> torch.Size:
    """All tensors have one shape ``(B, ...)`` with B >= 1 and at least one element per sample; returns it.

    The expected shape is the one most of the tensors share, so the message names the odd one out.
    """
    shapes = [t.shape for t in tensors.values()]
    expected = max(shapes, key=shapes.count)  # ties: the first one
    for name, t in tensors.items():
        if t.shape != expected:
            others = ", ".join(n for n, u in tensors.items() if u.shape == expected)
            raise ValueError(f"{name}: expected shape {tuple(expected)} (the shape of {others}), got {tuple(t.shape)}")
    first_name = next(iter(tensors))
    if len(expected) < 1:
        raise ValueError(f"{first_name}: expected a tensor of shape (B, ...) with a batch dimension, got a 0-d tensor")
    if expected[0] < 1:
        raise ValueError(f"{first_name}: expected a batch of B >= 1 samples, got shape {tuple(expected)}")
    if math.prod(expected) == 0:
        raise ValueError(f"{first_name}: expected at least one element per sample, got shape {tuple(expected)}")
    return expected


def check_per_sample(name: str, x: object, batch: int, *, floating: bool = True) -> Tensor:
    """A per-sample vector: a tensor of shape ``(B,)``."""
    x = check_tensor(name, x, floating=floating)
    if x.shape != (batch,):
        raise ValueError(f"{name}: expected shape ({batch},) (one value per sample), got {tuple(x.shape)}")
    return x


def check_mask(name: str, x: object, batch: int) -> Tensor:
    """A ``(B,)`` bool mask (integer 0/1 tensors are accepted and converted)."""
    x = check_tensor(name, x, floating=False)
    if x.is_floating_point() or x.is_complex():
        raise TypeError(f"{name}: expected a bool tensor (True = forget component), got {x.dtype}")
    x = check_per_sample(name, x, batch, floating=False)
    return x if x.dtype == torch.bool else x != 0


def check_same_device(tensors: Dict[str, Tensor]) -> torch.device:
    """All tensors live on the device of the first one."""
    (first_name, first), *rest = tensors.items()
    for name, t in rest:
        if t.device != first.device:
            raise ValueError(f"{name}: expected a tensor on {first.device} (the device of {first_name}), got {t.device}")
    return first.device


def _real_number(name: str, x: object) -> float:
    if isinstance(x, Tensor) and x.numel() == 1 and not x.requires_grad:
        x = x.item()
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise TypeError(f"{name}: expected a real number, got {_describe(x)}")
    return float(x)


def check_lambd(lambd: object) -> float:
    """The mixture probability: a real number with 0 <= lambd <= 1."""
    value = _real_number("lambd", lambd)
    if not (0.0 <= value <= 1.0):
        raise ValueError(f"lambd: expected a probability 0 <= lambd <= 1, got {value!r}")
    return value


def check_weight_clip(weight_clip: object) -> Optional[float]:
    """``None`` (no clipping) or a real number > 0; ``inf`` means no clipping."""
    if weight_clip is None:
        return None
    value = _real_number("weight_clip", weight_clip)
    if not value > 0.0:  # also rejects NaN
        raise ValueError(f"weight_clip: expected None or a number > 0, got {value!r}")
    return None if math.isinf(value) else value


def check_reduction(reduction: object) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected one of {REDUCTIONS}, got {reduction!r}")
    return reduction  # type: ignore[return-value]


def check_sigma_positive(sigma: Tensor) -> None:
    if value_checks_enabled() and not bool((sigma > 0).all()):
        bad = sigma[~(sigma > 0)][:4].tolist()
        raise ValueError(f"sigma: expected every value > 0 (sigma_t = sqrt(1 - alphas_cumprod[t])), got {bad}")


def check_timesteps(timesteps: object, num_timesteps: int) -> Tensor:
    """Integer timesteps of shape ``(B,)`` (a 0-d tensor is one sample) with values in ``[0, T)``."""
    t = check_tensor("timesteps", timesteps, floating=False)
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"timesteps: expected an integer tensor, got {t.dtype}")
    if t.dim() == 0:
        t = t.reshape(1)
    if t.dim() != 1 or t.shape[0] < 1:
        raise ValueError(f"timesteps: expected shape (B,) with B >= 1, got {tuple(t.shape)}")
    if value_checks_enabled():
        low, high = int(t.min()), int(t.max())
        if low < 0 or high >= num_timesteps:
            raise ValueError(
                f"timesteps: expected values in [0, {num_timesteps}) (the length of alphas_cumprod), "
                f"got values in [{low}, {high}]"
            )
    return t


def promote(tensors: Sequence[Tensor]) -> torch.dtype:
    """The common floating dtype of ``tensors`` (torch's promotion rules)."""
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype
