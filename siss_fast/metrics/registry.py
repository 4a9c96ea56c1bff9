"""The metric registry: what the engine's validation, the reports and plug-ins share.

It sits below the engine (``siss_fast.engine`` imports it, never the reverse)::

    from siss_fast.metrics.registry import register_metric, MetricContext

    @register_metric("my_metric", higher_is_better=False)
    def my_metric(ctx: MetricContext):            # called once per run
        reference = ctx.forget_images              # (K, C, H, W) fp32 in [0, 1], on CPU
        def score(samples):                        # (N, C, H, W) fp32 in [0, 1], on CPU
            return float(...)
        return score

A config names metrics in ``validation.metrics``: registered names, or ``"package.module:function"`` for a factory
(the function is registered under that string; give ``higher_is_better`` as an attribute of the function if it
is). ``validation.metric_options[name]`` is passed as ``ctx.options``. The metrics of :mod:`siss_fast.metrics`
register themselves when that package is imported (:func:`get_metric` imports it on a miss).

A metric declares the ``torch.Generator`` seeds it draws from (``generator_seeds(options, n_forget) -> [int]``:
its ``metric_options`` as given in the config, and the number of forget items; ``[]`` for a metric that draws no
random numbers): the run's manifest records them (:func:`siss_fast.engine.run_record.validation_seeds`) and an
audit (``siss-fast verify``) draws only from seeds outside them. ``register_metric(..., generator_seeds=fn)``, or
an attribute ``generator_seeds`` of a ``"package.module:function"`` factory; :func:`metric_seeds` reads it (None:
not declared, the seeds are unknown).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from torch import Tensor

__all__ = ["MetricContext", "DEFAULT_TOLERANCE", "register_metric", "unregister_metric", "get_metric", "list_metrics",
           "check_metric_name", "build_metrics", "merge_options", "check_int", "metric_seeds", "no_seeds"]

MetricFn = Callable[[Tensor], float]
DEFAULT_TOLERANCE = 0.15  # quality guard tolerance of a metric registered without its own
MetricFactory = Callable[["MetricContext"], MetricFn]
SeedsFn = Callable[[Dict[str, Any], int], Sequence[int]]  # (metric_options, n_forget) -> generator seeds


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
    check_options: Optional[Callable[[Dict[str, Any]], None]] = None  # raises ValueError naming the bad option
    tolerance: Optional[float] = None  # the quality guard's default tolerance when this metric is the guard
    generator_seeds: Optional[SeedsFn] = None  # the Generator seeds it draws from; None: not declared


_REGISTRY: Dict[str, _Entry] = {}


def register_metric(name: str, *, higher_is_better: bool = False,
                    check_options: Optional[Callable[[Dict[str, Any]], None]] = None,
                    tolerance: Optional[float] = None, generator_seeds: Optional[SeedsFn] = None
                    ) -> Callable[[MetricFactory], MetricFactory]:
    """Decorator: register ``factory(ctx) -> fn(samples) -> float`` under ``name`` (re-registering replaces).
    ``check_options(options)`` lets the engine's config validation reject bad ``metric_options`` before any model
    loads (raise ``ValueError`` naming the option). ``tolerance``: the relative worsening this metric may show before
    the quality guard trips, when the config leaves ``validation.quality_tolerance`` null (default
    :data:`DEFAULT_TOLERANCE`) -- a property of the metric's own noise, hence registered with it.
    ``generator_seeds(options, n_forget) -> [int]``: the ``torch.Generator`` seeds the metric draws from (module doc;
    default: the factory's ``generator_seeds`` attribute, if any)."""

    def wrap(factory: MetricFactory) -> MetricFactory:
        seeds = generator_seeds if generator_seeds is not None else getattr(factory, "generator_seeds", None)
        _REGISTRY[name] = _Entry(factory, higher_is_better, check_options, tolerance, seeds)
        return factory

    return wrap


def merge_options(metric: str, options: Dict[str, Any], defaults: Dict[str, Any],
                  extra: Sequence[str] = ()) -> Dict[str, Any]:
    """``options`` over ``defaults``; ValueError ``validation.metric_options.METRIC.KEY: unknown option`` for a key
    in neither ``defaults`` nor ``extra``."""
    known = set(defaults) | set(extra)
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"validation.metric_options.{metric}.{unknown[0]}: unknown option; valid: {sorted(known)}")
    return {**defaults, **options}


def no_seeds(options: Dict[str, Any], n_forget: int) -> List[int]:
    """``generator_seeds`` of a metric that draws no random numbers."""
    return []


def metric_seeds(name: str, options: Dict[str, Any], n_forget: int) -> Optional[List[int]]:
    """The generator seeds metric ``name`` declares for ``options`` and ``n_forget`` forget items (sorted, distinct),
    or None when it declares none (or cannot be found: a plug-in that is not importable here)."""
    try:
        entry = get_metric(name)
    except ValueError:
        return None
    if entry.generator_seeds is None:
        return None
    return sorted({int(x) for x in entry.generator_seeds(dict(options or {}), int(n_forget))})


def check_int(metric: str, key: str, value: Any, low: int) -> int:
    """``value`` if it is an integer ``>= low`` (not a bool), else ValueError naming ``metric.key``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"validation.metric_options.{metric}.{key}: expected an integer >= {low}, got {value!r}")
    return value


def unregister_metric(name: str) -> None:
    """Remove ``name`` from the registry (KeyError when it is not registered)."""
    del _REGISTRY[name]


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
    """The metrics of ``siss_fast.metrics`` register themselves when the package is imported."""
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
