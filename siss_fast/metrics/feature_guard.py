"""A classifier-free quality guard: Fréchet / kernel distance of the samples to the retain set in the frozen base
UNet's own features (issue 12).

The built-in ``retain_distance`` (mean nearest-retain pixel distance) is blind to what a classifier sees: samples
can drift towards blurry, ambiguous shapes that stay close to *some* retain image in pixels. Here each image is
noised to a fixed small timestep with fixed noise and passed once through a frozen copy of the base model's UNet;
the activations of chosen blocks, average-pooled over space, are its features, and the guard compares the
*distributions* of sample and retain features.

Features (:class:`BaseFeatures`), for images ``x`` ``(N, C, H, W)`` fp32 in ``[0, 1]``:

* ``z = 2 x - 1`` (pixel DDPM) or ``z = s * E(2 x - 1)`` (latent models: the VAE encoder's posterior mean times
  its ``scaling_factor``), ``x_t = sqrt(abar_t) z + sqrt(1 - abar_t) eps``, ``eps`` drawn from
  ``Generator().manual_seed(seed)`` for the whole batch (the same noise for sample ``i`` at every validation;
  the retain set gets ``seed + 1``);
* ``f = concat_b pool(h_b)`` over the blocks ``b`` of option ``blocks`` (``down0`` ... ``downL``, ``mid``; ``h_b``
  the block's output hidden states ``(N, C_b, H_b, W_b)`` of ``unet(x_t, t)``), ``pool`` = spatial mean (``mean``)
  or mean and standard deviation (``meanstd``); latent models get the empty prompt's text embedding;
* standardised per dimension by the retain features' mean and standard deviation: ``(N, F)`` fp64;
* with ``exclude_forget`` (default true) the samples whose nearest neighbour among retain ∪ forget images (pixel
  RMS) is a forget item are left out (:func:`siss_fast.metrics.forget_signal.nearest_item` without a radius): the
  guard judges the quality of what is *not* a forget copy, as ``classifier_quality`` does -- otherwise removing
  the memorised copies (far from the retain set in features) reads as a large quality gain.

Distances between sample features ``a`` ``(N, F)`` and retain features ``b`` ``(M, F)``:

* ``feature_fd``: ``||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2))`` (Fréchet distance of the Gaussians
  fitted to both, as FID); the finite-sample bias keeps the base model's value well above 0, so a relative guard
  on it is meaningful;
* ``feature_kid``: the unbiased MMD^2 with the cubic polynomial kernel ``k(u, v) = (u.v / F + 1)^3`` (as KID),
  times 100 -- unbiased, so the base model's value sits near 0 and a relative guard on it is not meaningful; use
  an absolute reading or ``feature_fd`` for the guard.

Cost per validation: one base-UNet forward per sample (N forwards; the sampler spends ``sampler_steps`` x N), plus
one VAE-encoder forward per sample for latent models; the retain features are computed once when the metric is
built (one forward per retain image, at most ``max_retain``). Memory: a second copy of the UNet. Measured on the
demo (512 samples, one loaded CPU thread): feature_fd 0.6-2.1 s, feature_kid 0.6-2.3 s per validation.

Fidelity (``benchmarks/results/guard-fidelity.json``; four over-trained runs: demo at lr 6e-4 and 2e-4, five10 and
checker1 at 6e-4): Spearman of ``-feature_fd`` with ``classifier_quality`` over the validated steps 0.65 / 0.55 /
0.76 / 0.43 (the classifier against itself, even vs odd half of the samples: 0.73 / 0.55 / 0.86 / 0.86;
``retain_distance``: 0.55 / -0.21 / -0.10 / 0.39); with tolerance 0.15 it trips at the classifier's first check
below 97 % of its baseline in all four. Of the variants tried (blocks ``down0..mid`` and combinations, t in {20,
100, 300}, FD / KID, the mean eps-prediction error), ``mid`` at t = 100 with mean+std pooling had the best mean
Spearman (0.60; next best 0.52).

In the engine's pixel defaults (``engine/defaults.py``) it is reported on the ``validation.num_samples`` = 96 samples
of 10 DDIM steps; the guard there is ``retain_fit`` (:mod:`.retain_fit`). Named as ``quality_metric``, its registered
tolerance is ``FD_TOLERANCE`` = 0.5: with 96 samples its reading moves by up to +22 % between checks while the
classifier stays >= 97 %. Over the five planted experiments at lr 1e-3 (``benchmarks/results/guard-fidelity-fit.json``,
``benchmarks/trajectory_report.py``) it follows sample quality where memorised copies are few (it sees the demo's
partial recovery between steps 60 and 120 that the retain fit does not), and reads the opposite where they are many:
on five10 (10 % of the data planted) it fell by 40 % while the classifier's score fell by 7 %, because removing the
glyph-like samples that the nearest-item exclusion keeps brings the samples closer to the retain set.

Options (``validation.metric_options.feature_fd``; the defaults were chosen on these runs by
``benchmarks/guard_fidelity.py``): ``t`` (default 100), ``blocks`` (default ``[mid]``), ``pool`` (``meanstd``),
``seed`` (0), ``batch_size`` (64), ``max_retain`` (2048: a fixed random subset of larger retain sets),
``exclude_forget`` (true).
"""

from __future__ import annotations

import copy
from typing import Any, Dict, List, Sequence

import torch
from torch import Tensor

from ..text_encoding import encode_prompts
from .registry import MetricContext, check_int, merge_options, register_metric

from .forget_signal import nearest_item
from .sampling import model_eps

__all__ = ["BaseFeatures", "RetainReference", "frechet_distance", "kernel_distance", "feature_seeds",
           "DEFAULT_OPTIONS"]

DEFAULT_OPTIONS: Dict[str, Any] = {"t": 100, "blocks": ["mid"], "pool": "meanstd", "seed": 0, "batch_size": 64,
                                   "max_retain": 2048, "exclude_forget": True}
_POOLS = ("mean", "meanstd")
FD_TOLERANCE = 0.5  # the guard's default tolerance on feature_fd (engine/defaults.py: chosen on the planted runs)


def _option(options: Dict[str, Any], metric: str, allowed: Sequence[str] = ()) -> Dict[str, Any]:
    """The options of ``metric`` merged over :data:`DEFAULT_OPTIONS`; ValueError naming an unknown or bad one."""
    opts = merge_options(metric, options, DEFAULT_OPTIONS, allowed)
    if isinstance(opts["blocks"], str):
        opts["blocks"] = [opts["blocks"]]
    for key in ("t", "seed", "batch_size", "max_retain"):
        check_int(metric, key, opts[key], 0 if key in ("t", "seed") else 1)
    if opts["pool"] not in _POOLS:
        raise ValueError(f"validation.metric_options.{metric}.pool: expected one of {list(_POOLS)}, "
                         f"got {opts['pool']!r}")
    if not isinstance(opts["exclude_forget"], bool):
        raise ValueError(f"validation.metric_options.{metric}.exclude_forget: expected true or false, "
                         f"got {opts['exclude_forget']!r}")
    if not opts["blocks"]:
        raise ValueError(f"validation.metric_options.{metric}.blocks: expected a non-empty list")
    return opts


class BaseFeatures:
    """Frozen base-UNet features of images: ``features(images (N, C, H, W) fp32 in [0, 1]) -> (N, F)`` fp64.

    ``ctx.unet`` (the base model when the engine builds the metric) is deep-copied, frozen and put in eval mode;
    ``ctx.model`` gives the scheduler's ``alphas_cumprod`` and, for latent models, the VAE, tokenizer and text
    encoder. Raw (unstandardised) features: :meth:`raw`; :meth:`blockwise` returns them per block (``{name:
    (N, F_b)}``, plus ``"eps_err"``: the per-sample mean squared noise-prediction error, ``(N, 1)``).
    """

    def __init__(self, ctx: MetricContext, *, t: int, blocks: List[str], pool: str, seed: int, batch_size: int,
                 metric: str = "feature_fd"):
        if ctx.unet is None or ctx.model is None:
            raise ValueError(f"{metric}: needs the run's model (MetricContext.model and .unet; the engine sets them)")
        self.unet = copy.deepcopy(ctx.unet).eval().requires_grad_(False)
        param = next(self.unet.parameters())
        self.device, self.dtype = param.device, param.dtype
        abar = ctx.model.scheduler.alphas_cumprod.double()
        if not 0 <= t < abar.shape[0]:
            raise ValueError(f"validation.metric_options.{metric}.t: expected 0 <= t < {abar.shape[0]}, got {t}")
        self.t, self.gain, self.sigma = t, float(abar[t].sqrt()), float((1 - abar[t]).sqrt())
        n_down = len(self.unet.down_blocks)
        modules = {**{f"down{i}": b for i, b in enumerate(self.unet.down_blocks)}, "mid": self.unet.mid_block}
        for name in blocks:
            if name not in modules:
                raise ValueError(f"validation.metric_options.{metric}.blocks: unknown block {name!r}; valid: "
                                 f"{[f'down{i}' for i in range(n_down)] + ['mid']}")
        self.blocks, self.pool, self.seed, self.batch_size = list(blocks), pool, seed, batch_size
        self.vae = getattr(ctx.model, "vae", None)
        self.cond = None
        if self.vae is not None:
            self.cond, _ = encode_prompts(ctx.model.tokenizer, ctx.model.text_encoder, [""], self.device,
                                          self.dtype)
        self._seen: Dict[str, Tensor] = {}
        for name, module in modules.items():
            module.register_forward_hook(self._hook(name))

    def _hook(self, name: str):
        def hook(_module, _inputs, output):
            self._seen[name] = (output[0] if isinstance(output, tuple) else output).detach()
        return hook

    def _pool(self, h: Tensor) -> Tensor:
        h = h.double().flatten(2)
        return h.mean(2) if self.pool == "mean" else torch.cat([h.mean(2), h.std(2)], 1)

    @torch.no_grad()
    def _encode(self, images: Tensor) -> Tensor:
        z = images.to(self.device, torch.float32) * 2 - 1
        if self.vae is None:
            return z
        vdtype = next(self.vae.parameters()).dtype
        return self.vae.encode(z.to(vdtype)).latent_dist.mean.float() * self.vae.config.scaling_factor

    @torch.no_grad()
    def blockwise(self, images: Tensor, seed: int) -> Dict[str, Tensor]:
        """``{block: (N, F_b) fp64}`` for every block of the UNet, and ``"eps_err"`` ``(N, 1)`` (see class doc)."""
        gen = torch.Generator().manual_seed(seed)
        out: Dict[str, List[Tensor]] = {}
        for start in range(0, images.shape[0], self.batch_size):
            z = self._encode(images[start:start + self.batch_size])
            eps = torch.randn(z.shape, generator=gen).to(self.device)
            x_t = (self.gain * z + self.sigma * eps).to(self.dtype)
            t = torch.full((z.shape[0],), self.t, device=self.device, dtype=torch.long)
            kwargs = {} if self.cond is None else {"encoder_hidden_states": self.cond.expand(z.shape[0], -1, -1)}
            pred = model_eps(self.unet, x_t, t, **kwargs).float()
            out.setdefault("eps_err", []).append((pred - eps).square().flatten(1).mean(1, keepdim=True).double())
            for name, h in self._seen.items():
                out.setdefault(name, []).append(self._pool(h).cpu())
        return {k: torch.cat(v).cpu() for k, v in out.items()}

    def raw(self, images: Tensor, seed: int) -> Tensor:
        """``(N, F)`` fp64: the pooled features of ``self.blocks``, concatenated in that order."""
        feats = self.blockwise(images, seed)
        return torch.cat([feats[b] for b in self.blocks], 1)


def frechet_distance(a: Tensor, b: Tensor) -> float:
    """``||mu_a - mu_b||^2 + Tr(S_a) + Tr(S_b) - 2 Tr((S_a^(1/2) S_b S_a^(1/2))^(1/2))`` of ``(N, F)``, ``(M, F)``
    feature sets (fp64; covariances with ``N - 1``; the trace of the matrix square root through symmetric
    eigendecompositions, negative round-off eigenvalues clamped to 0)."""
    a, b = a.double(), b.double()
    mu = (a.mean(0) - b.mean(0)).square().sum()
    sa, sb = torch.cov(a.T).reshape(a.shape[1], -1), torch.cov(b.T).reshape(b.shape[1], -1)
    w, v = torch.linalg.eigh(sa)
    root_a = (v * w.clamp_min(0).sqrt()) @ v.T
    cross = torch.linalg.eigvalsh(root_a @ sb @ root_a).clamp_min(0).sqrt().sum()
    return float(mu + sa.trace() + sb.trace() - 2 * cross)


def kernel_distance(a: Tensor, b: Tensor) -> float:
    """Unbiased MMD^2 between ``(N, F)`` and ``(M, F)`` feature sets with ``k(u, v) = (u.v / F + 1)^3``:
    ``mean_{i!=j} k(a_i, a_j) + mean_{i!=j} k(b_i, b_j) - 2 mean_{i,j} k(a_i, b_j)`` (fp64, N, M >= 2)."""
    a, b = a.double(), b.double()
    f = a.shape[1]

    def k(x: Tensor, y: Tensor) -> Tensor:
        return (x @ y.T / f + 1) ** 3

    def within(x: Tensor) -> Tensor:
        kx = k(x, x)
        n = x.shape[0]
        return (kx.sum() - kx.diagonal().sum()) / (n * (n - 1))

    return float(within(a) + within(b) - 2 * k(a, b).mean())


def feature_seeds(options: Dict[str, Any], n_forget: int) -> List[int]:
    """The generator seeds of ``feature_fd`` / ``feature_kid`` (their ``generator_seeds`` declaration): ``seed``
    (the samples' noise, the subset of a large retain set) and ``seed + 1`` (the retain set's noise)."""
    seed = int((options or {}).get("seed", DEFAULT_OPTIONS["seed"]))
    return [seed, seed + 1]


class RetainReference:
    """The frozen base-UNet features of the retain set and of samples, standardised alike (module doc).

    ``ref`` ``(M, F)`` fp64: the retain features (at most ``max_retain`` images, a fixed random subset), standardised
    per dimension by their own mean and std; ``samples(x)`` ``(N', F)`` fp64: the samples' features standardised the
    same way, without the samples whose nearest neighbour is a forget item when ``exclude_forget`` (all of them when
    fewer than 2 would remain). Shared by ``feature_fd``, ``feature_kid`` and ``cluster_score``.
    """

    def __init__(self, ctx: MetricContext, metric: str, opts: Dict[str, Any]):
        self.opts = opts
        self.features = BaseFeatures(ctx, t=opts["t"], blocks=opts["blocks"], pool=opts["pool"], seed=opts["seed"],
                                     batch_size=opts["batch_size"], metric=metric)
        retain = ctx.retain_images
        if retain.shape[0] > opts["max_retain"]:
            pick = torch.randperm(retain.shape[0], generator=torch.Generator().manual_seed(opts["seed"]))
            retain = retain[pick[:opts["max_retain"]]]
        ref = self.features.raw(retain, opts["seed"] + 1)
        self.mean, self.std = ref.mean(0), ref.std(0).clamp_min(1e-8)
        self.ref = (ref - self.mean) / self.std
        self._forget, self._retain = ctx.forget_images, ctx.retain_images
        self._every_item = torch.full((ctx.forget_images.shape[0],), float("inf"))

    def samples(self, samples: Tensor) -> Tensor:
        f = (self.features.raw(samples, self.opts["seed"]) - self.mean) / self.std
        if self.opts["exclude_forget"]:
            keep = nearest_item(samples, self._forget, self._retain, self._every_item) < 0
            f = f[keep] if int(keep.sum()) >= 2 else f
        return f


def _guard(ctx: MetricContext, metric: str, distance) -> Any:
    reference = RetainReference(ctx, metric, _option(ctx.options, metric))

    def score(samples: Tensor) -> float:
        return distance(reference.samples(samples), reference.ref)

    score.features = reference.features
    return score


@register_metric("feature_fd", higher_is_better=False, tolerance=FD_TOLERANCE, generator_seeds=feature_seeds,
                 check_options=lambda opts: _option(opts, "feature_fd") and None)
def _feature_fd(ctx: MetricContext):
    """Fréchet distance of the samples to the retain set in frozen base-UNet features (module doc)."""
    return _guard(ctx, "feature_fd", frechet_distance)


@register_metric("feature_kid", higher_is_better=False, generator_seeds=feature_seeds,
                 check_options=lambda opts: _option(opts, "feature_kid") and None)
def _feature_kid(ctx: MetricContext):
    """100 x the unbiased cubic-kernel MMD^2 of the samples to the retain set in base-UNet features (module doc)."""
    return _guard(ctx, "feature_kid", lambda a, b: 100.0 * kernel_distance(a, b))
