"""``sscd``: copy detection with an SSCD-style descriptor network from a local TorchScript file.

SSCD (Pizzi et al., "A Self-Supervised Descriptor for Image Copy Detection", CVPR 2022) maps an image to a
descriptor whose cosine similarity separates copies (including crops, colour shifts and blur) from other images;
Somepalli et al. (CVPR 2023) and the SISS paper count a Stable Diffusion generation as a copy of a training image
when that similarity exceeds 0.5. The network is not shipped and never downloaded: give the path of a TorchScript
export (e.g. the authors' ``sscd_disc_mixup.torchscript.pt``)::

    validation:
      metrics: [sscd, ...]
      forget_metric: sscd
      metric_options: {sscd: {weights: /models/sscd_disc_mixup.torchscript.pt, threshold: 0.5}}

For images ``x`` ``(N, C, H, W)`` fp32 in ``[0, 1]`` (grey images repeated to RGB): resized to ``size`` x ``size``
(default 288, the authors' evaluation size), normalised with ImageNet's mean and std, ``d = net(x)`` ``(N, D)``,
L2-normalised. A sample is forget item ``k`` when ``cos(d_s, d_k) >= threshold`` and ``k`` is its most similar item.

``sscd`` (lower is better) is the share of samples that are some forget item; the score function also has
``per_item(samples) -> [rate_k]`` (each item's own rate, for "every item meets its target"), ``assign(samples) ->
(N,) int64`` (item index or -1) and ``similarity(samples) -> (N, K)`` cosine similarities. Options: ``weights``
(required), ``threshold`` (0.5), ``size`` (288), ``batch_size`` (32). Cost per check: one descriptor forward per
sample (the forget items' descriptors are computed once).
"""

from __future__ import annotations

from typing import Any, Dict

import torch
from torch import Tensor

from .forget_signal import item_counting_score
from .local_weights import check_torchscript_file, prepare_images
from .registry import MetricContext, check_int, merge_options, no_seeds, register_metric

__all__ = ["SSCD_DEFAULTS", "check_sscd_options", "IMAGENET_MEAN", "IMAGENET_STD"]

SSCD_DEFAULTS: Dict[str, Any] = {"weights": None, "threshold": 0.5, "size": 288, "batch_size": 32}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def check_sscd_options(options: Dict[str, Any]) -> Dict[str, Any]:
    """The options merged over :data:`SSCD_DEFAULTS`; ValueError naming the key of a missing weights file, a file
    that is not TorchScript, a threshold outside ``(-1, 1]`` or a bad size."""
    opts = merge_options("sscd", options or {}, SSCD_DEFAULTS)
    if opts["weights"] is None:
        raise ValueError("validation.metric_options.sscd.weights: required: the path of a local TorchScript "
                         "descriptor network (e.g. sscd_disc_mixup.torchscript.pt)")
    opts["weights"] = str(check_torchscript_file("validation.metric_options.sscd.weights", opts["weights"]))
    thr = opts["threshold"]
    if isinstance(thr, bool) or not isinstance(thr, (int, float)) or not -1 < thr <= 1:
        raise ValueError(f"validation.metric_options.sscd.threshold: expected a cosine similarity in (-1, 1], "
                         f"got {thr!r}")
    check_int("sscd", "size", opts["size"], 16)
    check_int("sscd", "batch_size", opts["batch_size"], 1)
    return opts


@register_metric("sscd", higher_is_better=False, check_options=lambda o: check_sscd_options(o) and None,
                 generator_seeds=no_seeds)
def _sscd(ctx: MetricContext):
    """Share of samples whose SSCD descriptor is within ``threshold`` cosine similarity of a forget item's."""
    opts = check_sscd_options(ctx.options)
    net = torch.jit.load(opts["weights"], map_location="cpu").eval()
    size, batch = opts["size"], opts["batch_size"]

    @torch.no_grad()
    def descriptors(images: Tensor) -> Tensor:
        out = []
        for start in range(0, images.shape[0], batch):
            x = prepare_images(images[start:start + batch].cpu(), size, IMAGENET_MEAN, IMAGENET_STD)
            d = net(x)
            if d.dim() != 2 or d.shape[0] != x.shape[0]:
                raise ValueError(f"validation.metric_options.sscd.weights: the network returned shape "
                                 f"{tuple(d.shape)} for {x.shape[0]} images; expected (N, D) descriptors")
            out.append(torch.nn.functional.normalize(d.float(), dim=1))
        return torch.cat(out)

    items = descriptors(ctx.forget_images)  # (K, D)
    k = items.shape[0]

    def similarity(samples: Tensor) -> Tensor:
        return descriptors(samples) @ items.T

    def assign(samples: Tensor) -> Tensor:
        best, item = similarity(samples).max(dim=1)
        return torch.where(best >= opts["threshold"], item, torch.full_like(item, -1))

    score = item_counting_score(assign, k)
    score.similarity = similarity
    return score
