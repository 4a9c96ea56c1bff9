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
  or ``w == 0``, and each product ``c * (pred - eps)`` is 0 where ``pred - eps == 0`` (so an unused term, or an
  infinite weight on a zero residual, contributes nothing instead of NaN).

Extreme magnitudes (SPEC §8: for finite inputs no NaN, and inf only where the exact value overflows). The three sums
are accumulated in ``acc``; for finite inputs they fail only visibly (the same rule in every backend):

* overflow: a per-element product beyond ``acc``'s range (fp32: inputs ~1e20 at t = 0) makes the sum +-inf or NaN;
* underflow (fp32 only): squares below 2^-126 lose relative precision, which matters for ``sse < D * 2^-100`` (a
  huge weight can still make ``ell`` representable) and, for ``delta``, when ``2 sigma^2 < D * 2^-109``.

Such a sum is recomputed for that sample by the *wide* path: in fp64 from the unscaled inputs for fp32 accumulation
(nothing there can overflow or underflow for finite fp16/bf16/fp32 inputs), in fp64 from the inputs scaled by
``2^-600`` for fp64 accumulation (the sum then carries a factor ``2^1200``). The finish (delta, weights,
``ell = w * (sse / D)``) runs per sample in fp64 and rounds to ``acc`` only at the end: a delta beyond the range
gives the exact limits of the weights, ``w == 0`` or ``sse == 0`` gives ``ell == 0``, and ``ell`` is inf only where
the exact value overflows.
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


#: Input scaling exponent of the wide path for fp64 accumulation (inputs * 2^-600, sums * 2^-1200).
WIDE_SHIFT_FP64 = 600


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
    log_w_x = -torch.logaddexp(keep, _log_times_exp(log_lambd, delta))
    log_w_a = -torch.logaddexp(_log_times_exp(log_keep, -delta), lam)
    if weight_clip is not None:
        log_clip = math.log(weight_clip)
        log_w_x = log_w_x.clamp(max=log_clip)
        log_w_a = log_w_a.clamp(max=log_clip)
    return log_w_x, log_w_a


def _log_times_exp(log_c: float, delta: Tensor) -> Tensor:
    """``log(c * e^delta) = log_c + delta``, with log 0 staying log 0 (``0 * e^delta = 0`` also for a delta that
    overflowed to +-inf, where ``-inf + inf`` would be NaN)."""
    if log_c == -math.inf:
        return torch.full_like(delta, -math.inf)
    return log_c + delta


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


def _residuals(pred: Tensor, noisy: Tensor, x0: Tensor, a0: Tensor, gamma: Tensor, sigma: Tensor,
               dtype: Optional[torch.dtype] = None, scale: float = 1.0):
    """``(pred - eps_x, pred - eps_a, gamma*(a0 - x0)*(2m - gamma*(x0 + a0)))`` in ``dtype`` (default: the
    accumulation dtype), from pred, noisy, x0, a0 multiplied by ``scale`` (a power of two: exact)."""
    acc = dtype or gamma.dtype
    p, m, x, a = (t.to(acc) * scale if scale != 1.0 else t.to(acc) for t in (pred, noisy, x0, a0))
    g, s = _bcast(gamma.to(acc), p), _bcast(sigma.to(acc), p)
    if acc == torch.float32:
        # m - g*x cancels when m was drawn around g*x with little noise (t near 0): form it from the exact fp64
        # product of the fp32 values and round once, as the compiled kernels do with a fused multiply-add
        m64, g64 = m.double(), g.double()
        num_x, num_a = (m64 - g64 * x.double()).float(), (m64 - g64 * a.double()).float()
    else:
        num_x, num_a = m - g * x, m - g * a
    res_x = p - num_x / s
    res_a = p - num_a / s
    delta_terms = (g * (a - x)) * (num_x + num_a)  # = g(a - x) * (2m - g(x + a))
    return res_x, res_a, delta_terms


def siss_loss_forward(pred: Tensor, noisy: Tensor, x0: Tensor, a0: Tensor, gamma: Tensor, sigma: Tensor, lambd: float,
                      weight_clip: Optional[float] = None) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Fused SISS forward: per-sample weighted losses and importance weights.

    Returns ``(ell_x, ell_a, w_x, w_a)``, each ``(B,)`` in the accumulation dtype, with
    ``ell_x = w_x * mean_i (pred - eps_x)^2`` and ``ell_a = w_a * mean_i (pred - eps_a)^2``.
    """
    batch = pred.shape[0]
    d = pred.numel() // batch
    acc = gamma.dtype
    sums = _per_sample_sums(pred, noisy, x0, a0, gamma, sigma, acc).to(torch.float64)
    usable = _usable_sums(sums, sigma.to(torch.float64), d, acc)
    exponents = torch.zeros(sums.shape, dtype=torch.int64, device=sums.device)
    if not bool(usable.all()):
        # The wide path, for the samples (rows) with an unusable sum only.
        shift = WIDE_SHIFT_FP64 if acc == torch.float64 else 0
        rows = ~usable.all(dim=0)
        wide = _per_sample_sums(
            pred[rows], noisy[rows], x0[rows], a0[rows], gamma[rows], sigma[rows], torch.float64, 2.0**-shift
        )
        sums[:, rows] = torch.where(usable[:, rows], sums[:, rows], wide)
        exponents[:, rows] = torch.where(usable[:, rows], 0, 2 * shift)
    return _finish(sums, exponents, sigma.to(torch.float64), d, lambd, weight_clip, acc)


def _per_sample_sums(pred, noisy, x0, a0, gamma, sigma, dtype: torch.dtype, scale: float = 1.0) -> Tensor:
    """``(3, B)`` in ``dtype``: the delta numerator ``sum_i gamma*(a0-x0)*(2m - gamma*(x0+a0))``, ``sse_x``,
    ``sse_a``, from the inputs multiplied by ``scale`` (so every sum is multiplied by ``scale**2``)."""
    batch = pred.shape[0]
    res_x, res_a, delta_terms = _residuals(pred, noisy, x0, a0, gamma, sigma, dtype, scale)
    return torch.stack([t.reshape(batch, -1).sum(dim=1) for t in (delta_terms, res_x.square(), res_a.square())])


def _usable_sums(sums: Tensor, sigma: Tensor, d: int, acc: torch.dtype) -> Tensor:
    """``(3, B)`` bool: which fast sums can be used as they are (see the module docstring)."""
    usable = torch.isfinite(sums)
    if acc != torch.float64:
        # delta: absolute error of underflowed terms <= D * 2^-150 / (2 sigma^2), kept below 2^-41
        usable[0] &= 2.0 * sigma * sigma >= d * 2.0**-109
        # sse: relative error of underflowed squares <= D * 2^-150 / sse <= 2^-50
        usable[1:] &= sums[1:] >= d * 2.0**-100
    return usable


def _ldexp(x: Tensor, exponent: Tensor) -> Tensor:
    """``x * 2^exponent`` for exponents beyond the range of one power of two (|exponent| <= 2300): three exact
    steps of equal sign, so an intermediate overflows only when the result does."""
    third = torch.div(exponent, 3, rounding_mode="trunc")
    return torch.ldexp(torch.ldexp(torch.ldexp(x, third), third), exponent - 2 * third)


def _weighted_mean(w: Tensor, log_w: Tensor, mean: Tensor, exponent: Tensor) -> Tensor:
    """``w * mean * 2^exponent`` in fp64, rounded once: 0 where ``w == 0`` or ``mean == 0`` (the exact product is 0;
    no ``0 * inf``), mantissas and exponents multiplied separately (no intermediate overflow or underflow), and in
    log space where the weight itself overflowed fp64 (lambda in {0, 1} without clip)."""
    f_w, e_w = torch.frexp(w)
    f_m, e_m = torch.frexp(mean)
    product = _ldexp(f_w * f_m, e_w.long() + e_m.long() + exponent)
    in_log_space = torch.exp(log_w + torch.log(mean) + exponent * math.log(2.0))
    out = torch.where(torch.isinf(w), in_log_space, product)
    return torch.where((w == 0) | (mean == 0), torch.zeros_like(out), out)


def _finish(sums: Tensor, exponents: Tensor, sigma: Tensor, d: int, lambd: float, weight_clip: Optional[float],
            acc: torch.dtype):
    """From the fp64 sums (value * 2^exponent) to ``(ell_x, ell_a, w_x, w_a)`` in ``acc``; fp64 throughout."""
    two_s2 = 2.0 * sigma * sigma
    # 2 sigma^2 underflows fp64 only for sigma < 1e-154: divide twice there
    scaled = torch.where(two_s2 >= 2.0**-1022, sums[0] / two_s2, sums[0] / (2.0 * sigma) / sigma)
    delta = _ldexp(scaled, exponents[0])  # +-inf beyond the range: the weights take their exact limits
    log_w_x, log_w_a = log_weights(delta, lambd)
    w_x, w_a = log_w_x.exp(), log_w_a.exp()
    if weight_clip is not None:
        # the clip rounded to acc, like every backend: the stored weight never exceeds it, even by a rounding
        clip = float(torch.tensor(weight_clip, dtype=acc))
        w_x, w_a = w_x.clamp(max=clip), w_a.clamp(max=clip)
    # w * (sse / D): the product of a large weight and sse could overflow although ell itself does not
    ell_x = _weighted_mean(w_x, log_w_x, sums[1] / d, exponents[1])
    ell_a = _weighted_mean(w_a, log_w_a, sums[2] / d, exponents[2])
    return ell_x.to(acc), ell_a.to(acc), w_x.to(acc), w_a.to(acc)


def backward_coefficients(grad: Tensor, weight: Tensor, numel_per_sample: int) -> Tensor:
    """``2*g*w/D`` per sample, and exactly 0 where ``g == 0`` or ``w == 0`` (an unused term never turns inf into
    NaN)."""
    coef = grad * weight * (2.0 / numel_per_sample)
    return torch.where((grad == 0) | (weight == 0), torch.zeros_like(coef), coef)


def _times_residual(coef: Tensor, res: Tensor) -> Tensor:
    """``c * r`` in fp64 for a ``(B,)`` coefficient, 0 where ``c == 0`` or ``r == 0`` (never ``0 * inf``). In fp64
    neither ``c`` (``2gw/D`` of fp32 values) nor the product can leave the range for fp16/bf16/fp32 inputs."""
    c, r = _bcast(coef, res), res.to(torch.float64)
    return torch.where((c == 0) | (r == 0), torch.zeros_like(r), c * r)


def siss_loss_backward(grad_ell_x: Tensor, grad_ell_a: Tensor, w_x: Tensor, w_a: Tensor, pred: Tensor, noisy: Tensor,
                       x0: Tensor, a0: Tensor, gamma: Tensor, sigma: Tensor) -> Tensor:
    """Gradient of ``sum_b g_x[b]*ell_x[b] + g_a[b]*ell_a[b]`` with respect to ``pred``.

    ``grad_ell_x``, ``grad_ell_a``, ``w_x``, ``w_a``: ``(B,)`` in the accumulation dtype.
    Returns a contiguous tensor of ``pred``'s shape and dtype.
    """
    batch = pred.shape[0]
    d = pred.numel() // batch
    acc = gamma.dtype
    # c in fp64: 2gw/D of acc values can leave acc's range although c * (pred - eps) does not
    c_x = backward_coefficients(grad_ell_x.to(acc).double(), w_x.to(acc).double(), d)
    c_a = backward_coefficients(grad_ell_a.to(acc).double(), w_a.to(acc).double(), d)
    res_x, res_a, _ = _residuals(pred, noisy, x0, a0, gamma, sigma)
    if acc != torch.float64 and _fits(c_x, acc) and _fits(c_a, acc):
        # the common case: both coefficients are normal numbers of acc (or exactly 0), so c * r in acc is the
        # fp64 product rounded once, and 0 * r = 0 for the finite residuals of finite inputs
        grad = _bcast(c_x.to(acc), res_x) * res_x + _bcast(c_a.to(acc), res_a) * res_a
    else:
        grad = _times_residual(c_x, res_x) + _times_residual(c_a, res_a)
    return grad.to(pred.dtype).contiguous()


def _fits(coef: Tensor, dtype: torch.dtype) -> bool:
    """Every value is 0 or a normal, finite number of ``dtype`` (one host synchronisation)."""
    info = torch.finfo(dtype)
    size = coef.abs()
    return bool(((coef == 0) | ((size <= info.max) & (size >= info.tiny))).all())
