"""Public functional API (SPEC §7): checked arguments, normalised dtypes, then the ``siss_fast::`` ops.

Dtype rules (SPEC §9): reductions and weights are computed in fp32, or fp64 when any input is fp64. ``noisy``,
``x0`` and ``a0`` are brought to one dtype (torch's promotion) while ``pred`` may keep its own (bf16 predictions
against fp32 latents); if anything is fp64, everything is computed in fp64.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from . import _checks as checks
from . import ops

__all__ = ["SISSTerms", "schedule_coefficients", "mixture_noise", "importance_weights", "siss_loss", "model_output"]


class SISSTerms(NamedTuple):
    """Result of :func:`siss_loss`: ``loss_x`` and ``loss_a`` (reduced as asked, differentiable w.r.t. pred) and the
    per-sample importance weights ``weight_x``, ``weight_a`` (``(B,)``, constants)."""

    loss_x: Tensor
    loss_a: Tensor
    weight_x: Tensor
    weight_a: Tensor


def schedule_coefficients(
    alphas_cumprod: Tensor, timesteps: Tensor, *, dtype: torch.dtype = torch.float32
) -> Tuple[Tensor, Tensor]:
    """``(gamma, sigma)`` with ``gamma = sqrt(alphas_cumprod[t])``, ``sigma = sqrt(1 - alphas_cumprod[t])``.

    Args:
        alphas_cumprod: ``(T,)`` floating table from the scheduler. The square roots are taken in fp64 (never in
            fp16/bf16); the table is moved to the timesteps' device if needed (it is a small constant).
        timesteps: ``(B,)`` integer tensor with values in ``[0, T)``.
        dtype: dtype of the result, fp32 (default) or fp64.

    Returns:
        ``(gamma, sigma)``, each ``(B,)`` of ``dtype`` on the timesteps' device.
    """
    table = checks.check_tensor("alphas_cumprod", alphas_cumprod)
    if table.dim() != 1 or table.shape[0] < 1:
        raise ValueError(f"alphas_cumprod: expected a 1-D table of length T >= 1, got shape {tuple(table.shape)}")
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"dtype: expected torch.float32 or torch.float64, got {dtype}")
    t = checks.check_timesteps(timesteps, table.shape[0])
    abar = table.to(device=t.device, dtype=torch.float64)[t.long()]
    if checks.value_checks_enabled() and not bool(((abar > 0) & (abar < 1)).all()):
        bad = abar[~((abar > 0) & (abar < 1))][:4].tolist()
        raise ValueError(f"alphas_cumprod: expected values in (0, 1) at the requested timesteps, got {bad}")
    return abar.sqrt().to(dtype), (1.0 - abar).sqrt().to(dtype)


def _per_sample_vector(name: str, x: object, batch: int, acc: torch.dtype) -> Tensor:
    return checks.check_per_sample(name, x, batch).to(acc).contiguous()


def mixture_noise(x0: Tensor, a0: Tensor, noise: Tensor, gamma: Tensor, sigma: Tensor, mask: Tensor) -> Tensor:
    """Mixture forward noising (SPEC §3), one fused pass.

    ``noisy[b] = gamma[b] * (a0[b] if mask[b] else x0[b]) + sigma[b] * noise[b]``

    Args:
        x0, a0, noise: ``(B, ...)`` floating tensors of one shape (retain sample, forget sample, shared noise).
        gamma, sigma: ``(B,)`` floating (from :func:`schedule_coefficients`), ``sigma > 0``.
        mask: ``(B,)`` bool, True where the sample comes from the forget component.

    Returns:
        ``(B, ...)`` contiguous tensor in the promoted dtype of x0, a0 and noise; arithmetic in fp32 (fp64 for fp64).
        Differentiable with respect to x0, a0 and noise.
    """
    tensors = {"x0": checks.check_tensor("x0", x0), "a0": checks.check_tensor("a0", a0),
               "noise": checks.check_tensor("noise", noise)}
    shape = checks.check_same_shape(tensors)
    batch = shape[0]
    dtype = checks.promote(list(tensors.values()))
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    g = _per_sample_vector("gamma", gamma, batch, acc)
    s = _per_sample_vector("sigma", sigma, batch, acc)
    m = checks.check_mask("mask", mask, batch)
    checks.check_same_device({**tensors, "gamma": gamma, "sigma": sigma, "mask": mask})
    checks.check_sigma_positive(s)
    x0, a0, noise = (t.to(dtype) for t in tensors.values())
    return ops.call_mixture_noise(x0, a0, noise, g, s, m.contiguous())


def _prepare_loss_inputs(pred, noisy, x0, a0, gamma, sigma, lambd, weight_clip):
    """Check and normalise the arguments shared by :func:`siss_loss` and :func:`importance_weights`."""
    tensors = {
        "pred": checks.check_tensor("pred", pred),
        "noisy": checks.check_tensor("noisy", noisy),
        "x0": checks.check_tensor("x0", x0),
        "a0": checks.check_tensor("a0", a0),
    }
    shape = checks.check_same_shape(tensors)
    batch = shape[0]
    lambd = checks.check_lambd(lambd)
    weight_clip = checks.check_weight_clip(weight_clip)
    latent_dtype = checks.promote([tensors["noisy"], tensors["x0"], tensors["a0"]])
    fp64 = latent_dtype == torch.float64 or tensors["pred"].dtype == torch.float64
    acc = torch.float64 if fp64 else torch.float32
    g = _per_sample_vector("gamma", gamma, batch, acc)
    s = _per_sample_vector("sigma", sigma, batch, acc)
    checks.check_same_device({**tensors, "gamma": gamma, "sigma": sigma})
    checks.check_sigma_positive(s)
    if fp64:
        latent_dtype = torch.float64
        pred = pred.to(torch.float64)
    noisy, x0, a0 = (t.to(latent_dtype) for t in (noisy, x0, a0))
    return pred, noisy, x0, a0, g, s, lambd, weight_clip


def importance_weights(noisy: Tensor, x0: Tensor, a0: Tensor, gamma: Tensor, sigma: Tensor, lambd: float, *,
                       weight_clip: Optional[float] = None) -> Tuple[Tensor, Tensor]:
    """Importance weights of the mixture sample (SPEC §4).

    ``w_x = 1 / ((1-lambd) + lambd*exp(delta))``, ``w_a = 1 / ((1-lambd)*exp(-delta) + lambd)`` with
    ``delta = ||m - gamma*x0||^2/(2 sigma^2) - ||m - gamma*a0||^2/(2 sigma^2)`` accumulated as one sum of
    per-element differences, evaluated in log space; ``w <- min(w, weight_clip)`` if given.

    Returns:
        ``(w_x, w_a)``, each ``(B,)`` fp32 (fp64 for fp64 inputs), no gradient.
    """
    _, noisy, x0, a0, g, s, lambd, weight_clip = _prepare_loss_inputs(
        noisy, noisy, x0, a0, gamma, sigma, lambd, weight_clip
    )
    with torch.no_grad():
        _, _, w_x, w_a = ops.call_siss_loss(noisy, noisy, x0, a0, g, s, lambd, weight_clip)
    return w_x, w_a


def siss_loss(pred: Tensor, noisy: Tensor, x0: Tensor, a0: Tensor, gamma: Tensor, sigma: Tensor, lambd: float, *,
              weight_clip: Optional[float] = None, reduction: str = "mean") -> SISSTerms:
    """Fused SISS loss (SPEC §4): both importance-weighted terms from one prediction on the mixture sample.

    Per sample, with ``eps_x = (noisy - gamma*x0)/sigma`` and ``eps_a = (noisy - gamma*a0)/sigma``:
    ``ell_x = w_x * mean_i (pred - eps_x)^2`` and ``ell_a = w_a * mean_i (pred - eps_a)^2``.

    Args:
        pred: ``(B, ...)`` model prediction on ``noisy`` (any floating dtype; bf16 with fp32 latents is fine).
        noisy, x0, a0: ``(B, ...)`` mixture sample, retain sample, forget sample.
        gamma, sigma: ``(B,)``; lambd in [0, 1]; weight_clip: None or > 0.
        reduction: ``"mean"`` = ``(1/B) sum_b ell_b``; ``"sum"`` = ``sum_b D*ell_b``; ``"none"`` = ``(B,)``.

    Returns:
        :class:`SISSTerms` ``(loss_x, loss_a, weight_x, weight_a)``. Losses are fp32 (fp64 for fp64 inputs) and
        differentiable w.r.t. ``pred`` only: ``d ell_x / d pred = 2*w_x*(pred - eps_x)/D``.
    """
    reduction = checks.check_reduction(reduction)
    args = _prepare_loss_inputs(pred, noisy, x0, a0, gamma, sigma, lambd, weight_clip)
    ell_x, ell_a, w_x, w_a = ops.call_siss_loss(*args)
    if reduction == "mean":
        ell_x, ell_a = ell_x.mean(), ell_a.mean()
    elif reduction == "sum":
        d = pred.numel() // pred.shape[0]
        ell_x, ell_a = ell_x.sum() * d, ell_a.sum() * d
    return SISSTerms(ell_x, ell_a, w_x, w_a)


def model_output(out: object) -> Tensor:
    """The prediction tensor of a model call: a tensor, a diffusers output's ``.sample``, or a tuple's first item."""
    if isinstance(out, Tensor):
        return out
    sample = getattr(out, "sample", None)
    if isinstance(sample, Tensor):
        return sample
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    raise TypeError(f"model output: expected a tensor, an object with .sample or a tuple, got {type(out).__name__}")
