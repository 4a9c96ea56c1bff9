"""A forget signal that still counts degraded copies: "this sample is forget item k" from the nearest neighbour
among retain ∪ forget images (issue 12).

``forget_distance`` counts a sample as forget item ``k`` only within half of the item's distance to its nearest
retain image; partly unlearned models make degraded copies just outside that radius that are still visibly the
item. Here a sample ``s`` (RMS distances over all pixels in ``[0, 1]``) is item ``k`` when

* its nearest neighbour among the retain images and the forget items is item ``k``:
  ``d(s, a_k) < min_j d(s, r_j)`` and ``d(s, a_k) <= d(s, a_l)`` for every other item ``l``; and
* it is within the item's radius ``rho_k``: by default (``radius: auto``) the item's own distance to its nearest
  retain image, ``rho_k = min_j d(a_k, r_j)`` -- a sample nearer the item than any retained image is to it, and
  nearer to it than to every retained image, is a copy of the item, however degraded; noise blobs and collapsed
  samples far from everything (which may still be nearest to a filled forget image) are not counted.

``rho_k`` is per item, from the data (the gap between the item and the retain set); a number sets the same radius
for every item, ``radius_scale`` (default 1) multiplies either. Retain images are never counted (each is its own
nearest neighbour at distance 0).

``forget_nn`` (lower is better) returns the share of samples that are some forget item, ``sum_k rate_k``; the
returned score function has ``per_item(samples) -> [rate_1, ..., rate_K]`` (share of the samples that are item
``k``) for "each item must meet its target", and ``assign(samples) -> (N,) int64`` (item index or -1).
Cost per validation: one ``(N, M + K)`` distance matrix (no network).
"""

from __future__ import annotations

from typing import Any, Callable, List

import torch
from torch import Tensor

from .distances import forget_thresholds, rms_distances
from .registry import MetricContext, no_seeds, register_metric

__all__ = ["nearest_item", "item_radii", "item_counting_score"]


def item_radii(forget: Tensor, retain: Tensor, radius: Any = "auto", radius_scale: float = 1.0) -> Tensor:
    """``(K,)`` fp64 radius of each forget item: ``radius_scale x`` (``auto``: the item's RMS distance to its nearest
    retain image, i.e. twice :func:`siss_fast.metrics.distances.forget_thresholds`; a number: that radius)."""
    if radius == "auto":
        return radius_scale * 2 * forget_thresholds(forget, retain, "auto")
    return radius_scale * forget_thresholds(forget, retain, radius)


def nearest_item(samples: Tensor, forget: Tensor, retain: Tensor, radii: Tensor, chunk: int = 4096) -> Tensor:
    """``(N,)`` int64: the forget item each sample is (the rule of the module doc), or -1.

    ``samples`` ``(N, C, H, W)``, ``forget`` ``(K, C, H, W)``, ``retain`` ``(M, C, H, W)``, all in ``[0, 1]``;
    ``radii`` ``(K,)``. The retain distances are taken ``chunk`` retain images at a time (memory ``N x chunk``)."""
    d_forget = rms_distances(samples, forget)  # (N, K)
    d_item, item = d_forget.min(dim=1)
    d_retain = torch.full_like(d_item, float("inf"))
    for start in range(0, retain.shape[0], chunk):
        d_retain = torch.minimum(d_retain, rms_distances(samples, retain[start:start + chunk]).min(dim=1).values)
    hit = (d_item < d_retain) & (d_item <= radii.to(d_item)[item])
    return torch.where(hit, item, torch.full_like(item, -1))


@register_metric("forget_nn", higher_is_better=False, generator_seeds=no_seeds)
def _forget_nn(ctx: MetricContext):
    """Share of samples whose nearest retain-or-forget image is a forget item, within its radius (module doc)."""
    opts = dict(ctx.options)
    unknown = sorted(set(opts) - {"radius", "radius_scale"})
    if unknown:
        raise ValueError(f"validation.metric_options.forget_nn.{unknown[0]}: unknown option; valid: "
                         f"['radius', 'radius_scale']")
    radius, scale = opts.get("radius", "auto"), opts.get("radius_scale", 1.0)
    if radius != "auto" and (isinstance(radius, bool) or not isinstance(radius, (int, float)) or radius <= 0):
        raise ValueError(f"validation.metric_options.forget_nn.radius: expected 'auto' or a number > 0, "
                         f"got {radius!r}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or scale <= 0:
        raise ValueError(f"validation.metric_options.forget_nn.radius_scale: expected a number > 0, got {scale!r}")
    forget, retain = ctx.forget_images, ctx.retain_images
    radii = item_radii(forget, retain, radius, float(scale))
    k = forget.shape[0]

    score = item_counting_score(lambda samples: nearest_item(samples, forget, retain, radii), k)
    score.radii = radii
    return score


def item_counting_score(assign: Callable[[Tensor], Tensor], k: int) -> Callable[[Tensor], float]:
    """The score function of a forget metric that assigns each sample to a forget item: ``assign(samples)`` ->
    ``(N,)`` int64 item index in ``[0, k)`` or -1. ``score(samples)`` is the share of samples that are some item;
    it carries ``per_item(samples) -> [rate_1, ..., rate_k]`` (each item's share of the samples) and ``assign``."""

    def per_item(samples: Tensor) -> List[float]:
        counts = torch.bincount(assign(samples) + 1, minlength=k + 1)[1:].double()
        return (counts / max(samples.shape[0], 1)).tolist()

    def score(samples: Tensor) -> float:
        return float((assign(samples) >= 0).double().mean())

    score.per_item, score.assign = per_item, assign
    return score
