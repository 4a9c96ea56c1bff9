"""Retain and forget sets: image folders, prompts, cached latents and embeddings, sampling with replacement.

* :func:`scan_folder` checks a folder (PNG/JPEG, readable, one size) from the headers only; :func:`load_images`
  decodes it into a ``(N, C, H, W)`` float tensor in ``[-1, 1]``. A corrupt or truncated file raises
  :class:`DataError` naming it.
* Prompts (Stable Diffusion): a captions file (JSON ``{file name: caption}`` or lines ``file name<TAB>caption``)
  or one prompt per set (``retain_prompt`` / ``forget_prompt``); a prompt per set wins over the captions file.
* :class:`LatentCache` (Stable Diffusion): each image is encoded by the VAE **once**; the mean and std of its latent
  distribution are kept and a fresh latent ``(mean + std * n) * scaling_factor`` is drawn per use, so the training
  distribution is what re-encoding every step gives. Text embeddings are computed once per distinct prompt
  (:func:`encode_prompts`, from :mod:`siss_fast.text_encoding`).
* :class:`SampleStream`: draws micro-batches with replacement, forever, from its own seeded generators.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..hashing import sha256_file
from ..text_encoding import encode_prompts  # re-exported: the engine and its callers use it from here
from .errors import ConfigError

__all__ = ["DataError", "FolderScan", "scan_folder", "load_images", "resolve_prompts", "sha256_file",
           "LatentCache", "encode_prompts", "SampleStream", "IMAGE_SUFFIXES"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


class DataError(ConfigError):
    """A problem with the image folders, captions or prompts; the message names the file."""


@dataclass
class FolderScan:
    files: List[Path]
    size: Tuple[int, int]  # (width, height)


def scan_folder(folder: str, key: str) -> FolderScan:
    """The sorted image files of ``folder`` and their common size, from headers and CRC checks (no decoding)."""
    from PIL import Image

    path = Path(folder)
    if not path.is_dir():
        raise DataError(f"{key}: folder {folder!r} not found")
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise DataError(f"{key}: no images (PNG/JPEG: {', '.join(IMAGE_SUFFIXES)}) in {folder!r}")
    size = None
    for f in files:
        try:
            with Image.open(f) as im:
                this = im.size
                im.verify()
        except Exception as exc:  # PIL raises many types for damaged files
            raise DataError(f"{key}: cannot read image {str(f)!r} (corrupt or truncated?): {exc}") from None
        if size is None:
            size = this
        elif this != size:
            raise DataError(f"{key}: images of different sizes: {files[0].name} is {size[0]}x{size[1]}, "
                            f"{f.name} is {this[0]}x{this[1]} (resize them to one size)")
    return FolderScan(files, size)


def load_images(files: Sequence[Path], channels: int) -> Tensor:
    """Decode ``files`` into ``(N, channels, H, W)`` fp32 in ``[-1, 1]`` (``channels`` 1: grayscale, 3: RGB)."""
    import numpy as np
    from PIL import Image

    mode = {1: "L", 3: "RGB"}[channels]
    arrays = []
    for f in files:
        try:
            with Image.open(f) as im:
                arr = np.asarray(im.convert(mode), dtype=np.float32)
        except Exception as exc:
            raise DataError(f"cannot decode image {str(f)!r} (corrupt or truncated?): {exc}") from None
        arrays.append(arr[:, :, None] if arr.ndim == 2 else arr)
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise DataError(f"images of different sizes among {[str(f) for f in files[:3]]}...: {sorted(shapes)}")
    batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    return batch / 127.5 - 1.0


def _read_captions(path: str) -> Dict[str, str]:
    p = Path(path)
    if not p.is_file():
        raise DataError(f"data.captions: file {path!r} not found")
    text = p.read_text(encoding="utf-8")
    if p.suffix.lower() == ".json":
        try:
            table = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"data.captions: {path!r} is not valid JSON: {exc}") from None
        if not isinstance(table, dict) or not all(isinstance(v, str) for v in table.values()):
            raise DataError(f"data.captions: {path!r} must map file names to caption strings")
        return dict(table)
    table = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if "\t" not in line:
            raise DataError(f"data.captions: {path!r} line {lineno}: expected 'file name<TAB>caption'")
        name, caption = line.split("\t", 1)
        table[name.strip()] = caption.strip()
    return table


def resolve_prompts(data_cfg: Any, retain_files: Sequence[Path], forget_files: Sequence[Path]
                    ) -> Tuple[List[str], List[str]]:
    """One prompt per image for each set (Stable Diffusion)."""
    captions = _read_captions(data_cfg.captions) if data_cfg.captions else None
    out = []
    for key, files, prompt in (("data.retain_prompt", retain_files, data_cfg.retain_prompt),
                               ("data.forget_prompt", forget_files, data_cfg.forget_prompt)):
        if prompt is not None:
            out.append([prompt] * len(files))
            continue
        if captions is None:
            raise DataError(f"{key}: Stable Diffusion needs prompts: give {key} or data.captions")
        missing = [f.name for f in files if f.name not in captions]
        if missing:
            raise DataError(f"data.captions: {data_cfg.captions!r} has no caption for {missing[:5]} (and give {key} "
                              f"to use one prompt)")
        out.append([captions[f.name] for f in files])
    return out[0], out[1]


class LatentCache:
    """VAE latent distributions of a set of images, encoded once; a fresh latent sample per draw.

    ``mean``, ``std``: ``(N, 4, h, w)`` fp32 on ``device``. :meth:`draw` returns ``(mean + std * n) * scale``
    for the given indices, with ``n`` from ``generator`` -- exactly what ``vae.encode(x).latent_dist.sample()``
    times ``scaling_factor`` gives, without running the VAE.
    """

    def __init__(self, vae: Any, images: Tensor, device: torch.device, dtype: torch.dtype, batch_size: int = 16):
        means, stds = [], []
        with torch.no_grad():
            for i in range(0, images.shape[0], batch_size):
                chunk = images[i:i + batch_size].to(device=device, dtype=dtype)
                dist = vae.encode(chunk).latent_dist
                means.append(dist.mean.float())
                stds.append(dist.std.float())
        self.mean = torch.cat(means)
        self.std = torch.cat(stds)
        self.scale = float(getattr(vae.config, "scaling_factor", 1.0))

    def draw(self, index: Tensor, generator: torch.Generator) -> Tensor:
        mean, std = self.mean[index], self.std[index]
        n = torch.randn(mean.shape, generator=generator, device=generator.device).to(mean.device)
        return (mean + std * n) * self.scale


class SampleStream:
    """One stream of micro-batches: retain/forget indices with replacement and the objective's randomness.

    ``data_gen`` (CPU) draws indices and latent samples; ``noise_gen`` (on the training device) is handed to the
    objective for timesteps, noise and masks. Both are seeded from ``(seed, stream)`` and saved in checkpoints.
    """

    def __init__(self, seed: int, stream: int, device: torch.device):
        mixed = (seed * 1_000_003 + stream * 7919 + 17) % (2**63 - 1)
        self.data_gen = torch.Generator().manual_seed(mixed)
        self.noise_gen = torch.Generator(device=device).manual_seed(mixed + 1)

    def indices(self, n: int, batch: int) -> Tensor:
        return torch.randint(0, n, (batch,), generator=self.data_gen)

    def state_dict(self) -> Dict[str, Tensor]:
        return {"data": self.data_gen.get_state(), "noise": self.noise_gen.get_state()}

    def load_state_dict(self, state: Dict[str, Tensor]) -> None:
        self.data_gen.set_state(state["data"])
        self.noise_gen.set_state(state["noise"])


def describe_set(files: Sequence[Path]) -> List[Dict[str, str]]:
    """``[{"file": name, "sha256": ...}]`` for the manifest."""
    return [{"file": f.name, "sha256": sha256_file(f)} for f in files]


def optional_prompt_of(prompts: Optional[Sequence[str]]) -> Optional[str]:
    return None if not prompts else prompts[0]
