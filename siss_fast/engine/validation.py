"""Sample-based validation, pluggable metrics and the stop rules.

The denoising loss on retained data stays flat while sample quality collapses (issue 5), so the engine judges the
run by *generated samples*: every ``validation.every`` steps it draws ``num_samples`` images with a short DDIM
sampler from fixed seeds (the same noise every time, so changes come from the weights) and scores them.

Metric registry (the API other layers plug into)::

    from siss_fast.engine.validation import register_metric, MetricContext

    @register_metric("my_metric", higher_is_better=False)
    def my_metric(ctx: MetricContext):            # called once per run
        reference = ctx.forget_images              # (K, C, H, W) fp32 in [0, 1], on CPU
        def score(samples):                        # (N, C, H, W) fp32 in [0, 1], on CPU
            return float(...)
        return score

A config names metrics in ``validation.metrics``: registered names, or ``"package.module:function"`` for a factory
(the function is registered under that string; give ``higher_is_better`` as an attribute of the function if it
is). ``validation.metric_options[name]`` is passed as ``ctx.options``.

Built-ins: ``forget_distance`` -- the fraction of samples within RMS distance ``threshold`` (on the [0, 1] scale) of
some forget item (the memorisation signal; lower is better); ``threshold: auto`` (default) is half of each forget
item's distance to its nearest retain image (:func:`forget_thresholds`); ``retain_distance`` -- the mean RMS
distance of each sample to its nearest retain image (a quality guard without a classifier; lower is better).

Stop rules (:class:`siss_fast.engine.stop_rules.StopRules`): the forget target is met when ``forget_metric`` reaches ``forget_target`` -- by
default (``forget_target: null``) a relative target, ``forget_target_ratio`` (0.1) times the metric's value before
training, so "90 % of the memorised generations are gone" needs no knowledge of the metric's scale; the
quality guard trips when ``quality_metric`` worsens by more than ``quality_tolerance`` relative to its value before
training. The best validated state that met the target (best quality among them) is kept as the final model.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import Tensor

__all__ = ["MetricContext", "register_metric", "forget_thresholds", "get_metric", "list_metrics", "check_metric_name",
           "build_metrics", "sample_images", "save_grid"]

MetricFn = Callable[[Tensor], float]
MetricFactory = Callable[["MetricContext"], MetricFn]


@dataclass
class MetricContext:
    """What a metric factory sees: the reference sets (``(N, C, H, W)`` fp32 in ``[0, 1]``, CPU), its options
    (``validation.metric_options[name]``), the model kind (``"ddpm"`` / ``"sd"``) and the training device."""

    retain_images: Tensor
    forget_images: Tensor
    options: Dict[str, Any] = field(default_factory=dict)
    kind: str = "ddpm"
    device: torch.device = torch.device("cpu")
    model: Any = None  # the run's LoadedModel (scheduler, VAE, text encoder) when built by the engine, else None
    unet: Any = None  # the UNet as the factory is called: the base model (copy it to keep frozen features)


@dataclass
class _Entry:
    factory: MetricFactory
    higher_is_better: bool


_REGISTRY: Dict[str, _Entry] = {}


def register_metric(name: str, *, higher_is_better: bool = False) -> Callable[[MetricFactory], MetricFactory]:
    """Decorator: register ``factory(ctx) -> fn(samples) -> float`` under ``name`` (re-registering replaces)."""

    def wrap(factory: MetricFactory) -> MetricFactory:
        _REGISTRY[name] = _Entry(factory, higher_is_better)
        return factory

    return wrap


def list_metrics() -> List[str]:
    return sorted(_REGISTRY)


def get_metric(name: str) -> _Entry:
    """The registry entry of ``name``, importing ``"module:function"`` factories on first use."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    if ":" in name:
        module_name, func_name = name.split(":", 1)
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise ValueError(f"cannot import module {module_name!r} of metric {name!r}: {exc}") from None
        factory = getattr(module, func_name, None)
        if not callable(factory):
            raise ValueError(f"module {module_name!r} has no callable {func_name!r} (metric {name!r})")
        register_metric(name, higher_is_better=bool(getattr(factory, "higher_is_better", False)))(factory)
        return _REGISTRY[name]
    _load_plugins()
    if name in _REGISTRY:
        return _REGISTRY[name]
    raise ValueError(f"unknown metric {name!r}; registered: {list_metrics()}, or 'package.module:function'")


def check_metric_name(name: str) -> None:
    get_metric(name)


def _load_plugins() -> None:
    """Metrics of layer 5 (``siss_fast.metrics``) register themselves on import, if that package is present."""
    try:
        importlib.import_module("siss_fast.metrics")
    except ImportError:
        pass


def build_metrics(names: List[str], ctx_base: MetricContext, options: Dict[str, Dict[str, Any]]
                  ) -> Dict[str, MetricFn]:
    out = {}
    for name in names:
        ctx = MetricContext(ctx_base.retain_images, ctx_base.forget_images, dict(options.get(name, {})),
                            ctx_base.kind, ctx_base.device, ctx_base.model, ctx_base.unet)
        out[name] = get_metric(name).factory(ctx)
    return out


def _rms_distances(samples: Tensor, reference: Tensor) -> Tensor:
    """``(N, M)`` RMS distances between flattened samples and references (fp64, chunk-free: sets are small)."""
    a = samples.reshape(samples.shape[0], -1).double()
    b = reference.reshape(reference.shape[0], -1).double()
    sq = (a.square().sum(1, keepdim=True) - 2 * a @ b.T + b.square().sum(1)[None]).clamp_min(0)
    return (sq / a.shape[1]).sqrt()


def forget_thresholds(forget: Tensor, retain: Tensor, threshold: Any = "auto") -> Tensor:
    """``(K,)`` RMS radius around each forget item inside which a sample counts as that item.

    ``"auto"``: half the item's RMS distance to its nearest retain image -- a sample that close is nearer the forget
    item than any retained image could be while still being ambiguous between them. (Measured on the demo: the
    T-shirt is 0.42 from its nearest digit, so 0.21; partly unlearned copies sit at 0.10-0.15 from it, which a fixed
    0.1 would already stop counting.) A number: the same radius for every item."""
    if threshold == "auto":
        return 0.5 * _rms_distances(forget, retain).min(dim=1).values
    return torch.full((forget.shape[0],), float(threshold), dtype=torch.float64)


@register_metric("forget_distance")
def _forget_distance(ctx: MetricContext) -> MetricFn:
    forget = ctx.forget_images
    radius = forget_thresholds(forget, ctx.retain_images, ctx.options.get("threshold", "auto"))

    def score(samples: Tensor) -> float:
        return float((_rms_distances(samples, forget) < radius[None]).any(dim=1).double().mean())

    return score


@register_metric("retain_distance")
def _retain_distance(ctx: MetricContext) -> MetricFn:
    retain = ctx.retain_images

    def score(samples: Tensor) -> float:
        return float(_rms_distances(samples, retain).min(dim=1).values.mean())

    return score


# ------------------------------------------------------------------------------------------------------ sampling


@torch.no_grad()
def sample_images(model: Any, unet: Any, *, num_samples: int, steps: int, seed: int, batch_size: int,
                  device: torch.device, autocast_dtype: Optional[torch.dtype], encoder_hidden_states: Optional[Tensor]
                  = None, uncond_hidden_states: Optional[Tensor] = None, guidance_scale: float = 1.0) -> Tensor:
    """``(N, C, H, W)`` fp32 images in ``[0, 1]`` (CPU) from a DDIM sampler with a fixed seed.

    The initial noise comes from a CPU generator seeded with ``seed``, so every validation (and every device)
    starts from the same noise. SD: latents are decoded by the VAE; ``encoder_hidden_states`` is ``(1, L, D)``.
    """
    from diffusers import DDIMScheduler

    # latent models: never clip the x0 estimate to [-1, 1] (it is a latent, not an image), whatever the config says
    scheduler = DDIMScheduler.from_config(model.scheduler.config, **({"clip_sample": False} if model.vae is not None
                                                                     else {}))
    scheduler.set_timesteps(steps)
    cfg = unet.config
    size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
    gen = torch.Generator().manual_seed(seed)
    out = []
    was_training = unet.training
    unet.eval()
    try:
        for start in range(0, num_samples, batch_size):
            n = min(batch_size, num_samples - start)
            x = torch.randn((n, cfg.in_channels, size, size), generator=gen).to(device)
            kwargs: Dict[str, Any] = {}
            guided = encoder_hidden_states is not None and guidance_scale != 1.0
            if encoder_hidden_states is not None:
                cond = encoder_hidden_states.expand(n, -1, -1)
                kwargs["encoder_hidden_states"] = (torch.cat([uncond_hidden_states.expand(n, -1, -1), cond])
                                                   if guided else cond)
            for t in scheduler.timesteps:
                inp = torch.cat([x, x]) if guided else x
                with torch.autocast(device.type, dtype=autocast_dtype or torch.float32,
                                    enabled=autocast_dtype is not None):
                    eps = unet(inp, t.to(device), **kwargs).sample.float()
                if guided:
                    eps_u, eps_c = eps.chunk(2)
                    eps = eps_u + guidance_scale * (eps_c - eps_u)
                x = scheduler.step(eps, t, x).prev_sample
            if model.vae is not None:
                vae = model.vae
                x = vae.decode((x / vae.config.scaling_factor).to(next(vae.parameters()).dtype)).sample.float()
            out.append(((x.float() + 1) / 2).clamp(0, 1).cpu())
    finally:
        unet.train(was_training)
    return torch.cat(out)


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
