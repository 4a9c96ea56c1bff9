"""The audit's measurements on one model: fresh-seed forget rates, quality, and the membership signal.

Images here are ``(N, C, H, W)`` fp32: "pixels" in ``[0, 1]`` (metrics), model space ``x = 2 p - 1`` for the UNet.

* :func:`draw_samples` -- ``N`` DDIM samples from the one sampler (:func:`siss_fast.metrics.sampling.ddim_sample`
  through the engine's :func:`~siss_fast.engine.validation.sample_images`), pixels;
* :func:`item_counts` -- per forget item ``k`` the number of samples that are item ``k``
  (:func:`siss_fast.metrics.forget_signal.nearest_item`: nearer item ``k`` than every retain image and every other
  item, within the item's radius ``rho_k`` = its RMS distance to its nearest retain image), and
  :func:`rate_rows` -- ``x_k / N`` with its Clopper-Pearson 95 % interval;
* :func:`per_image_loss` -- each image's denoising loss at fixed ``(t, eps)``
  (:func:`siss_fast.metrics.likelihood.per_image_denoising_loss`, the one implementation)::

      loss_i = (1 / |T|) sum_{t in T} mean_d (eps_theta(sqrt(abar_t) x_i + sqrt(1 - abar_t) eps_t, t, c_i) - eps_t)_d^2

  (fp64 accumulation) with ``T`` = ten timesteps ``(2j + 1) T / 20`` and one noise ``eps_t`` per timestep, shared
  by every image and by both models (from ``Generator().manual_seed(seed)``), so losses differ only by image and
  weights; ``x_i`` the image in the model's space (a latent model's VAE posterior mean times ``scaling_factor``),
  ``c_i`` its prompt's text states (text-conditioned models); a memorised image has a low loss (a low percentile
  among the retain images' losses);
* :func:`quality` -- ``retain_fit`` (:class:`siss_fast.metrics.retain_fit.RetainFit`, the run's guard, on fresh
  noise) and ``feature_fd`` (Fréchet distance to the retain set in the frozen base UNet's features) of samples.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import Tensor

from ..metrics.forget_signal import nearest_item
from ..metrics.likelihood import model_space, per_image_denoising_loss
from .stats import clopper_pearson, percentile_of

__all__ = ["draw_samples", "item_counts", "rate_rows", "per_image_loss", "membership_rows", "Quality", "PixelSubject"]


def draw_samples(model: Any, unet: Any, n: int, *, steps: int, seed: int, batch_size: int,
                 device: torch.device, cond: Optional[Tensor] = None, uncond: Optional[Tensor] = None,
                 guidance_scale: float = 1.0) -> Tensor:
    """``(n, C, H, W)`` fp32 pixels in ``[0, 1]`` (CPU); chunk ``i`` from ``Generator(seed * 100003 + i)``. ``cond`` /
    ``uncond`` ``(1, L, D)``: a text-conditioned model's prompt and the empty prompt (guided when ``guidance_scale``
    is not 1), as the engine's validation samples."""
    from ..engine.validation import sample_images

    return sample_images(model, unet, num_samples=n, steps=steps, seed=seed, batch_size=batch_size, device=device,
                         autocast_dtype=None, encoder_hidden_states=cond, uncond_hidden_states=uncond,
                         guidance_scale=guidance_scale)


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


def per_image_loss(unet: Any, images: Tensor, alphas_cumprod: Tensor, *, seed: int, batch_size: int = 128,
                   device: torch.device = torch.device("cpu"), vae: Any = None, cond: Optional[Tensor] = None,
                   ) -> Tensor:
    """``(N,)`` fp64: each image's denoising loss at fixed ``(t, eps)`` (module doc), ``images`` pixels in ``[0, 1]``;
    :func:`siss_fast.metrics.likelihood.per_image_denoising_loss` with one noise per timestep shared by every image,
    in the model's space (:func:`~siss_fast.metrics.likelihood.model_space`: latents through ``vae``), each image
    conditioned on its prompt (``cond`` ``(N, L, D)``) for a text-conditioned model."""
    z = model_space(images, vae, batch_size=batch_size, device=device)
    return per_image_denoising_loss(unet, z, alphas_cumprod, seed=seed, shared_noise=True, cond=cond,
                                    batch_size=batch_size, device=device)


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
    """``retain_fit`` and ``feature_fd`` on fresh noise: ``fit(unet) -> float``, ``fd(samples) -> float`` (None for
    a latent model: its samples are generations for the forget prompts, not draws of the retain distribution).

    ``retain``/``forget`` pixels; ``model`` the base :class:`~siss_fast.engine.models.LoadedModel` (its UNet gives
    the frozen features; a latent model's VAE encodes the retain images, as the registered ``retain_fit`` does);
    ``fit_options`` the run's ``metric_options.retain_fit`` (images, t_fracs, batch_size); ``cond`` ``(1, L, D)``
    the empty prompt's text states (latent models: the unconditional fit, as the registered metric)."""

    def __init__(self, model: Any, retain: Tensor, forget: Tensor, *, fit_seed: int, fd_seed: int,
                 fit_options: Dict[str, Any], device: torch.device, cond: Optional[Tensor] = None):
        from ..metrics.registry import MetricContext, get_metric
        from ..metrics.retain_fit import FIT_DEFAULTS, RetainFit

        opts = {**FIT_DEFAULTS, **{k: v for k, v in fit_options.items() if k in FIT_DEFAULTS}, "seed": fit_seed}
        vae = getattr(model, "vae", None)
        self.fit = RetainFit(retain, model.scheduler.alphas_cumprod, images=opts["images"],
                             t_fracs=opts["t_fracs"], seed=opts["seed"], batch_size=opts["batch_size"],
                             vae=vae, cond=cond, device=device)
        self.fit_images = min(int(opts["images"]), retain.shape[0])
        self.fd = None
        if vae is None:
            ctx = MetricContext(retain, forget, {"seed": fd_seed}, "ddpm", device, model, model.unet)
            self.fd = get_metric("feature_fd").factory(ctx)


class PixelSubject:
    """The audit's view of a pixel-DDPM run (the same interface as :class:`~.sd.SDSubject`): unconditional samples
    (``{"": samples}``), counted by the nearest-neighbour rule of ``forget_nn`` (:func:`item_counts`)."""

    kind = "ddpm"
    prompts = None

    def __init__(self, base: Any, retain: Tensor, forget: Tensor, *, steps: int, batch_size: int,
                 device: torch.device):
        from ..metrics.forget_signal import item_radii

        self.base, self.retain, self.forget, self.device = base, retain, forget, device
        self.steps, self.batch_size = steps, batch_size
        self.radii = item_radii(forget, retain)

    @staticmethod
    def describe() -> str:
        return ("nearest neighbour among the retain images and the forget items, within the item's radius "
                "(`forget_signal.nearest_item`, the rule of `forget_nn`)")

    def draw(self, unet: Any, n: int, seed: int) -> Dict[str, Tensor]:
        return {"": draw_samples(self.base, unet, n, steps=self.steps, seed=seed, batch_size=self.batch_size,
                                 device=self.device)}

    def counts(self, drawn: Dict[str, Tensor], n: Optional[int] = None) -> List[int]:
        return item_counts(drawn[""][:n], self.forget, self.retain, self.radii)

    @staticmethod
    def all_samples(drawn: Dict[str, Tensor]) -> Tensor:
        return drawn[""]

    def member_losses(self, unet: Any, seed: int):
        abar = self.base.scheduler.alphas_cumprod
        return (per_image_loss(unet, self.forget, abar, seed=seed, device=self.device),
                per_image_loss(unet, self.retain, abar, seed=seed, device=self.device))

    @staticmethod
    def relearn_args() -> Dict[str, Any]:
        return {}
