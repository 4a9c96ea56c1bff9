"""Sample-based validation: fixed-seed DDIM samples and sample grids.

The denoising loss on retained data stays flat while sample quality collapses, so the engine judges the run by
*generated samples*: every ``validation.every`` steps it draws ``num_samples`` images with a short DDIM sampler from
fixed seeds (the same noise every time, so changes come from the weights) and scores them with the metrics of
:mod:`siss_fast.metrics.registry` (re-exported here: ``register_metric``, ``MetricContext``, ...; built-ins in
:mod:`siss_fast.metrics.distances`). The stop rules are :mod:`.stop_rules`.

Stable Diffusion, several deletion requests in one run (:func:`prompt_groups`, :func:`sample_groups`,
:func:`score_groups`): each forget item is measured on generations for **its own prompt**. Validation generates
``num_samples`` images for every distinct forget prompt (the same seeds for each prompt, so the manifest's
``validation_seeds`` hold), and a metric with ``per_item`` reads item ``k`` on the generations of item ``k``'s
prompt: ``"name[k]"`` in the scores, each against its own target (:meth:`.stop_rules.StopRules.target_met`). Metrics
without ``per_item`` (the quality guard) and the overall reading see all generations together. ``validation.prompt``
set: one prompt for every item, as before. A check then costs ``P x num_samples x sampler_steps`` UNet forwards (x2
with classifier-free guidance) for ``P`` distinct forget prompts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from torch import Tensor

from siss_fast.metrics.distances import forget_thresholds, rms_distances
from siss_fast.metrics.registry import (MetricContext, build_metrics, check_metric_name, get_metric, list_metrics,
                                        register_metric)

__all__ = ["MetricContext", "register_metric", "forget_thresholds", "get_metric", "list_metrics", "check_metric_name",
           "build_metrics", "rms_distances", "sample_images", "save_grid", "PromptGroups", "prompt_groups",
           "sample_groups", "score_groups"]
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


# ------------------------------------------------------------------------------------- per-item prompts (SD)


@dataclass
class PromptGroups:
    """What validation generates for: ``prompts`` (``[None]``: unconditional, a pixel DDPM), the index into them of
    each forget item's prompt (``item_group``), and their embeddings (``conds`` ``(1, L, D)`` each, ``uncond`` the
    empty prompt's; ``None`` for pixel models)."""

    prompts: List[Optional[str]]
    item_group: List[int]
    conds: List[Optional[Tensor]] = field(default_factory=lambda: [None])
    uncond: Optional[Tensor] = None


def prompt_groups(model: Any, forget_prompts: Optional[Sequence[str]], n_forget: int, prompt: Optional[str],
                  device: torch.device, dtype: torch.dtype) -> PromptGroups:
    """The validation prompts of a run: a pixel DDPM generates unconditionally; Stable Diffusion generates for
    ``prompt`` (``validation.prompt``) when it is set, else for every distinct prompt of ``forget_prompts`` (one
    per forget item, the captions' order of first appearance), each item scored on its own prompt's generations."""
    if model.kind != "sd":
        return PromptGroups([None], [0] * n_forget)
    from . import data as engine_data

    if prompt:  # (an empty validation.prompt counts as unset, as before)
        prompts, groups = [prompt], [0] * n_forget
    else:
        prompts = list(dict.fromkeys(forget_prompts or []))
        groups = [prompts.index(p) for p in forget_prompts or []]
    emb, idx = engine_data.encode_prompts(model.tokenizer, model.text_encoder, [*prompts, ""], device, dtype)
    conds = [emb[i:i + 1] for i in idx[:-1]]
    return PromptGroups(prompts, groups, conds, emb[idx[-1]:idx[-1] + 1])


def sample_groups(model: Any, unet: Any, groups: PromptGroups, **kwargs: Any) -> List[Tensor]:
    """:func:`sample_images` for each prompt of ``groups`` (same ``kwargs``, same seed): ``[(N, C, H, W)]``."""
    return [sample_images(model, unet, encoder_hidden_states=c, uncond_hidden_states=groups.uncond, **kwargs)
            for c in groups.conds]


def score_groups(metrics: Dict[str, Callable], samples: Sequence[Tensor], item_group: Sequence[int],
                 unet: Any = None) -> Dict[str, float]:
    """Every metric's reading on the generations ``samples`` (one tensor per prompt of :class:`PromptGroups`).

    Score functions marked ``uses_unet`` (the targeted probe) also get the UNet (and all generations together); those
    with ``per_item`` add one reading per forget item, ``"name[k]"`` -- item ``k`` read on the generations of its own
    prompt ``samples[item_group[k]]`` -- and their overall value is ``aggregate(items)`` when they define it, else the
    metric on all generations."""
    every = samples[0] if len(samples) == 1 else torch.cat(list(samples))
    scores: Dict[str, float] = {}
    for name, fn in metrics.items():
        kwargs = {"unet": unet} if getattr(fn, "uses_unet", False) else {}
        if not hasattr(fn, "per_item"):
            scores[name] = float(fn(every, **kwargs))
            continue
        if len(samples) == 1 or kwargs:
            items = [float(v) for v in fn.per_item(every, **kwargs)]
        else:
            per_prompt = [fn.per_item(s) for s in samples]
            if any(len(r) != len(item_group) for r in per_prompt):
                raise ValueError(f"validation metric {name!r}: per_item returned {len(per_prompt[0])} readings for "
                                 f"{len(item_group)} forget items")
            items = [float(per_prompt[g][k]) for k, g in enumerate(item_group)]
        scores[name] = float(fn.aggregate(items) if hasattr(fn, "aggregate") else fn(every, **kwargs))
        scores.update({f"{name}[{k}]": v for k, v in enumerate(items)})
    return scores


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
