"""The retain-fit guard: how well the model still denoises the data it must keep, at fixed ``(t, eps)``.

A quality guard on generated samples has to tell a few percent of quality loss from sampling noise, and forgetting
itself moves every sample statistic: removing memorised copies changes the sample distribution however good the
rest stays (on the five-glyph experiment the Fréchet distance to the retain set *fell* by half while the digits
classifier's score fell by 15 %). The retain set's denoising error has neither problem: it is measured on fixed
inputs (no sampling noise, the same numbers for the same weights), on images that contain no forget item, and it
rises as soon as the score field the sampler follows is damaged.

For ``M`` retain images ``a_i`` (a fixed random subset, option ``images``) and the timesteps ``t_j`` (option
``t_fracs``: ``t_j = round(f_j (T - 1))``), the model-space inputs ``z_i`` (``2 a_i - 1``; latent models: the VAE
encoder's posterior mean times ``scaling_factor``) are noised once, when the metric is built::

    x_ij = sqrt(abar_tj) z_i + sqrt(1 - abar_tj) eps_ij,     eps_ij ~ N(0, I) from Generator().manual_seed(seed)
    retain_fit(unet) = mean_ij mean_d (eps_theta(x_ij, t_j) - eps_ij)_d^2          (fp64 accumulation)

computed by the one fixed-``(t, eps)`` implementation, :func:`~.likelihood.noised` and :func:`~.likelihood.eps_errors`
(the inputs through :func:`~.likelihood.model_space`).

Lower is better; the guard compares it with its step-0 value (the base model), so its tolerance is a relative
increase (:data:`FIT_TOLERANCE`). Latent models get the empty prompt's text embedding (the unconditional fit).

Cost per check: ``M x len(t_fracs)`` UNet forwards without sampling (defaults 256 x 1; the default pixel
validation's 96 samples of 10 DDIM steps are 960); memory: the ``(M x len(t_fracs), C, H, W)`` inputs and noise.
Like the targeted probe it reads the UNet being validated: ``score(samples, unet=unet)`` (``uses_unet``).

Options (``validation.metric_options.retain_fit``): ``images`` (256), ``t_fracs`` ([0.2]), ``seed`` (0),
``batch_size`` (128). Fidelity, the tolerance and why ``t_frac`` 0.2: ``benchmarks/results/guard-fidelity-fit.json``
and the README's "When to stop".
"""

from __future__ import annotations

from typing import Any, Dict, List

import torch
from torch import Tensor

from ..text_encoding import encode_prompts
from .likelihood import eps_errors, model_space, noised
from .registry import MetricContext, check_int, merge_options, register_metric

__all__ = ["FIT_DEFAULTS", "FIT_TOLERANCE", "RetainFit"]

FIT_DEFAULTS: Dict[str, Any] = {"images": 256, "t_fracs": [0.2], "seed": 0, "batch_size": 128}
FIT_TOLERANCE = 0.03  # relative increase over the base model's value at which the guard trips (README, results)


def _options(opts: Dict[str, Any]) -> Dict[str, Any]:
    out = merge_options("retain_fit", opts, FIT_DEFAULTS)
    for name, low in (("images", 1), ("batch_size", 1), ("seed", 0)):
        check_int("retain_fit", name, out[name], low)
    fracs = out["t_fracs"]
    if isinstance(fracs, (int, float)) and not isinstance(fracs, bool):
        fracs = [fracs]
    if (not isinstance(fracs, (list, tuple)) or not fracs
            or any(isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 <= f <= 1 for f in fracs)):
        raise ValueError(f"validation.metric_options.retain_fit.t_fracs: expected a non-empty list of numbers in [0, 1], got {out['t_fracs']!r}")
    out["t_fracs"] = [float(f) for f in fracs]
    return out


class RetainFit:
    """``fit(unet) -> float``: the mean squared noise-prediction error on fixed noisy retain inputs (module doc).

    ``retain`` ``(N, C, H, W)`` fp32 in ``[0, 1]``; ``alphas_cumprod`` ``(T,)``; ``vae`` / ``cond`` for latent
    models (``cond`` ``(1, L, D)``: the empty prompt's text states)."""

    def __init__(self, retain: Tensor, alphas_cumprod: Tensor, *, images: int, t_fracs: List[float], seed: int,
                 batch_size: int, vae: Any = None, cond: Any = None, device: Any = "cpu"):
        gen = torch.Generator().manual_seed(seed)
        pick = torch.randperm(retain.shape[0], generator=gen)[:images]
        z = model_space(retain[pick], vae, batch_size=batch_size, device=device)
        abar = torch.as_tensor(alphas_cumprod, dtype=torch.float64).cpu()
        ts = [int(round(f * (abar.shape[0] - 1))) for f in t_fracs]
        self.t = torch.tensor(ts, dtype=torch.long).repeat_interleave(z.shape[0])
        z = z.repeat(len(ts), *([1] * (z.dim() - 1)))
        self.eps = torch.randn(z.shape, generator=gen)
        self.x_t = noised(z, self.t, self.eps, abar, precision=torch.float64)
        self.timesteps, self.batch_size, self.cond, self.device = ts, batch_size, cond, device

    def __call__(self, unet: Any) -> float:
        err = eps_errors(unet, self.x_t, self.t, self.eps, cond=self.cond, batch_size=self.batch_size,
                         device=self.device)
        total = torch.zeros((), dtype=torch.float64)
        for i in range(0, err.shape[0], self.batch_size):  # batch sums, in order
            total += err[i:i + self.batch_size].sum()
        return float(total / self.x_t.shape[0])


@register_metric("retain_fit", higher_is_better=False, tolerance=FIT_TOLERANCE,
                 check_options=lambda opts: _options(opts) and None,
                 generator_seeds=lambda opts, n_forget: [int((opts or {}).get("seed", FIT_DEFAULTS["seed"]))])
def _retain_fit(ctx: MetricContext):
    """Denoising error of the validated UNet on fixed noisy retain inputs (module doc)."""
    opts = _options(dict(ctx.options))
    if ctx.model is None:
        raise ValueError("retain_fit: needs the run's model for its noise schedule (MetricContext.model; the engine "
                         "sets it)")
    vae, cond = getattr(ctx.model, "vae", None), None
    dtype = torch.float32 if ctx.unet is None else next(ctx.unet.parameters()).dtype
    if vae is not None:
        cond, _ = encode_prompts(ctx.model.tokenizer, ctx.model.text_encoder, [""], ctx.device, dtype)
    fit = RetainFit(ctx.retain_images, ctx.model.scheduler.alphas_cumprod, images=opts["images"],
                    t_fracs=opts["t_fracs"], seed=opts["seed"], batch_size=opts["batch_size"], vae=vae, cond=cond,
                    device=ctx.device)

    def score(samples: Tensor, unet: Any = None) -> float:
        if unet is None:
            raise ValueError("retain_fit needs the UNet: call score(samples, unet=unet)")
        return fit(unet)

    score.uses_unet = True
    score.fit = fit
    return score
