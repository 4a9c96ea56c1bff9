"""``clip_fd``: sample quality as the Fréchet distance to the retain set in a local CLIP model's image embeddings.

Fréchet distances in CLIP's image-embedding space (as FID in Inception features) track human judgement of generated
images better than Inception features do (Kynkäänniemi et al., ICLR 2023). The CLIP model is not shipped and never
downloaded: give a local ``save_pretrained`` folder of a ``transformers`` CLIP model (``CLIPModel`` or
``CLIPVisionModelWithProjection``, e.g. ``openai/clip-vit-large-patch14`` saved on a machine with access)::

    validation:
      metrics: [clip_fd, ...]
      quality_metric: clip_fd
      metric_options: {clip_fd: {model: /models/clip-vit-large-patch14}}

For images ``x`` ``(N, C, H, W)`` fp32 in ``[0, 1]`` (grey repeated to RGB): resized to the vision tower's
``image_size``, normalised with the folder's ``preprocessor_config.json`` mean/std (CLIP's own when absent),
``e = image_embeds(x)`` ``(N, P)`` (the vision tower's pooled output through CLIP's projection), L2-normalised, in
fp64. ``clip_fd = FD(e_samples, e_retain)`` (:func:`siss_fast.metrics.feature_guard.frechet_distance`; lower is
better); the retain embeddings are computed once, from at most ``max_retain`` retain images (a fixed random subset
of larger sets, seed ``seed``). With few samples (SD's default 16 per check) the covariance term is dominated by
the sample count: compare readings taken at the same ``num_samples`` only, as the guard does (relative to step 0).
Its tolerance is not calibrated here (no CLIP weights on the machine that built this): the registry default
(0.15) applies unless ``validation.quality_tolerance`` is set. Options: ``model`` (required), ``batch_size`` (32),
``max_retain`` (1024), ``seed`` (0).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List

import torch
from torch import Tensor

from .feature_guard import frechet_distance
from .local_weights import check_model_folder, prepare_images
from .registry import MetricContext, check_int, merge_options, register_metric

__all__ = ["CLIP_DEFAULTS", "check_clip_options", "CLIP_MEAN", "CLIP_STD"]

CLIP_DEFAULTS: Dict[str, Any] = {"model": None, "batch_size": 32, "max_retain": 1024, "seed": 0}
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
CLIP_TYPES = ("clip", "clip_vision_model")


def check_clip_options(options: Dict[str, Any]) -> Dict[str, Any]:
    """The options merged over :data:`CLIP_DEFAULTS`; ValueError naming the key of a missing folder, a folder that
    is not a CLIP model, or a bad integer."""
    opts = merge_options("clip_fd", options or {}, CLIP_DEFAULTS)
    if opts["model"] is None:
        raise ValueError("validation.metric_options.clip_fd.model: required: a local save_pretrained folder of a "
                         "transformers CLIP model")
    opts["model"] = str(check_model_folder("validation.metric_options.clip_fd.model", opts["model"], CLIP_TYPES))
    check_int("clip_fd", "batch_size", opts["batch_size"], 1)
    check_int("clip_fd", "max_retain", opts["max_retain"], 2)
    check_int("clip_fd", "seed", opts["seed"], 0)
    return opts


def clip_seeds(options: Dict[str, Any], n_forget: int) -> List[int]:
    """``generator_seeds`` of ``clip_fd``: ``seed`` picks the retain subset."""
    return [int((options or {}).get("seed", CLIP_DEFAULTS["seed"]))]


def load_clip_vision(folder: str) -> Any:
    """The vision tower with its projection (``CLIPVisionModelWithProjection``) of a local CLIP folder, eval, CPU."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection
    from transformers.utils import logging as hf_logging

    config = json.loads((Path(folder) / "config.json").read_text())
    kwargs: Dict[str, Any] = {"local_files_only": True}
    if config.get("model_type") == "clip":  # a full CLIPModel folder: its vision config plus the projection size
        vc = dict(config["vision_config"])
        vc["projection_dim"] = config.get("projection_dim", vc.get("projection_dim", 512))
        kwargs["config"] = CLIPVisionConfig(**vc)
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # a CLIPModel folder's text tower is "unexpected" here, by design
    try:
        model, info = CLIPVisionModelWithProjection.from_pretrained(folder, output_loading_info=True, **kwargs)
    finally:
        hf_logging.set_verbosity(level)
    if info.get("missing_keys"):
        raise ValueError(f"validation.metric_options.clip_fd.model: {folder!r} lacks weights of CLIP's vision tower "
                         f"and projection, e.g. {sorted(info['missing_keys'])[:3]} (a CLIPVisionModel folder has no "
                         f"projection: save a CLIPModel or CLIPVisionModelWithProjection)")
    return model.eval()


def _normalisation(folder: str) -> Any:
    pre = Path(folder) / "preprocessor_config.json"
    if pre.is_file():
        cfg = json.loads(pre.read_text())
        return tuple(cfg.get("image_mean", CLIP_MEAN)), tuple(cfg.get("image_std", CLIP_STD))
    return CLIP_MEAN, CLIP_STD


@register_metric("clip_fd", higher_is_better=False, check_options=lambda o: check_clip_options(o) and None,
                 generator_seeds=clip_seeds)
def _clip_fd(ctx: MetricContext):
    """Fréchet distance of the samples to the retain set in CLIP image embeddings (module doc)."""
    opts = check_clip_options(ctx.options)
    model = load_clip_vision(opts["model"])
    size = int(model.config.image_size)
    mean, std = _normalisation(opts["model"])

    @torch.no_grad()
    def embed(images: Tensor) -> Tensor:
        out = []
        for start in range(0, images.shape[0], opts["batch_size"]):
            x = prepare_images(images[start:start + opts["batch_size"]].cpu(), size, mean, std)
            out.append(torch.nn.functional.normalize(model(pixel_values=x).image_embeds.double(), dim=1))
        return torch.cat(out)

    retain = ctx.retain_images
    if retain.shape[0] > opts["max_retain"]:
        pick = torch.randperm(retain.shape[0], generator=torch.Generator().manual_seed(opts["seed"]))
        retain = retain[pick[:opts["max_retain"]]]
    ref = embed(retain)

    def score(samples: Tensor) -> float:
        return frechet_distance(embed(samples), ref)

    score.embed = embed
    return score
