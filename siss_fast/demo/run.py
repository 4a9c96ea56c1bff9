"""``siss-fast demo``: a real diffusion model forgets a planted image, offline, on a CPU, in a few minutes.

The paper's MNIST + T-shirt experiment rebuilt on data that ships offline (:mod:`siss_fast.demo.data`): the shipped
base DDPM (:mod:`siss_fast.demo.pretrain`) was trained on 1,797 digits + 75 copies of a T-shirt glyph and generates
the T-shirt in a few % of its samples. The demo

1. measures the base model (``before``): forget rate and classifier quality on ``num_samples`` DDIM samples from
   fixed seeds, the membership signal (denoising loss of the T-shirt vs retained digits at fixed (t, eps)), and the
   variational bound on the likelihood of the T-shirt (bits/dim);
2. unlearns the T-shirt with SISS (lambda = 0.5) through the engine with the engine's defaults for a pixel DDPM
   (:mod:`siss_fast.engine.defaults`: batch 64, lr 1e-4, a 0.97 moving average of the weights, ``scaling_norm:
   auto``; every 20 steps a check; stop when the targeted probe's return rate of every item has fallen to 0.1 x its
   value at step 0 at two checks in a row -- keeping that state -- or when the retain fit rises more than 3 % above
   it) until the budget (``max_steps``) ends;
3. measures again (``after``), and writes the run directory: ``report.md``, ``report.json``, ``grid_before.png``,
   ``grid_after.png``, ``metrics.jsonl``, ``manifest.json``.

``--compare`` runs every method of SPEC §5 with the same budget and seed and adds a table and ``pareto.png``.

Unlearning always goes through the engine (``siss_fast.engine``, :mod:`siss_fast.demo.engine_backend`); the run
record is written by :mod:`siss_fast.demo.record`, shared with the text-to-image demo.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

from siss_fast.methods import get_method, method_names

from .data import DemoData, demo_data, to_unit
from .report import rebuild_report
from .record import (audit_run, forget_items, method_lambd, method_record, read_engine_manifest, say,
                     software_versions, write_run_record)

__all__ = ["DemoConfig", "compare_methods", "measure", "run_demo", "run_compare"]


@dataclass
class DemoConfig:
    """Everything a demo run depends on (recorded in ``manifest.json``)."""

    out: str = "runs/demo"
    model: Optional[str] = None          # pretrain output folder (digits_ddpm/); default the shipped one
    method: str = "siss"
    lambd: Optional[float] = 0.5
    weight_clip: Optional[float] = None
    num_samples: int = 1000              # samples for the before/after metrics (fixed seeds)
    sampler_steps: int = 25              # DDIM steps
    seed: int = 0
    max_steps: int = 200                 # unlearning budget (optimizer steps)
    # None below: the engine's default (siss_fast.engine.config), so the demo shows what a first run gets
    batch_size: Optional[int] = None     # retain/forget pairs per step
    lr: Optional[float] = None
    scaling_norm: Any = "auto"
    max_grad_norm: Optional[float] = None
    val_every: Optional[int] = None
    val_samples: Optional[int] = None
    forget_target: Optional[float] = None       # absolute; None: forget_target_ratio x the rate at step 0
    forget_target_ratio: Optional[float] = None
    target_patience: Optional[int] = None       # checks in a row that must meet the target
    quality_tolerance: Optional[float] = None   # guard: stop when quality < (1 - tol) * quality at step 0
    min_steps: Optional[int] = None
    likelihood: bool = True              # bits/dim of the forget image and of 4 digits (4 x T forward passes)
    verify: bool = True                  # siss-fast verify on the finished run (fresh seeds, membership, relearning)
    verify_samples: int = 1000           # fresh samples per model for verify
    verify_relearn_steps: int = 100      # retain-only fine-tune steps of verify's relearning probe
    threads: Optional[int] = None


_ENGINE_DEFAULTS = {"batch_size": ("train", "batch_size"), "lr": ("train", "lr"),
                    "max_grad_norm": ("gradient", "max_grad_norm"), "val_every": ("validation", "every"),
                    "val_samples": ("validation", "num_samples"), "forget_target_ratio": ("validation",
                    "forget_target_ratio"), "quality_tolerance": ("validation", "quality_tolerance"),
                    "target_patience": ("validation", "target_patience"),
                    "min_steps": ("validation", "min_steps")}


def resolved(cfg: "DemoConfig") -> "DemoConfig":
    """``cfg`` with every ``None`` setting replaced by the engine's default (``forget_target`` stays ``None``:
    relative)."""
    from dataclasses import replace

    from siss_fast.engine.config import EngineConfig, apply_kind_defaults

    defaults = apply_kind_defaults(EngineConfig(), "ddpm")  # the demo's model is a pixel DDPM
    return replace(cfg, **{k: getattr(getattr(defaults, sec), key) for k, (sec, key) in _ENGINE_DEFAULTS.items()
                           if getattr(cfg, k) is None})


BPD_T_STRIDE = 4  # the bound's sum over t estimated on every 4th t (see bits_per_dim_vlb)



def compare_methods() -> List[Tuple[str, Dict[str, Any]]]:
    """What ``--compare`` runs, as ``(name, DemoConfig overrides)``: SISS at lambda 0.5 and at lambda 0 with weights
    clipped at 10, then every other registered method of :mod:`siss_fast.methods` (lambda 0.5 where it takes one)."""
    rows: List[Tuple[str, Dict[str, Any]]] = [("siss(0.5)", dict(method="siss", lambd=0.5)),
                                              ("siss(0)+clip", dict(method="siss", lambd=0.0, weight_clip=10.0))]
    rows += [(name, dict(method=name, lambd=method_lambd(name, 0.5))) for name in method_names() if name != "siss"]
    return rows


# ---------------------------------------------------------------------------------------------------- metrics


def measure(unet, alphas_cumprod, classifier, data: DemoData, *, num_samples: int, sampler_steps: int, seed: int,
            likelihood: bool = True) -> tuple:
    """All demo metrics of ``unet``. Returns ``(metrics dict, samples (N, 1, 16, 16) in [0, 1], forget mask)``."""
    from siss_fast.metrics import (bits_per_dim_vlb, ddim_sample, evaluate_samples, forget_mask,
                                   membership_signal)

    samples = to_unit(ddim_sample(unet, alphas_cumprod, num_samples, (1, 16, 16), steps=sampler_steps, seed=seed))
    forget01 = to_unit(data.forget_image)
    out = evaluate_samples(samples, forget01, classifier)
    probe = data.retain[torch.randperm(data.retain.shape[0], generator=torch.Generator().manual_seed(7))[:256]]
    out.update(membership_signal(unet, probe, data.forget_image.expand(64, -1, -1, -1), alphas_cumprod,
                                 seed=seed + 11))
    if likelihood:
        out["forget_bpd"] = bits_per_dim_vlb(unet, data.forget_image, alphas_cumprod, seed=seed + 13,
                                             t_stride=BPD_T_STRIDE)
        out["retain_bpd"] = sum(bits_per_dim_vlb(unet, probe[i], alphas_cumprod, seed=seed + 17 + i,
                                                 t_stride=BPD_T_STRIDE) for i in range(4)) / 4
    return out, samples, forget_mask(samples, forget01)


# ----------------------------------------------------------------------------------------------------- the run


def _pass_criteria(before: Dict, after: Dict) -> Dict[str, bool]:
    fb, fa = before["forget_rate"], after["forget_rate"]
    qb, qa = before["quality"], after["quality"]
    return {
        f"forget rate after ({fa:.4f}) <= 10 % of before ({fb:.4f})": fa <= 0.1 * fb,
        f"forget rate after ({fa:.4f}) <= 1 %": fa <= 0.01,
        f"quality after ({qa:.3f}) >= 90 % of before ({qb:.3f})": qa >= 0.9 * qb,
    }


def _open_run(cfg: DemoConfig) -> tuple:
    """What both demo modes start from: ``(start time, run folder (created), base model folder, unet,
    alphas_cumprod (T,) fp64, classifier, demo data)``; ``cfg.threads`` applied. A pretrain output folder holding
    ``digits_ddpm/`` stands for that subfolder."""
    from .models import SHIPPED_MODEL, load_base_model

    start = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    run_dir = Path(cfg.out)
    run_dir.mkdir(parents=True, exist_ok=True)
    model_dir = Path(cfg.model) if cfg.model else SHIPPED_MODEL
    if cfg.model and (model_dir / "digits_ddpm").is_dir():
        model_dir = model_dir / "digits_ddpm"
    unet, scheduler, classifier = load_base_model(model_dir)
    return start, run_dir, model_dir, unet, scheduler.alphas_cumprod.to(torch.float64), classifier, demo_data()


def run_demo(cfg: DemoConfig, argv: Optional[List[str]] = None) -> Dict[str, Any]:
    """Run the demo end to end and write the run directory ``cfg.out``. Returns the report dict."""
    from .engine_backend import unlearn_engine
    from .models import model_hash
    from .report import save_grid

    start, run_dir, model_dir, unet, abar, classifier, data = _open_run(cfg)
    base_hash = model_hash(model_dir)
    say(f"base model {model_dir} (sha256 {base_hash[:12]}), {data.retain.shape[0]} digits, forget set "
        f"{data.forget.shape[0]} copies of 1 image; torch threads {torch.get_num_threads()}", start)

    def measured(tag: str):
        """The demo's metrics of ``unet`` now, logged, and the grid of its first 100 samples (``grid_<tag>.png``)."""
        metrics, samples, mask = measure(unet, abar, classifier, data, num_samples=cfg.num_samples,
                                         sampler_steps=cfg.sampler_steps, seed=cfg.seed, likelihood=cfg.likelihood)
        say(f"{tag}: {_short(metrics)}", start)
        save_grid(samples[:100], run_dir / f"grid_{tag}.png", nrow=10, highlight=mask[:100])
        return metrics, samples, mask

    before, samples_b, mask_b = measured("before")

    t0 = time.perf_counter()
    info = unlearn_engine(unet, model_dir, data, cfg, run_dir=run_dir)  # the engine writes metrics.jsonl
    unlearn_wall = time.perf_counter() - t0
    say(f"unlearned (engine): {info['steps']} steps, stop rule {info['stop_reason']!r}, kept step "
        f"{info['final_step']}, {unlearn_wall:.1f} s", start)

    after, _, _ = measured("after")
    hits_b = samples_b[mask_b][:20]
    if hits_b.shape[0]:
        save_grid(hits_b, run_dir / "forget_samples_before.png", nrow=10)

    wall = time.perf_counter() - start
    method = method_record(cfg.method, cfg.lambd, weight_clip=cfg.weight_clip)
    command = "siss-fast demo " + " ".join(argv) if argv is not None else None
    report = {
        "title": f"{cfg.method} on the digits + planted T-shirt demo",
        "before": before, "after": after, "method": method,
        "steps": info["steps"], "final_step": info["final_step"], "stop_reason": info["stop_reason"],
        "wall_s": round(wall, 1), "unlearn_wall_s": round(unlearn_wall, 1), "backend": "engine",
        "base_model_sha256": base_hash,
        "pass_criteria": _pass_criteria(before, after),
        "grids": {"before": "grid_before.png", "after": "grid_after.png",
                  "T-shirt samples of the base model": "forget_samples_before.png"},
        "notes": [
            f"samples: {cfg.num_samples} DDIM({cfg.sampler_steps}) samples from fixed seeds (seed {cfg.seed}), the "
            "same noise before and after; grids show the first 100",
            "forget_bpd / retain_bpd are the DDPM variational bound (an upper bound on the NLL, one Monte-Carlo "
            "draw per t), not the probability-flow ODE likelihood of the paper",
        ],
    }
    if command:
        report["command"] = command
    manifest = read_engine_manifest(run_dir)
    if "metrics_before" in manifest:
        report["stop_signal"] = {
            "stop_reason": info["stop_reason"], "step": info["steps"], "kept_step": info["final_step"],
            "before": manifest["metrics_before"], "kept": manifest.get("metrics_after"),
            "differs": (f"The table above is the demo's own judge, not the stop rule's input: {cfg.num_samples} "
                        f"DDIM({cfg.sampler_steps}) samples (seed {cfg.seed}), forget_rate by the L2 threshold and "
                        "quality by the shipped digits classifier. The engine decided on its validation (seed "
                        f"{cfg.seed + 1}): the targeted probe (forget_probe: the T-shirt noised to an intermediate "
                        "level and denoised, share that comes back) and the retain fit (retain_fit: the digits' "
                        "denoising error at fixed noise, relative to the base model's), both without a classifier.")}
    write_run_record(
        run_dir, report, manifest, kind="siss-fast demo: data unlearning audit record",
        forget_items=forget_items(run_dir, run_dir / "data" / "forget",
                                  copies_in_training_set=int(data.forget.shape[0])),
        base_model={"path": str(model_dir), "sha256": base_hash}, method=method, config=asdict(resolved(cfg)),
        unlearning=dict(info), before=before, after=after, software=software_versions())
    if cfg.verify:
        report["verify"] = _verify(run_dir, cfg, start)
        (run_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        rebuild_report(run_dir)
    say(f"wrote {run_dir}/report.md ({time.perf_counter() - start:.1f} s total)", start)
    return report


def _verify(run_dir: Path, cfg: DemoConfig, start: float) -> Dict[str, Any]:
    """``siss-fast verify`` on the demo's finished run, with the shipped twin retrained without the T-shirt as the
    exact-unlearning control when the run used the shipped base model (:func:`~.record.audit_run`)."""
    from .models import SHIPPED_RETRAINED

    control = SHIPPED_RETRAINED if cfg.model is None and (SHIPPED_RETRAINED / "unet").is_dir() else None
    return audit_run(run_dir, start, samples=cfg.verify_samples, relearn_steps=cfg.verify_relearn_steps,
                     control=control)


def _short(m: Dict) -> str:
    keys = ("forget_rate", "quality", "class_entropy", "forget_loss", "retain_loss", "forget_bpd")
    return ", ".join(f"{k} {m[k]:.4f}" for k in keys if k in m)


def run_compare(cfg: DemoConfig, argv: Optional[List[str]] = None) -> Dict[str, Any]:
    """Every method of SPEC §5 with the same budget, seed, defaults and stop rules; writes ``compare.json``, a table
    in ``report.md``, ``pareto.png`` and one engine run directory per method under ``methods/``.

    ``neggrad`` has no retain gradient, so ``scaling_norm: auto`` (0.1 |G_x|) is undefined for it: it gets the
    ``c`` that SISS's auto rule measured (the same forget-gradient norm SISS applies), recorded in its row."""
    from .engine_backend import unlearn_engine
    from .models import model_hash
    from .report import save_pareto_plot

    start, run_dir, model_dir, unet0, abar, classifier, data = _open_run(cfg)
    before, _, _ = measure(unet0, abar, classifier, data, num_samples=cfg.num_samples,
                           sampler_steps=cfg.sampler_steps, seed=cfg.seed, likelihood=False)
    say(f"before: {_short(before)}", start)
    rows: List[Dict[str, Any]] = []
    siss_c: Optional[float] = None
    with (run_dir / "metrics.jsonl").open("w") as f:
        for name, kw in compare_methods():
            extra: Dict[str, Any] = {}
            if not get_method(kw["method"]).has_retain and cfg.scaling_norm == "auto":  # neggrad
                extra["scaling_norm"] = siss_c if siss_c is not None else 1.0
            c = DemoConfig(**{**asdict(cfg), **kw, **extra})
            unet = copy.deepcopy(unet0)
            t0 = time.perf_counter()
            method_dir = run_dir / "methods" / name.replace("(", "_").replace(")", "").replace("+", "_")
            info = unlearn_engine(unet, model_dir, data, c, run_dir=method_dir)
            manifest = json.loads((method_dir / "manifest.json").read_text())
            info["scaling_norm"] = manifest.get("scaling_norm")
            rules = manifest.get("config", {}).get("validation", {})
            info["check_metrics"] = [rules.get("forget_metric"), rules.get("quality_metric")]
            for line in (method_dir / "metrics.jsonl").read_text().splitlines():
                if line.strip():
                    record = json.loads(line)
                    f.write(json.dumps({"method": name, **record}) + "\n")
                    if "validation" in record:  # the check that ended the run (a tripped guard shows here)
                        info["last_check"] = record["validation"]
            if name == "siss(0.5)" and isinstance(info.get("scaling_norm"), (int, float)):
                siss_c = float(info["scaling_norm"])
            wall = time.perf_counter() - t0
            after, _, _ = measure(unet, abar, classifier, data, num_samples=cfg.num_samples,
                                  sampler_steps=cfg.sampler_steps, seed=cfg.seed, likelihood=False)
            say(f"{name}: {info['steps']} steps ({info['stop_reason']}, kept step {info['final_step']}), after: "
                f"{_short(after)}", start)
            rows.append({"name": name, **kw, **extra, "steps": info["steps"], "final_step": info["final_step"],
                         "stop_reason": info["stop_reason"], "last_check": info.get("last_check"),
                         "check_metrics": info["check_metrics"],
                         "wall_s": round(wall, 1), "after": after})
    plot = save_pareto_plot(rows, run_dir / "pareto.png", baseline=before)
    settings = resolved(cfg)
    report = {"title": "comparison of unlearning methods", "before": before, "after": {},
              "method": "compare", "steps": cfg.max_steps, "wall_s": round(time.perf_counter() - start, 1),
              "backend": "engine", "base_model_sha256": model_hash(model_dir), "compare": rows,
              "notes": [f"same budget ({cfg.max_steps} steps, batch {settings.batch_size}, lr {settings.lr}), seed "
                        f"{cfg.seed}, engine defaults and stop rules for every method; plot drawn with {plot}",
                        "siss(0)+clip: lambda = 0 (samples drawn around the retain images only) with importance "
                        "weights clipped at 10",
                        f"neggrad: scaling_norm = the c SISS's auto rule measured ({siss_c})",
                        "kept step: the weights each method ends with (the confirmed state that met the target; if "
                        "the quality guard tripped first, the last state within it -- 0 is the base model); last "
                        "check: the stop rules' own forget and quality readings (the engine's validation, named in "
                        "the column) at the step the run stopped"]}
    if argv is not None:
        report["command"] = "siss-fast demo " + " ".join(argv)
    (run_dir / "compare.json").write_text(json.dumps(rows, indent=2) + "\n")
    (run_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    rebuild_report(run_dir)
    say(f"wrote {run_dir}/report.md", start)
    return report
