"""The metrics of this package as plug-ins of the validation registry (:mod:`siss_fast.metrics.registry`).

Registered names (for ``validation.metrics`` / ``forget_metric`` / ``quality_metric`` of an engine config):

* ``forget_rate`` (lower is better): :func:`siss_fast.metrics.forget_rate` against the run's forget images.
  Option ``threshold``: L2 distance over all pixels in [0, 1]; default ``0.1875 * sqrt(D)`` (D = C*H*W), i.e. the
  demo's calibrated 4.5 at 16x16 (an RMS pixel error of 0.28).
* ``classifier_quality`` (higher is better): the Inception-Score-style quality of the samples that are not forget
  images, under a classifier. Option ``classifier``: a ``DigitClassifier`` safetensors file (default: the one
  shipped with the demo's base model); the images must be 1x16x16.

The engine finds these by importing ``siss_fast.metrics`` (the registry does on a miss).
"""

from __future__ import annotations

import math
from pathlib import Path

from .registry import MetricContext, no_seeds, register_metric

from .forget import FORGET_THRESHOLD, forget_mask, forget_rate
from .quality import classifier_quality

__all__ = ["load_classifier", "DEFAULT_CLASSIFIER"]

DEFAULT_CLASSIFIER = Path(__file__).resolve().parent.parent / "assets" / "digits_ddpm" / "classifier.safetensors"


def load_classifier(path=None):
    """A :class:`DigitClassifier` with the weights at ``path`` (default: the shipped demo classifier), in eval mode."""
    from safetensors.torch import load_file

    from .classifier import DigitClassifier

    clf = DigitClassifier()
    clf.load_state_dict(load_file(str(path or DEFAULT_CLASSIFIER)))
    return clf.eval()


def _threshold(ctx: MetricContext) -> float:
    if "threshold" in ctx.options:
        return float(ctx.options["threshold"])
    d = ctx.forget_images[0].numel()
    return FORGET_THRESHOLD / 16.0 * math.sqrt(d)


@register_metric("forget_rate", higher_is_better=False, generator_seeds=no_seeds)
def _forget_rate_metric(ctx: MetricContext):
    threshold, forget = _threshold(ctx), ctx.forget_images

    def score(samples):
        return forget_rate(samples, forget, threshold)

    return score


@register_metric("classifier_quality", higher_is_better=True, generator_seeds=no_seeds)
def _classifier_quality_metric(ctx: MetricContext):
    threshold, forget = _threshold(ctx), ctx.forget_images
    clf = load_classifier(ctx.options.get("classifier"))

    def score(samples):
        keep = samples[~forget_mask(samples, forget, threshold)]
        return classifier_quality(keep, clf)["quality"] if keep.shape[0] else float("nan")

    return score
