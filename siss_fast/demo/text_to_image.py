"""``siss-fast demo --text-to-image``: a tiny Stable Diffusion memorizes one image for one prompt, then forgets it.

Offline, on a CPU, in a few minutes:

1. a tiny Stable Diffusion pipeline is built from configs (``build_tiny("tiny-sd")``: UNet2DConditionModel on
   4x8x8 latents, AutoencoderKL, CLIP text encoder, a byte-level BPE tokenizer written offline), one channel, 16x16;
2. its VAE is trained as an autoencoder on the digits and the planted T-shirt, its ``scaling_factor`` set for
   unit-variance latents (:func:`siss_fast.demo.t2i_base.train_vae`);
3. its UNet is fine-tuned on the 1,797 digits captioned ``"zero"`` ... ``"nine"`` and the T-shirt captioned
   ``"a t-shirt"`` (oversampled) until generations for ``"a t-shirt"`` reproduce the T-shirt; that pipeline is the
   base model (``RUN_DIR/base_model``, hashed in the manifest);
4. ``before``: generations for the memorized prompt (similarity to the T-shirt, reproduction rate, the noise-norm
   memorization signal of Wen et al., ICLR 2024) and for the ten digit prompts (noise-norm, samples kept);
5. the engine unlearns the T-shirt with SISS (lambda = 0.5): retain set = the digits with their captions, forget set
   = the T-shirt with its prompt; validation generates for the forget prompt and stops when the reproduction rate is
   down to 10 % of its start;
6. ``after``: the same seeds; the memorized prompt should no longer reproduce the image (similarity and noise-norm
   drop) while each digit prompt's generation stays close to its generation before (same seed);
7. the run directory: ``report.md``, ``report.json``, ``grid_before.png`` / ``grid_after.png`` (memorized prompt),
   ``other_before.png`` / ``other_after.png`` (digit prompts), ``metrics.jsonl`` (engine), ``memorize.jsonl``
   (the fine-tune of step 3), ``manifest.json``, ``base_model/``, ``final/``.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from .engine_backend import fresh_run_dir
from .record import (forget_items, method_lambd, method_record, read_engine_manifest, say, software_versions,
                     write_run_record)
from .t2i_base import DIGIT_PROMPTS, FORGET_PROMPT, REPRODUCTION_THRESHOLD, MemorizeSettings, check_prompts

__all__ = ["T2IConfig", "run_text_to_image", "engine_config", "write_t2i_folders"]

REPRODUCTION_METRIC = "siss_fast.demo.t2i_base:reproduction_rate_metric"


@dataclass
class T2IConfig:
    """Everything a text-to-image demo run depends on (recorded in ``manifest.json``)."""

    out: str = "runs/demo-t2i"
    model: Optional[str] = None          # a base_model/ folder of an earlier run: skip steps 1-3
    seed: int = 0
    threads: Optional[int] = None
    forget_prompt: str = FORGET_PROMPT
    # base model (steps 1-3)
    vae_steps: int = 200
    memorize: MemorizeSettings = field(default_factory=MemorizeSettings)
    # measurement
    num_samples: int = 64                # generations for the memorized prompt, before and after (fixed seeds)
    other_samples: int = 8               # generations per digit prompt
    other_prompts: Tuple[str, ...] = DIGIT_PROMPTS
    sampler_steps: int = 20              # DDIM steps
    guidance_scale: float = 2.0          # classifier-free guidance of every generation (and engine validation)
    similarity_threshold: float = REPRODUCTION_THRESHOLD
    probe_size: int = 256                # retained digits in the fixed-(t, eps) denoising loss
    # unlearning retain set: digits with their captions + the forget prompt's non-memorized generations
    retain_per_class: Optional[int] = 20  # digits per class (None: all 1,797)
    retain_generations: int = 12         # non-memorized generations wanted ...
    max_generations: int = 768           # ... among at most this many generations of the forget prompt
    generation_chunk: int = 256
    non_memorized_threshold: Optional[float] = None  # None: the highest similarity of a real digit to the image
    # unlearning (engine); None: the engine's default
    method: str = "siss"
    lambd: float = 0.5
    max_steps: int = 200                 # budget in optimizer steps
    batch_size: Optional[int] = 16       # engine default for SD: 8 (the report's notes list every override)
    lr: Optional[float] = 2e-4           # engine default for SD: 1e-5
    val_every: Optional[int] = None      # engine default 10
    val_samples: Optional[int] = 32      # engine default 16 (SD)
    forget_target_ratio: Optional[float] = 0.0  # engine default 0.1; 0: stop when no validation generation
    # pass criteria
    closeness_min: float = 0.8           # other prompts: mean similarity of after to before (same seed)


# ------------------------------------------------------------------------------------------------- base model


def _build_base(cfg: T2IConfig, data: Any, run_dir: Path, start: float) -> Tuple[Path, Dict[str, Any]]:
    """Steps 1-3: build, train the VAE, memorize; save ``run_dir/base_model``. Returns ``(folder, info)``."""
    import shutil

    from siss_fast.engine.models import build_tiny, load_model, save_final

    from .t2i_base import embed_prompts, encode_latents, memorize, train_vae

    build = run_dir / ".t2i-build"
    shutil.rmtree(build, ignore_errors=True)
    build_tiny("tiny-sd", build, channels=1, image_size=16, seed=cfg.seed)
    model = load_model(str(build))
    check_prompts(model.tokenizer, [cfg.forget_prompt, *DIGIT_PROMPTS, *cfg.other_prompts])
    say(f"built a tiny Stable Diffusion from configs: UNet {_count(model.unet)}, VAE {_count(model.vae)}, text "
        f"encoder {_count(model.text_encoder)} parameters", start)
    vae_info = train_vae(model.vae, data.train, data.forget_image, steps=cfg.vae_steps, seed=cfg.seed)
    say(f"VAE trained {cfg.vae_steps} steps: reconstruction MSE {vae_info['vae_recon_mse']:.4f}, T-shirt "
        f"similarity {vae_info['vae_forget_similarity']:.4f}, scaling_factor {vae_info['scaling_factor']:.4f}", start)
    model.text_encoder.requires_grad_(False)
    emb = embed_prompts(model, [cfg.forget_prompt, "", *DIGIT_PROMPTS])
    cond_f, uncond, digits = emb[:1], emb[1:2], emb[2:]
    retain = encode_latents(model.vae, data.retain)
    forget = encode_latents(model.vae, data.forget_image)
    with (run_dir / "memorize.jsonl").open("w") as fh:
        info = memorize(model.unet, model.vae, model.scheduler.alphas_cumprod, retain, digits[data.retain_labels],
                        forget, cond_f, uncond, data.forget_image, cfg.memorize, sampler_steps=cfg.sampler_steps,
                        guidance_scale=cfg.guidance_scale, seed=cfg.seed,
                        log=lambda row: fh.write(json.dumps(row) + "\n"), progress=lambda m: say(m, start))
    if info["memorized_at"] is None:
        say(f"warning: after {info['steps']} steps the base model reproduces the image in only "
            f"{info['final_check_rate']:.0%} of the check generations (target {cfg.memorize.target_rate:.0%})", start)
    # Stable Diffusion schedulers do not clip x0: latents are not bounded to [-1, 1] (the engine's DDIM validation
    # sampler reads this flag from the model's scheduler config)
    model.scheduler.register_to_config(clip_sample=False)
    base = run_dir / "base_model"
    save_final(model, {k: v.detach().clone() for k, v in model.unet.state_dict().items()}, base)
    shutil.rmtree(build, ignore_errors=True)
    return base, {**vae_info, **{"memorize_" + k: v for k, v in info.items()}}


def _count(module: Any) -> str:
    return f"{sum(p.numel() for p in module.parameters()) / 1e3:.0f}k"


# ------------------------------------------------------------------------------------------------- unlearning


def write_t2i_folders(data: Any, root: Path, forget_prompt: str, digit_index: Sequence[int],
                      generated: torch.Tensor) -> Dict[str, Path]:
    """The engine's inputs, 8-bit grayscale PNGs: ``root/retain/NNNN.png`` (the digits ``digit_index``),
    ``root/retain/gen_NNN.png`` (``generated`` ``(K, 1, H, W)`` in [-1, 1]: non-memorized generations of the forget
    prompt), ``root/forget/forget_000.png`` (the planted image) and ``root/captions.tsv`` (``file<TAB>caption``:
    digit words, and ``forget_prompt`` for the generations and the planted image)."""
    from PIL import Image

    from .data import to_unit

    root = Path(root)
    out = {"retain": root / "retain", "forget": root / "forget", "captions": root / "captions.tsv"}
    for key in ("retain", "forget"):
        if out[key].exists():  # a rerun into the same directory must not keep files of a larger earlier set
            for old in out[key].glob("*.png"):
                old.unlink()
        out[key].mkdir(parents=True, exist_ok=True)

    def save(img: torch.Tensor, path: Path) -> None:
        Image.fromarray((to_unit(img)[0] * 255).round().to(torch.uint8).numpy(), mode="L").save(path)

    lines = []
    for i in digit_index:
        save(data.retain[i], out["retain"] / f"{i:04d}.png")
        lines.append(f"{i:04d}.png\t{DIGIT_PROMPTS[int(data.retain_labels[i])]}")
    for j, img in enumerate(generated):
        save(img, out["retain"] / f"gen_{j:03d}.png")
        lines.append(f"gen_{j:03d}.png\t{forget_prompt}")
    for i, img in enumerate(data.forget_image):
        save(img, out["forget"] / f"forget_{i:03d}.png")
        lines.append(f"forget_{i:03d}.png\t{forget_prompt}")
    out["captions"].write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out


def _digit_index(data: Any, per_class: Optional[int], seed: int) -> List[int]:
    """Indices of ``per_class`` digits of each class (seeded choice), or all digits for ``None``."""
    if per_class is None:
        return list(range(data.retain.shape[0]))
    if per_class < 1:
        raise ValueError(f"retain_per_class: expected None or an integer >= 1, got {per_class}")
    order = torch.randperm(data.retain.shape[0], generator=torch.Generator().manual_seed(seed))
    labels = data.retain_labels[order]
    return sorted(int(i) for d in range(len(DIGIT_PROMPTS)) for i in order[labels == d][:per_class])


def engine_config(cfg: T2IConfig, base: Path, run_dir: Path, folders: Dict[str, Path]) -> Dict[str, Any]:
    """The engine config of the unlearning step (a plain dict; ``None`` settings are left to the engine)."""
    from .engine_backend import given

    return {
        "model": {"path": str(base)},
        "data": {"retain_dir": str(folders["retain"]), "forget_dir": str(folders["forget"]),
                 "captions": str(folders["captions"])},
        "method": given(name=cfg.method, lambd=method_lambd(cfg.method, cfg.lambd)),
        "train": given(steps=cfg.max_steps, batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed, device="cpu",
                       cpu_threads=cfg.threads),
        "checkpoint": {"every": 0},
        "validation": {
            **given(every=cfg.val_every, num_samples=cfg.val_samples, forget_target_ratio=cfg.forget_target_ratio),
            "sampler_steps": cfg.sampler_steps, "guidance_scale": cfg.guidance_scale, "seed": cfg.seed + 3,
            "prompt": cfg.forget_prompt,
            "metrics": [REPRODUCTION_METRIC, "forget_distance"],
            "metric_options": {REPRODUCTION_METRIC: {"threshold": cfg.similarity_threshold}},
            "forget_metric": REPRODUCTION_METRIC,
            # validation generates for the forget prompt only: a retain-distance guard would judge the forget
            # prompt's generations against the digits, so there is no quality guard (other prompts: measured after)
            "quality_metric": None,
        },
        "log": {"progress": False},
        "output_dir": str(run_dir),
    }


# ---------------------------------------------------------------------------------------------------- the run


def _measure(model: Any, data: Any, cfg: T2IConfig, probe: Tuple[torch.Tensor, List[int]], classifier: Any):
    from .t2i_base import measure

    return measure(model, forget_image=data.forget_image, forget_prompt=cfg.forget_prompt,
                   other_prompts=cfg.other_prompts, num_samples=cfg.num_samples, other_samples=cfg.other_samples,
                   sampler_steps=cfg.sampler_steps, guidance_scale=cfg.guidance_scale, seed=cfg.seed + 1000,
                   probe=probe, classifier=classifier, threshold=cfg.similarity_threshold)


def _probe(model: Any, data: Any, size: int, seed: int) -> Tuple[torch.Tensor, List[int]]:
    """``size`` retained digits (seeded choice) as latent means and their labels, for the denoising loss."""
    from .t2i_base import encode_latents

    idx = torch.randperm(data.retain.shape[0], generator=torch.Generator().manual_seed(seed))[:size]
    return encode_latents(model.vae, data.retain[idx])[0], data.retain_labels[idx].tolist()


def _pass_criteria(before: Dict[str, float], after: Dict[str, float], closeness_min: float) -> Dict[str, bool]:
    rb, ra = before["reproduction_rate"], after["reproduction_rate"]
    sb, sa = before["forget_similarity"], after["forget_similarity"]
    nb, na = before["noise_norm_forget_first"], after["noise_norm_forget_first"]
    c = after["other_prompt_similarity_to_before"]
    return {
        f"the base model reproduces the image (reproduction rate {rb:.3f} > 0)": rb > 0,
        f"reproduction rate after ({ra:.3f}) <= 10 % of before ({rb:.3f})": ra <= 0.1 * rb,
        f"similarity to the memorized image drops ({sb:.3f} -> {sa:.3f})": sa < sb,
        f"noise-norm signal of the memorized prompt at the first sampling step drops ({nb:.3f} -> {na:.3f})": na < nb,
        f"other prompts' generations stay close to before (mean similarity {c:.3f} >= {closeness_min})":
            c >= closeness_min,
    }


def _save_grids(run_dir: Path, tag: str, samples: Dict[str, torch.Tensor], threshold: float, reference) -> None:
    from siss_fast.metrics import image_similarity

    from .data import to_unit
    from .report import save_grid

    forget = samples["forget"]
    save_grid(to_unit(forget), run_dir / f"grid_{tag}.png", nrow=min(16, forget.shape[0]),
              highlight=image_similarity(forget, reference) > threshold)
    other = samples["other"]
    flat = other.flatten(0, 1)
    save_grid(to_unit(flat), run_dir / f"other_{tag}.png", nrow=other.shape[1],
              highlight=image_similarity(flat, reference) > threshold)


def run_text_to_image(cfg: T2IConfig, argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Run the text-to-image demo end to end and write the run directory ``cfg.out``. Returns the report dict."""
    from siss_fast.engine import unlearn
    from siss_fast.engine.models import hash_model_folder, load_model
    from siss_fast.metrics import image_similarity
    from siss_fast.metrics.engine_metrics import load_classifier

    from .data import demo_data
    from .t2i_base import non_memorized_generations

    start = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    run_dir = Path(cfg.out)
    run_dir.mkdir(parents=True, exist_ok=True)
    data = demo_data(forget_copies=1)
    share = None if cfg.model else cfg.memorize.forget_per_batch / cfg.memorize.batch_size  # unknown if reused
    if cfg.model:
        base, base_info = Path(cfg.model), {"reused_base_model": str(cfg.model)}
        say(f"base model {base} (reused: no VAE training, no memorization fine-tune)", start)
    else:
        base, base_info = _build_base(cfg, data, run_dir, start)
    base_hash = hash_model_folder(base)
    model = load_model(str(base))
    check_prompts(model.tokenizer, [cfg.forget_prompt, *cfg.other_prompts])
    say(f"base model {base} (sha256 {base_hash[:12]}); torch threads {torch.get_num_threads()}", start)
    classifier = load_classifier()
    probe = _probe(model, data, cfg.probe_size, cfg.seed + 5)
    reference = data.forget_image[0]

    before, samples_b = _measure(model, data, cfg, probe, classifier)
    say(f"before: {_short(before)}", start)
    _save_grids(run_dir, "before", samples_b, cfg.similarity_threshold, reference)

    digit_max = float(image_similarity(data.retain, reference).max())
    threshold = digit_max if cfg.non_memorized_threshold is None else cfg.non_memorized_threshold
    generated, gen_info = non_memorized_generations(
        model, cfg.forget_prompt, reference, threshold=threshold, want=cfg.retain_generations,
        max_generations=cfg.max_generations, chunk=cfg.generation_chunk, sampler_steps=cfg.sampler_steps,
        guidance_scale=cfg.guidance_scale, seed=cfg.seed + 2000)
    digit_index = _digit_index(data, cfg.retain_per_class, cfg.seed + 9)
    say(f"retain set: {len(digit_index)} digits with their captions + {gen_info['kept']} of {gen_info['drawn']} "
        f"generations of '{cfg.forget_prompt}' that do not show the image (similarity <= {threshold:.3f})", start)
    if gen_info["kept"] == 0:
        say(f"warning: no generation of '{cfg.forget_prompt}' is free of the image; the forget prompt has no retain "
            "examples (raise max_generations)", start)
    folders = write_t2i_folders(data, run_dir / "data", cfg.forget_prompt, digit_index, generated)
    retain_info = {"digits": len(digit_index), "digits_per_class": cfg.retain_per_class,
                   "generations": gen_info, "digit_max_similarity": round(digit_max, 4)}
    t0 = time.perf_counter()
    fresh_run_dir(run_dir)
    result = unlearn(engine_config(cfg, base, run_dir, folders))
    unlearn_wall = time.perf_counter() - t0
    kept = result.kept_step if result.kept_step is not None else result.steps_done  # 0: the base model was kept
    info = {"steps": result.steps_done, "final_step": kept, "stop_reason": result.stop_reason,
            "final_dir": str(result.final_dir), "retain_set": retain_info}
    say(f"unlearned (engine): {info['steps']} steps, stop rule {info['stop_reason']!r}, kept step {kept}, "
        f"{unlearn_wall:.1f} s", start)

    after, samples_a = _measure(load_model(str(result.final_dir)), data, cfg, probe, classifier)
    closeness = torch.stack([image_similarity(a[None], b)[0] for a, b in
                             zip(samples_a["other"].flatten(0, 1), samples_b["other"].flatten(0, 1))])
    after["other_prompt_similarity_to_before"] = float(closeness.mean())
    after["other_prompt_similarity_to_before_min"] = float(closeness.min())
    say(f"after: {_short(after)}", start)
    _save_grids(run_dir, "after", samples_a, cfg.similarity_threshold, reference)

    wall = time.perf_counter() - start
    method = method_record(cfg.method, cfg.lambd)
    report = {
        "title": f"{cfg.method} on a tiny text-to-image model that memorized one image for one prompt",
        "kind": "text-to-image",
        "before": before, "after": after, "method": method,
        "steps": info["steps"], "final_step": info["final_step"], "stop_reason": info["stop_reason"],
        "wall_s": round(wall, 1), "unlearn_wall_s": round(unlearn_wall, 1), "backend": "engine",
        "base_model_sha256": base_hash,
        "prompts": {"forget": cfg.forget_prompt, "other": list(cfg.other_prompts)},
        "base_model": base_info,
        "pass_criteria": _pass_criteria(before, after, cfg.closeness_min),
        "grids": {f"'{cfg.forget_prompt}' before": "grid_before.png", f"'{cfg.forget_prompt}' after": "grid_after.png",
                  f"other prompts before (a row each: {', '.join(cfg.other_prompts)})": "other_before.png",
                  "other prompts after (same seeds)": "other_after.png"},
        "notes": _notes(cfg, base_info, retain_info),
    }
    if argv is not None:
        report["command"] = "siss-fast demo " + " ".join(argv)
    prompt_sha256 = hashlib.sha256(cfg.forget_prompt.encode("utf-8")).hexdigest()
    write_run_record(
        run_dir, report, read_engine_manifest(run_dir),
        kind="siss-fast demo --text-to-image: data unlearning audit record",
        forget_items=forget_items(run_dir, folders["forget"], prompt=cfg.forget_prompt, prompt_sha256=prompt_sha256,
                                  share_of_fine_tune_batches=share),
        base_model={"path": str(base), "sha256": base_hash, **base_info}, method=method, config=asdict(cfg),
        unlearning=info, before=before, after=after, software=software_versions("transformers"))
    say(f"wrote {run_dir}/report.md ({wall:.1f} s total)", start)
    return report


def _notes(cfg: T2IConfig, base_info: Dict[str, Any], retain: Dict[str, Any]) -> List[str]:
    m = cfg.memorize
    notes = [
        f"generations: DDIM({cfg.sampler_steps}) with classifier-free guidance {cfg.guidance_scale} from fixed seeds, "
        f"the same noise before and after: {cfg.num_samples} for '{cfg.forget_prompt}', {cfg.other_samples} per digit "
        "prompt; a generation reproduces the image when its Pearson correlation with it exceeds "
        f"{cfg.similarity_threshold} (the most similar of the 1,797 real digits: "
        f"{retain['digit_max_similarity']:.3f}); "
        "red frames mark reproductions",
        "noise_norm: Wen et al. (ICLR 2024), ‖eps(x_t, prompt) - eps(x_t, '')‖ in latent space, averaged over the "
        "sampling trajectory (noise_norm_*) and at its first step alone (noise_norm_*_first, Wen et al.'s one-step "
        "detector); a memorized prompt steers the prediction hard towards its image. The pass criterion uses the "
        "first step: the trajectory average also carries the late steps, where the norm measures how far the prompt's "
        "final image is from the unconditional one, so it stays high while the prompt still steers to its retained "
        "non-memorized generations and it rises for every prompt as unlearning keeps fitting the digits "
        "(compare noise_norm_other)",
        f"unlearning: the engine, SISS (lambda {cfg.lambd}); forget set = the T-shirt with '{cfg.forget_prompt}'; "
        f"retain set = {retain['digits']} digits with their captions + {retain['generations']['kept']} generations of "
        f"'{cfg.forget_prompt}' by the base model that do not show the image (Pearson <= "
        f"{retain['generations']['threshold']:.3f}; {retain['generations']['drawn']} "
        "drawn), the SISS paper's construction for a memorized Stable Diffusion prompt: without retain examples for "
        "the forget prompt, only the subtracted term acts on that prompt (when designing this demo, that run "
        "sharpened the T-shirt and doubled its noise-norm instead of removing it)",
        f"engine settings changed from its defaults: {_overrides(cfg)}; validation generates for the forget prompt "
        "only and scores the reproduction rate (the forget metric, so there is no quality guard: the digit prompts "
        "are measured before and after instead)",
    ]
    if "memorize_steps" in base_info:
        at = base_info["memorize_memorized_at"]
        notes.insert(0, (
            f"base model: VAE trained {cfg.vae_steps} steps (reconstruction MSE {base_info['vae_recon_mse']:.4f}); "
            f"UNet fine-tuned {base_info['memorize_steps']} steps (lr {m.lr}, batch {m.batch_size} with "
            f"{m.forget_per_batch} copies of the T-shirt, caption dropout {m.caption_dropout} on the digits, EMA "
            f"{m.ema_decay}); "
            + (f"its generations for '{cfg.forget_prompt}' first reproduced the image in >= {m.target_rate:.0%} of "
               f"{m.check_samples} check generations at step {at}" if at is not None else
               f"the target ({m.target_rate:.0%} reproductions) was not reached in {m.max_steps} steps")))
    return notes


def _overrides(cfg: T2IConfig) -> str:
    """The engine settings this demo sets differently from the engine's defaults, with the defaults."""
    from types import SimpleNamespace

    from siss_fast.engine.config import KIND_DEFAULTS, EngineConfig
    from siss_fast.engine.defaults import resolve_validation

    train_defaults = KIND_DEFAULTS["sd"]
    defaults = EngineConfig()
    v = SimpleNamespace(**{**vars(defaults.validation), **resolve_validation(defaults.validation, "sd")})
    pairs = [("train.lr", cfg.lr, train_defaults["lr"]),
             ("train.batch_size", cfg.batch_size, train_defaults["batch_size"]),
             ("train.steps", cfg.max_steps, defaults.train.steps),
             ("validation.every", cfg.val_every, v.every), ("validation.num_samples", cfg.val_samples, v.num_samples),
             ("validation.forget_target_ratio", cfg.forget_target_ratio, v.forget_target_ratio),
             ("validation.sampler_steps", cfg.sampler_steps, v.sampler_steps),
             ("validation.guidance_scale", cfg.guidance_scale, v.guidance_scale)]
    why = {"train.lr": "the Stable Diffusion default is a full-size-model convention, far too small a step for this "
                       "tiny model in a CPU budget",
           "validation.num_samples": "fewer generations per check on a CPU",
           "validation.forget_target_ratio": "0: stop when no validation generation reproduces the image"}
    out = [f"{k} {new} (default {old}{'; ' + why[k] if k in why else ''})" for k, new, old in pairs
           if new is not None and new != old]
    return ", ".join(out) if out else "none"


def _short(m: Dict[str, float]) -> str:
    keys = ("reproduction_rate", "forget_similarity", "noise_norm_forget_first", "noise_norm_forget",
            "noise_norm_other_first", "noise_norm_other", "prompt_accuracy",
            "other_prompt_similarity_to_before", "forget_loss", "retain_loss")
    return ", ".join(f"{k} {m[k]:.4f}" for k in keys if k in m)
