"""Stable Diffusion runs under audit: each forget item's own prompt, the run's forget rule, latents and prompts for
membership and relearning.

* **Prompts** -- from the run's data config as the engine resolved them (:func:`siss_fast.engine.data.resolve_prompts`:
  ``forget_prompt`` / ``retain_prompt``, else the captions file), embedded by the base model's frozen text encoder
  (:func:`siss_fast.text_encoding.encode_prompts`; the engine trains the UNet only). Samples are generated per
  distinct forget prompt through the engine's validation sampler (:func:`~.measure.draw_samples`, the one DDIM
  sampler), with the run's ``validation.guidance_scale`` against the empty prompt; item ``k`` is counted among the
  samples of its own prompt.
* **"A sample is forget item k"** (:class:`ForgetRule`) -- the run's own ``validation.forget_metric`` with its
  ``metric_options``, so the audit reads the item as the stop rule did: a metric with an ``assign`` function
  (``forget_nn``) assigns every sample to an item or none; one with ``per_item`` (the share of the samples that are
  item ``k``, as the engine's per-item stop rule reads it: the text-to-image demo's reproduction rate) gives
  ``count_k = per_item(samples)[k] x N``; any other sample metric that returns the share of samples that are forget
  images (``forget_distance``, ``forget_rate``) is built once per item with that item as its only forget image, and
  ``count_k = share x N``. A count must come out a whole number. A run without a forget metric, or with one that
  reads the UNet instead of samples, is judged by ``forget_nn`` (said in the report).
* **Membership** -- latents: the VAE posterior mean times ``scaling_factor``; each image conditioned on its own
  prompt (forget items: theirs; retain images: their captions).
* **Relearning** -- the engine's latent draws (:class:`~siss_fast.engine.data.LatentCache`) with the retain
  images' own prompts.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Dict, List, Optional

import torch
from torch import Tensor

from .integrity import VerifyError
from .measure import draw_samples, per_image_loss

__all__ = ["ForgetRule", "SDSubject"]


class ForgetRule:
    """``count(k, samples) -> int``: how many of ``samples`` (pixels in ``[0, 1]``) are forget item ``k`` (module doc);
    ``name``: the metric used; ``note``: why it is not the run's own forget metric (or None)."""

    def __init__(self, validation: Dict[str, Any], model: Any, retain: Tensor, forget: Tensor, device: torch.device):
        from ..metrics.registry import MetricContext, get_metric

        name = validation.get("forget_metric")
        options = (validation.get("metric_options") or {})
        self.note: Optional[str] = None
        fn = None
        if name is None:
            self.note = "the run names no forget metric"
        else:
            try:
                entry = get_metric(name)
                fn = entry.factory(MetricContext(retain, forget, dict(options.get(name) or {}), "sd", device, model,
                                                 model.unet))
            except ValueError as exc:
                self.note = f"the run's forget metric {name!r} cannot be built here ({exc})"
            if fn is not None and getattr(fn, "uses_unet", False):
                self.note, fn = f"the run's forget metric {name!r} reads the UNet, not samples", None
        if fn is None:
            name = "forget_nn"
            entry = get_metric(name)
            fn = entry.factory(MetricContext(retain, forget, dict(options.get(name) or {}), "sd", device, model,
                                             model.unet))
        self.name = name
        self._assign = getattr(fn, "assign", None)
        self._shares = None if self._assign is not None else getattr(fn, "per_item", None)
        self._per_item = []
        if self._assign is None and self._shares is None:
            for k in range(forget.shape[0]):
                ctx = MetricContext(retain, forget[k:k + 1], dict(options.get(name) or {}), "sd", device, model,
                                    model.unet)
                self._per_item.append(entry.factory(ctx))

    def describe(self) -> str:
        how = ("its assignment of each sample to an item (nearest neighbour within the item's radius)"
               if self._assign is not None else "its per-item share of the samples" if self._shares is not None
               else "its share of samples, built with item k as the only forget image")
        return f"`{self.name}` ({how})" + (f"; {self.note}, so forget_nn" if self.note else ", the run's forget metric")

    def count(self, k: int, samples: Tensor) -> int:
        n = samples.shape[0]
        if n == 0:
            return 0
        if self._assign is not None:
            return int((self._assign(samples) == k).sum())
        share = float(self._shares(samples)[k] if self._shares is not None else self._per_item[k](samples))
        c = round(share * n)
        if not 0 <= c <= n or abs(share * n - c) > 1e-6 * n:
            raise VerifyError(f"forget metric {self.name!r} returned {share!r} on {n} samples: not a share of the "
                              "samples, so it cannot count forget items; audit this run with a sample-share metric")
        return c


class SDSubject:
    """The audit's view of a Stable Diffusion run: sampling per prompt, counting, membership, relearning inputs."""

    kind = "sd"

    def describe(self) -> str:
        return self.rule.describe()

    def __init__(self, run: Any, base: Any, retain: Tensor, forget: Tensor, *, steps: int, batch_size: int,
                 device: torch.device):
        from ..engine import data as engine_data

        data = run.config.get("data") or {}
        cfg = SimpleNamespace(captions=data.get("captions"), retain_prompt=data.get("retain_prompt"),
                              forget_prompt=data.get("forget_prompt"))
        try:
            self.retain_prompts, self.prompts = engine_data.resolve_prompts(cfg, run.retain_files, run.forget_files)
        except engine_data.DataError as exc:
            raise VerifyError(f"the run's prompts cannot be read: {exc}") from None
        val = run.config.get("validation") or {}
        self.guidance = float(val.get("guidance_scale") or 1.0)
        self.base, self.retain, self.forget, self.device = base, retain, forget, device
        self.steps, self.batch_size = steps, batch_size
        self.distinct = list(dict.fromkeys(self.prompts))
        emb = self.embed(self.distinct + [""])
        self.cond = {p: emb[i:i + 1] for i, p in enumerate(self.distinct)}
        self.uncond = emb[-1:]
        self.rule = ForgetRule(val, base, retain, forget, device)
        self._retain_cond: Optional[Tensor] = None

    def retain_cond(self) -> Tensor:
        """``(M, L, D)``: each retain image's caption's text states (computed once)."""
        if self._retain_cond is None:
            self._retain_cond = self.embed(list(self.retain_prompts))
        return self._retain_cond

    def embed(self, prompts: List[str]) -> Tensor:
        """``(len(prompts), L, D)`` fp32 text states (CPU), one row per prompt."""
        from ..text_encoding import encode_prompts

        distinct, idx = encode_prompts(self.base.tokenizer, self.base.text_encoder, prompts, self.device,
                                       torch.float32)
        return distinct.cpu()[torch.as_tensor(idx, dtype=torch.long)]

    def sample(self, unet: Any, n: int, seed: int, cond: Tensor) -> Tensor:
        return draw_samples(self.base, unet, n, steps=self.steps, seed=seed, batch_size=self.batch_size,
                            device=self.device, cond=cond.to(self.device), uncond=self.uncond.to(self.device),
                            guidance_scale=self.guidance)

    def draw(self, unet: Any, n: int, seed: int) -> Dict[str, Tensor]:
        """``{prompt: (n, C, H, W)}``: ``n`` samples of each distinct forget prompt, from seed ``seed``."""
        return {p: self.sample(unet, n, seed, self.cond[p]) for p in self.distinct}

    def counts(self, drawn: Dict[str, Tensor], n: Optional[int] = None) -> List[int]:
        """Per item ``k``: how many of the first ``n`` samples of its prompt are item ``k``."""
        return [self.rule.count(k, drawn[p][:n]) for k, p in enumerate(self.prompts)]

    @staticmethod
    def all_samples(drawn: Dict[str, Tensor]) -> Tensor:
        return torch.cat(list(drawn.values()))

    def member_losses(self, unet: Any, seed: int):
        """``(forget (K,), retain (M,))`` fp64: denoising losses at fixed ``(t, eps)``, each image under its prompt."""
        abar, vae = self.base.scheduler.alphas_cumprod, self.base.vae
        f_cond = torch.cat([self.cond[p] for p in self.prompts])
        r_cond = self.retain_cond()
        return (per_image_loss(unet, self.forget, abar, seed=seed, device=self.device, vae=vae, cond=f_cond),
                per_image_loss(unet, self.retain, abar, seed=seed, device=self.device, vae=vae, cond=r_cond))

    def relearn_args(self) -> Dict[str, Any]:
        """``latents`` (the retain images' VAE posteriors, CPU) and ``cond`` (their prompts) for the probe."""
        from ..engine.data import LatentCache

        vae = self.base.vae
        cache = LatentCache(vae, (self.retain * 2 - 1).float(), self.device, next(vae.parameters()).dtype)
        cache.mean, cache.std = cache.mean.cpu(), cache.std.cpu()
        return {"latents": cache, "cond": self.retain_cond()}
