"""Text-to-image memorization signals: similarity to the memorized image, and the noise-norm signal.

Noise-norm signal (Wen, Liu, Chen, Lyu, "Detecting, Explaining, and Mitigating Memorization in Diffusion Models",
ICLR 2024): for a prompt embedding ``c`` and the empty prompt's ``c_0``, along the sampling trajectory
``x_T, ..., x_1``::

    d(c) = (1 / S) sum_{s=1}^{S} || eps_theta(x_{t_s}, c) - eps_theta(x_{t_s}, c_0) ||_2

Memorized prompts have a much larger ``d`` than ordinary ones (the text steers the prediction hard towards one
image). The trajectory is the classifier-free-guided DDIM trajectory of that prompt (guidance scale ``w``:
``eps = eps_0 + w (eps_c - eps_0)``) of the one sampler, :func:`siss_fast.metrics.sampling.ddim_sample`.
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
from torch import Tensor

from .sampling import ddim_sample

__all__ = ["noise_norm_signal", "image_similarity"]


@torch.no_grad()
def noise_norm_signal(unet: Callable, alphas_cumprod: Tensor, cond: Tensor, uncond: Tensor, shape, n: int = 4, *,
                      steps: int = 20, guidance_scale: float = 7.5, seed: int = 0, batch_size: int = 250,
                      decode: Optional[Callable[[Tensor], Tensor]] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """``(d (n,), first (n,), samples)``: each trajectory's mean noise-norm, its norm at the first step (on the
    initial noise at ``t = T - 1``: Wen et al.'s one-step detector) and its final samples (latents ``(n, *shape)``,
    or images when ``decode`` is given), all from :func:`siss_fast.metrics.sampling.ddim_sample` (guided, no
    clipping: latent space).

    ``cond`` / ``uncond``: ``(1, L, E)`` text embeddings; ``unet`` called as ``unet(x, t, encoder_hidden_states=...)``.
    """
    norms = torch.zeros(n, dtype=torch.float64)
    first = torch.zeros(n, dtype=torch.float64)

    def read(start: int, j: int, e_c: Tensor, e_u: Optional[Tensor]) -> None:
        d = (e_c - e_u).flatten(1).norm(dim=1).double().cpu()
        norms[start:start + d.shape[0]] += d
        if j == 0:
            first[start:start + d.shape[0]] = d

    samples = ddim_sample(unet, alphas_cumprod, n, shape, steps=steps, seed=seed, batch_size=batch_size,
                          device=cond.device, clip=False, cond=cond, uncond=uncond, guidance_scale=guidance_scale,
                          decode=decode, on_step=read)
    return norms / steps, first, samples


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
