"""The one sampler of siss_fast: DDIM (eta = 0) from seeded Gaussian noise, for every measurement.

The engine's validation (:func:`siss_fast.engine.validation.sample_images`), the demos' reports, the planted
experiments' judge and the noise-norm memorisation signal all draw samples here, so a number means the same thing
wherever it is printed. The same model and seed give the same samples: the initial noise of chunk ``i``
(``batch_size`` samples) comes from ``torch.Generator().manual_seed(seed * 100003 + i)`` on the CPU (identical on
every device, and the first ``m`` samples of a larger run equal an ``m``-sample run with the same seed and chunk
size); the sampler itself is deterministic.

DDIM update (Song et al. 2021, eta = 0), with ``abar`` the scheduler's ``alphas_cumprod`` and a decreasing timestep
sequence ``t_1 > ... > t_S`` evenly spaced over ``[0, T-1]`` including ``T-1`` ("trailing" spacing, better than
diffusers' default "leading" spacing for few steps)::

    eps   = eps_u + w (eps_c - eps_u)                          # classifier-free guidance (w = 1: eps_c alone)
    x0    = (x - sqrt(1 - abar_t) eps) / sqrt(abar_t)          # v-prediction: x0 = sqrt(abar_t) x - sqrt(1-abar_t) v
    x0    = clamp(x0, -1, 1) and eps re-derived from it        # pixel models only (``clip``), never for latents
    x     = sqrt(abar_prev) x0 + sqrt(1 - abar_prev) eps       # abar_prev = 1 after the last step

Latent models pass ``decode`` (latents -> images, e.g. the VAE); images are clamped to [-1, 1] after decoding, and
latents returned without ``decode`` (``clip`` off) are not clamped.
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
    cond: Optional[Tensor] = None,
    uncond: Optional[Tensor] = None,
    guidance_scale: float = 1.0,
    prediction_type: str = "epsilon",
    decode: Optional[Callable[[Tensor], Tensor]] = None,
    autocast_dtype: Optional[torch.dtype] = None,
    on_step: Optional[Callable[[int, int, Tensor, Optional[Tensor]], None]] = None,
    t_start: Optional[int] = None,
    x_start: Optional[Tensor] = None,
) -> Tensor:
    """``n`` samples, fp32 in [-1, 1] (model space), on the CPU: ``(n, *shape)``, or decoded images.

    * ``model(x, t, **kw)``: a UNet (diffusers outputs are unwrapped); ``shape`` is one sample's ``(C, H, W)``.
    * ``cond`` / ``uncond``: ``(1, L, E)`` text embeddings, passed as ``encoder_hidden_states`` (broadcast to the
      chunk). With ``uncond`` both branches run in one batch and ``eps = eps_u + guidance_scale (eps_c - eps_u)``.
    * ``on_step(start, j, eps_c, eps_u)``: called at sampling step ``j`` of the chunk whose first sample is ``start``
      (``eps_u`` None without ``uncond``) -- the noise-norm signal reads its norms there.
    * ``autocast_dtype``: the UNet runs under ``torch.autocast`` in that dtype; the update is fp32.
    * ``t_start`` / ``x_start``: start at timestep ``t_start`` (default ``T - 1``; the ``steps`` timesteps are then
      evenly spaced over ``[0, t_start]``) from the given ``(n, *shape)`` tensor instead of seeded noise -- a forget
      item noised to ``t_start`` for the targeted probe (:mod:`siss_fast.metrics.forget_probe`).
    """
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"prediction_type: expected 'epsilon' or 'v_prediction', got {prediction_type!r}")
    device = device or next(model.parameters()).device
    abar = torch.as_tensor(alphas_cumprod, dtype=torch.float64).cpu()
    ts = ddim_timesteps(abar.shape[0] if t_start is None else int(t_start) + 1, steps)
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    chunks = []
    try:
        for i, start in enumerate(range(0, n, batch_size)):
            b = min(batch_size, n - start)
            if x_start is None:
                gen = torch.Generator().manual_seed(seed * 100003 + i)
                x = torch.randn((b, *shape), generator=gen, dtype=torch.float32).to(device)
            else:
                x = x_start[start:start + b].to(device=device, dtype=torch.float32)
            kwargs = {}
            if cond is not None:
                c = cond.expand(b, *cond.shape[1:])
                kwargs["encoder_hidden_states"] = c if uncond is None else torch.cat([c, uncond.expand(b, *uncond.shape[1:])])
            for j, t in enumerate(ts):
                a_t = float(abar[t])
                a_prev = float(abar[ts[j + 1]]) if j + 1 < len(ts) else 1.0
                inp = x if uncond is None else torch.cat([x, x])
                tt = torch.full((inp.shape[0],), t, device=device, dtype=torch.long)
                with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
                    out = model_eps(model, inp, tt, **kwargs).float()
                e_c, e_u = (out, None) if uncond is None else out.chunk(2)
                if on_step is not None:
                    on_step(start, j, e_c, e_u)
                pred = e_c if e_u is None else e_u + guidance_scale * (e_c - e_u)
                if prediction_type == "v_prediction":
                    x0 = a_t ** 0.5 * x - (1 - a_t) ** 0.5 * pred
                    eps = (1 - a_t) ** 0.5 * x + a_t ** 0.5 * pred
                else:
                    eps = pred
                    x0 = (x - (1 - a_t) ** 0.5 * eps) / a_t ** 0.5
                if clip:
                    x0 = x0.clamp(-1.0, 1.0)
                    eps = (x - a_t ** 0.5 * x0) / (1 - a_t) ** 0.5
                x = a_prev ** 0.5 * x0 + (1 - a_prev) ** 0.5 * eps
            if decode is not None:
                x = decode(x).float()
            chunks.append((x.clamp(-1.0, 1.0) if (clip or decode is not None) else x).cpu())  # latents stay raw
    finally:
        if was_training and hasattr(model, "train"):
            model.train()
    return torch.cat(chunks) if chunks else torch.empty((0, *shape))
