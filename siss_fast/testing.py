"""Oracles and baselines shared by the tests and the benchmarks (one copy, imported from both).

* ``oracle_*``: float64 statements of SPEC §3-4 written independently of the backends: the weights come from the
  probability formula (not the log-space one the kernels use), with lambda in {0, 1} handled by cases.
* ``research_siss_loss``: the research code's eager formulation as it computes (elementwise tensors, the log-density
  gap as a difference of two large sums, ``exp`` of it). It is the speed baseline and shows the precision loss.
* ``make_case``: random inputs of the oracle suite.
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

__all__ = [
    "oracle_mixture_noise",
    "oracle_delta",
    "oracle_weights",
    "oracle_siss_loss",
    "oracle_grad",
    "research_siss_loss",
    "make_case",
    "linear_alphas_cumprod",
    "max_rel_error",
]


def _b(v: Tensor, like: Tensor) -> Tensor:
    return v.reshape(-1, *([1] * (like.dim() - 1)))


def _f64(*ts: Tensor):
    return tuple(t.detach().to(torch.float64) for t in ts)


def linear_alphas_cumprod(num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """The DDPM linear schedule's ``alphas_cumprod`` in fp64 (diffusers ``DDPMScheduler`` default)."""
    betas = torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)
    return torch.cumprod(1.0 - betas, dim=0)


def oracle_mixture_noise(x0, a0, noise, gamma, sigma, mask) -> Tensor:
    x0, a0, noise, gamma, sigma = _f64(x0, a0, noise, gamma, sigma)
    src = torch.where(_b(mask.bool(), x0), a0, x0)
    return _b(gamma, x0) * src + _b(sigma, x0) * noise


def oracle_delta(noisy, x0, a0, gamma, sigma) -> Tensor:
    """``delta = d_x - d_a``, ``d_z = ||m - gamma z||^2 / (2 sigma^2)``, in fp64 (two sums: exact enough in fp64)."""
    m, x0, a0, gamma, sigma = _f64(noisy, x0, a0, gamma, sigma)
    d_x = (m - _b(gamma, m) * x0).square().flatten(1).sum(1) / (2 * sigma**2)
    d_a = (m - _b(gamma, m) * a0).square().flatten(1).sum(1) / (2 * sigma**2)
    return d_x - d_a


def oracle_weights(delta: Tensor, lambd: float, weight_clip: Optional[float] = None) -> Tuple[Tensor, Tensor]:
    """``w_x = 1/((1-l) + l e^delta)``, ``w_a = 1/((1-l) e^-delta + l)`` in fp64, lambda in {0, 1} by cases."""
    delta = delta.to(torch.float64)
    if lambd == 0.0:
        w_x, w_a = torch.ones_like(delta), torch.exp(delta)
    elif lambd == 1.0:
        w_x, w_a = torch.exp(-delta), torch.ones_like(delta)
    else:
        # exp overflow to inf gives the right limits (1/inf = 0) since 0 < lambda < 1
        w_x = 1.0 / ((1 - lambd) + lambd * torch.exp(delta))
        w_a = 1.0 / ((1 - lambd) * torch.exp(-delta) + lambd)
    if weight_clip is not None:
        w_x, w_a = w_x.clamp(max=weight_clip), w_a.clamp(max=weight_clip)
    return w_x, w_a


def oracle_siss_loss(pred, noisy, x0, a0, gamma, sigma, lambd, weight_clip=None):
    """Per-sample ``(ell_x, ell_a, w_x, w_a)`` in fp64."""
    p, m, x, a, g, s = _f64(pred, noisy, x0, a0, gamma, sigma)
    w_x, w_a = oracle_weights(oracle_delta(m, x, a, g, s), lambd, weight_clip)
    eps_x = (m - _b(g, m) * x) / _b(s, m)
    eps_a = (m - _b(g, m) * a) / _b(s, m)
    mse_x = (p - eps_x).square().flatten(1).mean(1)
    mse_a = (p - eps_a).square().flatten(1).mean(1)
    return w_x * mse_x, w_a * mse_a, w_x, w_a


def oracle_grad(pred, noisy, x0, a0, gamma, sigma, lambd, weight_clip, grad_x, grad_a) -> Tensor:
    """``d/dpred sum_b grad_x[b] ell_x[b] + grad_a[b] ell_a[b]`` in fp64 (fp64 autograd through the oracle)."""
    p = pred.detach().to(torch.float64).requires_grad_(True)
    ell_x, ell_a, _, _ = _oracle_ell(p, noisy, x0, a0, gamma, sigma, lambd, weight_clip)
    total = (ell_x * grad_x.to(torch.float64)).sum() + (ell_a * grad_a.to(torch.float64)).sum()
    (g,) = torch.autograd.grad(total, p)
    return g


def _oracle_ell(p, noisy, x0, a0, gamma, sigma, lambd, weight_clip):
    m, x, a, g, s = _f64(noisy, x0, a0, gamma, sigma)
    w_x, w_a = oracle_weights(oracle_delta(m, x, a, g, s), lambd, weight_clip)
    eps_x = (m - _b(g, m) * x) / _b(s, m)
    eps_a = (m - _b(g, m) * a) / _b(s, m)
    return w_x * (p - eps_x).square().flatten(1).mean(1), w_a * (p - eps_a).square().flatten(1).mean(1), w_x, w_a


def research_siss_loss(pred, noisy, x0, a0, gamma, sigma, lambd):
    """The research code's formulation, as it computes, in the inputs' dtype.

    Returns ``(loss_x, loss_a, w_x, w_a)`` with the losses reduced like ``siss_loss(..., reduction="mean")`` so the
    two are comparable (the research script reduces the elementwise tensors itself).
    """
    g, s = _b(gamma, noisy), _b(sigma, noisy)
    eps_x = (noisy - g * x0) / s
    eps_a = (noisy - g * a0) / s
    loss_x = (pred - eps_x) ** 2
    loss_a = (pred - eps_a) ** 2
    dims = list(range(1, noisy.dim()))
    dist_x = torch.sum((noisy - g * x0) ** 2, dim=dims) / (2 * sigma**2)
    dist_a = torch.sum((noisy - g * a0) ** 2, dim=dims) / (2 * sigma**2)
    w_x = 1 / ((1 - lambd) + lambd * torch.exp(dist_x - dist_a))
    w_a = 1 / ((1 - lambd) * torch.exp(dist_a - dist_x) + lambd)
    weighted_x = _b(w_x, loss_x) * loss_x
    weighted_a = _b(w_a, loss_a) * loss_a
    return weighted_x.flatten(1).mean(1).mean(), weighted_a.flatten(1).mean(1).mean(), w_x, w_a


def make_case(
    shape,
    *,
    t=None,
    dtype: torch.dtype = torch.float32,
    pred_dtype: Optional[torch.dtype] = None,
    scale: float = 1.0,
    seed: int = 0,
    device="cpu",
    mask=None,
    alphas_cumprod: Optional[Tensor] = None,
) -> Dict[str, Tensor]:
    """Random inputs of one test case.

    ``shape`` is ``(B, ...)``; ``t`` an int (same timestep for every sample) or None (random); ``scale`` multiplies
    x0, a0, noise and pred. The mixture is built in fp64 and rounded to ``dtype`` so that it is exactly what a
    backend sees. Returns a dict with pred, noisy, x0, a0, noise, gamma, sigma (fp32), mask, timesteps.
    """
    gen = torch.Generator().manual_seed(seed)
    abar = linear_alphas_cumprod() if alphas_cumprod is None else alphas_cumprod
    batch = shape[0]
    if t is None:
        timesteps = torch.randint(0, abar.shape[0], (batch,), generator=gen)
    else:
        timesteps = torch.full((batch,), int(t), dtype=torch.long)
    gamma = abar[timesteps].sqrt().float()
    sigma = (1 - abar[timesteps]).sqrt().float()
    if mask is None:
        mask = torch.rand(batch, generator=gen) < 0.5
    x0 = torch.randn(shape, generator=gen, dtype=torch.float64) * scale
    a0 = torch.randn(shape, generator=gen, dtype=torch.float64) * scale
    noise = torch.randn(shape, generator=gen, dtype=torch.float64) * scale
    pred = torch.randn(shape, generator=gen, dtype=torch.float64) * scale
    x0, a0, noise = x0.to(dtype), a0.to(dtype), noise.to(dtype)
    noisy = oracle_mixture_noise(x0, a0, noise, gamma, sigma, mask).to(dtype)
    return {
        "pred": pred.to(pred_dtype or dtype).to(device),
        "noisy": noisy.to(device),
        "x0": x0.to(device),
        "a0": a0.to(device),
        "noise": noise.to(device),
        "gamma": gamma.to(device),
        "sigma": sigma.to(device),
        "mask": mask.to(device),
        "timesteps": timesteps.to(device),
    }


def max_rel_error(actual: Tensor, expected: Tensor, *, floor: float = 0.0) -> float:
    """``max |a - e| / max(|e|, floor)`` elementwise for per-sample vectors (inf == inf counts as exact)."""
    a, e = actual.detach().to(torch.float64).cpu(), expected.detach().to(torch.float64).cpu()
    same = (a == e) | (torch.isnan(a) & torch.isnan(e))
    err = torch.where(same, torch.zeros_like(a), (a - e).abs() / e.abs().clamp(min=floor))
    if err.numel() == 0:
        return 0.0
    value = float(err.max())
    return value if not math.isnan(value) else math.inf


def norm_rel_error(actual: Tensor, expected: Tensor) -> float:
    """``max |a - e| / max |e|``: relative error of a whole tensor (for elementwise outputs with cancellations)."""
    a, e = actual.detach().to(torch.float64).cpu(), expected.detach().to(torch.float64).cpu()
    denom = float(e.abs().max())
    num = float((a - e).abs().max())
    if denom == 0.0:
        return num
    return num / denom
