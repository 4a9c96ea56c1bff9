"""Built-in sample metrics of the engine's validation: RMS distances to the forget and retain sets.

* ``forget_distance`` -- the fraction of samples within RMS distance ``threshold`` (on the [0, 1] scale) of some forget
  item (lower is better); ``threshold: auto`` (default) is half of each forget item's distance to its nearest retain
  image (:func:`forget_thresholds`);
* ``retain_distance`` -- the mean RMS distance of each sample to its nearest retain image (lower is better).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .registry import MetricContext, MetricFn, no_seeds, register_metric

__all__ = ["rms_distances", "pearson", "forget_thresholds"]


def rms_distances(samples: Tensor, reference: Tensor) -> Tensor:
    """``(N, M)`` RMS distances between flattened samples and references (fp64, chunk-free: sets are small)."""
    a = samples.reshape(samples.shape[0], -1).double()
    b = reference.reshape(reference.shape[0], -1).double()
    sq = (a.square().sum(1, keepdim=True) - 2 * a @ b.T + b.square().sum(1)[None]).clamp_min(0)
    return (sq / a.shape[1]).sqrt()


def pearson(samples: Tensor, reference: Tensor) -> Tensor:
    """``(N, M)`` Pearson correlations between flattened samples and references (fp64): shape agreement whatever the
    brightness and contrast; 0 against a constant image."""
    a = samples.reshape(samples.shape[0], -1).double()
    b = reference.reshape(reference.shape[0], -1).double()
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    return (a @ b.T) / (a.norm(dim=1, keepdim=True) * b.norm(dim=1)[None]).clamp_min(1e-12)


def forget_thresholds(forget: Tensor, retain: Tensor, threshold: Any = "auto") -> Tensor:
    """``(K,)`` RMS radius around each forget item inside which a sample counts as that item.

    ``"auto"``: half the item's RMS distance to its nearest retain image -- a sample that close is nearer the forget
    item than any retained image could be while still being ambiguous between them. (Measured on the demo: the
    T-shirt is 0.42 from its nearest digit, so 0.21; partly unlearned copies sit at 0.10-0.15 from it, which a fixed
    0.1 would already stop counting.) A number: the same radius for every item."""
    if threshold == "auto":
        return 0.5 * rms_distances(forget, retain).min(dim=1).values
    return torch.full((forget.shape[0],), float(threshold), dtype=torch.float64)


@register_metric("forget_distance", generator_seeds=no_seeds)
def _forget_distance(ctx: MetricContext) -> MetricFn:
    forget = ctx.forget_images
    radius = forget_thresholds(forget, ctx.retain_images, ctx.options.get("threshold", "auto"))

    def score(samples: Tensor) -> float:
        return float((rms_distances(samples, forget) < radius[None]).any(dim=1).double().mean())

    return score


@register_metric("retain_distance", generator_seeds=no_seeds)
def _retain_distance(ctx: MetricContext) -> MetricFn:
    retain = ctx.retain_images

    def score(samples: Tensor) -> float:
        return float(rms_distances(samples, retain).min(dim=1).values.mean())

    return score
