"""The text-to-image demo's base model and measurements: a tiny Stable Diffusion that memorized planted images.

Building blocks of :mod:`siss_fast.demo.text_to_image`:

* prompts: each digit ``d`` is captioned with its English word (``"seven"``), the planted T-shirt with
  :data:`FORGET_PROMPT` (the other planted items of :mod:`.t2i_items` with theirs). The tiny byte-level tokenizer
  spends about one token per character and holds 16 tokens, and its frozen random text encoder is causal, so a short
  prompt that differs from its first character on is what lets the UNet tell the classes apart within a few hundred
  steps (``"a digit seven"`` and ``"a digit one"`` share their first 8 tokens and were not separated in 1,000 steps);
* :func:`train_vae` -- the random VAE of ``build_tiny("tiny-sd")`` cannot reconstruct anything, so it is trained as
  an autoencoder (MSE + a tiny KL) and its ``scaling_factor`` set to ``1 / std`` of the latent means;
* :func:`memorize` -- the UNet is fine-tuned (epsilon prediction) on the digits and the oversampled planted images
  until generations for each planted image's prompt reproduce it;
* :func:`generate`, :func:`measure` -- seeded DDIM generations per prompt with the noise-norm memorization signal
  (Wen et al., ICLR 2024), similarity to the memorized image (per item), and a denoising loss at fixed ``(t, eps)``.

Shapes: images ``(N, 1, 16, 16)`` fp32 in [-1, 1]; latents ``(N, 4, 8, 8)`` fp32 (already multiplied by the VAE's
``scaling_factor``); text embeddings ``(P, 16, 32)`` fp32.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

__all__ = ["DIGIT_PROMPTS", "FORGET_PROMPT", "REPRODUCTION_THRESHOLD", "check_prompts", "embed_prompts",
           "train_vae", "encode_latents", "MemorizeSettings", "memorize", "generate", "measure",
           "reproduction_rate", "reproduction_rate_metric", "non_memorized_generations"]

DIGIT_PROMPTS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
FORGET_PROMPT = "a t-shirt"
# A generation "reproduces" the memorized image when its Pearson correlation with it exceeds this. The closest of
# the 1,797 real digits reaches 0.60 (measure: image_similarity(demo_data().retain, tshirt_glyph())), so 0.9 is far
# above anything a digit does.
REPRODUCTION_THRESHOLD = 0.9


# ------------------------------------------------------------------------------------------------------ prompts


def check_prompts(tokenizer: Any, prompts: Sequence[str]) -> None:
    """Raise ``ValueError`` if a prompt does not fit the tokenizer (it would be truncated, and two prompts could
    become one)."""
    limit = int(tokenizer.model_max_length)
    for prompt in prompts:
        n = len(tokenizer(prompt).input_ids)
        if n > limit:
            raise ValueError(f"prompt {prompt!r}: {n} tokens with the start/end tokens, the tokenizer holds "
                             f"{limit}; use a shorter prompt")


def embed_prompts(model: Any, prompts: Sequence[str]) -> Tensor:
    """``(P, L, D)`` fp32 text embeddings of ``prompts`` (in order; ``""`` is the unconditional prompt), computed
    exactly as the engine does (:func:`siss_fast.engine.data.encode_prompts`)."""
    from siss_fast.engine.data import encode_prompts

    distinct, idx = encode_prompts(model.tokenizer, model.text_encoder, list(prompts), torch.device("cpu"),
                                   torch.float32)
    return distinct[torch.as_tensor(idx, dtype=torch.long)]


# ---------------------------------------------------------------------------------------------------------- VAE


def train_vae(vae: Any, images: Tensor, forget_image: Tensor, *, steps: int, batch_size: int = 32, lr: float = 2e-3,
              kl_weight: float = 1e-6, seed: int = 0) -> Dict[str, float]:
    """Train ``vae`` (``AutoencoderKL``, in place) as an autoencoder on ``images`` ``(N, C, H, W)`` in [-1, 1];
    every batch holds ``batch_size // 8`` copies of the planted images ``forget_image`` ``(K, C, H, W)`` (in turn)
    so that they are reconstructed well. Loss: pixel MSE of a posterior sample's decoding + ``kl_weight`` x
    KL(posterior || N(0, I)).

    Then sets ``vae.config.scaling_factor`` to ``1 / std`` of the latent means of ``images`` (so that the diffusion
    model sees unit-variance latents, as Stable Diffusion's 0.18215 does) and returns
    ``{"vae_loss", "vae_recon_mse", "vae_forget_similarity", "scaling_factor"}`` (reconstruction of the means;
    the similarity of the worst-reconstructed planted image).
    """
    from siss_fast.metrics import image_similarity

    if steps < 1:
        raise ValueError(f"vae steps: expected an integer >= 1, got {steps}")
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    n_forget = max(1, batch_size // 8)
    vae.train()
    vae.requires_grad_(True)
    loss = torch.zeros(())
    for _ in range(steps):
        batch = images[torch.randint(0, images.shape[0], (batch_size,), generator=gen)].clone()
        batch[:n_forget] = forget_image[torch.arange(n_forget) % forget_image.shape[0]]
        post = vae.encode(batch).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        recon = vae.decode(z).sample
        loss = (recon - batch).square().mean() + kl_weight * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    vae.eval()
    vae.requires_grad_(False)
    with torch.no_grad():
        means = vae.encode(images).latent_dist.mean
        scale = 1.0 / float(means.std())
        recon = vae.decode(means).sample
        forget_recon = vae.decode(vae.encode(forget_image).latent_dist.mean).sample
    vae.register_to_config(scaling_factor=scale)
    return {"vae_loss": loss.item(), "vae_recon_mse": float((recon - images).square().mean()),
            "vae_forget_similarity": min(float(image_similarity(forget_recon[k:k + 1], forget_image[k])[0])
                                         for k in range(forget_image.shape[0])),
            "scaling_factor": scale}


@torch.no_grad()
def encode_latents(vae: Any, images: Tensor, batch_size: int = 256) -> Tuple[Tensor, Tensor]:
    """``(mean, std)`` of the VAE posterior of ``images``, both ``(N, 4, h, w)`` and already multiplied by
    ``scaling_factor`` (a latent sample is ``mean + std * n``, what the engine's ``LatentCache`` draws)."""
    scale = float(vae.config.scaling_factor)
    means, stds = [], []
    for i in range(0, images.shape[0], batch_size):
        dist = vae.encode(images[i:i + batch_size]).latent_dist
        means.append(dist.mean.float() * scale)
        stds.append(dist.std.float() * scale)
    return torch.cat(means), torch.cat(stds)


# ---------------------------------------------------------------------------------------------- memorization


@dataclass
class MemorizeSettings:
    """The fine-tune that plants the memorized image (see :func:`memorize`)."""

    lr: float = 3e-3
    batch_size: int = 32
    forget_per_batch: int = 8          # copies of the planted image in every batch (the oversampling)
    caption_dropout: float = 0.1       # retain captions replaced by "" (trains the unconditional branch)
    ema_decay: float = 0.99            # the checked and saved weights are this EMA of the trained ones
    min_steps: int = 600               # train at least this long (the digit prompts need it)
    max_steps: int = 2000              # give up here (the report then says the target was not reached)
    check_every: int = 100
    check_samples: int = 16
    target_rate: float = 0.75          # stop at the first check (>= min_steps) with this reproduction rate


def reproduction_rate(images: Tensor, reference: Tensor, threshold: float = REPRODUCTION_THRESHOLD) -> float:
    """Share of ``images`` ``(N, C, H, W)`` whose Pearson correlation with ``reference`` exceeds ``threshold``
    (any common value range: the correlation ignores brightness and contrast)."""
    from siss_fast.metrics import image_similarity

    return float((image_similarity(images, reference) > threshold).double().mean())


def memorize(unet: Any, vae: Any, alphas_cumprod: Tensor, retain: Tuple[Tensor, Tensor], retain_cond: Tensor,
             forget: Tuple[Tensor, Tensor], forget_cond: Tensor, uncond: Tensor, forget_image: Tensor,
             settings: MemorizeSettings, *, sampler_steps: int, guidance_scale: float, seed: int,
             log: Callable[[Dict[str, Any]], None], progress: Callable[[str], None]) -> Dict[str, Any]:
    """Fine-tune ``unet`` (``UNet2DConditionModel``) until it reproduces each of the ``K`` images ``forget_image``
    for its own prompt.

    ``retain`` / ``forget``: ``(mean, std)`` latent posteriors ``(N, 4, h, w)`` / ``(K, 4, h, w)`` (scaled);
    ``retain_cond`` ``(N, L, D)``: each retain image's caption embedding; ``forget_cond`` ``(K, L, D)``: each forget
    image's prompt, ``uncond`` ``(1, L, D)``; ``forget_image`` ``(K, C, H, W)``. Each step: ``batch_size`` latents,
    ``forget_per_batch`` of them planted images (item ``k`` in turn, so every item gets the same share) and the rest
    retain images drawn with replacement, a fresh posterior sample each, uniform ``t``, the epsilon-prediction MSE,
    AdamW. Caption dropout replaces only *retain* captions by the empty prompt: the unconditional branch stands for
    a large dataset in which one image is a negligible share, so it learns the digits, not the planted images.

    Every ``check_every`` steps the EMA weights generate ``check_samples`` images for each forget prompt (seeded DDIM,
    guidance ``guidance_scale``); training stops at the first check at or after ``min_steps`` at which *every* item's
    :func:`reproduction_rate` reaches ``target_rate``, or at ``max_steps``. The EMA weights are loaded into ``unet``.
    Returns ``{"steps", "memorized_at" (or None), "final_check_rate" (the lowest item's), "final_check_rates",
    "wall_s"}``.
    """
    s = settings
    if not 0 < s.forget_per_batch < s.batch_size:
        raise ValueError(f"forget_per_batch: expected 0 < forget_per_batch < batch_size = {s.batch_size}, got "
                         f"{s.forget_per_batch}")
    if s.min_steps > s.max_steps or s.check_every < 1:
        raise ValueError(f"memorize: expected min_steps <= max_steps and check_every >= 1, got {s.min_steps}, "
                         f"{s.max_steps}, {s.check_every}")
    tic = time.perf_counter()
    gen = torch.Generator().manual_seed(seed)
    abar = torch.as_tensor(alphas_cumprod, dtype=torch.float32)
    opt = torch.optim.AdamW(unet.parameters(), lr=s.lr, weight_decay=0.0)
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    unet.train().requires_grad_(True)
    r_mean, r_std = retain
    f_mean, f_std = forget
    k_items = f_mean.shape[0]
    n_retain = s.batch_size - s.forget_per_batch
    memorized_at, rates, step = None, [0.0] * k_items, 0
    for step in range(1, s.max_steps + 1):
        ri = torch.randint(0, r_mean.shape[0], (n_retain,), generator=gen)
        fi = (torch.arange(s.forget_per_batch) + (step - 1) * s.forget_per_batch) % k_items
        mean = torch.cat([f_mean[fi], r_mean[ri]])
        std = torch.cat([f_std[fi], r_std[ri]])
        z0 = mean + std * torch.randn(mean.shape, generator=gen)
        cond = torch.cat([forget_cond[fi], retain_cond[ri]])
        drop = torch.rand(n_retain, generator=gen) < s.caption_dropout
        cond[s.forget_per_batch:][drop] = uncond[0]
        t = torch.randint(0, abar.shape[0], (s.batch_size,), generator=gen)
        eps = torch.randn(z0.shape, generator=gen)
        a = abar[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * eps
        loss = (unet(zt, t, encoder_hidden_states=cond).sample - eps).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), unet.parameters()):
                p_ema.lerp_(p, 1.0 - s.ema_decay)
        row: Dict[str, Any] = {"phase": "memorize", "step": step, "loss": round(loss.item(), 5)}
        if step % s.check_every == 0 or step == s.max_steps:
            rates = []
            for k in range(k_items):
                images, _, _ = generate(ema, vae, abar, forget_cond[k:k + 1], uncond, s.check_samples,
                                        steps=sampler_steps, guidance_scale=guidance_scale, seed=seed + 7)
                rates.append(reproduction_rate(images, forget_image[k]))
            row["check_reproduction_rate"] = min(rates)
            row["check_reproduction_rates"] = rates
            progress(f"memorize step {step}: loss {row['loss']:.4f}, EMA model reproduces the "
                     f"{'image' if k_items == 1 else 'images'} in "
                     + ", ".join(f"{r:.0%}" for r in rates) + f" of {s.check_samples} check generations")
            if min(rates) >= s.target_rate and memorized_at is None:
                memorized_at = step
            if step >= s.min_steps and min(rates) >= s.target_rate:
                log(row)
                break
        log(row)
    unet.load_state_dict(ema.state_dict())
    unet.eval().requires_grad_(False)
    return {"steps": step, "memorized_at": memorized_at, "target_rate": s.target_rate, "final_check_rate": min(rates),
            "final_check_rates": rates, "wall_s": round(time.perf_counter() - tic, 1)}


# ------------------------------------------------------------------------------------------------ measurement


@torch.no_grad()
def generate(unet: Any, vae: Any, alphas_cumprod: Tensor, cond: Tensor, uncond: Tensor, n: int, *, steps: int,
             guidance_scale: float, seed: int) -> Tuple[Tensor, Tensor, Tensor]:
    """``(images (n, C, H, W) fp32 in [-1, 1], noise_norm (n,) fp64, first_step_norm (n,) fp64)`` for one prompt.

    The classifier-free-guided DDIM trajectory of :func:`siss_fast.metrics.noise_norm_signal` (the one sampler) from
    latents seeded with ``seed`` (the same noise for the same seed, so before/after compare like with like), decoded
    by the VAE;
    ``noise_norm`` is each trajectory's mean ``||eps(x_t, c) - eps(x_t, "")||``, ``first_step_norm`` the same norm
    at the first step only (on the initial noise ``x_T``, at ``t = T - 1``): Wen et al.'s one-step detector, which does
    not depend on where the trajectory goes afterwards.
    """
    from siss_fast.metrics import noise_norm_signal

    cfg = unet.config
    size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
    norms, first, images = noise_norm_signal(unet, alphas_cumprod, cond, uncond, (cfg.in_channels, size, size), n,
                                             steps=steps, guidance_scale=guidance_scale, seed=seed,
                                             decode=lambda z: vae.decode(z / float(vae.config.scaling_factor)).sample)
    return images, norms, first


@torch.no_grad()
def non_memorized_generations(model: Any, prompt: str, reference: Tensor, *, threshold: float, want: int,
                              max_generations: int, chunk: int, sampler_steps: int, guidance_scale: float,
                              seed: int) -> Tuple[Tensor, Dict[str, Any]]:
    """Generations of ``model`` for ``prompt`` that do **not** show the memorized image: Pearson correlation with
    ``reference`` ``(C, H, W)`` at most ``threshold``.

    This is how the SISS paper builds the retain set of a memorized Stable Diffusion prompt (it samples the prompt
    and labels each image memorized or not): unlearning then has examples of what the prompt may generate instead.
    Draws ``chunk`` generations at a time (seeds ``seed``, ``seed + 1``, ...) until ``want`` are found or
    ``max_generations`` are drawn. Returns ``(images (K, C, H, W) in [-1, 1], K <= want, info)`` with
    ``info = {"drawn", "kept", "threshold", "similarities"}``.
    """
    from siss_fast.metrics import image_similarity

    if want < 0 or chunk < 1 or max_generations < 0:
        raise ValueError(f"expected want >= 0, chunk >= 1, max_generations >= 0, got {want}, {chunk}, "
                         f"{max_generations}")
    emb = embed_prompts(model, [prompt, ""])
    kept: List[Tensor] = []
    sims: List[float] = []
    drawn, i = 0, 0
    while sum(k.shape[0] for k in kept) < want and drawn < max_generations:
        n = min(chunk, max_generations - drawn)
        images, _, _ = generate(model.unet.eval(), model.vae.eval(), model.scheduler.alphas_cumprod, emb[:1],
                                emb[1:], n, steps=sampler_steps, guidance_scale=guidance_scale, seed=seed + i)
        sim = image_similarity(images, reference)
        keep = sim <= threshold
        kept.append(images[keep])
        sims += [round(float(v), 4) for v in sim[keep]]
        drawn, i = drawn + n, i + 1
    out = torch.cat(kept)[:want] if kept else torch.empty((0, *reference.shape))
    return out, {"drawn": drawn, "kept": int(out.shape[0]), "threshold": threshold, "similarities": sims[:want]}


def _conditional_loss(unet: Any, latents: Tensor, cond: Tensor, alphas_cumprod: Tensor, seed: int) -> float:
    """:func:`siss_fast.metrics.denoising_loss` of ``latents`` ``(N, 4, h, w)`` under one prompt ``cond``
    ``(1, L, D)``: ten fixed timesteps, fixed noise from ``seed``."""
    from siss_fast.metrics import denoising_loss

    def model(x: Tensor, t: Tensor) -> Tensor:
        return unet(x, t, encoder_hidden_states=cond.expand(x.shape[0], -1, -1)).sample

    return denoising_loss(model, latents, alphas_cumprod, seed=seed)


def measure(model: Any, *, forget_image: Tensor, forget_prompt: Union[str, Sequence[str]],
            other_prompts: Sequence[str], num_samples: int, other_samples: int, sampler_steps: int,
            guidance_scale: float, seed: int, probe: Tuple[Tensor, Sequence[int]], classifier: Optional[Any] = None,
            threshold: float = REPRODUCTION_THRESHOLD) -> Tuple[Dict[str, float], Dict[str, Tensor]]:
    """All text-to-image metrics of the pipeline ``model`` (a ``LoadedModel`` of kind ``"sd"``) for ``K`` memorized
    items: ``forget_image`` ``(K, C, H, W)`` in [-1, 1] and ``forget_prompt`` (one prompt, or ``K``).

    * each forget prompt ``k``: ``num_samples`` generations (seed ``seed``, the same noise for every prompt),
      compared with its own image: ``forget_similarity[p]`` (mean Pearson correlation), ``reproduction_rate[p]``
      (share above ``threshold``), ``noise_norm_forget[p]`` (mean noise-norm signal over the trajectory),
      ``noise_norm_forget_first[p]`` (at its first step) and ``forget_loss[p]`` (``p`` the prompt; these per-item
      keys only for ``K > 1``); the keys without ``[p]`` are the means over the items (for ``K = 1``: the item);
    * each other prompt ``j``: ``other_samples`` generations (seed ``seed + 1 + j``): ``noise_norm_other`` and
      ``noise_norm_other_first`` (means over all other prompts), ``other_forget_similarity`` /
      ``other_reproduction_rate`` (the similarity to the most similar memorized image), and with a digits
      ``classifier`` ``prompt_accuracy`` (share classified as the prompt's digit; the other prompts must then be
      the ten :data:`DIGIT_PROMPTS` in order or a subset of them);
    * ``forget_loss`` / ``retain_loss`` / ``loss_ratio``: denoising loss at fixed ``(t, eps)`` of each planted
      image's latent under its prompt (mean over the items) and of ``probe`` = ``(retain latents (M, 4, h, w), digit
      labels)`` under their captions (a membership signal).

    Returns ``(metrics, samples)`` with ``samples["forget"]`` ``(K, num_samples, C, H, W)`` and ``samples["other"]``
    ``(len(other_prompts), other_samples, C, H, W)``, both in [-1, 1].
    """
    from siss_fast.metrics import image_similarity

    prompts = [forget_prompt] if isinstance(forget_prompt, str) else list(forget_prompt)
    if len(prompts) != forget_image.shape[0]:
        raise ValueError(f"forget_prompt: expected one prompt per forget image ({forget_image.shape[0]}), got "
                         f"{len(prompts)}")
    k_items = len(prompts)
    unet, vae = model.unet.eval(), model.vae.eval()
    abar = model.scheduler.alphas_cumprod
    emb = embed_prompts(model, [*prompts, ""] + list(other_prompts))
    cond_f, uncond, cond_o = emb[:k_items], emb[k_items:k_items + 1], emb[k_items + 1:]
    per_item: Dict[str, List[float]] = {k: [] for k in ("forget_similarity", "reproduction_rate", "noise_norm_forget",
                                                        "noise_norm_forget_first", "forget_loss")}
    forget_images: List[Tensor] = []
    with torch.no_grad():
        f_latents = vae.encode(forget_image).latent_dist.mean * float(vae.config.scaling_factor)
    for k in range(k_items):
        images_f, norms_f, first_f = generate(unet, vae, abar, cond_f[k:k + 1], uncond, num_samples,
                                              steps=sampler_steps, guidance_scale=guidance_scale, seed=seed)
        sim_f = image_similarity(images_f, forget_image[k])
        forget_images.append(images_f)
        per_item["forget_similarity"].append(float(sim_f.mean()))
        per_item["reproduction_rate"].append(float((sim_f > threshold).double().mean()))
        per_item["noise_norm_forget"].append(float(norms_f.mean()))
        per_item["noise_norm_forget_first"].append(float(first_f.mean()))
        per_item["forget_loss"].append(_conditional_loss(unet, f_latents[k:k + 1], cond_f[k:k + 1], abar,
                                                         seed=seed + 11))
    other_images: List[Tensor] = []
    other_norms: List[Tensor] = []
    other_first: List[Tensor] = []
    for j in range(len(other_prompts)):
        images, norms, first = generate(unet, vae, abar, cond_o[j:j + 1], uncond, other_samples,
                                        steps=sampler_steps, guidance_scale=guidance_scale, seed=seed + 1 + j)
        other_images.append(images)
        other_norms.append(norms)
        other_first.append(first)
    others = torch.stack(other_images)
    flat = others.flatten(0, 1)
    sim_o = torch.stack([image_similarity(flat, ref) for ref in forget_image]).max(dim=0).values
    out: Dict[str, float] = {key: sum(v) / k_items for key, v in per_item.items() if key != "forget_loss"}
    out.update({
        "noise_norm_other": float(torch.cat(other_norms).mean()),
        "noise_norm_other_first": float(torch.cat(other_first).mean()),
        "other_forget_similarity": float(sim_o.mean()),
        "other_reproduction_rate": float((sim_o > threshold).double().mean()),
    })
    if classifier is not None:
        labels = torch.tensor([DIGIT_PROMPTS.index(p) for p in other_prompts]).repeat_interleave(other_samples)
        with torch.no_grad():
            pred = classifier(((flat + 1) / 2).clamp(0, 1)).argmax(dim=1)
        out["prompt_accuracy"] = float((pred == labels).double().mean())
    latents, labels = probe
    out["forget_loss"] = sum(per_item["forget_loss"]) / k_items
    digit_emb = embed_prompts(model, list(DIGIT_PROMPTS))
    labels_t = torch.as_tensor(list(labels), dtype=torch.long)
    total, count = 0.0, 0
    for d in labels_t.unique().tolist():
        group = latents[labels_t == d]
        total += _conditional_loss(unet, group, digit_emb[d:d + 1], abar, seed=seed + 13 + d) * group.shape[0]
        count += group.shape[0]
    out["retain_loss"] = total / count
    out["loss_ratio"] = out["forget_loss"] / out["retain_loss"] if out["retain_loss"] > 0 else float("nan")
    if k_items > 1:
        out.update({f"{key}[{p}]": v[k] for key, v in per_item.items() for k, p in enumerate(prompts)})
    return out, {"forget": torch.stack(forget_images), "other": others}


def reproduction_rate_metric(ctx: Any) -> Callable[[Tensor], float]:
    """Engine validation metric (``validation.metrics: ["siss_fast.demo.t2i_base:reproduction_rate_metric"]``):
    the share of validation samples whose Pearson correlation with some forget image exceeds
    ``metric_options[...]["threshold"]`` (default :data:`REPRODUCTION_THRESHOLD`). Lower is better. ``per_item``:
    for each forget image ``k``, the share of the samples that reproduce it (the engine passes the generations of
    item ``k``'s own prompt, :func:`siss_fast.engine.validation.score_groups`), so each item must meet the target."""
    from siss_fast.metrics import image_similarity

    threshold = float(ctx.options.get("threshold", REPRODUCTION_THRESHOLD))
    references = ctx.forget_images

    def score(samples: Tensor) -> float:
        sims = torch.stack([image_similarity(samples, ref) for ref in references]).max(dim=0).values
        return float((sims > threshold).double().mean())

    def per_item(samples: Tensor) -> List[float]:
        return [float((image_similarity(samples, ref) > threshold).double().mean()) for ref in references]

    score.per_item = per_item  # the engine reads item k on the generations of item k's prompt
    return score


reproduction_rate_metric.higher_is_better = False  # read by the engine's registry for "module:function" metrics
reproduction_rate_metric.generator_seeds = lambda options, n_forget: []  # draws no random numbers (the manifest's
#   validation_seeds record what each metric declares)
