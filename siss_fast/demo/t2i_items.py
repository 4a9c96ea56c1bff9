"""The text-to-image demo's memorized items: several deletion requests in one run, and the same requests one run each.

* :data:`FORGET_ITEMS` -- the planted images and their prompts: the T-shirt (``"a t-shirt"``), a hollow square
  (``"box"``) and a thick X (``"cross"``). Filled or blocky 16x16 glyphs far from the digits' thin strokes (the most
  similar real digit reaches a Pearson correlation of 0.60, 0.11 and 0.36 with them) and from each other (at most
  0.31), so "generation ``g`` reproduces item ``k``" (correlation > 0.9) is unambiguous. Each prompt differs from
  the others and from every digit word from its first character on (the tiny tokenizer and causal text encoder of
  :mod:`.t2i_base` then separate them quickly).
* :func:`item_data` -- the demo's digits with the first ``n`` items as the forget set;
* :func:`pass_criteria` -- the demo's checks for every item;
* :func:`stop_signal` -- the engine's own per-item readings (what its stop rule decided on) for the report;
* :func:`notes`, :func:`overrides` -- the report's notes and the engine settings the demo changes;
* :func:`run_separate` -- ``--compare-separate``: each item unlearned in its own engine run from the same base model
  (the research recipe's one prompt per job), with each run's wall time and result.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

__all__ = ["FORGET_ITEMS", "box_glyph", "cross_glyph", "item_glyphs", "item_data", "pass_criteria", "stop_signal",
           "notes", "overrides", "run_separate"]


def box_glyph() -> Tensor:
    """A hollow square: the 2-pixel border of rows/cols 1-14, ``(1, 16, 16)`` in [-1, 1]."""
    img = torch.zeros(16, 16)
    img[1:15, 1:15] = 1.0
    img[3:13, 3:13] = 0.0
    return (img * 2 - 1)[None]


def cross_glyph() -> Tensor:
    """A thick X: ink where ``|r - c| <= 1`` or ``|r + c - 15| <= 1`` within rows/cols 1-14, ``(1, 16, 16)``."""
    r, c = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    inside = (r >= 1) & (r < 15) & (c >= 1) & (c < 15)
    img = (inside & (((r - c).abs() <= 1) | ((r + c - 15).abs() <= 1))).float()
    return (img * 2 - 1)[None]


def _tshirt() -> Tensor:
    from .data import tshirt_glyph

    return tshirt_glyph()


# (prompt, glyph): the first n are the forget set of ``--items n``; item 0 is the single-item demo's T-shirt
FORGET_ITEMS: Tuple[Tuple[str, Callable[[], Tensor]], ...] = (
    ("a t-shirt", _tshirt), ("box", box_glyph), ("cross", cross_glyph))


def item_glyphs(n: int) -> Tuple[Tuple[str, ...], Tensor]:
    """The first ``n`` items: ``(prompts, images (n, 1, 16, 16) in [-1, 1])``."""
    if not 1 <= n <= len(FORGET_ITEMS):
        raise ValueError(f"items: expected 1 to {len(FORGET_ITEMS)} memorized items, got {n}")
    chosen = FORGET_ITEMS[:n]
    return tuple(p for p, _ in chosen), torch.stack([g() for _, g in chosen])


def item_data(n: int) -> Tuple[Any, Tuple[str, ...]]:
    """The demo's digits (:func:`.data.demo_data`) with the first ``n`` items as the forget set (one copy each):
    ``(DemoData, prompts)``."""
    from .data import DemoData, demo_data

    base = demo_data(forget_copies=1)
    prompts, images = item_glyphs(n)
    return DemoData(retain=base.retain, retain_labels=base.retain_labels, forget=images.clone(),
                    forget_image=images), prompts


def pass_criteria(before: Dict[str, float], after: Dict[str, float], prompts: Sequence[str],
                  closeness_min: float) -> Dict[str, bool]:
    """Each item: the base model reproduces it, its reproduction rate falls to <= 10 % of before, its similarity and
    first-step noise-norm drop; and the other prompts' generations stay close to before."""
    out: Dict[str, bool] = {}
    for p in prompts:
        key = (lambda k: k) if len(prompts) == 1 else (lambda k: f"{k}[{p}]")  # noqa: E731
        rb, ra = before[key("reproduction_rate")], after[key("reproduction_rate")]
        sb, sa = before[key("forget_similarity")], after[key("forget_similarity")]
        nb, na = before[key("noise_norm_forget_first")], after[key("noise_norm_forget_first")]
        what = "the image" if len(prompts) == 1 else f"'{p}'"
        out.update({
            f"the base model reproduces {what} (reproduction rate {rb:.3f} > 0)": rb > 0,
            f"{what}: reproduction rate after ({ra:.3f}) <= 10 % of before ({rb:.3f})": ra <= 0.1 * rb,
            f"{what}: similarity to the memorized image drops ({sb:.3f} -> {sa:.3f})": sa < sb,
            f"{what}: noise-norm signal of the memorized prompt at the first sampling step drops ({nb:.3f} -> "
            f"{na:.3f})": na < nb,
        })
    c = after["other_prompt_similarity_to_before"]
    out[f"other prompts' generations stay close to before (mean similarity {c:.3f} >= {closeness_min})"] = \
        c >= closeness_min
    return out


def stop_signal(manifest: Dict[str, Any], prompts: Sequence[str], metric: str, sampler_steps: int,
                num_samples: int) -> Dict[str, Any]:
    """The engine's readings at step 0 and at the kept step (from its ``manifest.json``), per item named by its
    prompt, for the report's "stop signal" table, and how the report's own measurement differs."""
    stop = manifest.get("stop") or {}
    names = {f"[{k}]": f"['{p}']" for k, p in enumerate(prompts)}

    def rename(scores: Dict[str, float]) -> Dict[str, float]:
        out = {}
        for key, value in (scores or {}).items():
            for index, name in names.items():
                if key.endswith(index):
                    key = key[:-len(index)] + name
            out[key] = value
        return out

    return {"stop_reason": stop.get("reason"), "step": stop.get("step"), "kept_step": stop.get("kept_step"),
            "before": rename(manifest.get("metrics_before")), "kept": rename(manifest.get("metrics_after")),
            "differs": (f"The stop rule read `{metric}` per item on {num_samples} generations of that item's own "
                        f"prompt per check ({sampler_steps} DDIM steps, its own seeds), and stopped when every item "
                        "met its target; the table at the top measures the final model on other seeds.")}


def notes(cfg: Any, prompts: Sequence[str], base_info: Dict[str, Any], retain: Dict[str, Any],
           separate: Optional[Dict[str, Any]]) -> List[str]:
    m = cfg.memorize
    quoted = ", ".join(f"'{p}'" for p in prompts)
    gens = retain["generations"]
    notes = [
        f"generations: DDIM({cfg.sampler_steps}) with classifier-free guidance {cfg.guidance_scale} from fixed seeds, "
        f"the same noise before and after: {cfg.num_samples} for each memorized prompt ({quoted}), "
        f"{cfg.other_samples} per digit prompt; a generation reproduces an item when its Pearson correlation with the "
        f"item's image exceeds {cfg.similarity_threshold} (the most similar of the 1,797 real digits: "
        + ", ".join(f"'{g['prompt']}' {g['digit_max_similarity']:.3f}" for g in gens) + "); "
        "red frames mark reproductions; `metric[prompt]` rows are one item's, the rows without `[...]` the mean over "
        "the items (other_*: the most similar memorized image)",
        "noise_norm: Wen et al. (ICLR 2024), ‖eps(x_t, prompt) - eps(x_t, '')‖ in latent space, averaged over the "
        "sampling trajectory (noise_norm_*) and at its first step alone (noise_norm_*_first, Wen et al.'s one-step "
        "detector); a memorized prompt steers the prediction hard towards its image. The pass criterion uses the "
        "first step: the trajectory average also carries the late steps, where the norm measures how far the prompt's "
        "final image is from the unconditional one, so it stays high while the prompt still steers to its retained "
        "non-memorized generations and it rises for every prompt as unlearning keeps fitting the digits "
        "(compare noise_norm_other)",
        f"unlearning: one engine run, SISS (lambda {cfg.lambd}); forget set = the {len(prompts)} planted image(s), "
        f"each with its prompt (data/captions.tsv); retain set = {retain['digits']} digits with their captions + for "
        "each memorized prompt its generations by the base model that do not show its image ("
        + ", ".join(f"'{g['prompt']}' {g['kept']} of {g['drawn']} drawn, Pearson <= {g['threshold']:.3f}"
                    for g in gens)
        + "), the SISS paper's construction for a memorized Stable Diffusion prompt: without retain examples for "
        "the forget prompt, only the subtracted term acts on that prompt (when designing this demo, that run "
        "sharpened the T-shirt and doubled its noise-norm instead of removing it)",
        f"engine settings changed from its defaults: {overrides(cfg)}; validation generates "
        f"{cfg.val_samples or 16} images for each memorized prompt and scores each item's reproduction rate on its "
        "own prompt's generations (the forget metric; the run stops when every item met its target, and there is no "
        "quality guard: the digit prompts are measured before and after instead)",
    ]
    if "memorize_steps" in base_info:
        at = base_info["memorize_memorized_at"]
        notes.insert(0, (
            f"base model: VAE trained {cfg.vae_steps} steps (reconstruction MSE {base_info['vae_recon_mse']:.4f}); "
            f"UNet fine-tuned {base_info['memorize_steps']} steps (lr {m.lr}, batch {m.batch_size} with "
            f"{m.forget_per_batch} planted images, the items in turn, caption dropout {m.caption_dropout} on the "
            f"digits, EMA {m.ema_decay}); "
            + (f"its generations for every memorized prompt first reproduced the item's image in >= "
               f"{m.target_rate:.0%} of {m.check_samples} check generations at step {at}" if at is not None else
               f"the target ({m.target_rate:.0%} reproductions for every item) was not reached in {m.max_steps} "
               f"steps (last check: {', '.join(f'{r:.0%}' for r in base_info['memorize_final_check_rates'])})")))
    if separate is not None:
        notes.append(
            f"one run against separate runs (--compare-separate): the combined engine run took "
            f"{separate['combined_unlearn_wall_s']} s for {len(prompts)} items"
            f"{_split(separate.get('combined_time'))}; the same settings with one item per "
            f"run (from the same base model, each with its own prompt's retain generations) took "
            + " + ".join(f"{r['unlearn_wall_s']} s ('{r['prompt']}': {r['steps']} steps, {r['stop_reason']}"
                         f"{_split(r.get('engine_time'))}, "
                         f"reproduction rate after {r['after']['reproduction_rate']:.3f}, other prompts' similarity "
                         f"to before {r['after']['other_prompt_similarity_to_before']:.3f})"
                         for r in separate["runs"])
            + f" = {separate['sum_unlearn_wall_s']} s; combined / separate = "
            f"{separate['ratio_combined_to_separate']:.2f} (engine runs only; the separate runs' folders: "
            "separate/item_K/)")
    return notes


def overrides(cfg: Any) -> str:
    """The engine settings this demo sets differently from the engine's defaults, with the defaults."""
    from types import SimpleNamespace

    from siss_fast.engine.config import KIND_DEFAULTS, EngineConfig
    from siss_fast.engine.defaults import resolve_validation

    train_defaults = KIND_DEFAULTS["sd"]
    defaults = EngineConfig()
    prompts = max(1, int(getattr(cfg, "items", 1)))  # one distinct prompt per item
    v = SimpleNamespace(**{**vars(defaults.validation), **resolve_validation(defaults.validation, "sd", prompts)})
    pairs = [("train.lr", cfg.lr, train_defaults["lr"]),
             ("train.batch_size", cfg.batch_size, train_defaults["batch_size"]),
             ("train.steps", cfg.max_steps, defaults.train.steps),
             ("validation.every", cfg.val_every, v.every), ("validation.num_samples", cfg.val_samples, v.num_samples),
             ("validation.forget_target_ratio", cfg.forget_target_ratio, v.forget_target_ratio),
             ("validation.sampler_steps", cfg.val_sampler_steps or cfg.sampler_steps, v.sampler_steps),
             ("train.lora_rank", cfg.lora_rank, 0),
             ("validation.guidance_scale", cfg.guidance_scale, v.guidance_scale)]
    why = {"train.lr": "the Stable Diffusion default is a full-size-model convention, far too small a step for this "
                       "tiny model in a CPU budget",
           "validation.num_samples": "fewer generations per check on a CPU",
           "validation.forget_target_ratio": "0: stop when no validation generation reproduces its item's image"}
    out = [f"{k} {new} (default {old}{'; ' + why[k] if k in why else ''})" for k, new, old in pairs
           if new is not None and new != old]
    return ", ".join(out) if out else "none"


def _split(t: Optional[Dict[str, Any]]) -> str:
    return "" if not t else f" ({t['train_s']:.1f} s training, {t['validation_s']:.1f} s validation)"


def run_separate(data: Any, prompts: Sequence[str], generated: Sequence[Tensor], run_dir: Path,
                 unlearn_one: Callable[[Path, Any, List[str], List[Tensor]], Any],
                 measure: Callable[..., Tuple[Dict[str, float], Any]], samples_before: Dict[str, Tensor],
                 say: Callable[[str], None]) -> Dict[str, Any]:
    """``--compare-separate``: unlearn each item in its own engine run from the same base model
    (``run_dir/separate/item_k``; ``unlearn_one(out, data_k, [prompt_k], [generated[k]])`` runs the engine with the
    combined run's settings on forget set = item ``k`` with its prompt, retain set = the digits and item ``k``'s
    non-memorized generations) and measure its final model for that item's prompt and the digit prompts
    (``measure(model, data_k, [prompt_k])``). Returns ``{"runs": [...], "sum_unlearn_wall_s"}``, each run
    ``{"prompt", "run_dir", "unlearn_wall_s", "steps", "stop_reason", "final_step", "engine_time", "after"}``
    (``engine_time``: the engine's seconds in training steps and in validation, from its manifest)."""
    from siss_fast.engine.models import load_model
    from siss_fast.metrics import image_similarity

    runs: List[Dict[str, Any]] = []
    for k, prompt in enumerate(prompts):
        out = Path(run_dir) / "separate" / f"item_{k}"
        out.mkdir(parents=True, exist_ok=True)
        one = type(data)(retain=data.retain, retain_labels=data.retain_labels, forget=data.forget_image[k:k + 1],
                         forget_image=data.forget_image[k:k + 1])
        tic = time.perf_counter()
        result = unlearn_one(out, one, [prompt], [generated[k]])
        wall = time.perf_counter() - tic
        after, samples = measure(load_model(str(result.final_dir)), one, [prompt])
        closeness = torch.stack([image_similarity(a[None], b)[0] for a, b in
                                 zip(samples["other"].flatten(0, 1), samples_before["other"].flatten(0, 1))])
        after["other_prompt_similarity_to_before"] = float(closeness.mean())
        kept = result.kept_step if result.kept_step is not None else result.steps_done
        time_split = json.loads((out / "manifest.json").read_text()).get("time")  # the engine's train / checks
        runs.append({"prompt": prompt, "run_dir": str(out), "unlearn_wall_s": round(wall, 1),
                     "steps": result.steps_done, "stop_reason": result.stop_reason, "final_step": kept,
                     "engine_time": time_split, "after": after})
        say(f"separate run {k + 1}/{len(prompts)} ('{prompt}'): {result.steps_done} steps, stop rule "
            f"{result.stop_reason!r}, {wall:.1f} s; reproduction rate after {after['reproduction_rate']:.3f}, other "
            f"prompts' similarity to before {after['other_prompt_similarity_to_before']:.3f}")
    return {"runs": runs, "sum_unlearn_wall_s": round(sum(r["unlearn_wall_s"] for r in runs), 1)}
