"""Membership and likelihood signals of a diffusion model: denoising loss at fixed (t, eps), and bits/dim.

Both take images in the **model's space** ([-1, 1] pixels, or a latent model's scaled latents: :func:`model_space`)
and a model called as ``model(x_t, t, **kw)`` returning the noise prediction (a tensor or a diffusers output), with
the scheduler's ``alphas_cumprod`` table (T,).

The fixed-``(t, eps)`` denoising loss has one implementation here, used by :func:`denoising_loss`, the retain-fit
guard (:mod:`.retain_fit`) and the audit's membership signal (:mod:`siss_fast.verify.measure`):

* :func:`noised` -- ``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps`` row by row (fp32);
* :func:`eps_errors` -- each row's ``mean_d (eps_theta(x_t, t, c) - eps)_d^2`` (fp64), batched, the model put in eval
  mode and restored;
* :func:`per_image_denoising_loss` -- both, over a set of images and timesteps: ``(N,)`` fp64.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, Optional, Sequence

import torch
from torch import Tensor

from .sampling import model_eps

__all__ = ["denoising_loss", "per_image_denoising_loss", "noised", "eps_errors", "model_space", "loss_timesteps",
           "membership_signal", "bits_per_dim_vlb", "DEFAULT_LOSS_TIMESTEPS"]

# Default probe: ten evenly spaced timesteps, t_i = (2i + 1) T / 20 (50, 150, ..., 950 for T = 1000).
DEFAULT_LOSS_TIMESTEPS = None


def _device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


def _dtype(model) -> Optional[torch.dtype]:
    try:
        return next(model.parameters()).dtype
    except (AttributeError, StopIteration):
        return None


def loss_timesteps(num_train_timesteps: int, timesteps: Optional[Sequence[int]] = None) -> Tensor:
    """``(S,)`` int64: ``timesteps`` checked to lie in ``[0, T)``, default ten evenly spaced ``(2i + 1) T / 20``."""
    if timesteps is None:
        timesteps = [(2 * i + 1) * num_train_timesteps // 20 for i in range(10)]
    ts = torch.as_tensor(list(timesteps), dtype=torch.long)
    if ts.numel() == 0 or int(ts.min()) < 0 or int(ts.max()) >= num_train_timesteps:
        raise ValueError(f"timesteps: expected values in [0, {num_train_timesteps}), got {list(timesteps)}")
    return ts


@torch.no_grad()
def model_space(pixels: Tensor, vae: Any = None, *, batch_size: int = 128, device: Any = "cpu") -> Tensor:
    """Images ``(N, C, H, W)`` fp32 in ``[0, 1]`` -> the model's input space, fp32 on the CPU: ``2 p - 1`` (pixel
    models), or for a latent model the VAE encoder's posterior mean of ``2 p - 1`` times ``scaling_factor``
    (``(N, C_lat, h, w)``; the VAE runs on ``device`` in its own dtype, ``batch_size`` images at a time)."""
    z = pixels.float() * 2 - 1
    if vae is None:
        return z
    vdtype = next(vae.parameters()).dtype
    return torch.cat([vae.encode(z[i:i + batch_size].to(device, vdtype)).latent_dist.mean.float().cpu()
                      for i in range(0, z.shape[0], batch_size)]) * vae.config.scaling_factor


def noised(x0: Tensor, t: Tensor, eps: Tensor, alphas_cumprod: Tensor, *,
           precision: torch.dtype = torch.float32) -> Tensor:
    """``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps`` as fp32: ``x0``, ``eps`` ``(R, ...)`` fp32 (``x0`` may
    broadcast), ``t`` ``(R,)`` int64. The coefficients come from the fp64 ``alphas_cumprod``; ``precision`` fp32
    (default: the coefficients rounded to fp32, fp32 arithmetic) or fp64 (the sum in fp64, rounded once: the
    retain-fit guard's inputs, kept as they were when it was introduced)."""
    abar = torch.as_tensor(alphas_cumprod, dtype=torch.float64).cpu()
    shape = (-1,) + (1,) * (eps.dim() - 1)
    g = abar[t].sqrt().to(precision).view(shape)
    s = (1 - abar[t]).sqrt().to(precision).view(shape)
    return (g * x0.to(precision) + s * eps.to(precision)).float()


@torch.no_grad()
def eps_errors(model: Callable, x_t: Tensor, t: Tensor, eps: Tensor, *, cond: Optional[Tensor] = None,
               batch_size: int = 128, device: Any = None) -> Tensor:
    """``(R,)`` fp64: ``mean_d (eps_theta(x_t[r], t[r]) - eps[r])_d^2`` for each row ``r``.

    ``x_t``, ``eps`` ``(R, ...)`` fp32 (CPU), ``t`` ``(R,)`` int64; ``cond`` (text-conditioned models) ``(1, L, D)``
    for every row or ``(R, L, D)`` one per row, passed as ``encoder_hidden_states``. Rows go to ``device`` (default
    the model's) in the model's parameter dtype, ``batch_size`` at a time; the prediction is compared in fp32 on the
    CPU and squared in fp64. The model is put in eval mode and its mode restored."""
    device = device if device is not None else _device(model)
    dtype = _dtype(model)
    was_training = bool(getattr(model, "training", False))
    if hasattr(model, "eval"):
        model.eval()
    out = torch.empty(x_t.shape[0], dtype=torch.float64)
    try:
        for i in range(0, x_t.shape[0], batch_size):
            x = x_t[i:i + batch_size].to(device) if dtype is None else x_t[i:i + batch_size].to(device, dtype)
            kwargs = {}
            if cond is not None:
                c = cond[i:i + batch_size] if cond.shape[0] > 1 else cond.expand(x.shape[0], -1, -1)
                kwargs["encoder_hidden_states"] = c.to(device)
            err = model_eps(model, x, t[i:i + batch_size].to(device), **kwargs).float().cpu() - eps[i:i + batch_size]
            out[i:i + x.shape[0]] = err.double().square().flatten(1).mean(1)
    finally:
        if hasattr(model, "train"):
            model.train(was_training)
    return out


@torch.no_grad()
def per_image_denoising_loss(model: Callable, images: Tensor, alphas_cumprod: Tensor,
                             timesteps: Optional[Sequence[int]] = DEFAULT_LOSS_TIMESTEPS, *, seed: int = 0,
                             shared_noise: bool = False, cond: Optional[Tensor] = None, batch_size: int = 128,
                             device: Any = None) -> Tensor:
    """``(N,)`` fp64: each image's denoising loss at fixed ``(t, eps)``, averaged over the timesteps::

        loss_i = (1 / S) sum_{t in timesteps} mean_d (eps_theta(sqrt(abar_t) x_i + sqrt(1 - abar_t) eps_it, t, c_i)
                                                      - eps_it)_d^2

    * ``images`` ``(N, C, H, W)`` in the model's space (:func:`model_space`); ``timesteps`` default ten evenly
      spaced ``(2j + 1) T / 20`` (:func:`loss_timesteps`);
    * noise from ``Generator().manual_seed(seed)``: one ``eps_it`` per pair, drawn as ``(N * S, C, H, W)`` in
      image-major order (``shared_noise`` False), or one ``eps_t`` per timestep shared by every image
      (``shared_noise`` True: ``(S, C, H, W)``; the losses of two images then differ by the image alone);
    * ``cond`` (text-conditioned models): ``(1, L, D)`` for every image or ``(N, L, D)`` each image's prompt.

    Two models probed with the same seed see the very same noisy inputs. The per-timestep errors are accumulated
    in fp64, timestep by timestep."""
    if images.dim() < 2 or images.shape[0] == 0:
        raise ValueError(f"images: expected a non-empty (N, C, H, W) tensor, got {tuple(images.shape)}")
    ts = loss_timesteps(torch.as_tensor(alphas_cumprod).shape[0], timesteps)
    n, s = images.shape[0], ts.numel()
    x = images.detach().float().cpu()
    gen = torch.Generator().manual_seed(seed)
    total = torch.zeros(n, dtype=torch.float64)
    if shared_noise:  # timestep by timestep, the images in batches
        eps = torch.randn((s, *x.shape[1:]), generator=gen)
        for j in range(s):
            t, e = ts[j].repeat(n), eps[j].expand_as(x)
            total += eps_errors(model, noised(x, t, e, alphas_cumprod), t, e, cond=cond, batch_size=batch_size,
                                device=device)
        return total / s
    # one noise per pair: the N * S pairs in image-major order, in batches
    eps = torch.randn((n * s, *x.shape[1:]), generator=gen)
    t = ts.repeat(n)
    rows_cond = cond if cond is None or cond.shape[0] == 1 else cond.repeat_interleave(s, dim=0)
    err = eps_errors(model, noised(x.repeat_interleave(s, dim=0), t, eps, alphas_cumprod), t, eps, cond=rows_cond,
                     batch_size=batch_size, device=device).view(n, s)
    for j in range(s):
        total += err[:, j]
    return total / s


@torch.no_grad()
def denoising_loss(model: Callable, images: Tensor, alphas_cumprod: Tensor,
                   timesteps: Optional[Sequence[int]] = DEFAULT_LOSS_TIMESTEPS, seed: int = 0,
                   batch_size: int = 500) -> float:
    """Mean denoising loss ``E_{i, t} mean_j (eps_theta(x_t, t) - eps)_j^2`` at fixed ``(t, eps)``: the mean of
    :func:`per_image_denoising_loss` (one ``eps`` per pair ``(i, t)``, image-major from
    ``Generator().manual_seed(seed)``), so two models (before/after unlearning) are probed with the very same noisy
    inputs. ``x_t = sqrt(abar_t) x_i + sqrt(1 - abar_t) eps``.
    """
    return float(per_image_denoising_loss(model, images, alphas_cumprod, timesteps, seed=seed,
                                          batch_size=batch_size).mean())


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
