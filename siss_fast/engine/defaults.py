"""The model kind's defaults: what a config leaves null (or ``"auto"``) becomes once the model's kind is known.

Training (``train.batch_size``, ``train.lr``, ``train.ema_decay``) and validation (``every``, ``num_samples``, ``sampler_steps``,
``metrics``, ``forget_metric``, ``quality_metric``) differ between pixel DDPMs (``"ddpm"``) and latent text-to-image
models (``"sd"``); :func:`apply_kind_defaults` fills them in place. Config validation calls :func:`resolve_validation`
with the kind read from the model folder's JSON, so a metric name that cannot work fails before any weights load.

**ddpm** -- chosen on the planted-image experiments (``benchmarks/planted_trajectory.py``, the stop rules replayed by
``benchmarks/stop_calibration.py``, verified by ``benchmarks/planted.py run``; numbers in the README's "Stop signal"
section and ``benchmarks/results/``):

* ``lr`` 1e-4 (batch 64): at 2e-4 the digits classifier's quality fell 5-10 % within 10-50 steps on every planted
  experiment (and 7-10 % at 3e-4 within the first 10); at 1e-4 the forget rates fell to 0 within 200 steps on all
  of them, with quality within a few % of the base model's;
* ``ema_decay`` 0.97: the run validates and keeps the weights' moving average (:mod:`.ema`): the raw weights'
  quality swings by several % from step to step (demo: 95.5 / 102 / 94.2 % at steps 60 / 100 / 120), the average
  does not; 0.97 is the shortest lag that kept quality >= 97 % at the step the demo's forget rate reached 10 % of
  the base model's (the table in :mod:`.ema`);
* the forget signal is the targeted probe ``forget_probe`` (per item, ``t_frac: auto``): each forget item noised to
  the highest level from which the base model still brings it back in most probes, denoised, and counted;
* the guard is ``retain_fit`` (the retain set's denoising error at fixed ``(t, eps)``, t = T/5, 256 images;
  tolerance 3 %): deterministic, 256 forwards per check, and blind to the memorised copies that unlearning removes,
  which move every sample-based reading (at lr 1e-3 five10's feature-FD fell by 40 % while the classifier's score
  fell by 7 %). At lr 1e-4 it rose by at most 2.0 % over 200 steps on the planted experiments (quality >= 97 %); at
  lr 1e-3 it passed 3 % at the classifier's first check below 97 % or the next
  (``benchmarks/results/guard-fidelity-fit.json``);
* ``cluster_score`` (an Inception-style score over k-means clusters of the retain set's base-UNet features: it
  orders over-trained checks like the digits classifier better than the retain fit on seven of the eight planted
  experiments, ``benchmarks/results/guard-fidelity-rejudged.json``, but trips 1-10 checks late at 96 samples) and
  ``forget_nn`` read the ``num_samples`` samples of ``sampler_steps`` DDIM steps: reported, not rules
  (``feature_fd`` stays available). Weighing the two into one guard (``retain_fit / cluster_score ** w``,
  ``benchmarks/guard_composite.py``) was measured and not adopted: the README's "How far to trust the guard".

**sd** -- Stable Diffusion fine-tuning conventions (full-UNet lr 1e-5; batch 8 fits a 24 GB GPU in bf16 with
gradient checkpointing), not calibrated on a memorised SD model. A check generates ``num_samples`` images per distinct
forget prompt (each item is judged on its own prompt's generations, :func:`.validation.score_groups`) and costs
``P x num_samples x sampler_steps`` UNet forwards for ``P`` prompts (x2 with classifier-free guidance): 16 x 15 =
240 per prompt against ~240 forward-equivalents of training in 10 steps (batch 8 x ~3 for forward + backward). So
that a run with ``P`` deletion requests stays inside the bound of 2x, ``validation.every`` left null is ``10 x P``
(``validation.prompt`` set: one prompt, ``P = 1``).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

__all__ = ["KIND_DEFAULTS", "VALIDATION_DEFAULTS", "apply_kind_defaults", "resolve_validation"]

KIND_DEFAULTS = {"ddpm": {"batch_size": 64, "lr": 1e-4, "ema_decay": 0.97},
                 "sd": {"batch_size": 8, "lr": 1e-5, "ema_decay": 0.0}}

VALIDATION_DEFAULTS: Dict[str, Dict[str, Any]] = {
    "ddpm": {"every": 20, "num_samples": 96, "sampler_steps": 10,
             "metrics": ["forget_probe", "forget_nn", "cluster_score", "retain_fit"],
             "forget_metric": "forget_probe", "quality_metric": "retain_fit"},
    "sd": {"every": 10, "num_samples": 16, "sampler_steps": 15,
           "metrics": ["forget_nn", "retain_distance"],
           "forget_metric": "forget_nn", "quality_metric": "retain_distance"},
}


def resolve_validation(v: Any, kind: str, prompts: int = 1) -> Dict[str, Any]:
    """The validation settings of ``v`` (a :class:`~.config.ValidationConfig`) with its nulls and ``"auto"`` names replaced by ``kind``'s defaults:
    ``{"every", "num_samples", "sampler_steps", "metrics", "forget_metric", "quality_metric", "quality_tolerance"}``.
    With ``metrics`` null, a forget / quality metric named explicitly joins the default list; a null tolerance is the
    quality metric's registered one (:func:`siss_fast.metrics.registry.register_metric`). SD: ``every`` null is the
    default times ``prompts``, the number of distinct forget prompts a check generates for (module doc)."""
    d = VALIDATION_DEFAULTS[kind]
    out: Dict[str, Any] = {k: d[k] if getattr(v, k) is None else getattr(v, k)
                           for k in ("every", "num_samples", "sampler_steps")}
    if kind == "sd" and v.every is None and getattr(v, "prompt", None) is None:
        out["every"] = d["every"] * max(1, int(prompts))  # a check per prompt costs what 10 steps of training do
    names: Dict[str, Optional[str]] = {}
    for key in ("forget_metric", "quality_metric"):
        names[key] = d[key] if getattr(v, key) == "auto" else getattr(v, key)
    metrics: List[str] = list(d["metrics"]) if v.metrics is None else list(v.metrics)
    if v.metrics is None:
        metrics += [n for n in names.values() if n is not None and n not in metrics]
    tolerance = v.quality_tolerance
    if tolerance is None:
        from siss_fast.metrics.registry import DEFAULT_TOLERANCE, get_metric

        quality = names["quality_metric"]
        registered = get_metric(quality).tolerance if quality is not None else None
        tolerance = DEFAULT_TOLERANCE if registered is None else registered
    return {**out, "metrics": metrics, **names, "quality_tolerance": tolerance}


def apply_kind_defaults(cfg: Any, kind: str, prompts: int = 1) -> Any:
    """Fill ``cfg`` (an :class:`~.config.EngineConfig`, in place) for a model of ``kind``: ``train.batch_size`` / ``train.lr`` left null and
    ``train.ema_decay`` left ``auto`` from :data:`KIND_DEFAULTS`, the validation settings as :func:`resolve_validation`. Idempotent."""
    for key, value in KIND_DEFAULTS[kind].items():
        if getattr(cfg.train, key) in (None, "auto"):
            setattr(cfg.train, key, value)
    for key, value in resolve_validation(cfg.validation, kind, prompts).items():
        setattr(cfg.validation, key, value)
    return cfg
