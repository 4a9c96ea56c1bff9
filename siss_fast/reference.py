"""Pure-PyTorch reference backend: the readable statement of the math and the CPU fallback.

Every backend (``torch`` = this module, ``cpp``/``cuda`` = ``siss_fast._C``, ``triton`` = ``siss_fast.kernels``)
implements the same three functions with the same contract. Arguments reach a backend already validated and
normalised by :mod:`siss_fast._checks`:

* ``pred`` has shape ``(B, ...)``; ``noisy``, ``x0``, ``a0``, ``noise`` have the same shape and share one dtype
  (the *latent dtype*); ``pred`` may have another (bf16 predictions against fp32 latents).
* Floating dtypes only. If any tensor is fp64, every tensor is fp64 and the accumulation dtype ``acc`` is fp64;
  otherwise tensors are fp16/bf16/fp32 and ``acc`` is fp32.
* ``gamma``, ``sigma``: ``(B,)`` contiguous, dtype ``acc``, ``sigma > 0``. ``mask``: ``(B,)`` contiguous bool.
* Tensors may be non-contiguous. All tensors are on one device.
* ``lambd`` is a Python float in [0, 1]; ``weight_clip`` is ``None`` or a Python float > 0.

Formulas (SPEC §3-4), per sample ``b`` with D elements:

* mixture:  ``m = gamma * (a0 if mask else x0) + sigma * noise``
* targets:  ``eps_x = (m - gamma*x0) / sigma``, ``eps_a = (m - gamma*a0) / sigma``
* log-density gap, one sum of per-element differences (never two large sums subtracted):
  ``delta = sum_i gamma*(a0 - x0)_i * (2*m - gamma*(x0 + a0))_i / (2*sigma^2)``
* log-space weights (``log 0 = -inf`` so lambda in {0, 1} is exact):
  ``log w_x = -logaddexp(log(1-lambda), log(lambda) + delta)``,
  ``log w_a = -logaddexp(log(1-lambda) - delta, log(lambda))``,
  then ``w = exp(log w)`` and the optional clip ``w <- min(w, clip)`` on the weight (clip rounded to the
  accumulation dtype), so a clipped weight is never above the clip, even by a rounding, and an overflow is clipped
* per-sample losses: ``ell_x = w_x * (sse_x / D)``, ``sse_x = sum_i (pred - eps_x)_i^2``; likewise ``ell_a``
* backward, for upstream gradients ``g_x, g_a`` of ``ell_x, ell_a``:
  ``dpred = (2/D) * (c_x * (pred - eps_x) + c_a * (pred - eps_a))``, ``c = g * w`` and ``c = 0`` where ``g == 0``
  (so an unused term with an infinite weight contributes nothing instead of NaN).
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

__all__ = [
    "accumulation_dtype",
    "log_weights",
    "weights_from_delta",
    "mixture_noise",
    "siss_loss_forward",
    "siss_loss_backward",
]


def accumulation_dtype(*tensors: Tensor) -> torch.dtype:
    """fp64 if any tensor is fp64, else fp32 (SPEC §9: reductions accumulate in fp32, fp64 for fp64 inputs)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _log_mixture_coefficients(lambd: float) -> Tuple[float, float]:
    """(log(1 - lambda), log(lambda)) as Python floats, with log 0 = -inf."""
    log_keep = math.log1p(-lambd) if lambd < 1.0 else -math.inf
    log_lambd = math.log(lambd) if lambd > 0.0 else -math.inf
    return log_keep, log_lambd


def log_weights(delta: Tensor, lambd: float, weight_clip: Optional[float] = None) -> Tuple[Tensor, Tensor]:
    """Log importance weights from the log-density gap.

    Args:
        delta: ``(B,)`` fp32/fp64, ``delta = d_x - d_a``.
        lambd: mixture probability of the forget component, in [0, 1].
        weight_clip: optional upper bound on each weight (truncated importance sampling).

    Returns:
        ``(log_w_x, log_w_a)``, each ``(B,)`` in ``delta.dtype``.
    """
    log_keep, log_lambd = _log_mixture_coefficients(lambd)
    keep = torch.full_like(delta, log_keep)
    lam = torch.full_like(delta, log_lambd)
    log_w_x = -torch.logaddexp(keep, lam + delta)
    log_w_a = -torch.logaddexp(keep - delta, lam)
    if weight_clip is not None:
        log_clip = math.log(weight_clip)
        log_w_x = log_w_x.clamp(max=log_clip)
        log_w_a = log_w_a.clamp(max=log_clip)
    return log_w_x, log_w_a


def weights_from_delta(delta: Tensor, lambd: float, weight_clip: Optional[float] = None) -> Tuple[Tensor, Tensor]:
    """``(w_x, w_a)``, each ``(B,)`` in ``delta.dtype``: ``exp`` of :func:`log_weights` without the clip, then
    ``min(w, weight_clip)`` on the weight itself, so a clipped weight never exceeds the clip by a rounding."""
    log_w_x, log_w_a = log_weights(delta, lambd)
    w_x, w_a = log_w_x.exp(), log_w_a.exp()
    if weight_clip is not None:
        w_x, w_a = w_x.clamp(max=weight_clip), w_a.clamp(max=weight_clip)
    return w_x, w_a


def _bcast(v: Tensor, like: Tensor) -> Tensor:
    """View a ``(B,)`` vector so it broadcasts against a ``(B, ...)`` tensor."""
    return v.view(v.shape[0], *([1] * (like.dim() - 1)))


def mixture_noise(x0: Tensor, a0: Tensor, noise: Tensor, gamma: Tensor, sigma: Tensor, mask: Tensor) -> Tensor:
    """``m = gamma*(a0 if mask else x0) + sigma*noise``; computed in ``gamma.dtype``, returned in ``x0.dtype``.

    Shapes: x0, a0, noise ``(B, ...)``; gamma, sigma ``(B,)`` fp32/fp64; mask ``(B,)`` bool. Output contiguous.
    """
    acc = gamma.dtype
    src = torch.where(_bcast(mask, x0), a0, x0).to(acc)
    out = torch.addcmul(_bcast(sigma, x0) * noise.to(acc), _bcast(gamma, x0), src)
    return out.to(x0.dtype).contiguous()


def _residuals(pred: Tensor, noisy: Tensor, x0: Tensor, a0: Tensor, gamma: Tensor, sigma: Tensor):
    """``(pred - eps_x, pred - eps_a, gamma*(a0 - x0)*(2m - gamma*(x0 + a0)))`` in the accumulation dtype."""
    acc = gamma.dtype
    p, m, x, a = pred.to(acc), noisy.to(acc), x0.to(acc), a0.to(acc)
    g, s = _bcast(gamma, p), _bcast(sigma, p)
    res_x = p - (m - g * x) / s
    res_a = p - (m - g * a) / s
    delta_terms = (g * (a - x)) * (2.0 * m - g * (x + a))
    return res_x, res_a, delta_terms


def siss_loss_forward(
    pred: Tensor,
    noisy: Tensor,
    x0: Tensor,
    a0: Tensor,
    gamma: Tensor,
    sigma: Tensor,
    lambd: float,
    weight_clip: Optional[float] = None,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Fused SISS forward: per-sample weighted losses and importance weights.

    Returns ``(ell_x, ell_a, w_x, w_a)``, each ``(B,)`` in the accumulation dtype, with
    ``ell_x = w_x * mean_i (pred - eps_x)^2`` and ``ell_a = w_a * mean_i (pred - eps_a)^2``.
    """
    batch = pred.shape[0]
    d = pred.numel() // batch
    res_x, res_a, delta_terms = _residuals(pred, noisy, x0, a0, gamma, sigma)
    delta = delta_terms.reshape(batch, -1).sum(dim=1) / (2.0 * sigma * sigma)
    sse_x = res_x.square().reshape(batch, -1).sum(dim=1)
    sse_a = res_a.square().reshape(batch, -1).sum(dim=1)
    w_x, w_a = weights_from_delta(delta, lambd, weight_clip)
    # w * (sse / D): the product of a large weight and sse could overflow although ell itself does not
    return w_x * (sse_x / d), w_a * (sse_a / d), w_x, w_a


def backward_coefficients(grad: Tensor, weight: Tensor, numel_per_sample: int) -> Tensor:
    """``2*g*w/D`` per sample, and exactly 0 where ``g == 0`` (an unused term never turns inf into NaN)."""
    coef = grad * weight * (2.0 / numel_per_sample)
    return torch.where(grad == 0, torch.zeros_like(coef), coef)


def siss_loss_backward(
    grad_ell_x: Tensor,
    grad_ell_a: Tensor,
    w_x: Tensor,
    w_a: Tensor,
    pred: Tensor,
    noisy: Tensor,
    x0: Tensor,
    a0: Tensor,
    gamma: Tensor,
    sigma: Tensor,
) -> Tensor:
    """Gradient of ``sum_b g_x[b]*ell_x[b] + g_a[b]*ell_a[b]`` with respect to ``pred``.

    ``grad_ell_x``, ``grad_ell_a``, ``w_x``, ``w_a``: ``(B,)`` in the accumulation dtype.
    Returns a contiguous tensor of ``pred``'s shape and dtype.
    """
    batch = pred.shape[0]
    d = pred.numel() // batch
    acc = gamma.dtype
    c_x = backward_coefficients(grad_ell_x.to(acc), w_x.to(acc), d)
    c_a = backward_coefficients(grad_ell_a.to(acc), w_a.to(acc), d)
    res_x, res_a, _ = _residuals(pred, noisy, x0, a0, gamma, sigma)
    grad = _bcast(c_x, res_x) * res_x + _bcast(c_a, res_a) * res_a
    return grad.to(pred.dtype).contiguous()
