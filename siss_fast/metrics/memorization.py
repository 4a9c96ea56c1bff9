"""Text-to-image memorization signals: similarity to the memorized image, and the noise-norm signal.

Noise-norm signal (Wen, Liu, Chen, Lyu, "Detecting, Explaining, and Mitigating Memorization in Diffusion Models",
ICLR 2024): for a prompt embedding ``c`` and the empty prompt's ``c_0``, along the sampling trajectory
``x_T, ..., x_1``::

    d(c) = (1 / S) sum_{s=1}^{S} || eps_theta(x_{t_s}, c) - eps_theta(x_{t_s}, c_0) ||_2

Memorized prompts have a much larger ``d`` than ordinary ones (the text steers the prediction hard towards one
image). The trajectory is the classifier-free-guided DDIM trajectory of that prompt (guidance scale ``w``:
``eps = eps_0 + w (eps_c - eps_0)``), from seeded Gaussian latents.
"""

from __future__ import annotations

from typing import Callable, Tuple

import torch
from torch import Tensor

from .sampling import ddim_timesteps, model_eps

__all__ = ["noise_norm_signal", "image_similarity"]


@torch.no_grad()
def noise_norm_signal(unet: Callable, alphas_cumprod: Tensor, cond: Tensor, uncond: Tensor, shape, n: int = 4, *,
                      steps: int = 20, guidance_scale: float = 7.5, seed: int = 0) -> Tuple[Tensor, Tensor]:
    """``(d (n,), latents (n, *shape))``: the mean noise-norm along each trajectory, and its final latents.

    ``cond`` / ``uncond``: ``(1, L, E)`` text embeddings (broadcast to the batch); ``unet`` called as
    ``unet(x, t, encoder_hidden_states=...)``. Latents start from ``Generator().manual_seed(seed)``; the sampler
    is DDIM (eta = 0), no clipping (latent space).
    """
    device = cond.device
    abar = torch.as_tensor(alphas_cumprod, dtype=torch.float64).cpu()
    ts = ddim_timesteps(abar.shape[0], steps)
    x = torch.randn((n, *shape), generator=torch.Generator().manual_seed(seed)).to(device)
    c = cond.expand(n, *cond.shape[1:])
    c0 = uncond.expand(n, *uncond.shape[1:])
    norms = torch.zeros(n, dtype=torch.float64)
    for j, t in enumerate(ts):
        tt = torch.full((n,), t, device=device, dtype=torch.long)
        both = model_eps(unet, torch.cat([x, x]), torch.cat([tt, tt]),
                         encoder_hidden_states=torch.cat([c, c0])).float()
        e_c, e_0 = both[:n], both[n:]
        norms += (e_c - e_0).flatten(1).norm(dim=1).double().cpu()
        eps = e_0 + guidance_scale * (e_c - e_0)
        a_t = float(abar[t])
        a_prev = float(abar[ts[j + 1]]) if j + 1 < len(ts) else 1.0
        x0 = (x - (1 - a_t) ** 0.5 * eps) / a_t ** 0.5
        x = a_prev ** 0.5 * x0 + (1 - a_prev) ** 0.5 * eps
    return norms / len(ts), x


def image_similarity(images: Tensor, reference: Tensor) -> Tensor:
    """``(N,)`` Pearson correlation of each image with ``reference`` over all pixels (in [-1, 1]; 1 = same
    picture up to brightness and contrast). ``images`` ``(N, C, H, W)``, ``reference`` ``(C, H, W)`` or
    ``(1, C, H, W)``, same value range."""
    a = images.detach().reshape(images.shape[0], -1).double()
    r = reference.detach().reshape(1, -1).double()
    if a.shape[1] != r.shape[1]:
        raise ValueError(f"reference: expected {a.shape[1]} elements like each image, got {r.shape[1]}")
    a = a - a.mean(dim=1, keepdim=True)
    r = r - r.mean(dim=1, keepdim=True)
    return (a * r).sum(dim=1) / (a.norm(dim=1) * r.norm(dim=1)).clamp_min(1e-12)
