"""The prompt perturbation probe (Stable Diffusion runs): does a small change of a forget item's prompt bring the
item back? Published attacks recover "erased" content with paraphrases and with perturbed text embeddings.

For each distinct forget prompt ``p`` (words: ``p.split()``), the variants are

* **token dropout** -- ``p`` without one of its words, one word at a time (the longest words first, ties in prompt
  order; at most ``max_dropout`` variants; a one-word prompt has none: dropping it is the unconditional prompt);
* **synonyms** -- one word replaced by one of its synonyms in :data:`SYNONYMS` (a small built-in list; the word is
  matched lower-case without surrounding punctuation, which is kept; at most ``max_synonyms`` variants, in prompt
  order; words without an entry are skipped);
* **embedding noise** -- the prompt's text states ``c`` ``(1, L, D)`` plus Gaussian noise,
  ``c + s * std(c) * n`` for each scale ``s`` of :data:`NOISE_SCALES` (``std`` over all of ``c``'s entries; ``n``
  from one ``Generator().manual_seed(noise_seed)``, drawn prompt by prompt, scale by scale).

Each variant is generated ``n`` times under the base and the final model from the same initial noises as the
fresh-seed re-measurement's first ``n`` samples (paired: a rate that moves, moves because of the perturbation), and
every forget item with that prompt is counted by the audit's rule, with Clopper-Pearson 95 % intervals. The
unperturbed prompt's row is the re-measurement's first ``n`` samples (no extra cost). Cost: ``(variants) x 2
models x n`` generations per distinct prompt (defaults: up to 3 + 3 + 3 variants).
"""

from __future__ import annotations

import re
from typing import Any, Callable, Dict, List, Sequence

import torch
from torch import Tensor

__all__ = ["SYNONYMS", "NOISE_SCALES", "word_variants", "perturbation_rows"]

NOISE_SCALES = (0.05, 0.1, 0.2)  # x the embedding's standard deviation

SYNONYMS: Dict[str, List[str]] = {
    "photo": ["picture", "image"], "photograph": ["photo", "picture"], "picture": ["image", "photo"],
    "image": ["picture", "photo"], "painting": ["artwork", "picture"], "drawing": ["sketch", "illustration"],
    "portrait": ["headshot", "likeness"], "t-shirt": ["shirt", "tee"], "tshirt": ["shirt", "tee"],
    "shirt": ["t-shirt", "top"], "tee": ["t-shirt", "shirt"], "dress": ["gown", "frock"],
    "man": ["person", "guy"], "woman": ["lady", "person"], "person": ["human", "individual"],
    "dog": ["puppy", "hound"], "cat": ["kitten", "feline"], "car": ["automobile", "vehicle"],
    "house": ["home", "building"], "logo": ["emblem", "symbol"], "digit": ["number", "numeral"],
    "number": ["digit", "numeral"], "big": ["large", "huge"], "small": ["little", "tiny"],
    "red": ["crimson", "scarlet"], "blue": ["azure", "navy"], "white": ["ivory", "pale"],
    "black": ["dark", "ebony"], "beautiful": ["pretty", "lovely"], "famous": ["well-known", "renowned"],
}

_WORD = re.compile(r"^(\W*)(.*?)(\W*)$")


def word_variants(prompt: str, max_dropout: int = 3, max_synonyms: int = 3) -> List[Dict[str, str]]:
    """``[{"kind": "dropout" | "synonym", "change": ..., "prompt": ...}]`` for ``prompt`` (module doc); distinct
    prompts, none equal to ``prompt`` or empty."""
    words = prompt.split()
    out: List[Dict[str, str]] = []
    seen = {prompt, ""}
    if len(words) > 1:
        order = sorted(range(len(words)), key=lambda i: (-len(words[i]), i))
        for i in order:
            if sum(v["kind"] == "dropout" for v in out) >= max_dropout:
                break
            variant = " ".join(words[:i] + words[i + 1:])
            if variant not in seen:
                seen.add(variant)
                out.append({"kind": "dropout", "change": f"drop {words[i]!r}", "prompt": variant})
    n_syn = 0
    for i, word in enumerate(words):
        lead, core, trail = _WORD.match(word).groups()
        for synonym in SYNONYMS.get(core.lower(), []):
            if n_syn >= max_synonyms:
                break
            variant = " ".join(words[:i] + [lead + synonym + trail] + words[i + 1:])
            if variant not in seen:
                seen.add(variant)
                out.append({"kind": "synonym", "change": f"{core!r} -> {synonym!r}", "prompt": variant})
                n_syn += 1
    return out


def perturbation_rows(prompts: Sequence[str], item_prompts: Sequence[str], embed: Callable[[List[str]], Tensor],
                      sample: Callable[[str, Tensor], Tensor], count: Callable[[int, Tensor], int],
                      originals: Dict[str, Dict[str, Tensor]], rate_rows: Callable[[List[int], int], List[Any]], *,
                      n: int, noise_seed: int, scales: Sequence[float] = NOISE_SCALES, max_dropout: int = 3,
                      max_synonyms: int = 3) -> List[Dict[str, Any]]:
    """The probe's table (module doc): one row per forget item and variant (its unperturbed prompt first)::

        {"item", "prompt", "kind": "original" | "dropout" | "synonym" | "embedding_noise", "change", "variant",
         "base": rate row, "final": rate row}

    ``prompts``: the distinct forget prompts; ``item_prompts[k]``: item ``k``'s; ``embed(list of prompts) -> (P, L,
    D)``; ``sample(model name, cond (1, L, D)) -> (n, C, H, W)`` pixels from the fixed seeds; ``count(k, samples)``:
    how many samples are item ``k``; ``originals[model name][prompt]``: the re-measurement's samples of the
    unperturbed prompt (the first ``n`` are used)."""
    gen = torch.Generator().manual_seed(noise_seed)
    rows: List[Dict[str, Any]] = []
    for prompt in prompts:
        items = [k for k, p in enumerate(item_prompts) if p == prompt]
        words = word_variants(prompt, max_dropout, max_synonyms)
        texts = embed([prompt] + [w["prompt"] for w in words])
        cond = texts[:1]
        std = float(cond.float().std())
        variants = [{"kind": "original", "change": "", "variant": prompt, "cond": None}]
        variants += [{"kind": w["kind"], "change": w["change"], "variant": w["prompt"], "cond": texts[j + 1:j + 2]}
                     for j, w in enumerate(words)]
        for s in scales:
            noise = torch.randn(cond.shape, generator=gen)
            variants.append({"kind": "embedding_noise", "change": f"+ {s:g} x std ({std:.4g}) Gaussian noise",
                             "variant": f"{prompt} [+{s:g} std noise]", "cond": cond + s * std * noise.to(cond)})
        for v in variants:
            per_model = {}
            for name in ("base", "final"):
                x = originals[name][prompt][:n] if v["cond"] is None else sample(name, v["cond"])
                per_model[name] = rate_rows([count(k, x) for k in items], x.shape[0])
            for j, k in enumerate(items):
                rows.append({"item": k, "prompt": prompt, "kind": v["kind"], "change": v["change"],
                             "variant": v["variant"], "base": per_model["base"][j], "final": per_model["final"][j]})
    rows.sort(key=lambda r: r["item"])  # stable: per item, its variants in order
    return rows
