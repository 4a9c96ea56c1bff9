"""The audit's outputs: ``verify.json`` (every number), ``verify.md`` (tables), ``item-K.png`` per forget item
(the item, its nearest fresh samples under the base and the final model, the relearning curves; matplotlib when
installed, otherwise no picture and the report says so), and their sha256 appended to ``RUN_DIR/manifest.json``
under ``verify`` (a list, one entry per audit; every other key kept; temp file + rename).

Files are written to a temp name in the output folder and renamed into place; nothing is written under ``final/``.
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, List

from torch import Tensor

from ..engine import run_record
from ..hashing import sha256_file

__all__ = ["write", "markdown"]


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _pct(x: float) -> str:
    return f"{100 * x:.2f} %"


def _rate(r: Dict[str, Any]) -> str:
    return f"{r['count']}/{r['n']} = {_pct(r['rate'])} [{_pct(r['ci_low'])}, {_pct(r['ci_high'])}]"


def markdown(data: Dict[str, Any], pictures: List[str], plot_note: str) -> str:
    """``verify.md`` from the ``verify.json`` data."""
    st, q, mem = data["settings"], data["quality"], data["membership"]
    fd = q["feature_fd"]
    sd = data.get("kind") == "sd"
    per_prompt = " per forget prompt" if sd else ""
    guided = f", guidance {st['guidance_scale']:g}" if sd else ""
    own_prompt = " (among the samples of item k's own prompt)" if sd else ""
    seeds = data["seeds"]
    lines = [f"# siss-fast verify: {data['run_dir']}", "",
             f"**{'PASSED' if data['checks']['passed'] else 'FAILED'}**"
             + "".join(f"\n- {f}" for f in data["checks"]["failures"])
             + "".join(f"\n- note: {n}" for n in data["checks"].get("notes") or []), "",
             "## Integrity", "",
             f"- final model sha256 `{data['final_model_sha256']}`: all {data['final_files_checked']} files of "
             "`final/` match the manifest (checked before and after the audit)",
             f"- stop: {data['stop']}",
             f"- fresh seed {seeds['verify_seed']}: generator seeds {seeds['verify_generator_seeds']['samples'][:3]}"
             f"... disjoint from the {len(seeds['run_validation_seeds']['generator_seeds'])} seeds the run's "
             f"validation used{' (derived from its config)' if seeds['run_validation_seeds'].get('derived') else ''}",
             "", f"## Forget rate on {st['samples']} fresh samples{per_prompt} ({st['sampler_steps']} DDIM steps"
             f"{guided})", "",
             f"A sample is forget item k by {data.get('rule') or 'the nearest-neighbour rule'}{own_prompt}; "
             "Clopper-Pearson 95 % intervals.", "",
             "| item | file | " + ("prompt | " if sd else "") + "base model | final model |",
             "|---|---|" + ("---|" if sd else "") + "---|---|"]
    lines += [f"| {it['item']} | {it['file']} | " + (f"{it['prompt']} | " if sd else "")
              + f"{_rate(it['base'])} | {_rate(it['final'])} |" for it in data["items"]]
    fit_note = ", latents, empty prompt" if sd else ""
    lines += ["", "## Quality", "", "| measure | base | final | final / base |", "|---|---|---|---|",
              f"| retain_fit ({q['retain_fit_images']} retain images, fresh noise{fit_note}) | "
              f"{q['retain_fit']['base']:.5f} | {q['retain_fit']['final']:.5f} | {_ratio(q['retain_fit_ratio'])} |"]
    if fd is not None:
        lines.append(f"| feature_fd ({q['samples']} samples) | {fd['base']:.4f} | {fd['final']:.4f} | "
                     f"{_ratio(fd['final'] / fd['base'] if fd['base'] else None)} |")
    if q.get("conditional_retain_loss"):
        c = q["conditional_retain_loss"]
        lines.append(f"| retain images' denoising loss under their own prompts (membership probe, mean) | "
                     f"{c['base']:.5f} | {c['final']:.5f} | {_ratio(c['ratio'])} |")
    if fd is None:
        lines += ["", "No feature_fd: a Stable Diffusion run's fresh samples are generations for the forget prompts, "
                  "not draws of the retain distribution."]
    lines += ["", "## Membership signal", "",
              f"Denoising loss at fixed (t, eps), ten timesteps; percentile among the {mem['reference_images']} "
              f"{mem['reference']} images' losses under the same model (low: treated as training data). "
              f"{mem['note']}.", "",
              "| item | loss base | loss final | percentile base | percentile final |", "|---|---|---|---|---|"]
    lines += [f"| {k} | {r['loss_base']:.5f} | {r['loss_final']:.5f} | {r['percentile_base']:.1f} | "
              f"{r['percentile_final']:.1f} |" for k, r in enumerate(mem["items"])]
    curves = data["relearn"]
    steps = [p["step"] for p in curves["final"]]
    lines += ["", f"## Relearning probe ({st['relearn_steps']} steps on retain data only, AdamW lr "
              f"{st['relearn_lr']:g}, batch {st['relearn_batch']}; {st['relearn_samples']} fresh samples per point)",
              "", "Forget rate along the fine-tune of the final model, and of the base model as the control (and of "
              "a model retrained without the items, when given: exact unlearning). An item comes back when its rate "
              "reaches half its base-model rate.", "",
              "| item | model | " + " | ".join(f"step {s}" for s in steps) + " | reaches 1/2 base rate |",
              "|---|---|" + "---|" * (len(steps) + 1)]
    for it in data["items"]:
        k = it["item"]
        rows = [("final", "final", "returned_at_step"), ("base (control)", "base_control",
                                                          "base_control_returned_at_step")]
        if "control" in curves:
            rows.append(("retrained without the items (control)", "control", "control_returned_at_step"))
        for name, key, back in rows:
            when = it[back]
            verdict = ("n/a (base rate 0)" if it["return_level"] <= 0 else "never" if when is None else
                       f"**step {when}**" if key == "final" else f"step {when}")
            lines.append(f"| {k} | {name} | " + " | ".join(_pct(p["rates"][k]) for p in curves[key])
                         + f" | {verdict} |")
    lines += _perturbation(data.get("perturbation"), st)
    lines += ["", "## Pictures", ""]
    lines += [f"![item {i}]({name})" for i, name in enumerate(pictures)] or [plot_note]
    t = data["timings_s"]
    lines += ["", "## Time", "", ", ".join(f"{k} {v:.1f}" for k, v in t.items()), ""]
    return "\n".join(lines)


def _ratio(x: Any) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def _perturbation(p: Any, st: Dict[str, Any]) -> List[str]:
    """The prompt perturbation table (Stable Diffusion runs), or nothing."""
    if not p:
        return []
    gate = st.get("max_perturbed_rate")
    lines = ["", f"## Prompt perturbation probe ({p['samples']} samples per prompt, the re-measurement's first seeds)",
             "", "Each forget prompt with one word dropped, one word replaced by a synonym, and Gaussian noise added "
             "to its text embedding; the item is counted by the same rule. A perturbed prompt that brings the item "
             "back under the final model is a leak that the unperturbed prompt hides."
             + (f" Threshold: --max-perturbed-rate {gate}." if gate is not None else ""), "",
             "| item | perturbation | prompt | base model | final model |", "|---|---|---|---|---|"]
    for r in p["rows"]:
        what = "none (the prompt)" if r["kind"] == "original" else f"{r['kind']}: {r['change']}"
        lines.append(f"| {r['item']} | {what} | {r['variant']} | {_rate(r['base'])} | {_rate(r['final'])} |")
    return lines


def _nearest(samples: Tensor, item: Tensor, count: int) -> Tensor:
    d = (samples - item).flatten(1).square().mean(1)
    return samples[d.argsort()[:count]]


def _plot(path: Path, k: int, item: Tensor, base: Tensor, final: Tensor, data: Dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    count = 6
    rows = [("base", _nearest(base, item, count)), ("final", _nearest(final, item, count))]
    fig = plt.figure(figsize=(2 + 1.2 * (count + 1) + 4, 3.2))
    grid = fig.add_gridspec(2, count + 2, width_ratios=[1] * (count + 1) + [4])
    for r, (name, imgs) in enumerate(rows):
        for c, img in enumerate([item] + list(imgs)):
            ax = fig.add_subplot(grid[r, c])
            arr = img.permute(1, 2, 0).clamp(0, 1).numpy()
            ax.imshow(arr[:, :, 0] if arr.shape[2] == 1 else arr, cmap="gray" if arr.shape[2] == 1 else None)
            ax.set_xticks([]), ax.set_yticks([])
            ax.set_title("item" if c == 0 else "", fontsize=7)
            if c == 0:
                ax.set_ylabel(f"{name}\nnearest", fontsize=7)
    ax = fig.add_subplot(grid[:, -1])
    for key, label in (("final", "final model"), ("base_control", "base model (control)"),
                       ("control", "retrained without the items (control)")):
        pts = data["relearn"].get(key)
        if pts is None:
            continue
        ax.plot([p["step"] for p in pts], [p["rates"][k] for p in pts], marker="o", label=label)
    ax.set_xlabel("relearning steps (retain only)"), ax.set_ylabel("forget rate")
    ax.set_title(f"item {k}: {data['items'][k]['file']}", fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    os.replace(tmp, path)


def write(run_dir: Path, out_dir: Path, data: Dict[str, Any], pictures: Dict[str, Tensor], *,
          plots: bool = True) -> Dict[str, str]:
    """Write the outputs (module doc); returns ``{file name: sha256}`` as appended to the manifest."""
    out_dir.mkdir(parents=True, exist_ok=True)
    names: List[str] = []
    note = "no pictures: plots were turned off"
    if plots:
        import importlib.util

        if importlib.util.find_spec("matplotlib") is None:
            note = "no pictures: matplotlib is not installed (pip install matplotlib)"
        else:
            for k in range(pictures["forget"].shape[0]):
                name = f"item-{k}.png"
                _plot(out_dir / name, k, pictures["forget"][k], pictures["base"], pictures["final"], data)
                names.append(name)
    data = {**data, "pictures": names, "pictures_note": None if names else note}
    _atomic_text(out_dir / "verify.json", json.dumps(data, indent=2, default=str))
    _atomic_text(out_dir / "verify.md", markdown(data, names, note))
    files = {n: sha256_file(out_dir / n) for n in ["verify.json", "verify.md"] + names}
    manifest = json.loads((run_dir / "manifest.json").read_text())
    entry = {"at": datetime.now(timezone.utc).isoformat(), "out": str(out_dir), "passed": data["checks"]["passed"],
             "seed": data["seeds"]["verify_seed"], "samples": data["settings"]["samples"],
             "relearn_steps": data["settings"]["relearn_steps"], "files": files}
    run_record.update_manifest(run_dir, {"verify": list(manifest.get("verify") or []) + [entry]})
    return files

