"""``verify_run(RUN_DIR, ...)``: audit a finished pixel-DDPM run on fresh seeds; the library call behind
``siss-fast verify``.

Order: :func:`~.integrity.open_run` (manifest, hashes of ``final/``, base model, forget items) -> fresh seed
(:mod:`.seeds`) -> ``N`` fresh samples from the base and the final model, per-item forget rates with
Clopper-Pearson 95 % intervals, quality (:class:`~.measure.Quality`) -> membership percentiles
(:func:`~.measure.per_image_loss`) -> relearning probe on the final model and, as the control, on the base model
(:mod:`.relearn`) -> checks against the thresholds -> ``verify.json``, ``verify.md``, one PNG per item
(:mod:`.report`) -> their sha256 appended to ``manifest.json`` under ``verify``.

Checks (each ``None`` = off): ``max_forget_rate``: every item's fresh-seed rate under the final model (point
estimate) <= it; ``max_relearn_rate``: every item's highest rate along the final model's relearning curve <= it.
An item "comes back" when its rate on that curve reaches half its base-model rate (reported, not a check). Each
point of the relearning curves counts ``relearn_samples`` (default :data:`RELEARN_SAMPLES`, 250) fresh samples --
the first ones of the re-measurement, same seeds -- to keep the probe's cost near that of the re-measurement.

The run's ``final/`` is re-hashed at the end and must be unchanged (it is only ever read).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from . import measure, relearn, report, seeds
from .integrity import RunUnderAudit, VerifyError, check_final, open_run

__all__ = ["VerifyResult", "verify_run", "RELEARN_SAMPLES"]

RELEARN_SAMPLES = 250  # fresh samples per point of the relearning curves (the first 250 of the --samples ones)


@dataclass
class VerifyResult:
    out_dir: Path
    passed: bool
    failures: List[str] = field(default_factory=list)
    report: Dict[str, Any] = field(default_factory=dict)


def _folder_hash(path: Any) -> str:
    from ..engine.models import hash_model_folder

    return hash_model_folder(Path(path))


def _load_control(path: Any, final: Any, device: torch.device) -> Any:
    """The control model folder, checked to be a pixel DDPM of the final model's sample shape."""
    from ..engine.models import load_model

    if not Path(path).is_dir():
        raise VerifyError(f"--control {str(path)!r}: not a model folder")
    m = load_model(str(path))
    if m.kind != "ddpm" or m.unet.config.sample_size != final.unet.config.sample_size or \
            m.image_channels != final.image_channels:
        raise VerifyError(f"--control {str(path)!r}: expected a pixel DDPM with the run's image shape")
    m.unet.to(device).eval().requires_grad_(False)
    return m


def _load(run: RunUnderAudit, device: torch.device):
    from ..engine import data as engine_data
    from ..engine.models import load_model

    allow = bool((run.config.get("model") or {}).get("allow_pickle", False))
    base, final = load_model(str(run.base_dir), allow_pickle=allow), load_model(str(run.final_dir))
    if base.kind != "ddpm" or final.kind != "ddpm":
        raise VerifyError(f"{str(run.run_dir)!r} is a Stable Diffusion run: verify supports pixel-DDPM runs only "
                          "for now")
    for m in (base, final):
        m.unet.to(device).eval().requires_grad_(False)
    ch = base.image_channels
    retain = (engine_data.load_images(run.retain_files, ch) + 1) / 2
    forget = (engine_data.load_images(run.forget_files, ch) + 1) / 2
    return base, final, retain, forget


def verify_run(run_dir: Any, *, samples: int = 1000, relearn_steps: int = 100, relearn_every: int = 25,
               relearn_samples: Optional[int] = None, seed: Optional[int] = None, out: Any = None,
               sampler_steps: Optional[int] = None, batch_size: int = 250, relearn_lr: Optional[float] = None,
               relearn_batch: int = 64, max_forget_rate: Optional[float] = None,
               max_relearn_rate: Optional[float] = None, device: str = "auto", plots: bool = True,
               control: Any = None, log: Any = print) -> VerifyResult:
    """Audit the finished run in ``run_dir`` (module doc). Raises :class:`VerifyError` when it cannot be audited;
    returns the result (``passed`` False when a threshold check failed). ``control``: a model folder that never saw
    the forget items (retrained from scratch without them: exact unlearning); its relearning curve is drawn and
    reported beside the final model's and the base model's (``relearn["control"]``)."""
    from ..engine.defaults import KIND_DEFAULTS
    from ..metrics.forget_signal import item_radii

    started, timings = time.perf_counter(), {}
    if samples < 2 or relearn_steps < 0 or relearn_every < 1 or batch_size < 1 or relearn_batch < 1:
        raise ValueError("verify: expected samples >= 2, relearn_steps >= 0, relearn_every >= 1, batch sizes >= 1")
    run = open_run(run_dir)
    run_dir = run.run_dir
    out_dir = Path(out) if out is not None else run_dir / "verify"
    if out_dir.resolve() == run.final_dir.resolve() or run.final_dir.resolve() in out_dir.resolve().parents:
        raise VerifyError(f"--out {str(out_dir)!r} is inside the final model {str(run.final_dir)!r}: verify never "
                          "writes there")
    final_hashes = check_final(run_dir, run.manifest)
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    base, final, retain, forget = _load(run, dev)
    val = run.config.get("validation") or {}
    steps = int(sampler_steps or val.get("sampler_steps") or 10)
    used = seeds.run_seeds(run.manifest)
    s = seeds.choose_seed(used["generator_seeds"], max(samples, relearn_samples or 0), batch_size, seed)
    own = seeds.verify_seeds(s, max(samples, relearn_samples or 0), batch_size)
    timings["open_s"] = time.perf_counter() - started
    log(f"[verify] {run_dir}: final model matches the manifest ({len(final_hashes)} files); fresh seed {s}")

    radii = item_radii(forget, retain)
    abar = base.scheduler.alphas_cumprod
    t0 = time.perf_counter()
    drawn = {name: measure.draw_samples(m, m.unet, samples, steps=steps, seed=s, batch_size=batch_size, device=dev)
             for name, m in (("base", base), ("final", final))}
    counts = {name: measure.item_counts(x, forget, retain, radii) for name, x in drawn.items()}
    rates = {name: measure.rate_rows(c, samples) for name, c in counts.items()}
    timings["samples_s"] = time.perf_counter() - t0
    log("[verify] fresh-seed forget rates (base -> final): "
        + ", ".join(f"{b['rate']:.4f} -> {f['rate']:.4f}" for b, f in zip(rates["base"], rates["final"])))

    t0 = time.perf_counter()
    fit_opts = (val.get("metric_options") or {}).get("retain_fit") or {}
    q = measure.Quality(base, retain, forget, fit_seed=own["retain_fit"][0], fd_seed=own["feature_fd"][0],
                        fit_options=fit_opts, device=dev)
    fit = {name: q.fit(m.unet) for name, m in (("base", base), ("final", final))}
    fd = {name: float(q.fd(x)) for name, x in drawn.items()}
    quality = {"retain_fit": fit, "retain_fit_ratio": fit["final"] / fit["base"] if fit["base"] > 0 else None,
               "retain_fit_images": q.fit_images, "feature_fd": fd, "samples": samples}
    timings["quality_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    m_seed = own["membership"][0]
    f_loss = {n: measure.per_image_loss(m.unet, forget, abar, seed=m_seed, device=dev)
              for n, m in (("base", base), ("final", final))}
    r_loss = {n: measure.per_image_loss(m.unet, retain, abar, seed=m_seed, device=dev)
              for n, m in (("base", base), ("final", final))}
    membership = {"reference": "retain", "reference_images": retain.shape[0],
                  "note": "The run's config names no held-out set: percentiles are within the retain images only",
                  "items": measure.membership_rows(f_loss, r_loss)}
    timings["membership_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    n_re = min(relearn_samples or RELEARN_SAMPLES, samples)
    train = run.config.get("train") or {}
    lr = float(relearn_lr or KIND_DEFAULTS["ddpm"]["lr"])

    def probe(unet: Any) -> Dict[str, Any]:
        x = measure.draw_samples(base, unet, n_re, steps=steps, seed=s, batch_size=batch_size, device=dev)
        c = measure.item_counts(x, forget, retain, radii)
        return {"counts": c, "rates": [v / n_re for v in c]}

    models = [("final", final), ("base", base)]
    if control is not None:
        models.append(("control", _load_control(control, final, dev)))
    curves = {name: relearn.relearn_curve(m.unet, abar, retain, probe, steps=relearn_steps, every=relearn_every,
                                          lr=lr, batch_size=relearn_batch, seed=own["relearn"][0],
                                          betas=tuple(train.get("betas") or (0.9, 0.999)),
                                          adam_eps=float(train.get("eps") or 1e-8),
                                          weight_decay=float(train.get("weight_decay") or 0.0), device=dev)
              for name, m in models}
    items = []
    for k, f in enumerate(run.forget_files):
        level = 0.5 * rates["base"][k]["rate"]
        peak = max(p["rates"][k] for p in curves["final"])
        items.append({"item": k, "file": f.name, "base": rates["base"][k], "final": rates["final"][k],
                      "relearn_peak_rate": peak, "relearn_end_rate": curves["final"][-1]["rates"][k],
                      "returned_at_step": relearn.returned_at(curves["final"], k, level),
                      "base_control_returned_at_step": relearn.returned_at(curves["base"], k, level),
                      **({"control_peak_rate": max(p["rates"][k] for p in curves["control"]),
                          "control_returned_at_step": relearn.returned_at(curves["control"], k, level)}
                         if "control" in curves else {}),
                      "return_level": level})
    timings["relearn_s"] = time.perf_counter() - t0

    failures = []
    for it in items:
        if max_forget_rate is not None and it["final"]["rate"] > max_forget_rate:
            failures.append(f"item {it['item']} ({it['file']}): fresh-seed forget rate {it['final']['rate']:.4f} > "
                            f"--max-forget-rate {max_forget_rate}")
        if max_relearn_rate is not None and it["relearn_peak_rate"] > max_relearn_rate:
            failures.append(f"item {it['item']} ({it['file']}): rate {it['relearn_peak_rate']:.4f} within "
                            f"{relearn_steps} relearning steps > --max-relearn-rate {max_relearn_rate}")
    if check_final(run_dir, run.manifest) != final_hashes:  # read-only: the same bytes as before the audit
        raise VerifyError(f"{str(run.final_dir)!r} changed while it was being audited")
    timings["total_s"] = time.perf_counter() - started
    data = {
        "run_dir": str(run_dir), "final_model_sha256": run.manifest["final_model"]["sha256"],
        "final_files_checked": len(final_hashes), "stop": run.manifest.get("stop"),
        "seeds": {"verify_seed": s, "verify_generator_seeds": own, "run_validation_seeds": used},
        "settings": {"samples": samples, "sampler_steps": steps, "batch_size": batch_size,
                     "relearn_steps": relearn_steps, "relearn_every": relearn_every, "relearn_samples": n_re,
                     "relearn_lr": lr, "relearn_batch": relearn_batch, "device": str(dev),
                     "max_forget_rate": max_forget_rate, "max_relearn_rate": max_relearn_rate},
        "items": items, "quality": quality, "membership": membership,
        "relearn": {"final": curves["final"], "base_control": curves["base"],
                    **({"control": curves["control"], "control_model": {
                        "path": str(control), "sha256": _folder_hash(control)}} if control else {})},
        "checks": {"passed": not failures, "failures": failures}, "timings_s": timings,
    }
    pictures = {"base": drawn["base"], "final": drawn["final"], "forget": forget}
    report.write(run_dir, out_dir, data, pictures, plots=plots)
    log(f"[verify] {'PASSED' if not failures else 'FAILED: ' + '; '.join(failures)}; report in {out_dir}")
    return VerifyResult(out_dir, not failures, failures, data)
