"""Loading the demo's base model (a diffusers ``DDPMPipeline`` folder) and its classifier."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Optional, Tuple

from siss_fast.engine.models import offline

__all__ = ["SHIPPED_MODEL", "SHIPPED_RETRAINED", "load_base_model", "model_hash"]

SHIPPED_MODEL = Path(__file__).resolve().parent.parent / "assets" / "digits_ddpm"
# the same training on the digits alone (no T-shirt): exact unlearning, verify's retrained control
# (python -m siss_fast.demo.pretrain --out DIR --seed 0 --without-forget)
SHIPPED_RETRAINED = SHIPPED_MODEL.parent / "digits_ddpm_retrained"


def load_base_model(folder: Optional[os.PathLike] = None) -> Tuple[object, object, object]:
    """``(unet, scheduler, classifier)`` from a folder written by :mod:`siss_fast.demo.pretrain` (default: shipped).

    Weights are read from safetensors only, offline.
    """
    from diffusers import DDPMScheduler, UNet2DModel

    from siss_fast.metrics.engine_metrics import load_classifier

    folder = Path(folder or SHIPPED_MODEL)
    if not (folder / "unet").is_dir():
        raise FileNotFoundError(f"model: expected a DDPM pipeline folder with unet/ and scheduler/, got {folder}"
                                + ("" if folder != SHIPPED_MODEL else
                                   " (the shipped weights are missing: run `siss-fast demo --pretrain`)"))
    with offline():
        unet = UNet2DModel.from_pretrained(str(folder / "unet"), use_safetensors=True, local_files_only=True)
        scheduler = DDPMScheduler.from_pretrained(str(folder / "scheduler"), local_files_only=True)
    classifier = load_classifier(folder / "classifier.safetensors")
    return unet.eval(), scheduler, classifier


def model_hash(folder: Optional[os.PathLike] = None) -> str:
    """sha256 over the folder's config and weight files (relative path + content, sorted): the base-model hash.

    The engine's :func:`siss_fast.engine.models.hash_model_folder` when present (the same hash its manifests hold).
    """
    folder = Path(folder or SHIPPED_MODEL)
    try:
        from siss_fast.engine.models import hash_model_folder
    except ImportError:
        hash_model_folder = None
    if hash_model_folder is not None:
        return hash_model_folder(folder)
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.suffix in (".json", ".safetensors") and p.name != "pretrain.json":
            h.update(str(p.relative_to(folder)).encode())
            h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()
