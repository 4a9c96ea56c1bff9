"""A short deterministic sampler for evaluation: DDIM (eta = 0) from seeded Gaussian noise.

Metrics that look at generated images need the same images for the same model: the initial noise is drawn
from ``torch.Generator().manual_seed(seed)`` on the CPU (so it is identical on every device), in chunks whose
seeds depend only on the chunk index; the sampler itself is deterministic.

DDIM update (Song et al. 2021, eta = 0), with ``abar`` the scheduler's ``alphas_cumprod`` and a decreasing
timestep sequence ``t_1 > ... > t_S`` evenly spaced over ``[0, T-1]`` including ``T-1`` ("trailing" spacing,
which is better than diffusers' default "leading" spacing for few steps)::

    eps   = eps_theta(x, t)
    x0    = clamp((x - sqrt(1 - abar_t) eps) / sqrt(abar_t), -1, 1)
    eps   = (x - sqrt(abar_t) x0) / sqrt(1 - abar_t)          # consistent with the clamped x0
    x     = sqrt(abar_prev) x0 + sqrt(1 - abar_prev) eps       # abar_prev = 1 after the last step
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

__all__ = ["ddim_timesteps", "ddim_sample", "model_eps"]


def model_eps(model: Callable, x: Tensor, t: Tensor, **kwargs) -> Tensor:
    """``model(x, t, **kwargs)`` as a tensor (unwraps diffusers outputs and tuples)."""
    out = model(x, t, **kwargs)
    if hasattr(out, "sample"):
        out = out.sample
    elif isinstance(out, (tuple, list)):
        out = out[0]
    return out


def ddim_timesteps(num_train_timesteps: int, steps: int) -> list:
    """``steps`` decreasing integer timesteps, evenly spaced over ``[0, T-1]``, first ``T-1`` ("trailing")."""
    if not 1 <= steps <= num_train_timesteps:
        raise ValueError(f"steps: expected 1 <= steps <= T = {num_train_timesteps}, got {steps}")
    ratio = num_train_timesteps / steps
    return [int(round(num_train_timesteps - 1 - i * ratio)) for i in range(steps)]


@torch.no_grad()
def ddim_sample(
    model: Callable,
    alphas_cumprod: Tensor,
    n: int,
    shape: Sequence[int],
    *,
    steps: int = 25,
    seed: int = 0,
    batch_size: int = 250,
    device: Optional[torch.device] = None,
    clip: bool = True,
) -> Tensor:
    """``n`` samples ``(n, *shape)`` fp32 in [-1, 1] (model space) on the CPU.

    Chunk ``i`` (``batch_size`` samples) starts from noise of generator seed ``seed * 100003 + i``, so the first
    ``m`` samples of a larger run equal an ``m``-sample run with the same seed and batch size.
    """
    device = device or next(model.parameters()).device
    abar = torch.as_tensor(alphas_cumprod, dtype=torch.float64).cpu()
    ts = ddim_timesteps(abar.shape[0], steps)
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    chunks = []
    try:
        for i, start in enumerate(range(0, n, batch_size)):
            b = min(batch_size, n - start)
            gen = torch.Generator().manual_seed(seed * 100003 + i)
            x = torch.randn((b, *shape), generator=gen, dtype=torch.float32).to(device)
            for j, t in enumerate(ts):
                a_t = float(abar[t])
                a_prev = float(abar[ts[j + 1]]) if j + 1 < len(ts) else 1.0
                eps = model_eps(model, x, torch.full((b,), t, device=device, dtype=torch.long)).float()
                x0 = (x - (1 - a_t) ** 0.5 * eps) / a_t ** 0.5
                if clip:
                    x0 = x0.clamp(-1.0, 1.0)
                    eps = (x - a_t ** 0.5 * x0) / (1 - a_t) ** 0.5
                x = a_prev ** 0.5 * x0 + (1 - a_prev) ** 0.5 * eps
            chunks.append(x.clamp(-1.0, 1.0).cpu())
    finally:
        if was_training and hasattr(model, "train"):
            model.train()
    return torch.cat(chunks) if chunks else torch.empty((0, *shape))
