"""Shared helpers of the engine tests: tiny model folders (built once per session) and small configs."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict

import numpy as np

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
DATA = EXAMPLES / "data"


def write_images(folder: Path, count: int, size: int = 16, seed: int = 0, mode: str = "RGB") -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        shape = (size, size, 3) if mode == "RGB" else (size, size)
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode).save(folder / f"img_{i:02d}.png")
    return folder


def base_config(model_dir: Path, out: Path, **sections: Dict[str, Any]) -> Dict[str, Any]:
    cfg: Dict[str, Any] = {
        "model": {"path": str(model_dir)},
        "data": {"retain_dir": str(DATA / "retain"), "forget_dir": str(DATA / "forget")},
        "train": {"steps": 2, "batch_size": 2, "seed": 0, "device": "cpu", "cpu_threads": 1},
        "validation": {"every": 0},
        "log": {"progress": False},
        "output_dir": str(out),
    }
    for key, value in sections.items():
        if isinstance(value, dict):
            cfg.setdefault(key, {}).update(value)
        else:
            cfg[key] = value
    return cfg


_BUILT: Dict[str, Path] = {}


def tiny_model(kind: str) -> Path:
    """A random-weight diffusers folder (``kind`` ddpm or sd), built once per test process."""
    import tempfile

    from siss_fast.engine.models import build_tiny

    if kind not in _BUILT:
        root = Path(tempfile.mkdtemp(prefix="siss_fast_tiny_"))
        _BUILT[kind] = build_tiny("tiny-ddpm" if kind == "ddpm" else "tiny-sd", root / kind)
    return _BUILT[kind]


def ddp_worker(rank, world, port, cfg_dict, queue):
    """One rank of a spawned data-parallel run (top-level in an importable module so spawn can pickle it)."""
    import os

    import torch

    from siss_fast.engine.config import load_config

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    from siss_fast.engine.loop import run

    try:
        run(load_config(cfg_dict))
        queue.put((rank, "ok"))
    except Exception as exc:  # report to the parent instead of hanging
        queue.put((rank, repr(exc)))
        raise
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
