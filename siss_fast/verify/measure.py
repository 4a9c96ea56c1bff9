"""The audit's measurements on one model: fresh-seed forget rates, quality, and the membership signal.

Images here are ``(N, C, H, W)`` fp32: "pixels" in ``[0, 1]`` (metrics), model space ``x = 2 p - 1`` for the UNet.

* :func:`draw_samples` -- ``N`` DDIM samples from the one sampler (:func:`siss_fast.metrics.sampling.ddim_sample`
  through the engine's :func:`~siss_fast.engine.validation.sample_images`), pixels;
* :func:`item_counts` -- per forget item ``k`` the number of samples that are item ``k``
  (:func:`siss_fast.metrics.forget_signal.nearest_item`: nearer item ``k`` than every retain image and every other
  item, within the item's radius ``rho_k`` = its RMS distance to its nearest retain image), and
  :func:`rate_rows` -- ``x_k / N`` with its Clopper-Pearson 95 % interval;
* :func:`per_image_loss` -- each image's denoising loss at fixed ``(t, eps)``::

      loss_i = (1 / |T|) sum_{t in T} mean_d (eps_theta(sqrt(abar_t) x_i + sqrt(1 - abar_t) eps_t, t) - eps_t)_d^2

  (fp64 accumulation) with ``T`` = ten timesteps ``(2j + 1) T / 20`` and one noise ``eps_t`` per timestep, shared
  by every image and by both models (from ``Generator().manual_seed(seed)``), so losses differ only by image and
  weights; a memorised image has a low loss (a low percentile among the retain images' losses);
* :func:`quality` -- ``retain_fit`` (:class:`siss_fast.metrics.retain_fit.RetainFit`, the run's guard, on fresh
  noise) and ``feature_fd`` (Fréchet distance to the retain set in the frozen base UNet's features) of samples.
"""

from __future__ import annotations

from typing import Any, Dict, List, Sequence

import torch
from torch import Tensor

from ..metrics.forget_signal import nearest_item
from ..metrics.sampling import model_eps
from .stats import clopper_pearson, percentile_of

__all__ = ["draw_samples", "item_counts", "rate_rows", "per_image_loss", "membership_rows", "Quality"]


def draw_samples(model: Any, unet: Any, n: int, *, steps: int, seed: int, batch_size: int,
                 device: torch.device) -> Tensor:
    """``(n, C, H, W)`` fp32 pixels in ``[0, 1]`` (CPU); chunk ``i`` from ``Generator(seed * 100003 + i)``."""
    from ..engine.validation import sample_images

    return sample_images(model, unet, num_samples=n, steps=steps, seed=seed, batch_size=batch_size, device=device,
                         autocast_dtype=None)


def item_counts(samples: Tensor, forget: Tensor, retain: Tensor, radii: Tensor) -> List[int]:
    """``[x_k]``: how many of ``samples`` are forget item ``k`` (pixels; ``radii`` ``(K,)``)."""
    hits = nearest_item(samples, forget, retain, radii)
    return [int(c) for c in torch.bincount(hits + 1, minlength=forget.shape[0] + 1)[1:]]


def rate_rows(counts: Sequence[int], n: int, alpha: float = 0.05) -> List[Dict[str, Any]]:
    """``[{"count", "n", "rate", "ci_low", "ci_high"}]`` per item (Clopper-Pearson ``1 - alpha`` interval)."""
    rows = []
    for x in counts:
        lo, hi = clopper_pearson(int(x), n, alpha)
        rows.append({"count": int(x), "n": n, "rate": x / n, "ci_low": lo, "ci_high": hi})
    return rows


@torch.no_grad()
def per_image_loss(unet: Any, pixels: Tensor, alphas_cumprod: Tensor, *, seed: int, batch_size: int = 128,
                   device: torch.device = torch.device("cpu")) -> Tensor:
    """``(N,)`` fp64: each image's denoising loss at fixed ``(t, eps)`` (module doc); ``pixels`` in ``[0, 1]``."""
    abar = torch.as_tensor(alphas_cumprod, dtype=torch.float64).cpu()
    n_t = abar.shape[0]
    ts = [(2 * j + 1) * n_t // 20 for j in range(10)]
    shape = tuple(pixels.shape[1:])
    eps = torch.randn((len(ts), *shape), generator=torch.Generator().manual_seed(seed))
    x = pixels.float() * 2 - 1
    was_training = bool(getattr(unet, "training", False))
    unet.eval()
    total = torch.zeros(x.shape[0], dtype=torch.float64)
    try:
        for j, t in enumerate(ts):
            g, s = float(abar[t].sqrt()), float((1 - abar[t]).sqrt())
            for i in range(0, x.shape[0], batch_size):
                xb = x[i:i + batch_size]
                x_t = (g * xb + s * eps[j]).to(device)
                tt = torch.full((xb.shape[0],), t, dtype=torch.long, device=device)
                err = model_eps(unet, x_t, tt).float().cpu() - eps[j]
                total[i:i + batch_size] += err.double().square().flatten(1).mean(1)
    finally:
        unet.train(was_training)
    return total / len(ts)


def membership_rows(forget_loss: Dict[str, Tensor], retain_loss: Dict[str, Tensor]) -> List[Dict[str, Any]]:
    """Per forget item: its loss under each model (``{"base": (K,), "final": (K,)}``) and its percentile among the
    retain images' losses under the same model (``{"base": (M,), "final": (M,)}``). Percentile 50 reads "as typical
    as a training image", near 0 "lower loss than almost every image the model keeps" (memorised)."""
    rows = []
    for k in range(forget_loss["base"].shape[0]):
        row: Dict[str, Any] = {}
        for name in ("base", "final"):
            value = float(forget_loss[name][k])
            row[f"loss_{name}"] = value
            row[f"percentile_{name}"] = percentile_of(value, retain_loss[name].tolist())
        rows.append(row)
    return rows


class Quality:
    """``retain_fit`` and ``feature_fd`` on fresh noise: ``fit(unet) -> float``, ``fd(samples) -> float``.

    ``retain``/``forget`` pixels; ``model`` the base :class:`~siss_fast.engine.models.LoadedModel` (its UNet gives
    the frozen features); ``fit_options`` the run's ``metric_options.retain_fit`` (images, t_fracs, batch_size)."""

    def __init__(self, model: Any, retain: Tensor, forget: Tensor, *, fit_seed: int, fd_seed: int,
                 fit_options: Dict[str, Any], device: torch.device):
        from ..metrics.registry import MetricContext, get_metric
        from ..metrics.retain_fit import FIT_DEFAULTS, RetainFit

        opts = {**FIT_DEFAULTS, **{k: v for k, v in fit_options.items() if k in FIT_DEFAULTS}, "seed": fit_seed}
        self.fit = RetainFit(retain, model.scheduler.alphas_cumprod, images=opts["images"],
                             t_fracs=opts["t_fracs"], seed=opts["seed"], batch_size=opts["batch_size"],
                             device=device)
        self.fit_images = min(int(opts["images"]), retain.shape[0])
        ctx = MetricContext(retain, forget, {"seed": fd_seed}, "ddpm", device, model, model.unet)
        self.fd = get_metric("feature_fd").factory(ctx)
