"""Launcher helpers shared by the Triton kernels of this folder.

Nothing here touches CUDA at import time. Under ``TRITON_INTERPRET=1`` (read once, at import, exactly as Triton
itself does) kernels run on the CPU interpreter, where every program instance costs about a millisecond, so the
launchers then use a few large blocks instead of many small ones.
"""

from __future__ import annotations

import math
import os
import struct
from typing import Tuple

import torch
from torch import Tensor

#: True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1`` set before triton was imported).
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def as_rows(t: Tensor, batch: int) -> Tensor:
    """``t`` as a contiguous ``(B, D)`` tensor; a no-op (no copy) when ``t`` is already contiguous."""
    return t.contiguous().view(batch, -1)


def as_vector(t: Tensor) -> Tensor:
    """A ``(B,)`` per-sample tensor as a contiguous vector (an expanded upstream gradient has stride 0)."""
    return t.reshape(-1).contiguous()


def split_hi_lo(x: float) -> Tuple[float, float]:
    """Split a Python float into two fp32-representable parts with ``hi + lo == x`` to about 2**-48 relative.

    Triton passes Python floats to kernels as fp32 scalars. The kernels rebuild a constant in the accumulation
    dtype as ``hi.to(acc) + lo.to(acc)``: in fp32 that rounds back to ``hi`` (= fp32(x), since |lo| <= ulp(hi)/2),
    in fp64 it keeps ~48 significant bits, far below the fp64 oracle tolerances. Infinities keep ``lo = 0`` so that
    ``-inf + 0 = -inf`` (log 0 = -inf must survive the round trip).
    """
    if not math.isfinite(x):
        return x, 0.0
    hi = struct.unpack("f", struct.pack("f", x))[0]
    lo = struct.unpack("f", struct.pack("f", x - hi))[0]
    return hi, lo


def elementwise_configs(triton):
    """Autotune space for the elementwise kernels. Their outputs do not depend on the configuration."""
    return [
        triton.Config({"BLOCK": 1024}, num_warps=4),
        triton.Config({"BLOCK": 2048}, num_warps=4),
        triton.Config({"BLOCK": 2048}, num_warps=8),
        triton.Config({"BLOCK": 4096}, num_warps=8),
    ]


def check_device(*tensors: Tensor) -> None:
    """Triton kernels need GPU tensors, except under the interpreter, which runs on CPU tensors."""
    if INTERPRET:
        return
    for t in tensors:
        if t.device.type == "cpu":
            raise ValueError(
                "the triton backend needs GPU tensors (or TRITON_INTERPRET=1 set before triton is imported); "
                f"got a tensor on {t.device}"
            )

