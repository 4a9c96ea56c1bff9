"""Membership and likelihood signals of a pixel DDPM: denoising loss at fixed (t, eps), and bits/dim.

Both take images in the **model's space** ([-1, 1]) and a model called as ``model(x_t, t)`` returning the noise
prediction (a tensor or a diffusers output), with the scheduler's ``alphas_cumprod`` table (T,).
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Optional, Sequence

import torch
from torch import Tensor

from .sampling import model_eps

__all__ = ["denoising_loss", "membership_signal", "bits_per_dim_vlb", "DEFAULT_LOSS_TIMESTEPS"]

# Default probe: ten evenly spaced timesteps, t_i = (2i + 1) T / 20 (50, 150, ..., 950 for T = 1000).
DEFAULT_LOSS_TIMESTEPS = None


def _device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


@torch.no_grad()
def denoising_loss(model: Callable, images: Tensor, alphas_cumprod: Tensor,
                   timesteps: Optional[Sequence[int]] = DEFAULT_LOSS_TIMESTEPS, seed: int = 0,
                   batch_size: int = 500) -> float:
    """Mean denoising loss ``E_{i, t} mean_j (eps_theta(x_t, t) - eps)_j^2`` at fixed ``(t, eps)``.

    Every image ``x_i`` is paired with every ``t`` in ``timesteps`` (default ten evenly spaced,
    ``(2i + 1) T / 20``); ``eps`` for pair ``(i, t)`` is drawn from
    ``Generator().manual_seed(seed)`` in image-major order, so two models (before/after unlearning) are probed with
    the very same noisy inputs. ``x_t = sqrt(abar_t) x_i + sqrt(1 - abar_t) eps``.
    """
    if images.dim() < 2 or images.shape[0] == 0:
        raise ValueError(f"images: expected a non-empty (N, C, H, W) tensor, got {tuple(images.shape)}")
    device = _device(model)
    abar = torch.as_tensor(alphas_cumprod, dtype=torch.float64).cpu()
    if timesteps is None:
        timesteps = [(2 * i + 1) * abar.shape[0] // 20 for i in range(10)]
    ts = torch.as_tensor(list(timesteps), dtype=torch.long)
    if ts.numel() == 0 or int(ts.min()) < 0 or int(ts.max()) >= abar.shape[0]:
        raise ValueError(f"timesteps: expected values in [0, {abar.shape[0]}), got {list(timesteps)}")
    x = images.detach().float().cpu().repeat_interleave(ts.numel(), dim=0)
    t = ts.repeat(images.shape[0])
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
    g = abar[t].sqrt().float().view(-1, *([1] * (x.dim() - 1)))
    s = (1 - abar[t]).sqrt().float().view(-1, *([1] * (x.dim() - 1)))
    x_t = g * x + s * eps
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    total = 0.0
    for i in range(0, x.shape[0], batch_size):
        pred = model_eps(model, x_t[i:i + batch_size].to(device), t[i:i + batch_size].to(device)).float().cpu()
        total += (pred - eps[i:i + batch_size]).double().square().mean(dim=tuple(range(1, x.dim()))).sum().item()
    if was_training and hasattr(model, "train"):
        model.train()
    return total / x.shape[0]


def membership_signal(model: Callable, retain: Tensor, forget: Tensor, alphas_cumprod: Tensor,
                      timesteps: Optional[Sequence[int]] = DEFAULT_LOSS_TIMESTEPS, seed: int = 0) -> Dict[str, float]:
    """``{"forget_loss", "retain_loss", "loss_ratio"}``: denoising losses of the two sets at fixed (t, eps).

    A model that memorised the forget set has ``forget_loss`` well below ``retain_loss`` (ratio < 1); after
    unlearning the forget set should look like data the model never saw (ratio >= 1).
    """
    f = denoising_loss(model, forget, alphas_cumprod, timesteps, seed=seed)
    r = denoising_loss(model, retain, alphas_cumprod, timesteps, seed=seed + 1)
    return {"forget_loss": f, "retain_loss": r, "loss_ratio": f / r if r > 0 else float("nan")}


def _normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """Elementwise KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2).square() * torch.exp(-logvar2))


def _std_normal_cdf(x: Tensor) -> Tensor:
    return 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


def _discretized_gaussian_log_likelihood(x: Tensor, mean: Tensor, log_scale: Tensor) -> Tensor:
    """log P(x) of 8-bit data in [-1, 1] (bins of width 2/255) under N(mean, e^(2 log_scale)); edge bins open."""
    centered = x - mean
    inv_std = torch.exp(-log_scale)
    cdf_plus = _std_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = _std_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = cdf_plus.clamp_min(1e-12).log()
    log_one_minus_cdf_min = (1.0 - cdf_min).clamp_min(1e-12).log()
    log_probs = torch.where(x < -0.999, log_cdf_plus,
                            torch.where(x > 0.999, log_one_minus_cdf_min, (cdf_plus - cdf_min).clamp_min(1e-12).log()))
    return log_probs


@torch.no_grad()
def bits_per_dim_vlb(model: Callable, image: Tensor, alphas_cumprod: Tensor, *, seed: int = 0,
                     noise_draws: int = 1, t_stride: int = 1, batch_size: int = 250) -> float:
    """Negative log-likelihood bound of one image in bits/dim: the DDPM **variational bound** (not the ODE).

    ``-log p(x_0) <= L_T + sum_{t=1}^{T-1} L_t + L_0`` (Ho et al. 2020, eq. 5; indices of the table here), with

    * ``L_T = KL(q(x_{T-1} | x_0) || N(0, I))``,
    * ``L_t = KL(q(x_{t-1} | x_t, x_0) || p_theta(x_{t-1} | x_t))``, both Gaussians with the posterior variance
      ``beta_t (1 - abar_{t-1}) / (1 - abar_t)`` (diffusers' ``fixed_small``), the model mean from
      ``x0_hat = (x_t - sqrt(1 - abar_t) eps_theta) / sqrt(abar_t)``,
    * ``L_0 = -log p_theta(x_0 | x_0^noisy)``: a discretized Gaussian over 256 bins (the image is rounded to 8 bits).

    Each ``L_t`` is estimated with ``noise_draws`` Monte-Carlo draws of ``x_t`` (seeded): an upper bound on the
    negative log-likelihood, tighter for better models. ``t_stride = s > 1`` evaluates every ``L_t`` for
    ``t < T / 20`` (where the terms are largest and change fastest) and every s-th one above, each counted for the
    s timesteps of its block (a stratified estimate of the sum, about s times cheaper). The paper reports likelihoods through the
    probability-flow ODE instead; the bound is cheaper (T forward passes, batched) and moves the same way.

    Args:
        image: ``(C, H, W)`` or ``(1, C, H, W)`` in [-1, 1]. Returns bits per dimension (nats / (D ln 2)).
    """
    x0 = image.detach().float().cpu()
    if x0.dim() == 4:
        if x0.shape[0] != 1:
            raise ValueError(f"image: expected one image (C, H, W) or (1, C, H, W), got {tuple(image.shape)}")
        x0 = x0[0]
    x0 = torch.round((x0.clamp(-1, 1) + 1) * 127.5) / 127.5 - 1  # the 8-bit grid
    device = _device(model)
    abar = torch.as_tensor(alphas_cumprod, dtype=torch.float64).cpu()
    T = abar.shape[0]
    abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
    betas = 1 - abar / abar_prev
    post_var = betas * (1 - abar_prev) / (1 - abar)
    post_logvar = torch.log(torch.cat([post_var[1:2], post_var[1:]]))  # clipped at t = 0 (improved-diffusion)
    coef_x0 = betas * abar_prev.sqrt() / (1 - abar)
    coef_xt = (1 - abar_prev) * (1 - betas).sqrt() / (1 - abar)
    D = x0.numel()
    if t_stride < 1:
        raise ValueError(f"t_stride: expected an integer >= 1, got {t_stride}")
    x0_64 = x0.double()

    prior = _normal_kl(abar[-1].sqrt() * x0_64, torch.log(1 - abar[-1]).expand_as(x0_64),
                       torch.zeros_like(x0_64), torch.zeros_like(x0_64)).sum().item()
    gen = torch.Generator().manual_seed(seed)
    terms = torch.zeros(T, dtype=torch.float64)
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    for _ in range(noise_draws):
        exact = max(1, T // 20) if t_stride > 1 else T
        grid = torch.cat([torch.arange(exact), torch.arange(exact, T, t_stride)])
        weight = torch.cat([torch.ones(exact, dtype=torch.float64),
                            (T - torch.arange(exact, T, t_stride)).clamp(max=t_stride).double()])
        for start in range(0, grid.numel(), batch_size):
            t, w = grid[start:start + batch_size], weight[start:start + batch_size]
            b = t.numel()
            eps = torch.randn((b, *x0.shape), generator=gen, dtype=torch.float64)
            shape = (b,) + (1,) * x0.dim()
            x_t = abar[t].sqrt().view(shape) * x0_64 + (1 - abar[t]).sqrt().view(shape) * eps
            pred = model_eps(model, x_t.float().to(device), t.to(device)).double().cpu()
            x0_hat = (x_t - (1 - abar[t]).sqrt().view(shape) * pred) / abar[t].sqrt().view(shape)
            mean_p = coef_x0[t].view(shape) * x0_hat + coef_xt[t].view(shape) * x_t
            mean_q = coef_x0[t].view(shape) * x0_64 + coef_xt[t].view(shape) * x_t
            logvar = post_logvar[t].view(shape).expand_as(x_t)
            kl = _normal_kl(mean_q, logvar, mean_p, logvar).flatten(1).sum(1)
            if start == 0:  # t = 0: the decoder term replaces the KL
                nll0 = -_discretized_gaussian_log_likelihood(x0_64, mean_p[0], 0.5 * logvar[0]).sum()
                kl[0] = nll0
            terms[t] += kl * w
    if was_training and hasattr(model, "train"):
        model.train()
    total = prior + (terms / noise_draws).sum().item()
    return total / (D * math.log(2.0))
