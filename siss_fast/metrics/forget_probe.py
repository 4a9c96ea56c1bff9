"""The targeted probe: does the model bring a forget item back from an intermediate noise level? (issue 12)

A memorised item generated unconditionally 1 % of the time needs hundreds of samples per check to be seen at all.
Started instead from the item itself, noised to an intermediate timestep, a model that memorised it denoises back to
it almost every time, and a model that forgot it almost never: on the demo (pixel DDPM, the planted T-shirt), at
``t = T/2`` with 10 DDIM steps the base model brought the T-shirt back in 55 of 64 probes (86 %), the unlearned one
in 0 of 64, and an image the model never saw (a ring glyph) in 0 of 64 under both -- the probe reads memorisation,
not how much of the item survives the noise.

For each forget item ``a_k`` (model space ``x_k = 2 a_k - 1``) and ``P`` fixed noises ``eps_p`` (seeded, the same at
every check)::

    x_t = sqrt(abar_t) x_k + sqrt(1 - abar_t) eps_p,      t = round(t_frac_k (T - 1))
    y_p = DDIM(x_t -> 0, ``steps`` steps)                 (:func:`~.sampling.ddim_sample`, the one sampler)
    rate_k = #{p : y_p is item k} / P                      (:func:`~.forget_signal.nearest_item`: nearest neighbour
                                                            among retain images and forget items, within its radius)

``t_frac: auto`` (the default) chooses ``t_frac_k`` per item once, on the base model (:func:`calibrate_levels`): the
highest level of :data:`AUTO_GRID` from which the base model brings the item back in at least ``auto_level`` (0.5)
of the probes. Measured base-model returns at t_frac 0.9 / 0.8 / 0.7 / 0.6 / 0.5 (32 probes): the demo's T-shirt
0.09 / 0.13 / 0.22 / 0.50 / 0.84 (auto: 0.6), checker3's checkerboard 0.06 / 0.09 / 0.16 / 0.34 / 0.94 (auto: 0.5);
the demo's model, which never saw a checkerboard, returns it from no level (0 of 32 down to 0.3). Unlearning removes
the item's basin from high noise levels first: on the demo at lr 1e-4 the unconditional T-shirt rate fell from 4 % to
0.5 % in 60 steps while the probe at 0.6 went 0.50 -> 0.34 and collapsed to 0 only at step 150-160, so the probe is
the conservative reading (``benchmarks/results/planted-trajectories.json``).

``forget_probe`` (lower is better) returns the mean of ``rate_k``; its ``per_item`` gives every ``rate_k`` (each item
must meet its own target). Cost per check: ``K x P x steps`` UNet sample-forwards (defaults: 32 x 10 = 320 per item),
plus at most ``len(AUTO_GRID) x 320`` per item once for ``auto``. It needs the UNet being trained, so its score
function has ``uses_unet = True`` and is called ``score(samples, unet=unet)``. Pixel models only: a latent model's
probe needs the forget prompt and a VAE round trip (not built yet); it raises ``ValueError`` there.

Options (``validation.metric_options.forget_probe``): ``t_frac`` (``auto`` or a number in (0, 1]), ``auto_level``
(0.5), ``probes`` (32), ``steps`` (10), ``seed`` (0), and ``radius`` / ``radius_scale`` as in ``forget_nn``.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Union

import torch
from torch import Tensor

from .forget_signal import item_radii, nearest_item
from .registry import MetricContext, check_int, merge_options, register_metric
from .sampling import ddim_sample

__all__ = ["probe_return_rates", "calibrate_levels", "probe_seeds", "PROBE_DEFAULTS", "AUTO_GRID", "PROBE_SEED_STRIDE"]

PROBE_DEFAULTS: Dict[str, Any] = {"t_frac": "auto", "auto_level": 0.5, "probes": 32, "steps": 10, "seed": 0,
                                  "radius": "auto", "radius_scale": 1.0}
AUTO_GRID = (0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3)  # t_frac candidates of ``t_frac: auto``, scanned from the top
PROBE_SEED_STRIDE = 1009  # item k of seed s draws its probes' noise from Generator(s * 1009 + k)


def probe_seeds(options: Dict[str, Any], n_forget: int) -> List[int]:
    """The generator seeds of the probe (its ``generator_seeds`` declaration): ``seed * 1009 + k`` per item ``k``."""
    seed = int((options or {}).get("seed", PROBE_DEFAULTS["seed"]))
    return [seed * PROBE_SEED_STRIDE + k for k in range(n_forget)]


def _options(opts: Dict[str, Any]) -> Dict[str, Any]:
    key = "validation.metric_options.forget_probe"
    out = merge_options("forget_probe", opts, PROBE_DEFAULTS)
    t = out["t_frac"]
    if t != "auto" and (isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t <= 1):
        raise ValueError(f"{key}.t_frac: expected 'auto' or a number in (0, 1], got {t!r}")
    level = out["auto_level"]
    if isinstance(level, bool) or not isinstance(level, (int, float)) or not 0 < level <= 1:
        raise ValueError(f"{key}.auto_level: expected a number in (0, 1], got {level!r}")
    for name in ("probes", "steps"):
        check_int("forget_probe", name, out[name], 1)
    if isinstance(out["seed"], bool) or not isinstance(out["seed"], int):
        raise ValueError(f"{key}.seed: expected an integer, got {out['seed']!r}")
    return out


def probe_return_rates(unet: Any, alphas_cumprod: Tensor, forget: Tensor, retain: Tensor, radii: Tensor, *,
                       t_frac: Union[float, Sequence[float]] = 0.5, probes: int = 32, steps: int = 10, seed: int = 0,
                       clip: bool = True, device: Any = None, batch_size: int = 256,
                       items: Optional[Sequence[int]] = None) -> List[float]:
    """``[rate_k for k in items]``: the share of ``probes`` noisy starts of each forget item that come back as it.

    ``forget`` ``(K, C, H, W)`` and ``retain`` ``(M, C, H, W)`` in ``[0, 1]``; ``radii`` ``(K,)`` (see
    :func:`~.forget_signal.item_radii`); ``alphas_cumprod`` ``(T,)``; ``t_frac`` one level for every item or one
    per item (``(K,)``); ``items`` default all ``K``."""
    abar = torch.as_tensor(alphas_cumprod, dtype=torch.float64).cpu()
    items = range(forget.shape[0]) if items is None else items
    levels = [t_frac] * forget.shape[0] if isinstance(t_frac, (int, float)) else list(t_frac)
    rates = []
    for k in items:
        t = int(round(levels[k] * (abar.shape[0] - 1)))
        a = float(abar[t])
        x_k = (2 * forget[k:k + 1] - 1).float()
        gen = torch.Generator().manual_seed(seed * PROBE_SEED_STRIDE + k)
        eps = torch.randn((probes, *x_k.shape[1:]), generator=gen)
        x_t = a ** 0.5 * x_k + (1 - a) ** 0.5 * eps
        out = ddim_sample(unet, abar, probes, tuple(x_k.shape[1:]), steps=steps, batch_size=batch_size, device=device,
                          clip=clip, t_start=t, x_start=x_t)
        hits = nearest_item(((out + 1) / 2).clamp(0, 1), forget, retain, radii)
        rates.append(float((hits == k).double().mean()))
    return rates


def calibrate_levels(unet: Any, alphas_cumprod: Tensor, forget: Tensor, retain: Tensor, radii: Tensor, *,
                     level: float = 0.5, grid: Sequence[float] = AUTO_GRID, **probe_kwargs) -> List[Dict[str, Any]]:
    """``t_frac: auto``: per item, the highest noise level of ``grid`` from which the **base** model ``unet`` brings
    the item back in at least ``level`` of the probes (fallback: the level with the highest return).

    Deep levels (t = T/2) are reconstructed from what survives the noise -- a simple high-contrast item (a
    checkerboard) comes back from there under any model that denoises well, and reads as "not forgotten" long after
    the model stopped generating it -- while near T the probe is almost unconditional generation and as rare. The
    highest level with a majority return is where the base model's memory, not the noisy input, does the work.
    Returns ``[{"t_frac", "base_rate", "scanned": {t_frac: rate}}]`` per item; cost ``len(grid) x probes x steps``
    sample-forwards per item at most, once."""
    out = []
    for k in range(forget.shape[0]):
        scanned: Dict[float, float] = {}
        for t_frac in grid:
            scanned[t_frac] = probe_return_rates(unet, alphas_cumprod, forget, retain, radii, t_frac=t_frac,
                                                 items=[k], **probe_kwargs)[0]
            if scanned[t_frac] >= level:
                break
        best = next((t for t, r in scanned.items() if r >= level), max(scanned, key=scanned.get))
        out.append({"t_frac": best, "base_rate": scanned[best], "scanned": scanned})
    return out


@register_metric("forget_probe", higher_is_better=False, check_options=lambda opts: _options(opts) and None,
                 generator_seeds=probe_seeds)
def _forget_probe(ctx: MetricContext):
    """Mean return rate of the targeted probes (module doc); ``per_item`` gives each item's rate."""
    opts = _options(dict(ctx.options))
    if ctx.kind != "ddpm" or (ctx.model is not None and getattr(ctx.model, "vae", None) is not None):
        raise ValueError("validation.metrics: forget_probe supports pixel DDPMs only (a latent model's probe needs "
                         "the forget prompt and a VAE round trip); use forget_nn or forget_distance")
    forget, retain = ctx.forget_images, ctx.retain_images
    radii = item_radii(forget, retain, opts["radius"], float(opts["radius_scale"]))
    scheduler = None if ctx.model is None else ctx.model.scheduler
    clip = True if scheduler is None else bool(scheduler.config.get("clip_sample", True))

    kwargs = {"probes": opts["probes"], "steps": opts["steps"], "seed": opts["seed"], "clip": clip,
              "device": ctx.device}
    levels: Union[float, List[float]] = opts["t_frac"]
    calibration = None
    if levels == "auto":
        if scheduler is None or ctx.unet is None:
            raise ValueError("forget_probe: t_frac 'auto' needs the run's model and base UNet (MetricContext.model, "
                             ".unet; the engine sets them)")
        calibration = calibrate_levels(ctx.unet, scheduler.alphas_cumprod, forget, retain, radii,
                                       level=float(opts["auto_level"]), **kwargs)
        levels = [c["t_frac"] for c in calibration]

    def per_item(samples: Tensor, unet: Any = None) -> List[float]:
        if unet is None:
            raise ValueError("forget_probe needs the UNet: call score(samples, unet=unet)")
        if scheduler is None:
            raise ValueError("forget_probe needs the run's model (MetricContext.model) for its noise schedule")
        return probe_return_rates(unet, scheduler.alphas_cumprod, forget, retain, radii, t_frac=levels, **kwargs)

    def score(samples: Tensor, unet: Any = None) -> float:
        rates = per_item(samples, unet)
        return sum(rates) / len(rates)

    score.per_item = per_item
    score.aggregate = lambda rates: sum(rates) / len(rates)
    score.uses_unet = True
    score.calibration = calibration  # t_frac auto: the level chosen per item and the base model's return there
    return score
