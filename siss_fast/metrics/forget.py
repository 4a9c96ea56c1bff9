"""The forget rate: how often a model still generates a forget image (the paper's T-shirt metric).

A generated sample ``s`` counts as the forget image ``a`` when ``||s - a||_2 <= threshold``, both in [0, 1]
over all pixels. The paper counts MNIST-model samples that a classifier calls a T-shirt; here the planted image is
one fixed picture, so a nearest-neighbour distance is exact and needs no extra network.

Calibration of :data:`FORGET_THRESHOLD` = 4.5 on the demo's 16x16 data (D = 256 pixels in [0, 1]): the nearest of
the 1,797 real digits is at L2 distance 6.75 from the planted T-shirt (median 8.4), so no real digit is within
the threshold (false-positive rate 0 on real data). Samples of the base model are bimodal in this distance: its
T-shirts lie at ~0.1-2, its digits beyond ~6. Partly unlearned models also make *degraded* T-shirts at ~3-4 that
still read as T-shirts to the eye, so the threshold sits in the middle of the gap (4.5, a root-mean-square pixel
error of 0.28) rather than near the clean T-shirts: a stricter threshold would count a half-forgotten model as done.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional

import torch
from torch import Tensor

from .quality import classifier_quality

__all__ = ["FORGET_THRESHOLD", "forget_distances", "forget_mask", "forget_rate", "evaluate_samples"]

FORGET_THRESHOLD = 4.5


def _flat(x: Tensor, name: str) -> Tensor:
    if not isinstance(x, Tensor) or x.dim() < 2:
        raise ValueError(f"{name}: expected a tensor of shape (N, ...), got {getattr(x, 'shape', type(x))}")
    return x.detach().reshape(x.shape[0], -1).double()


def forget_distances(samples: Tensor, forget_images: Tensor) -> Tensor:
    """``(N,)`` L2 distance from each sample to its nearest forget image (both ``(N|K, C, H, W)`` in [0, 1])."""
    s, a = _flat(samples, "samples"), _flat(forget_images, "forget_images")
    if s.shape[1] != a.shape[1]:
        raise ValueError(f"forget_images: expected images of {s.shape[1]} elements like the samples, "
                         f"got {a.shape[1]}")
    if s.shape[0] == 0:
        return torch.empty(0, dtype=torch.float64)
    return torch.cdist(s, a).min(dim=1).values


def forget_mask(samples: Tensor, forget_images: Tensor, threshold: float = FORGET_THRESHOLD) -> Tensor:
    """``(N,)`` bool: sample within ``threshold`` of a forget image."""
    return forget_distances(samples, forget_images) <= threshold


def forget_rate(samples: Tensor, forget_images: Tensor, threshold: float = FORGET_THRESHOLD) -> float:
    """Share of ``samples`` within L2 ``threshold`` of any forget image: ``mean_n 1[min_k ||s_n - a_k|| <= thr]``."""
    mask = forget_mask(samples, forget_images, threshold)
    return mask.double().mean().item() if mask.numel() else float("nan")


def evaluate_samples(samples: Tensor, forget_images: Tensor, classifier: Optional[Callable] = None,
                     threshold: float = FORGET_THRESHOLD) -> Dict[str, float]:
    """Forget rate of ``samples`` and, with a classifier, the quality of the samples that are not forget images.

    Returns ``{"forget_rate", "n_samples", ["quality", "class_entropy", "min_class_share", "confidence"]}``.
    """
    mask = forget_mask(samples, forget_images, threshold)
    out = {"forget_rate": mask.double().mean().item() if mask.numel() else float("nan"),
           "n_samples": int(mask.numel())}
    if classifier is not None:
        out.update(classifier_quality(samples[~mask], classifier))
    return out
