"""``siss-fast demo --text-to-image``: a tiny Stable Diffusion memorizes three images, each for its own prompt,
then forgets all three in one engine run.

Offline, on a CPU, in a few minutes:

1. a tiny Stable Diffusion pipeline is built from configs (``build_tiny("tiny-sd")``: UNet2DConditionModel on
   4x8x8 latents, AutoencoderKL, CLIP text encoder, a byte-level BPE tokenizer written offline), one channel, 16x16;
2. its VAE is trained as an autoencoder on the digits and the planted images, its ``scaling_factor`` set for
   unit-variance latents (:func:`siss_fast.demo.t2i_base.train_vae`);
3. its UNet is fine-tuned on the 1,797 digits captioned ``"zero"`` ... ``"nine"`` and the planted items of
   :data:`siss_fast.demo.t2i_items.FORGET_ITEMS` (the T-shirt ``"a t-shirt"``, a hollow square ``"box"``, a thick X
   ``"cross"``; ``--items N``: the first N, ``--items 1`` the single-item demo of earlier versions), oversampled,
   until generations for each item's prompt reproduce it; that pipeline is the base model (``RUN_DIR/base_model``);
4. ``before``: generations for each memorized prompt (similarity to its image, reproduction rate, the noise-norm
   memorization signal of Wen et al., ICLR 2024; per item and their mean) and for the ten digit prompts;
5. the engine unlearns all items in one run with SISS (lambda = 0.5): retain set = the digits with their captions +
   each memorized prompt's non-memorized generations, forget set = the items, a captions file giving each its
   prompt; validation generates for each item's own prompt and stops when *every* item's reproduction rate is 0
   (per-item forget targets, :func:`siss_fast.engine.validation.score_groups`);
6. ``after``: the same seeds; each memorized prompt should no longer reproduce its image while each digit prompt's
   generation stays close to its generation before (same seed);
7. ``--compare-separate``: each item is also unlearned in its own engine run from the same base model
   (:func:`siss_fast.demo.t2i_items.run_separate`); the report sets the combined run's wall time against the sum;
8. the run directory: ``report.md``, ``report.json``, ``grid_before.png`` / ``grid_after.png`` (a block of rows per
   memorized prompt), ``other_before.png`` / ``other_after.png`` (digit prompts), ``metrics.jsonl`` (engine),
   ``memorize.jsonl`` (step 3), ``manifest.json`` (per-item before/after under ``forget_items``), ``base_model/``,
   ``final/``, ``data/`` (the engine's inputs: ``retain/``, ``forget/``, ``captions.tsv``), ``separate/``.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch

from .engine_backend import fresh_run_dir
from .record import (audit_run, forget_items, method_lambd, method_record, read_engine_manifest, say,
                     software_versions, write_run_record)
from .report import rebuild_report
from .t2i_base import DIGIT_PROMPTS, REPRODUCTION_THRESHOLD, MemorizeSettings, check_prompts

__all__ = ["T2IConfig", "run_text_to_image", "engine_config", "write_t2i_folders"]

REPRODUCTION_METRIC = "siss_fast.demo.t2i_base:reproduction_rate_metric"
# A generation of a memorized prompt is a retain example when it is no more similar to the item's image than the most
# similar real digit is -- but at least this similar is allowed: no digit resembles the hollow square (0.115), and a
# threshold that strict leaves a prompt without retain examples (0 of 768 in a trial run)
NON_MEMORIZED_FLOOR = 0.5


@dataclass
class T2IConfig:
    """Everything a text-to-image demo run depends on (recorded in ``manifest.json``)."""

    out: str = "runs/demo-t2i"
    model: Optional[str] = None          # a base_model/ folder of an earlier run (same --items): skip steps 1-3
    seed: int = 0
    threads: Optional[int] = None
    items: int = 3                       # memorized items (t2i_items.FORGET_ITEMS[:items]), forgotten in one run
    compare_separate: bool = False       # also unlearn each item in its own engine run; compare wall times
    # base model (steps 1-3)
    vae_steps: int = 200
    memorize: MemorizeSettings = field(default_factory=lambda: MemorizeSettings(
        forget_per_batch=12, check_every=50, check_samples=8, target_rate=0.5))
    # measurement
    num_samples: int = 32                # generations per memorized prompt, before and after (fixed seeds)
    other_samples: int = 8               # generations per digit prompt
    other_prompts: Tuple[str, ...] = DIGIT_PROMPTS
    sampler_steps: int = 20              # DDIM steps
    guidance_scale: float = 2.0          # classifier-free guidance of every generation (and engine validation)
    similarity_threshold: float = REPRODUCTION_THRESHOLD
    probe_size: int = 256                # retained digits in the fixed-(t, eps) denoising loss
    # unlearning retain set: digits with their captions + each forget prompt's non-memorized generations
    retain_per_class: Optional[int] = 20  # digits per class (None: all 1,797)
    retain_generations: int = 12         # non-memorized generations wanted per memorized prompt ...
    max_generations: int = 512           # ... among at most this many generations of that prompt
    generation_chunk: int = 64
    non_memorized_threshold: Optional[float] = None  # None: per item, max(NON_MEMORIZED_FLOOR, the highest
    #   similarity of a real digit to the item)
    # unlearning (engine); None: the engine's default
    method: str = "siss"
    lambd: float = 0.5
    max_steps: int = 200                 # budget in optimizer steps
    batch_size: Optional[int] = 16       # engine default for SD: 8 (the report's notes list every override)
    lr: Optional[float] = 2e-4           # engine default for SD: 1e-5
    lora_rank: Optional[int] = None      # engine default 0: the full UNet; R > 0: LoRA adapters of rank R
    val_every: Optional[int] = None      # engine default 10
    val_samples: Optional[int] = 16      # per memorized prompt; engine default 16 (SD)
    val_sampler_steps: Optional[int] = None  # None: sampler_steps
    forget_target_ratio: Optional[float] = 0.0  # engine default 0.1; 0: stop when no validation generation
    # pass criteria
    closeness_min: float = 0.8           # other prompts: mean similarity of after to before (same seed)
    # siss-fast verify on the finished run (fresh seeds, membership, relearning, prompt perturbations)
    verify: bool = True
    verify_samples: Optional[int] = None  # fresh generations per forget prompt and model; None: verify's SD default
    verify_relearn_steps: int = 100       # retain-only fine-tune steps of verify's relearning probe


# ------------------------------------------------------------------------------------------------- base model


def _build_base(cfg: T2IConfig, data: Any, prompts: Sequence[str], run_dir: Path,
                start: float) -> Tuple[Path, Dict[str, Any]]:
    """Steps 1-3: build, train the VAE, memorize; save ``run_dir/base_model``. Returns ``(folder, info)``."""
    import shutil

    from siss_fast.engine.models import build_tiny, load_model, save_final

    from .t2i_base import embed_prompts, encode_latents, memorize, train_vae

    build = run_dir / ".t2i-build"
    shutil.rmtree(build, ignore_errors=True)
    build_tiny("tiny-sd", build, channels=1, image_size=16, seed=cfg.seed)
    model = load_model(str(build))
    check_prompts(model.tokenizer, [*prompts, *DIGIT_PROMPTS, *cfg.other_prompts])
    say(f"built a tiny Stable Diffusion from configs: UNet {_count(model.unet)}, VAE {_count(model.vae)}, text "
        f"encoder {_count(model.text_encoder)} parameters", start)
    vae_info = train_vae(model.vae, data.train, data.forget_image, steps=cfg.vae_steps, seed=cfg.seed)
    say(f"VAE trained {cfg.vae_steps} steps: reconstruction MSE {vae_info['vae_recon_mse']:.4f}, planted image "
        f"similarity {vae_info['vae_forget_similarity']:.4f}, scaling_factor {vae_info['scaling_factor']:.4f}", start)
    model.text_encoder.requires_grad_(False)
    k = len(prompts)
    emb = embed_prompts(model, [*prompts, "", *DIGIT_PROMPTS])
    cond_f, uncond, digits = emb[:k], emb[k:k + 1], emb[k + 1:]
    retain = encode_latents(model.vae, data.retain)
    forget = encode_latents(model.vae, data.forget_image)
    with (run_dir / "memorize.jsonl").open("w") as fh:
        info = memorize(model.unet, model.vae, model.scheduler.alphas_cumprod, retain, digits[data.retain_labels],
                        forget, cond_f, uncond, data.forget_image, cfg.memorize, sampler_steps=cfg.sampler_steps,
                        guidance_scale=cfg.guidance_scale, seed=cfg.seed,
                        log=lambda row: fh.write(json.dumps(row) + "\n"), progress=lambda m: say(m, start))
    if info["memorized_at"] is None:
        say(f"warning: after {info['steps']} steps the base model reproduces the images in only "
            f"{', '.join(f'{r:.0%}' for r in info['final_check_rates'])} of the check generations (target "
            f"{cfg.memorize.target_rate:.0%})", start)
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


def write_t2i_folders(data: Any, root: Path, forget_prompt: Union[str, Sequence[str]], digit_index: Sequence[int],
                      generated: Union[torch.Tensor, Sequence[torch.Tensor]]) -> Dict[str, Path]:
    """The engine's inputs, 8-bit grayscale PNGs: ``root/retain/NNNN.png`` (the digits ``digit_index``),
    ``root/retain/gen_K_NNN.png`` (``generated[k]`` ``(G, 1, H, W)`` in [-1, 1]: non-memorized generations of
    forget prompt ``k``; ``gen_NNN.png`` for one item), ``root/forget/forget_NNN.png`` (the planted images
    ``data.forget_image``) and ``root/captions.tsv`` (``file<TAB>caption``: digit words, and each item's prompt for
    its generations and its image). ``forget_prompt``: one prompt per planted image (a string: one item)."""
    from PIL import Image

    from .data import to_unit

    prompts = [forget_prompt] if isinstance(forget_prompt, str) else list(forget_prompt)
    gens = [generated] if isinstance(generated, torch.Tensor) else list(generated)
    if not len(prompts) == len(gens) == data.forget_image.shape[0]:
        raise ValueError(f"expected one prompt and one set of generations per planted image "
                         f"({data.forget_image.shape[0]}), got {len(prompts)} and {len(gens)}")
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
    for k, (prompt, images) in enumerate(zip(prompts, gens)):
        for j, img in enumerate(images):
            name = f"gen_{j:03d}.png" if len(prompts) == 1 else f"gen_{k}_{j:03d}.png"
            save(img, out["retain"] / name)
            lines.append(f"{name}\t{prompt}")
    for i, (img, prompt) in enumerate(zip(data.forget_image, prompts)):
        save(img, out["forget"] / f"forget_{i:03d}.png")
        lines.append(f"forget_{i:03d}.png\t{prompt}")
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
    """The engine config of the unlearning step (a plain dict; ``None`` settings are left to the engine). The
    captions file gives each forget item its prompt; validation generates for each item's own prompt."""
    from .engine_backend import given

    return {
        "model": {"path": str(base)},
        "data": {"retain_dir": str(folders["retain"]), "forget_dir": str(folders["forget"]),
                 "captions": str(folders["captions"])},
        "method": given(name=cfg.method, lambd=method_lambd(cfg.method, cfg.lambd)),
        "train": given(steps=cfg.max_steps, batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed, device="cpu",
                       cpu_threads=cfg.threads, lora_rank=cfg.lora_rank),
        "checkpoint": {"every": 0},
        "validation": {
            **given(every=cfg.val_every, num_samples=cfg.val_samples, forget_target_ratio=cfg.forget_target_ratio),
            "sampler_steps": cfg.val_sampler_steps or cfg.sampler_steps, "guidance_scale": cfg.guidance_scale,
            "seed": cfg.seed + 3,
            "metrics": [REPRODUCTION_METRIC, "forget_nn"],
            "metric_options": {REPRODUCTION_METRIC: {"threshold": cfg.similarity_threshold}},
            "forget_metric": REPRODUCTION_METRIC,
            # validation generates for the forget prompts only: a retain-distance guard would judge their
            # generations against the digits, so there is no quality guard (other prompts: measured after)
            "quality_metric": None,
        },
        "log": {"progress": False},
        "output_dir": str(run_dir),
    }


# ---------------------------------------------------------------------------------------------------- the run


def _measure(model: Any, data: Any, prompts: Sequence[str], cfg: T2IConfig, probe: Tuple[torch.Tensor, List[int]],
             classifier: Any):
    from .t2i_base import measure

    return measure(model, forget_image=data.forget_image, forget_prompt=list(prompts),
                   other_prompts=cfg.other_prompts, num_samples=cfg.num_samples, other_samples=cfg.other_samples,
                   sampler_steps=cfg.sampler_steps, guidance_scale=cfg.guidance_scale, seed=cfg.seed + 1000,
                   probe=probe, classifier=classifier, threshold=cfg.similarity_threshold)


def _probe(model: Any, data: Any, size: int, seed: int) -> Tuple[torch.Tensor, List[int]]:
    """``size`` retained digits (seeded choice) as latent means and their labels, for the denoising loss."""
    from .t2i_base import encode_latents

    idx = torch.randperm(data.retain.shape[0], generator=torch.Generator().manual_seed(seed))[:size]
    return encode_latents(model.vae, data.retain[idx])[0], data.retain_labels[idx].tolist()


def _save_grids(run_dir: Path, tag: str, samples: Dict[str, torch.Tensor], threshold: float,
                references: torch.Tensor) -> None:
    """``grid_TAG.png``: a block of rows per memorized prompt (red frame: reproduces that prompt's image);
    ``other_TAG.png``: a row per digit prompt (red frame: reproduces any memorized image)."""
    from siss_fast.metrics import image_similarity

    from .data import to_unit
    from .report import save_grid

    forget = samples["forget"]  # (K, N, C, H, W)
    hit = torch.cat([image_similarity(images, ref) > threshold for images, ref in zip(forget, references)])
    save_grid(to_unit(forget.flatten(0, 1)), run_dir / f"grid_{tag}.png", nrow=min(16, forget.shape[1]),
              highlight=hit)
    other = samples["other"]
    flat = other.flatten(0, 1)
    sims = torch.stack([image_similarity(flat, ref) for ref in references]).max(dim=0).values
    save_grid(to_unit(flat), run_dir / f"other_{tag}.png", nrow=other.shape[1], highlight=sims > threshold)


def _non_memorized(model: Any, data: Any, prompts: Sequence[str], cfg: T2IConfig, start: float):
    """Each memorized prompt's generations that do not show its image (the retain examples of that prompt)."""
    from siss_fast.metrics import image_similarity

    from .t2i_base import non_memorized_generations

    generated, infos = [], []
    for k, prompt in enumerate(prompts):
        ref = data.forget_image[k]
        digit_max = float(image_similarity(data.retain, ref).max())
        threshold = (max(digit_max, NON_MEMORIZED_FLOOR) if cfg.non_memorized_threshold is None
                     else cfg.non_memorized_threshold)
        images, info = non_memorized_generations(
            model, prompt, ref, threshold=threshold, want=cfg.retain_generations, max_generations=cfg.max_generations,
            chunk=cfg.generation_chunk, sampler_steps=cfg.sampler_steps, guidance_scale=cfg.guidance_scale,
            seed=cfg.seed + 2000 + 100 * k)
        generated.append(images)
        infos.append({"prompt": prompt, "digit_max_similarity": round(digit_max, 4), **info})
        say(f"'{prompt}': {info['kept']} of {info['drawn']} generations do not show its image (similarity <= "
            f"{threshold:.3f}; the most similar real digit: {digit_max:.3f})", start)
        if info["kept"] == 0:
            say(f"warning: no generation of '{prompt}' is free of its image; that prompt has no retain examples "
                "(raise max_generations)", start)
    return generated, infos


def _unlearn(cfg: T2IConfig, base: Path, out: Path, data: Any, prompts: Sequence[str], digit_index: Sequence[int],
             generated: Sequence[torch.Tensor]):
    """One engine run into ``out`` on forget set = ``data.forget_image`` with ``prompts``."""
    from siss_fast.engine import unlearn

    folders = write_t2i_folders(data, out / "data", list(prompts), digit_index, list(generated))
    fresh_run_dir(out)
    return unlearn(engine_config(cfg, base, out, folders))


def _with_closeness(after: Dict[str, float], samples_a: Dict[str, torch.Tensor],
                    samples_b: Dict[str, torch.Tensor]) -> Dict[str, float]:
    from siss_fast.metrics import image_similarity

    closeness = torch.stack([image_similarity(a[None], b)[0] for a, b in
                             zip(samples_a["other"].flatten(0, 1), samples_b["other"].flatten(0, 1))])
    after["other_prompt_similarity_to_before"] = float(closeness.mean())
    after["other_prompt_similarity_to_before_min"] = float(closeness.min())
    return after


def run_text_to_image(cfg: T2IConfig, argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Run the text-to-image demo end to end and write the run directory ``cfg.out``. Returns the report dict."""
    from siss_fast.engine.models import hash_model_folder, load_model
    from siss_fast.metrics.engine_metrics import load_classifier

    from . import t2i_items

    start = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    run_dir = Path(cfg.out)
    run_dir.mkdir(parents=True, exist_ok=True)
    data, prompts = t2i_items.item_data(cfg.items)
    share = None if cfg.model else cfg.memorize.forget_per_batch / cfg.memorize.batch_size / len(prompts)
    if cfg.model:
        base, base_info = Path(cfg.model), {"reused_base_model": str(cfg.model)}
        say(f"base model {base} (reused: no VAE training, no memorization fine-tune)", start)
    else:
        base, base_info = _build_base(cfg, data, prompts, run_dir, start)
    base_hash = hash_model_folder(base)
    model = load_model(str(base))
    check_prompts(model.tokenizer, [*prompts, *cfg.other_prompts])
    say(f"base model {base} (sha256 {base_hash[:12]}); torch threads {torch.get_num_threads()}; memorized prompts: "
        + ", ".join(f"'{p}'" for p in prompts), start)
    classifier = load_classifier()
    probe = _probe(model, data, cfg.probe_size, cfg.seed + 5)

    before, samples_b = _measure(model, data, prompts, cfg, probe, classifier)
    say(f"before: {_short(before, prompts)}", start)
    _save_grids(run_dir, "before", samples_b, cfg.similarity_threshold, data.forget_image)

    generated, gen_info = _non_memorized(model, data, prompts, cfg, start)
    digit_index = _digit_index(data, cfg.retain_per_class, cfg.seed + 9)
    retain_info = {"digits": len(digit_index), "digits_per_class": cfg.retain_per_class, "generations": gen_info}
    t0 = time.perf_counter()
    result = _unlearn(cfg, base, run_dir, data, prompts, digit_index, generated)
    unlearn_wall = time.perf_counter() - t0
    kept = result.kept_step if result.kept_step is not None else result.steps_done  # 0: the base model was kept
    info = {"steps": result.steps_done, "final_step": kept, "stop_reason": result.stop_reason,
            "final_dir": str(result.final_dir), "retain_set": retain_info}
    say(f"unlearned {len(prompts)} item(s) in one engine run: {info['steps']} steps, stop rule "
        f"{info['stop_reason']!r}, kept step {kept}, {unlearn_wall:.1f} s", start)
    engine_manifest = read_engine_manifest(run_dir)

    after, samples_a = _measure(load_model(str(result.final_dir)), data, prompts, cfg, probe, classifier)
    _with_closeness(after, samples_a, samples_b)
    say(f"after: {_short(after, prompts)}", start)
    _save_grids(run_dir, "after", samples_a, cfg.similarity_threshold, data.forget_image)

    separate = None
    if cfg.compare_separate:
        def measure_one(m: Any, one: Any, ps: List[str]):
            return _measure(m, one, ps, cfg, probe, classifier)

        separate = t2i_items.run_separate(
            data, prompts, generated, run_dir,
            lambda out, one, ps, gens: _unlearn(cfg, base, out, one, ps, digit_index, gens),
            measure_one, samples_b, lambda m: say(m, start))
        separate["combined_unlearn_wall_s"] = round(unlearn_wall, 1)
        separate["combined_time"] = engine_manifest.get("time")
        separate["ratio_combined_to_separate"] = round(unlearn_wall / max(separate["sum_unlearn_wall_s"], 1e-9), 3)
        say(f"combined run {unlearn_wall:.1f} s vs {len(prompts)} separate runs {separate['sum_unlearn_wall_s']:.1f} "
            f"s in all (ratio {separate['ratio_combined_to_separate']:.2f})", start)

    wall = time.perf_counter() - start
    method = method_record(cfg.method, cfg.lambd, **({"lora_rank": cfg.lora_rank} if cfg.lora_rank else {}))
    n = len(prompts)
    report = {
        "title": (f"{cfg.method} on a tiny text-to-image model that memorized one image for one prompt" if n == 1 else
                  f"{cfg.method} on a tiny text-to-image model that memorized {n} images, each for its own prompt, "
                  "forgotten in one run"),
        "kind": "text-to-image",
        "before": before, "after": after, "method": method,
        "steps": info["steps"], "final_step": info["final_step"], "stop_reason": info["stop_reason"],
        "wall_s": round(wall, 1), "unlearn_wall_s": round(unlearn_wall, 1), "backend": "engine",
        "base_model_sha256": base_hash,
        "prompts": {"forget": prompts[0] if n == 1 else list(prompts), "other": list(cfg.other_prompts)},
        "items": _item_rows(prompts, before, after),
        "base_model": base_info,
        "pass_criteria": t2i_items.pass_criteria(before, after, prompts, cfg.closeness_min),
        "stop_signal": t2i_items.stop_signal(engine_manifest, prompts, REPRODUCTION_METRIC.split(":")[1],
                                             cfg.val_sampler_steps or cfg.sampler_steps,
                                             cfg.val_samples or 16),
        "grids": {("memorized prompts before (a block of rows each: " + ", ".join(f"'{p}'" for p in prompts) + ")"):
                  "grid_before.png", "memorized prompts after (same seeds)": "grid_after.png",
                  f"other prompts before (a row each: {', '.join(cfg.other_prompts)})": "other_before.png",
                  "other prompts after (same seeds)": "other_after.png"},
        "notes": t2i_items.notes(cfg, prompts, base_info, retain_info, separate),
    }
    if separate is not None:
        report["separate_runs"] = separate
    if argv is not None:
        report["command"] = "siss-fast demo " + " ".join(argv)
    items = forget_items(run_dir, run_dir / "data" / "forget", share_of_fine_tune_batches=share)
    for row, item in zip(report["items"], items):
        item.update(prompt=row["prompt"], prompt_sha256=hashlib.sha256(row["prompt"].encode("utf-8")).hexdigest(),
                    before=row["before"], after=row["after"])
    write_run_record(
        run_dir, report, engine_manifest, kind="siss-fast demo --text-to-image: data unlearning audit record",
        forget_items=items, base_model={"path": str(base), "sha256": base_hash, **base_info}, method=method,
        config=asdict(cfg), unlearning=info, before=before, after=after, software=software_versions("transformers"))
    if cfg.verify:  # after the record: verify audits the finished run and appends its hashes to manifest.json
        options = {} if cfg.verify_samples is None else {"samples": cfg.verify_samples}
        report["verify"] = audit_run(run_dir, start, relearn_steps=cfg.verify_relearn_steps, **options)
        (run_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        rebuild_report(run_dir)
    say(f"wrote {run_dir}/report.md ({time.perf_counter() - start:.1f} s total)", start)
    return report


_ITEM_KEYS = ("reproduction_rate", "forget_similarity", "noise_norm_forget_first", "noise_norm_forget",
              "forget_loss")


def _item_rows(prompts: Sequence[str], before: Dict[str, float], after: Dict[str, float]) -> List[Dict[str, Any]]:
    """``[{"prompt", "before": {metric: value}, "after": {...}}]`` per memorized item (the manifest's forget items
    carry the same)."""
    def pick(m: Dict[str, float], p: str) -> Dict[str, float]:
        return {k: m[k if len(prompts) == 1 else f"{k}[{p}]"] for k in _ITEM_KEYS}

    return [{"prompt": p, "before": pick(before, p), "after": pick(after, p)} for p in prompts]


def _short(m: Dict[str, float], prompts: Sequence[str]) -> str:
    keys = ["reproduction_rate", "forget_similarity", "noise_norm_forget_first", "noise_norm_forget",
            "noise_norm_other_first", "noise_norm_other", "prompt_accuracy",
            "other_prompt_similarity_to_before", "forget_loss", "retain_loss"]
    if len(prompts) > 1:
        keys[1:1] = [f"reproduction_rate[{p}]" for p in prompts]
    return ", ".join(f"{k} {m[k]:.4f}" for k in keys if k in m)
