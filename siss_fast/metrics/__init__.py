"""Metrics of an unlearning run (layer 5): pure functions on tensors and models.

Images given to the sample metrics are ``(N, C, H, W)`` in **[0, 1]**; models work in [-1, 1].

* :func:`forget_rate` -- share of generated samples within an L2 distance ``threshold`` of any forget image
  (the paper's T-shirt metric).
* :func:`classifier_quality` -- Inception-Score-style quality from a classifier, and class balance.
* :func:`evaluate_samples` -- both, the quality on the samples that are *not* forget images.
* :func:`denoising_loss`, :func:`membership_signal` -- denoising loss at fixed ``(t, eps)`` (membership signal).
* :func:`bits_per_dim_vlb` -- likelihood of an image in bits/dim through the DDPM variational bound.
* :func:`noise_norm_signal`, :func:`image_similarity` -- text-to-image memorization signals.
"""

from .quality import classifier_quality, class_balance, inception_score
from .forget import FORGET_THRESHOLD, forget_distances, forget_mask, forget_rate, evaluate_samples
from .likelihood import bits_per_dim_vlb, denoising_loss, membership_signal
from .memorization import image_similarity, noise_norm_signal
from .sampling import ddim_sample, ddim_timesteps

__all__ = [
    "FORGET_THRESHOLD",
    "bits_per_dim_vlb",
    "class_balance",
    "classifier_quality",
    "ddim_sample",
    "ddim_timesteps",
    "denoising_loss",
    "evaluate_samples",
    "forget_distances",
    "forget_mask",
    "forget_rate",
    "image_similarity",
    "inception_score",
    "membership_signal",
    "noise_norm_signal",
]


# the validation metrics register themselves (siss_fast.metrics.registry) on import
from . import distances, engine_metrics, feature_guard, forget_probe, forget_signal, retain_fit  # noqa: E402,F401
from . import cluster_score  # noqa: E402,F401
from . import clip_quality, copy_detection  # noqa: E402,F401  (local-weights plug-ins: sscd, clip_fd)
