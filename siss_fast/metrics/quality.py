"""Classifier-based sample quality: an Inception-Score-style score and class balance."""

from __future__ import annotations

import math
from typing import Callable, Dict

import torch
from torch import Tensor

__all__ = ["inception_score", "class_balance", "classifier_quality", "classifier_probs"]


@torch.no_grad()
def classifier_probs(classifier: Callable, images: Tensor, batch_size: int = 500) -> Tensor:
    """``(N, K)`` fp64 softmax probabilities of ``classifier(images)`` (images in the classifier's input space)."""
    if hasattr(classifier, "eval"):
        classifier.eval()
    out = [torch.softmax(classifier(images[i:i + batch_size]).double(), dim=1)
           for i in range(0, images.shape[0], batch_size)]
    return torch.cat(out) if out else torch.empty(0, 0, dtype=torch.float64)


def inception_score(probs: Tensor) -> float:
    """``IS = exp( E_x KL(p(y|x) || p(y)) )`` with ``p(y) = E_x p(y|x)``, from ``(N, K)`` class probabilities.

    Between 1 (every sample gets the same prediction, or predictions are uniform) and K (confident predictions,
    all classes equally often). Returns NaN for N = 0.
    """
    if probs.shape[0] == 0:
        return float("nan")
    p = probs.double().clamp_min(1e-12)
    marginal = p.mean(dim=0, keepdim=True)
    kl = (p * (p.log() - marginal.log())).sum(dim=1)
    return math.exp(kl.mean().item())


def class_balance(probs: Tensor) -> Dict[str, float]:
    """Class balance of the predicted labels ``argmax p(y|x)``.

    ``class_entropy``: entropy of the label histogram divided by log K (1 = perfectly balanced, 0 = one class);
    ``min_class_share``: share of the rarest class times K (1 = balanced, 0 = a class is missing).
    """
    if probs.shape[0] == 0:
        return {"class_entropy": float("nan"), "min_class_share": float("nan")}
    k = probs.shape[1]
    counts = torch.bincount(probs.argmax(dim=1), minlength=k).double()
    share = counts / counts.sum()
    nz = share[share > 0]
    entropy = -(nz * nz.log()).sum().item() / math.log(k)
    return {"class_entropy": entropy, "min_class_share": share.min().item() * k}


def classifier_quality(images: Tensor, classifier: Callable) -> Dict[str, float]:
    """``{"quality": IS, "class_entropy", "min_class_share", "confidence"}`` of ``images`` under ``classifier``.

    ``confidence`` is the mean max-probability (how digit-like the samples look to the classifier).
    """
    probs = classifier_probs(classifier, images)
    out = {"quality": inception_score(probs)}
    out.update(class_balance(probs))
    out["confidence"] = probs.max(dim=1).values.mean().item() if probs.shape[0] else float("nan")
    return out
