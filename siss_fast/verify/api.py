"""``verify_run(RUN_DIR, ...)``: audit a finished run (pixel DDPM or Stable Diffusion) on fresh seeds; the library
call behind ``siss-fast verify``.

Order: :func:`~.integrity.open_run` (manifest, hashes of ``final/``, base model, forget items) -> fresh seed
(:mod:`.seeds`) -> ``N`` fresh samples from the base and the final model (a Stable Diffusion run: ``N`` per distinct
forget prompt, each item counted among its own prompt's samples by the run's forget rule, :mod:`.sd`), per-item
forget rates with Clopper-Pearson 95 % intervals, quality (:class:`~.measure.Quality`) -> membership percentiles
(:func:`~.measure.per_image_loss`) -> relearning probe on the final model and, as the control, on the base model
(:mod:`.relearn`) -> prompt perturbation probe (Stable Diffusion only, :mod:`.perturb`) -> checks against the
thresholds -> ``verify.json``, ``verify.md``, one PNG per item (:mod:`.report`) -> their sha256 appended to
``manifest.json`` under ``verify``.

Checks (each ``None`` = off): ``max_forget_rate``: every item's fresh-seed rate under the final model (point
estimate) <= it; ``max_relearn_rate``: every item's highest rate along the final model's relearning curve <= it;
``max_perturbed_rate``: every perturbed prompt's rate under the final model <= it (Stable Diffusion runs; ignored,
and said so, on a pixel run). An item "comes back" when its rate on the relearning curve reaches half its
base-model rate (reported, not a check).

Sample counts default by the model's kind (:data:`SAMPLE_DEFAULTS`): pixel DDPM 1000 fresh samples and 250 per
point of the relearning curves (the first ones of the re-measurement, same seeds); Stable Diffusion 128 per forget
prompt, 32 per relearning point and 16 per perturbed prompt (a guided SD sample costs two UNet forwards per step:
the text-to-image demo's run is audited in about 2-3 minutes on a CPU). The relearning fine-tune uses the engine's
defaults for the kind (:data:`siss_fast.engine.defaults.KIND_DEFAULTS`: lr and batch size).

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

__all__ = ["VerifyResult", "verify_run", "RELEARN_SAMPLES", "SAMPLE_DEFAULTS"]

RELEARN_SAMPLES = 250  # fresh samples per point of the relearning curves (the first 250 of the --samples ones)
SAMPLE_DEFAULTS = {"ddpm": {"samples": 1000, "relearn_samples": RELEARN_SAMPLES, "perturb_samples": 0},
                   "sd": {"samples": 128, "relearn_samples": 32, "perturb_samples": 16}}


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
    """The control model folder, checked to be a model of the final model's kind and UNet input shape."""
    from ..engine.models import load_model

    if not Path(path).is_dir():
        raise VerifyError(f"--control {str(path)!r}: not a model folder")
    m = load_model(str(path))
    keys = ("sample_size", "in_channels", "cross_attention_dim")
    if m.kind != final.kind or any(m.unet.config.get(k) != final.unet.config.get(k) for k in keys):
        raise VerifyError(f"--control {str(path)!r}: expected a {final.kind} model with the run's UNet input shape "
                          f"({', '.join(f'{k} {final.unet.config.get(k)}' for k in keys)})")
    m.unet.to(device).eval().requires_grad_(False)
    return m


def _load(run: RunUnderAudit, device: torch.device):
    from ..engine import data as engine_data
    from ..engine.models import load_model

    allow = bool((run.config.get("model") or {}).get("allow_pickle", False))
    base, final = load_model(str(run.base_dir), allow_pickle=allow), load_model(str(run.final_dir))
    if base.kind != final.kind:
        raise VerifyError(f"{str(run.final_dir)!r} is a {final.kind} model, its base {str(run.base_dir)!r} a "
                          f"{base.kind} model")
    for m in (base, final):
        for part in (m.unet, m.vae, m.text_encoder):
            if part is not None:
                part.to(device).eval().requires_grad_(False)
    ch = base.image_channels
    retain = (engine_data.load_images(run.retain_files, ch) + 1) / 2
    forget = (engine_data.load_images(run.forget_files, ch) + 1) / 2
    return base, final, retain, forget


def _resolve(kind: str, value: Optional[int], key: str) -> int:
    return int(SAMPLE_DEFAULTS[kind][key] if value is None else value)


def verify_run(run_dir: Any, *, samples: Optional[int] = None, relearn_steps: int = 100, relearn_every: int = 25,
               relearn_samples: Optional[int] = None, seed: Optional[int] = None, out: Any = None,
               sampler_steps: Optional[int] = None, batch_size: int = 250, relearn_lr: Optional[float] = None,
               relearn_batch: Optional[int] = None, max_forget_rate: Optional[float] = None,
               max_relearn_rate: Optional[float] = None, device: str = "auto", plots: bool = True,
               control: Any = None, log: Any = print, perturb_samples: Optional[int] = None,
               max_perturbed_rate: Optional[float] = None) -> VerifyResult:
    """Audit the finished run in ``run_dir`` (module doc). Raises :class:`VerifyError` when it cannot be audited;
    returns the result (``passed`` False when a threshold check failed). ``control``: a model folder that never saw
    the forget items (retrained from scratch without them: exact unlearning); its relearning curve is drawn and
    reported beside the final model's and the base model's (``relearn["control"]``). ``samples``,
    ``relearn_samples``, ``perturb_samples`` (Stable Diffusion: samples per perturbed prompt, at most ``samples``;
    0 turns the probe off), ``relearn_batch``, ``relearn_lr``: None = the kind's default (module doc)."""
    from ..engine.defaults import KIND_DEFAULTS
    from .measure import PixelSubject
    from .perturb import perturbation_rows
    from .sd import SDSubject

    started, timings = time.perf_counter(), {}
    if (samples is not None and samples < 2) or relearn_steps < 0 or relearn_every < 1 or batch_size < 1 or \
            (relearn_batch is not None and relearn_batch < 1) or (perturb_samples is not None and perturb_samples < 0):
        raise ValueError("verify: expected samples >= 2, relearn_steps >= 0, relearn_every >= 1, batch sizes >= 1, "
                         "perturb_samples >= 0")
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
    kind = base.kind
    samples = _resolve(kind, samples, "samples")
    n_re = min(_resolve(kind, relearn_samples, "relearn_samples"), samples)
    n_p = min(_resolve(kind, perturb_samples, "perturb_samples"), samples) if kind == "sd" else 0
    val = run.config.get("validation") or {}
    steps = int(sampler_steps or val.get("sampler_steps") or 10)
    used = seeds.run_seeds(run.manifest)
    s = seeds.choose_seed(used["generator_seeds"], samples, batch_size, seed)
    own = seeds.verify_seeds(s, samples, batch_size)
    subject = (SDSubject(run, base, retain, forget, steps=steps, batch_size=batch_size, device=dev) if kind == "sd"
               else PixelSubject(base, retain, forget, steps=steps, batch_size=batch_size, device=dev))
    timings["open_s"] = time.perf_counter() - started
    log(f"[verify] {run_dir}: final model matches the manifest ({len(final_hashes)} files); {kind} run; fresh seed {s}")

    t0 = time.perf_counter()
    drawn = {name: subject.draw(m.unet, samples, s) for name, m in (("base", base), ("final", final))}
    counts = {name: subject.counts(d) for name, d in drawn.items()}
    rates = {name: measure.rate_rows(c, samples) for name, c in counts.items()}
    timings["samples_s"] = time.perf_counter() - t0
    log("[verify] fresh-seed forget rates (base -> final): "
        + ", ".join(f"{b['rate']:.4f} -> {f['rate']:.4f}" for b, f in zip(rates["base"], rates["final"])))

    t0 = time.perf_counter()
    m_seed = own["membership"][0]
    losses = {n: subject.member_losses(m.unet, m_seed) for n, m in (("base", base), ("final", final))}
    f_loss, r_loss = {n: v[0] for n, v in losses.items()}, {n: v[1] for n, v in losses.items()}
    membership = {"reference": "retain", "reference_images": retain.shape[0],
                  "note": "The run's config names no held-out set: percentiles are within the retain images only"
                  + (" (each image conditioned on its own prompt)" if kind == "sd" else ""),
                  "items": measure.membership_rows(f_loss, r_loss)}
    timings["membership_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    fit_opts = (val.get("metric_options") or {}).get("retain_fit") or {}
    q = measure.Quality(base, retain, forget, fit_seed=own["retain_fit"][0], fd_seed=own["feature_fd"][0],
                        fit_options=fit_opts, device=dev, cond=getattr(subject, "uncond", None))
    fit = {name: q.fit(m.unet) for name, m in (("base", base), ("final", final))}
    fd = None if q.fd is None else {name: float(q.fd(subject.all_samples(x))) for name, x in drawn.items()}
    quality = {"retain_fit": fit, "retain_fit_ratio": fit["final"] / fit["base"] if fit["base"] > 0 else None,
               "retain_fit_images": q.fit_images, "feature_fd": fd, "samples": samples}
    if kind == "sd":
        cond_loss = {n: float(v.mean()) for n, v in r_loss.items()}
        quality["conditional_retain_loss"] = {**cond_loss, "ratio": cond_loss["final"] / cond_loss["base"]
                                              if cond_loss["base"] > 0 else None}
    timings["quality_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    train = run.config.get("train") or {}
    lr = float(relearn_lr or KIND_DEFAULTS[kind]["lr"])
    r_batch = int(relearn_batch or KIND_DEFAULTS[kind]["batch_size"])

    def probe(unet: Any) -> Dict[str, Any]:
        c = subject.counts(subject.draw(unet, n_re, s))
        return {"counts": c, "rates": [v / n_re for v in c]}

    models = [("final", final), ("base", base)]
    if control is not None:
        models.append(("control", _load_control(control, final, dev)))
    extra = subject.relearn_args() if relearn_steps > 0 else {}
    curves = {name: relearn.relearn_curve(m.unet, base.scheduler.alphas_cumprod, retain, probe, steps=relearn_steps,
                                          every=relearn_every, lr=lr, batch_size=r_batch, seed=own["relearn"][0],
                                          betas=tuple(train.get("betas") or (0.9, 0.999)),
                                          adam_eps=float(train.get("eps") or 1e-8),
                                          weight_decay=float(train.get("weight_decay") or 0.0), device=dev, **extra)
              for name, m in models}
    items = []
    for k, f in enumerate(run.forget_files):
        level = 0.5 * rates["base"][k]["rate"]
        peak = max(p["rates"][k] for p in curves["final"])
        items.append({"item": k, "file": f.name, **({"prompt": subject.prompts[k]} if kind == "sd" else {}),
                      "base": rates["base"][k], "final": rates["final"][k],
                      "relearn_peak_rate": peak, "relearn_end_rate": curves["final"][-1]["rates"][k],
                      "returned_at_step": relearn.returned_at(curves["final"], k, level),
                      "base_control_returned_at_step": relearn.returned_at(curves["base"], k, level),
                      **({"control_peak_rate": max(p["rates"][k] for p in curves["control"]),
                          "control_returned_at_step": relearn.returned_at(curves["control"], k, level)}
                         if "control" in curves else {}),
                      "return_level": level})
    timings["relearn_s"] = time.perf_counter() - t0

    perturbation = None
    if kind == "sd" and n_p > 0:
        t0 = time.perf_counter()
        unets = {"base": base.unet, "final": final.unet}
        rows = perturbation_rows(subject.distinct, subject.prompts, subject.embed,
                                 lambda name, cond: subject.sample(unets[name], n_p, s, cond), subject.rule.count,
                                 drawn, measure.rate_rows, n=n_p, noise_seed=own["perturb"][0])
        perturbation = {"samples": n_p, "noise_seed": own["perturb"][0], "rows": rows,
                        "max_final_rate": max((r["final"]["rate"] for r in rows if r["kind"] != "original"),
                                              default=None)}
        timings["perturb_s"] = time.perf_counter() - t0
        log(f"[verify] prompt perturbations: {sum(r['kind'] != 'original' for r in rows)} variants, highest rate under "
            f"the final model {perturbation['max_final_rate']}")

    failures = []
    for it in items:
        if max_forget_rate is not None and it["final"]["rate"] > max_forget_rate:
            failures.append(f"item {it['item']} ({it['file']}): fresh-seed forget rate {it['final']['rate']:.4f} > "
                            f"--max-forget-rate {max_forget_rate}")
        if max_relearn_rate is not None and it["relearn_peak_rate"] > max_relearn_rate:
            failures.append(f"item {it['item']} ({it['file']}): rate {it['relearn_peak_rate']:.4f} within "
                            f"{relearn_steps} relearning steps > --max-relearn-rate {max_relearn_rate}")
    notes = []
    if max_perturbed_rate is not None:
        if perturbation is None:
            notes.append(f"--max-perturbed-rate {max_perturbed_rate} not checked: "
                         + ("the prompt perturbation probe is for Stable Diffusion runs" if kind != "sd" else
                            "the probe was turned off (perturb_samples 0)"))
        else:
            for r in perturbation["rows"]:
                if r["kind"] != "original" and r["final"]["rate"] > max_perturbed_rate:
                    failures.append(f"item {r['item']}: perturbed prompt {r['variant']!r} ({r['kind']}: "
                                    f"{r['change']}) rate {r['final']['rate']:.4f} > --max-perturbed-rate "
                                    f"{max_perturbed_rate}")
    for note in notes:
        log(f"[verify] {note}")
    if check_final(run_dir, run.manifest) != final_hashes:  # read-only: the same bytes as before the audit
        raise VerifyError(f"{str(run.final_dir)!r} changed while it was being audited")
    timings["total_s"] = time.perf_counter() - started
    data = {
        "run_dir": str(run_dir), "kind": kind, "final_model_sha256": run.manifest["final_model"]["sha256"],
        "final_files_checked": len(final_hashes), "stop": run.manifest.get("stop"),
        "seeds": {"verify_seed": s, "verify_generator_seeds": own, "run_validation_seeds": used},
        "settings": {"samples": samples, "sampler_steps": steps, "batch_size": batch_size,
                     "relearn_steps": relearn_steps, "relearn_every": relearn_every, "relearn_samples": n_re,
                     "relearn_lr": lr, "relearn_batch": r_batch, "device": str(dev),
                     "max_forget_rate": max_forget_rate, "max_relearn_rate": max_relearn_rate,
                     "perturb_samples": n_p, "max_perturbed_rate": max_perturbed_rate,
                     **({"guidance_scale": subject.guidance} if kind == "sd" else {})},
        "rule": subject.describe(), "items": items, "quality": quality, "membership": membership,
        "relearn": {"final": curves["final"], "base_control": curves["base"],
                    **({"control": curves["control"], "control_model": {
                        "path": str(control), "sha256": _folder_hash(control)}} if control else {})},
        "perturbation": perturbation,
        "checks": {"passed": not failures, "failures": failures, "notes": notes}, "timings_s": timings,
    }
    pictures = {"base": subject.all_samples(drawn["base"]), "final": subject.all_samples(drawn["final"]),
                "forget": forget}
    report.write(run_dir, out_dir, data, pictures, plots=plots)
    log(f"[verify] {'PASSED' if not failures else 'FAILED: ' + '; '.join(failures)}; report in {out_dir}")
    return VerifyResult(out_dir, not failures, failures, data)
