"""Checks and image preparation shared by the metrics that load a network from a local file or folder
(:mod:`.copy_detection`, :mod:`.clip_quality`). Nothing is downloaded: a path that is missing or holds the wrong kind of
file fails at config validation, before any model loads, with the option's key in the message.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

__all__ = ["check_torchscript_file", "check_model_folder", "prepare_images"]


def check_torchscript_file(key: str, path: Any) -> Path:
    """``path`` as a :class:`Path` if it is a TorchScript archive (what ``torch.jit.save`` writes: a zip with a
    ``code/`` tree and ``constants.pkl``), else ValueError naming ``key`` and what the file is instead."""
    if not isinstance(path, (str, Path)) or not str(path):
        raise ValueError(f"{key}: expected the path of a local TorchScript file, got {path!r}")
    p = Path(path).expanduser()
    if not p.is_file():
        raise ValueError(f"{key}: file {str(p)!r} not found")
    if not zipfile.is_zipfile(p):
        raise ValueError(f"{key}: {str(p)!r} is not a TorchScript archive (not a zip file; torch.jit.save writes one)")
    names = zipfile.ZipFile(p).namelist()
    if not any("/code/" in n for n in names) or not any(n.endswith("/constants.pkl") for n in names):
        raise ValueError(f"{key}: {str(p)!r} is a torch.save checkpoint, not a TorchScript archive: export the "
                         f"model with torch.jit.script or torch.jit.trace and torch.jit.save")
    return p


def check_model_folder(key: str, path: Any, model_types: Sequence[str]) -> Path:
    """``path`` as a :class:`Path` if it is a folder whose ``config.json`` has a ``model_type`` in ``model_types``
    (a ``save_pretrained`` folder of that kind), else ValueError naming ``key``."""
    if not isinstance(path, (str, Path)) or not str(path):
        raise ValueError(f"{key}: expected the path of a local model folder, got {path!r}")
    p = Path(path).expanduser()
    if not p.is_dir():
        raise ValueError(f"{key}: folder {str(p)!r} not found")
    config = p / "config.json"
    if not config.is_file():
        raise ValueError(f"{key}: {str(p)!r} has no config.json (expected a save_pretrained folder)")
    try:
        kind = json.loads(config.read_text()).get("model_type")
    except (ValueError, AttributeError):
        raise ValueError(f"{key}: {str(config)!r} is not a JSON object") from None
    if kind not in model_types:
        raise ValueError(f"{key}: {str(p)!r} holds a model of type {kind!r}, expected one of {list(model_types)}")
    return p


def prepare_images(images: Tensor, size: int, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """``(N, C, H, W)`` in ``[0, 1]`` -> ``(N, 3, size, size)`` fp32: grey images repeated to RGB, resized
    (bilinear, antialiased), then ``(x - mean) / std`` per channel."""
    x = images.float()
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if x.shape[1] != 3:
        raise ValueError(f"expected 1 or 3 image channels, got {x.shape[1]}")
    if x.shape[-2:] != (size, size):
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                                            antialias=True)
    m = torch.tensor(mean, dtype=x.dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - m) / s
