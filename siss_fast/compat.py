"""Drop-in replacement for the research code's ``losses/ddpm_deletion_loss.py`` (claserken/SISS).

A training script written for the research code switches by changing one import::

    # from losses.ddpm_deletion_loss import DDPMDeletionLoss
    from siss_fast.compat import DDPMDeletionLoss

:class:`DDPMDeletionLoss` keeps the research class's constructor, method names, arguments, return tuples
(same 7-tuple layout, same ``None`` positions, same elementwise tensors) and random-number consumption:

* ``importance_sampling_with_mixture`` and ``subscore_bernoulli`` draw ``torch.rand(batch_size)`` once on the
  default CPU generator; a sample is the forget (deletion) one where that draw is ``<= lambd``
  (the research code's ``all_mask = rand > lambd``).
* ``erasediff`` draws ``torch.rand_like(pred)`` once, after its two forward passes.
* Models are called as ``unet(noisy, timesteps, **conditioning, return_dict=False)`` in the same order.

What differs (numerics only, never the interface):

* The importance weights. The research code computes ``exp(d_x - d_a)`` where ``d_x`` and ``d_a`` are two large
  sums over every element, subtracted afterwards; in fp32 that cancellation costs 0.1 % - 2 % of the weight at
  realistic resolutions (SPEC §4). Here they come from :func:`siss_fast.importance_weights`: the gap is one sum of
  per-element differences accumulated in fp32 (fp64 for fp64 inputs) and the weights are formed in log space, so
  they are within 1e-5 (relative) of a float64 oracle, and exact at ``lambd`` in {0, 1}. They are returned as
  constants (no autograd graph) in fp32 (fp64 for fp64 latents).
* ``subscore_bernoulli``: when the draw leaves no retain (or no forget) sample, the research code prints a line and
  returns ``torch.zeros(1, 1, 1, 1, requires_grad=True)`` on the CPU; here the same zeros are created on the
  predictions' device and dtype and the message goes to :mod:`logging`. As in the research code, an all-forget
  draw also replaces ``loss_a`` by zeros.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, Optional, Tuple

import torch
from torch import Tensor

import siss_fast as sf

__all__ = ["DDPMDeletionLoss"]

_log = logging.getLogger(__name__)

LossTuple = Tuple[
    Optional[Tensor], Optional[Tensor], Optional[Tensor], Optional[Tensor], Optional[Tensor], Optional[Tensor],
    Optional[Tensor],
]


def _per_sample(v: Tensor, like: Tensor) -> Tensor:
    """View a ``(B,)`` vector so it broadcasts against a ``(B, ...)`` tensor."""
    return v.reshape(v.shape[0], *([1] * (like.dim() - 1)))


def _prediction(unet, noisy: Tensor, timesteps: Tensor, conditioning: Dict[str, Any]) -> Tensor:
    """The research scripts' model call, with the tensor taken out of the tuple / output it returns."""
    return sf.model_output(unet(noisy, timesteps, **conditioning, return_dict=False))


def _draw_forget_mask(batch_size: int, lambd: float) -> Tensor:
    """``(B,)`` bool on the CPU, True = deletion sample; consumes ``torch.rand(batch_size)`` like the research code."""
    return ~(torch.rand(batch_size) > lambd)


def _check_lambd(lambd, *, upper_inclusive: bool) -> float:
    try:
        value = float(lambd)
    except (TypeError, ValueError):
        raise TypeError(f"lambd: expected a real number, got {type(lambd).__name__}") from None
    ok = 0.0 <= value <= 1.0 if upper_inclusive else 0.0 <= value < 1.0
    if not ok:
        interval = "[0, 1]" if upper_inclusive else "[0, 1)"
        raise ValueError(f"lambd: expected a value in {interval}, got {value}")
    return value


def _select(forget_mask: Tensor, forget: Tensor, retain: Tensor) -> Tensor:
    """Per-sample choice: ``forget[b]`` where the mask is True, else ``retain[b]``."""
    mask = forget_mask.to(retain.device)
    return torch.where(_per_sample(mask, retain), forget, retain)


class DDPMDeletionLoss:
    """The research code's loss collection, with accurate importance weights.

    Args:
        gamma: ``(T,)`` table of ``sqrt(alphas_cumprod)``.
        sigma: ``(T,)`` table of ``sqrt(1 - alphas_cumprod)``.

    Every method takes ``all_samples_dict`` and ``deletion_samples_dict`` with keys ``'og_latents'`` (x0 / a0) and
    ``'noisy_latents'`` (``gamma_t * x0 + sigma_t * noise``, likewise for a0, with the same ``noise`` and
    ``timesteps``), and returns the 7-tuple
    ``(loss, loss_x, loss_a, importance_weight_x, importance_weight_a, weighted_loss_x, weighted_loss_a)``
    with ``None`` where the method has no such quantity. Loss tensors are elementwise (shape of the latents, or the
    selected rows for ``subscore_bernoulli``); the caller reduces them.
    """

    def __init__(self, gamma: Tensor, sigma: Tensor):
        self.all_gamma = gamma
        self.all_sigma = sigma

    # SISS
    def importance_sampling_with_mixture(
        self, unet, timesteps, noise, conditioning, all_samples_dict, deletion_samples_dict, lambd
    ) -> LossTuple:
        """SISS: one forward pass on the defensive mixture, both targets, importance weights.

        ``m = noisy_a`` for deletion samples (probability ``lambd``), else ``noisy_x``;
        ``eps_x = (m - gamma*x0)/sigma``, ``eps_a = (m - gamma*a0)/sigma``;
        ``loss_x = (pred - eps_x)^2``, ``loss_a = (pred - eps_a)^2`` (elementwise);
        ``w_x = 1/((1-lambd) + lambd*e^D)``, ``w_a = 1/((1-lambd)*e^-D + lambd)``, ``D = d_x - d_a``
        (from :func:`siss_fast.importance_weights`, see the module docstring);
        returns ``(None, loss_x, loss_a, w_x, w_a, w_x*loss_x, w_a*loss_a)``.
        """
        lambd = _check_lambd(lambd, upper_inclusive=True)
        x0 = all_samples_dict["og_latents"]
        a0 = deletion_samples_dict["og_latents"]
        noisy_x = all_samples_dict["noisy_latents"]
        gamma = self.all_gamma[timesteps]
        sigma = self.all_sigma[timesteps]

        forget_mask = _draw_forget_mask(noisy_x.shape[0], lambd)
        mixture = _select(forget_mask, deletion_samples_dict["noisy_latents"], noisy_x)
        pred = _prediction(unet, mixture, timesteps, conditioning)

        g, s = _per_sample(gamma, mixture), _per_sample(sigma, mixture)
        loss_x = (pred - (mixture - g * x0) / s) ** 2
        loss_a = (pred - (mixture - g * a0) / s) ** 2

        acc = torch.float64 if torch.float64 in (mixture.dtype, x0.dtype, a0.dtype) else torch.float32
        with torch.no_grad():
            weight_x, weight_a = sf.importance_weights(
                mixture, x0, a0, gamma.to(device=mixture.device, dtype=acc),
                sigma.to(device=mixture.device, dtype=acc), lambd,
            )
        weighted_loss_x = _per_sample(weight_x, loss_x) * loss_x
        weighted_loss_a = _per_sample(weight_a, loss_a) * loss_a
        return None, loss_x, loss_a, weight_x, weight_a, weighted_loss_x, weighted_loss_a

    # SISS (No IS): two forward passes.
    def double_forward_with_neg_del(
        self, unet, timesteps, noise, conditioning, all_samples_dict, deletion_samples_dict
    ) -> LossTuple:
        """``loss_x = (eps_theta(x_t) - noise)^2``, ``loss_a = (eps_theta(a_t) - noise)^2``;
        returns ``(None, loss_x, loss_a, None, None, loss_x, loss_a)``."""
        pred_x = _prediction(unet, all_samples_dict["noisy_latents"], timesteps, conditioning)
        loss_x = (pred_x - noise) ** 2
        pred_a = _prediction(unet, deletion_samples_dict["noisy_latents"], timesteps, conditioning)
        loss_a = (pred_a - noise) ** 2
        return None, loss_x, loss_a, None, None, loss_x, loss_a

    # EraseDiff: two forward passes.
    def erasediff(self, unet, timesteps, noise, conditioning, all_samples_dict, deletion_samples_dict) -> LossTuple:
        """``loss_x = (eps_theta(x_t) - noise)^2``, ``loss_a = (eps_theta(a_t) - u)^2`` with
        ``u = torch.rand_like(pred_a)`` drawn after both forward passes;
        returns ``(None, loss_x, loss_a, None, None, loss_x, loss_a)``."""
        pred_x = _prediction(unet, all_samples_dict["noisy_latents"], timesteps, conditioning)
        loss_x = (pred_x - noise) ** 2
        pred_a = _prediction(unet, deletion_samples_dict["noisy_latents"], timesteps, conditioning)
        uniform = torch.rand_like(pred_a)
        loss_a = (pred_a - uniform) ** 2
        return None, loss_x, loss_a, None, None, loss_x, loss_a

    # NegGrad
    def simple_neg_del(
        self, unet, timesteps, noise, conditioning, all_samples_dict, deletion_samples_dict, superfactor
    ) -> LossTuple:
        """``loss_a = (eps_theta(a_t) - noise)^2``; returns ``(-superfactor*loss_a, None, loss_a, None, None,
        None, None)`` (gradient ascent on the forget sample)."""
        pred_a = _prediction(unet, deletion_samples_dict["noisy_latents"], timesteps, conditioning)
        loss_a = (pred_a - noise) ** 2
        return -superfactor * loss_a, None, loss_a, None, None, None, None

    # Naive deletion
    def naive_del(self, unet, timesteps, noise, conditioning, all_samples_dict, deletion_samples_dict) -> LossTuple:
        """``loss_x = (eps_theta(x_t) - noise)^2``; returns ``(loss_x, loss_x, None, None, None, None, None)``."""
        pred_x = _prediction(unet, all_samples_dict["noisy_latents"], timesteps, conditioning)
        loss_x = (pred_x - noise) ** 2
        return loss_x, loss_x, None, None, None, None, None

    # Reviewer-proposed ablation
    def subscore_bernoulli(
        self, unet, timesteps, noise, conditioning, all_samples_dict, deletion_samples_dict, lambd
    ) -> LossTuple:
        """One forward pass on a Bernoulli(``lambd``) choice between ``x_t`` and ``a_t``;
        ``loss = (pred - noise)^2``, ``loss_x = loss[retain rows] / (1 - lambd)``, ``loss_a = loss[forget rows]``
        (the ``1/lambd`` of an unbiased forget term is left to the gradient rescaling, as in the research code);
        returns ``(None, loss_x, loss_a, None, None, loss_x, loss_a)``.
        """
        lambd = _check_lambd(lambd, upper_inclusive=False)
        noisy_x = all_samples_dict["noisy_latents"]
        forget_mask = _draw_forget_mask(noisy_x.shape[0], lambd)
        samples = _select(forget_mask, deletion_samples_dict["noisy_latents"], noisy_x)
        pred = _prediction(unet, samples, timesteps, conditioning)

        loss = (pred - noise) ** 2
        forget_rows = forget_mask.to(loss.device)
        loss_x = (1 / (1 - lambd)) * loss[~forget_rows]
        loss_a = loss[forget_rows]

        def zeros() -> Tensor:
            return torch.zeros(1, 1, 1, 1, device=pred.device, dtype=pred.dtype, requires_grad=True)

        if len(loss_x) == 0:
            _log.warning("subscore_bernoulli: no nondeletion samples in this batch")
            loss_x, loss_a = zeros(), zeros()
        if len(loss_a) == 0:
            _log.warning("subscore_bernoulli: no deletion samples in this batch")
            loss_a = zeros()
        return None, loss_x, loss_a, None, None, loss_x, loss_a
