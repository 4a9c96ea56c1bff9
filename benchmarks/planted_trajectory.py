"""Trajectories of the planted experiments: every candidate stop signal and the judge at every check (issue 12).

    python benchmarks/planted_trajectory.py EXP --out DIR --lr LR [--budget 150] [--every 10] [--judge 400]
                                            [--metrics NAME ...] [KEY=VALUE ...]

One engine run with the stop rules switched off (``stop_on_target`` / ``stop_on_guard`` false), the experiment's base
model and data folders, ``train.lr = LR`` and defaults otherwise. At every check the validator draws ``--judge``
DDIM-25 samples (seed 0) and records, side by side on the same model state:

* the judge (``benchmarks/planted_eval.py``): ``judge_forget`` (nearest-neighbour forget rate, per item as
  ``judge_forget[k]``) and ``judge_quality`` (the digits classifier's score of the samples not assigned to an item);
  ``judge2_quality``: the same on an independent draw (seed 1), the judge's own noise;
* the candidate forget signals: ``forget_probe`` (targeted probe, its defaults: ``t_frac`` 0.5), ``probe60`` ...
  ``probe90`` (the same at ``t_frac`` 0.6 ... 0.9), ``forget_nn`` on the first 128 of the samples;
* the candidate guards: ``feature_fd`` on all samples, on the first 128 (``fd128``), and on 128 samples of its own
  drawn with 10 DDIM steps (``fd128_s10``), and on samples of its own drawn as the engine's default validation draws
  them (``fd_default``: ``VALIDATION_DEFAULTS["ddpm"]`` num_samples x sampler_steps); ``cluster_score``
  (:mod:`siss_fast.metrics.cluster_score`) on such samples (``cluster_default``) and on 512 (``cluster512``);
  ``retain_fit`` (the retain set's denoising error at fixed inputs, :mod:`siss_fast.metrics.retain_fit`); ``fit05`` ... ``fit95`` (the same at
  the single ``t_fracs`` of :data:`FIT_LEVELS`) and ``fit_grid`` (averaged over ``t_fracs`` 0.1, 0.2, ..., 0.9, the
  diffusion training loss on retain data at fixed inputs).

Writes ``DIR/EXP/lr-LR/trajectory.json``: ``{"experiment", "lr", "checks": [{"step", <metric>: value, ...}],
"wall_s"}``. Stop rules are then simulated offline on these records (``benchmarks/stop_calibration.py``).
The seeds here (0) differ from the final judge's (1000003): choosing rules on these readings and verifying them
with ``planted.py run`` keeps the verification on seeds the choice never saw.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Dict, Optional, Sequence

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

__all__ = ["register_calibration_metrics", "trajectory", "main", "PROBE_LEVELS", "FIT_LEVELS", "FIT_GRID"]

PROBE_LEVELS = (60, 70, 80, 90)  # probe{pct}: forget_probe at t_frac = pct / 100
FIT_LEVELS = (5, 10, 20, 35, 50, 65, 80, 95)  # fit{pct:02d}: retain_fit at t_fracs [pct / 100]
FIT_GRID = [k / 10 for k in range(1, 10)]  # fit_grid: retain_fit averaged over t_fracs 0.1, 0.2, ..., 0.9
METRICS = ["judge_forget", "judge_quality", "judge2_quality", "forget_probe", *[f"probe{p}" for p in PROBE_LEVELS],
           "forget_nn128", "feature_fd", "fd128", "fd128_s10", "fd_default", "cluster_default", "cluster512",
           "retain_fit",
           *[f"fit{p:02d}" for p in FIT_LEVELS], "fit_grid"]


def register_calibration_metrics(exp: str) -> None:
    """Register ``judge_forget``, ``judge_quality``, ``judge2_quality``, ``probe60`` ..., ``fd128``, ``fd128_s10``,
    ``fd_default``, ``forget_nn128``, ``fit05`` ... ``fit95`` and ``fit_grid`` for ``exp``."""
    from siss_fast.metrics.engine_metrics import load_classifier
    from siss_fast.metrics.registry import MetricContext, get_metric, register_metric
    from siss_fast.metrics.sampling import ddim_sample

    from planted_data import EXPERIMENTS
    from planted_eval import evaluate_samples_nn

    names = list(EXPERIMENTS[exp].items)
    cache: Dict[str, object] = {}

    def judged(ctx: MetricContext, samples: torch.Tensor) -> Dict:
        # Keyed by the tensor itself, held here: an id() key can be reused by the next check's samples once this
        # check's tensor is freed, which returned a previous check's judgement (trajectories before this fix).
        if cache.get("samples") is not samples:
            cache["samples"] = samples
            cache["result"] = evaluate_samples_nn(samples, ctx.retain_images, ctx.forget_images, load_classifier(),
                                                  names)
        return cache["result"]

    @register_metric("judge_forget", higher_is_better=False)
    def _judge_forget(ctx: MetricContext):
        def per_item(samples):
            per = judged(ctx, samples)["per_item"]
            return [per[n]["rate"] for n in names]

        def score(samples):
            return judged(ctx, samples)["forget_rate"]

        score.per_item, score.aggregate = per_item, sum
        return score

    @register_metric("judge_quality", higher_is_better=True)
    def _judge_quality(ctx: MetricContext):
        return lambda samples: judged(ctx, samples)["quality"]["quality"]

    @register_metric("judge2_quality", higher_is_better=True)
    def _judge2_quality(ctx: MetricContext):
        """The judge's quality on an independent draw (seed 1, as many samples as the judge's): the judge's own
        noise, i.e. how well any guard could order the checks."""
        abar, shape = ctx.model.scheduler.alphas_cumprod, tuple(ctx.retain_images.shape[1:])

        def score(samples, unet=None):
            own = ((ddim_sample(unet, abar, samples.shape[0], shape, steps=25, seed=1, batch_size=128) + 1) / 2)
            return evaluate_samples_nn(own.clamp(0, 1), ctx.retain_images, ctx.forget_images, load_classifier(),
                                       names)["quality"]["quality"]

        score.uses_unet = True
        return score

    def first(name: str, n: int):
        def factory(ctx: MetricContext):
            fn = get_metric(name).factory(ctx)
            return lambda samples: fn(samples[:n])
        return factory

    def probe_at(t_frac: float):
        def factory(ctx: MetricContext):
            return get_metric("forget_probe").factory(MetricContext(
                ctx.retain_images, ctx.forget_images, {"t_frac": t_frac}, ctx.kind, ctx.device, ctx.model, ctx.unet))
        return factory

    for pct in PROBE_LEVELS:
        register_metric(f"probe{pct}", higher_is_better=False)(probe_at(pct / 100))

    def fit_at(t_fracs: Sequence[float]):
        """``retain_fit`` (the registered metric, :class:`~siss_fast.metrics.retain_fit.RetainFit`) with its other
        options at their defaults and ``t_fracs`` set: the guard read at other noise levels (issue 12)."""
        def factory(ctx: MetricContext):
            return get_metric("retain_fit").factory(MetricContext(
                ctx.retain_images, ctx.forget_images, {"t_fracs": list(t_fracs)}, ctx.kind, ctx.device, ctx.model,
                ctx.unet))
        return factory

    from siss_fast.metrics.retain_fit import FIT_TOLERANCE

    for pct in FIT_LEVELS:
        register_metric(f"fit{pct:02d}", higher_is_better=False, tolerance=FIT_TOLERANCE,
                        generator_seeds=lambda opts, n_forget: [0])(fit_at([pct / 100]))
    register_metric("fit_grid", higher_is_better=False, tolerance=FIT_TOLERANCE,
                    generator_seeds=lambda opts, n_forget: [0])(fit_at(FIT_GRID))
    register_metric("fd128", higher_is_better=False)(first("feature_fd", 128))
    register_metric("forget_nn128", higher_is_better=False)(first("forget_nn", 128))

    def own_samples_fd(n: int, steps: int, metric: str = "feature_fd"):
        def factory(ctx: MetricContext):
            fn = get_metric(metric).factory(ctx)
            abar, shape = ctx.model.scheduler.alphas_cumprod, tuple(ctx.retain_images.shape[1:])

            def score(samples, unet=None):
                own = ddim_sample(unet, abar, n, shape, steps=steps, seed=0, batch_size=128)
                return fn(((own + 1) / 2).clamp(0, 1))

            score.uses_unet = True
            return score
        return factory

    from siss_fast.engine.defaults import VALIDATION_DEFAULTS

    register_metric("fd128_s10", higher_is_better=False)(own_samples_fd(128, 10))
    d = VALIDATION_DEFAULTS["ddpm"]
    register_metric("fd_default", higher_is_better=False)(own_samples_fd(d["num_samples"], d["sampler_steps"]))
    register_metric("cluster_default", higher_is_better=True)(
        own_samples_fd(d["num_samples"], d["sampler_steps"], "cluster_score"))
    register_metric("cluster512", higher_is_better=True)(own_samples_fd(512, d["sampler_steps"], "cluster_score"))


def trajectory(exp: str, out: Path, lr: float, budget: int = 150, every: int = 10, judge: int = 400,
               overrides: Sequence[str] = (), metrics: Optional[Sequence[str]] = None) -> Dict:
    """Run ``exp`` at ``lr`` with the stop rules off; return and write the per-check readings (module doc).
    ``metrics``: a subset of :data:`METRICS` to record (default: all; ``judge_forget`` and ``judge_quality`` are
    always recorded)."""
    import siss_fast.metrics  # noqa: F401
    from siss_fast.engine import load_config
    from siss_fast.engine.loop import run

    from planted import model_dir
    from planted_data import write_experiment_folders

    register_calibration_metrics(exp)
    root = Path(out) / exp
    folders = write_experiment_folders(exp, root)
    run_dir = root / f"lr-{lr:g}" / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    unknown = sorted(set(metrics or ()) - set(METRICS))
    if unknown:
        raise SystemExit(f"--metrics: unknown {unknown}; valid: {METRICS}")
    metrics = ["judge_forget", "judge_quality", *[m for m in (metrics or METRICS) if not m.startswith("judge_")]]
    cfg = load_config({"model": {"path": str(model_dir(exp, out))},
                       "data": {"retain_dir": str(folders["retain"]), "forget_dir": str(folders["forget"])},
                       "train": {"steps": budget, "cpu_threads": 1, "device": "cpu", "lr": lr},
                       "validation": {"every": every, "num_samples": judge, "sampler_steps": 25, "seed": 0,
                                      "metrics": metrics, "forget_metric": "judge_forget",
                                      "quality_metric": "judge_quality", "stop_on_target": False,
                                      "stop_on_guard": False, "grids": False},
                       "log": {"progress": False}, "output_dir": str(run_dir)}, list(overrides))
    t0 = time.perf_counter()
    run(cfg)
    checks = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "validation" in rec:
            checks.append({"step": rec["step"], "validation_s": rec.get("validation_s"), **rec["validation"]})
    result = {"experiment": exp, "lr": lr, "budget": budget, "every": every, "judge_samples": judge,
              "overrides": list(overrides), "checks": checks, "wall_s": round(time.perf_counter() - t0, 1)}
    dest = run_dir.parent / "trajectory.json"
    dest.write_text(json.dumps(result, indent=1) + "\n")
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    return result


def main(argv: Optional[Sequence[str]] = None) -> int:
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("exp")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--lr", required=True, type=float)
    p.add_argument("--budget", type=int, default=150)
    p.add_argument("--every", type=int, default=10)
    p.add_argument("--judge", type=int, default=400)
    p.add_argument("--metrics", nargs="+", help=f"record only these (default: all of {METRICS})")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args(argv)
    res = trajectory(a.exp, a.out, a.lr, a.budget, a.every, a.judge, a.overrides, a.metrics)
    for c in res["checks"]:
        print(c["step"], {k: round(v, 4) for k, v in c.items() if isinstance(v, float) and "[" not in k})
    return 0


if __name__ == "__main__":
    sys.exit(main())
