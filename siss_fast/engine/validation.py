"""Sample-based validation: fixed-seed DDIM samples and sample grids.

The denoising loss on retained data stays flat while sample quality collapses, so the engine judges the run by
*generated samples*: every ``validation.every`` steps it draws ``num_samples`` images with a short DDIM sampler from
fixed seeds (the same noise every time, so changes come from the weights) and scores them with the metrics of
:mod:`siss_fast.metrics.registry` (re-exported here: ``register_metric``, ``MetricContext``, ...; built-ins in
:mod:`siss_fast.metrics.distances`). The stop rules are :mod:`.stop_rules`.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import Tensor

from siss_fast.metrics.distances import forget_thresholds, rms_distances
from siss_fast.metrics.registry import (MetricContext, build_metrics, check_metric_name, get_metric, list_metrics,
                                        register_metric)

__all__ = ["MetricContext", "register_metric", "forget_thresholds", "get_metric", "list_metrics", "check_metric_name",
           "build_metrics", "rms_distances", "sample_images", "save_grid"]
_rms_distances = rms_distances  # the name benchmarks and tests of this release use


# ------------------------------------------------------------------------------------------------------ sampling


def sample_images(model: Any, unet: Any, *, num_samples: int, steps: int, seed: int, batch_size: int,
                  device: torch.device, autocast_dtype: Optional[torch.dtype], encoder_hidden_states: Optional[Tensor]
                  = None, uncond_hidden_states: Optional[Tensor] = None, guidance_scale: float = 1.0) -> Tensor:
    """``(N, C, H, W)`` fp32 images in ``[0, 1]`` (CPU) from the one sampler,
    :func:`siss_fast.metrics.sampling.ddim_sample` (fixed seeds; trailing DDIM spacing).

    Pixel models clip the x0 estimate when their scheduler does (``clip_sample``, diffusers' default True); latent
    models never do (a latent is not an image) and are decoded by the VAE. ``encoder_hidden_states`` ``(1, L, D)``:
    the prompt; with ``guidance_scale != 1`` classifier-free guidance against ``uncond_hidden_states``.
    """
    from siss_fast.metrics.sampling import ddim_sample

    cfg, sched = unet.config, model.scheduler.config
    size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
    vae = model.vae
    decode: Optional[Callable[[Tensor], Tensor]] = None
    if vae is not None:
        dtype = next(vae.parameters()).dtype
        decode = lambda z: vae.decode((z / vae.config.scaling_factor).to(dtype)).sample  # noqa: E731

    guided = encoder_hidden_states is not None and guidance_scale != 1.0
    x = ddim_sample(unet, model.scheduler.alphas_cumprod, num_samples, (cfg.in_channels, size, size), steps=steps,
                    seed=seed, batch_size=batch_size, device=device,
                    clip=vae is None and bool(sched.get("clip_sample", True)), cond=encoder_hidden_states,
                    uncond=uncond_hidden_states if guided else None, guidance_scale=guidance_scale,
                    prediction_type=sched.get("prediction_type", "epsilon"), decode=decode,
                    autocast_dtype=autocast_dtype)
    return ((x + 1) / 2).clamp(0, 1)


def save_grid(images: Tensor, path: Any) -> None:
    """Save ``(N, C, H, W)`` images in ``[0, 1]`` as one PNG grid (about square)."""
    import math

    from PIL import Image

    n, c, h, w = images.shape
    cols = max(1, int(math.ceil(math.sqrt(n))))
    rows = int(math.ceil(n / cols))
    grid = torch.ones((c, rows * (h + 1) + 1, cols * (w + 1) + 1))
    for i in range(n):
        r, q = divmod(i, cols)
        grid[:, 1 + r * (h + 1):1 + r * (h + 1) + h, 1 + q * (w + 1):1 + q * (w + 1) + w] = images[i]
    arr = (grid * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    Image.fromarray(arr[:, :, 0] if c == 1 else arr, mode="L" if c == 1 else "RGB").save(path)
