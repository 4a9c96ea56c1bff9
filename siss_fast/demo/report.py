"""Run-directory reports: sample grids, ``report.md`` from ``report.json``, the comparison plot.

``siss-fast report RUN_DIR`` calls :func:`rebuild_report`: it needs only ``report.json`` (and the PNGs it names),
so a run directory can be re-rendered anywhere.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
from torch import Tensor

__all__ = ["save_grid", "render_report", "rebuild_report", "save_pareto_plot", "METRIC_DOCS"]

# metric key -> (direction, description) shown in report.md
METRIC_DOCS = {
    # text-to-image runs (siss-fast demo --text-to-image)
    "reproduction_rate": ("lower", "share of the memorized prompt's generations whose Pearson correlation with the "
                          "memorized image exceeds the reproduction threshold (0.9 by default)"),
    "forget_similarity": ("lower", "mean Pearson correlation of the memorized prompt's generations with the memorized "
                          "image"),
    "noise_norm_forget": ("lower", "noise-norm memorization signal (Wen et al., ICLR 2024) of the memorized prompt: "
                          "mean of ‖eps(x_t, prompt) - eps(x_t, '')‖ over the sampling trajectory"),
    "noise_norm_forget_first": ("lower", "the same norm at the first sampling step only (on the initial noise; Wen et "
                                "al.'s one-step detector)"),
    "noise_norm_other": ("flat", "the noise-norm signal of the other prompts (mean over the trajectory)"),
    "noise_norm_other_first": ("flat", "the noise-norm of the other prompts at the first sampling step"),
    "other_prompt_similarity_to_before": ("higher", "mean Pearson correlation of each other-prompt generation with the "
                                          "same-seed generation before unlearning (1 = unchanged)"),
    "other_prompt_similarity_to_before_min": ("higher", "the lowest of those correlations"),
    "other_forget_similarity": ("flat", "mean Pearson correlation of the other prompts' generations with the memorized "
                                "image"),
    "other_reproduction_rate": ("lower", "share of the other prompts' generations that reproduce the memorized image"),
    "prompt_accuracy": ("higher", "share of the digit prompts' generations that the digits classifier assigns to the "
                        "prompt's digit"),
    # pixel runs (siss-fast demo) and both
    "forget_rate": ("lower", "share of generated samples within L2 4.5 of the planted T-shirt ([0, 1] pixels)"),
    "quality": ("higher", "Inception-Score-style score of the digits classifier on the non-T-shirt samples (max 10)"),
    "class_entropy": ("higher", "entropy of the predicted digit classes / log 10 (1 = balanced)"),
    "min_class_share": ("higher", "rarest digit's share x 10 (1 = balanced, 0 = a digit is missing)"),
    "confidence": ("higher", "mean max class probability of the classifier on the non-T-shirt samples"),
    "forget_loss": ("higher", "denoising loss of the T-shirt at fixed (t, eps) (membership signal)"),
    "retain_loss": ("flat", "denoising loss of 256 retained digits at fixed (t, eps)"),
    "loss_ratio": ("higher", "forget_loss / retain_loss (< 1: the forget image looks like training data)"),
    "forget_bpd": ("higher", "variational bound (not ODE) on -log p(T-shirt), bits/dim"),
    "retain_bpd": ("flat", "variational bound on -log p(digit), bits/dim, mean of 4 retained digits"),
    "n_samples": ("", "number of generated samples scored"),
}


def save_grid(images: Tensor, path, *, nrow: Optional[int] = None, highlight: Optional[Tensor] = None,
              scale: int = 2) -> None:
    """Save ``(N, C, H, W)`` images in [0, 1] as a PNG grid; ``highlight`` ``(N,)`` bool draws a red frame."""
    from PIL import Image

    n, c, h, w = images.shape
    cols = nrow or max(1, int(math.ceil(math.sqrt(n))))
    rows = int(math.ceil(n / cols))
    pad = 2
    grid = torch.ones((3, rows * (h + pad) + pad, cols * (w + pad) + pad)) * 0.5
    rgb = images.expand(-1, 3, -1, -1) if c == 1 else images[:, :3]
    for i in range(n):
        r, q = divmod(i, cols)
        y, x = pad + r * (h + pad), pad + q * (w + pad)
        if highlight is not None and bool(highlight[i]):
            grid[:, y - 1:y + h + 1, x - 1:x + w + 1] = torch.tensor([1.0, 0.0, 0.0])[:, None, None]
        grid[:, y:y + h, x:x + w] = rgb[i]
    arr = (grid.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    img = Image.fromarray(arr, mode="RGB")
    if scale != 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def _fmt(value) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.4f}" if abs(value) < 1000 else f"{value:.4g}"
    return str(value)


def _change(before, after) -> str:
    if not isinstance(before, (int, float)) or not isinstance(after, (int, float)) or isinstance(before, bool):
        return ""
    if before == 0 or math.isnan(before) or math.isnan(after):
        return ""
    return f"{100.0 * (after - before) / abs(before):+.1f} %"


def render_report(report: Dict, run_dir: Path) -> str:
    """``report.md`` text from a ``report.json`` dict (before/after table, grids that exist, stop rule, checks)."""
    run_dir = Path(run_dir)
    before, after = report.get("before", {}), report.get("after", {})
    lines = [f"# Unlearning report: {report.get('title', run_dir.name)}", ""]
    method = report.get("method")
    lines.append(f"- method: `{json.dumps(method) if isinstance(method, dict) else method}`")
    for key in ("backend", "steps", "stop_reason", "wall_s", "unlearn_wall_s", "base_model_sha256", "command"):
        if key in report:
            lines.append(f"- {key}: `{report[key]}`")
    keys = [k for k in METRIC_DOCS if k in before or k in after]
    keys += [k for k in list(before) + list(after) if k not in keys and k not in METRIC_DOCS]
    seen = set()
    rows: List[str] = []
    for k in keys:
        if k in seen:
            continue
        seen.add(k)
        direction, doc = METRIC_DOCS.get(k, ("", ""))
        if not after:  # a comparison: one column for the base model, the methods' rows below
            rows.append(f"| {k} | {_fmt(before.get(k))} | {direction} | {doc} |")
            continue
        rows.append(f"| {k} | {_fmt(before.get(k))} | {_fmt(after.get(k))} | {_change(before.get(k), after.get(k))}"
                    f" | {direction} | {doc} |")
    head = (["| metric | base model | better | definition |", "|---|---|---|---|"] if not after else
            ["| metric | before | after | change | better | definition |", "|---|---|---|---|---|---|"])
    lines += [""] + head + rows
    lines += _stop_signal_lines(report.get("stop_signal"))
    lines += _verify_lines(report.get("verify"))
    checks = report.get("pass_criteria")
    if checks:
        lines += ["", "## Pass criteria", ""]
        for name, ok in checks.items():
            lines.append(f"- {'PASS' if ok else 'FAIL'}: {name}")
    grids = report.get("grids", {})
    if grids:
        lines += ["", "## Samples (fixed seeds; red frame: within the forget threshold of the planted image)", ""]
        for label, rel in grids.items():
            if (run_dir / rel).exists():
                lines.append(f"**{label}**  ")
                lines.append(f"![{label}]({rel})")
                lines.append("")
    compare = report.get("compare")
    if compare:
        lines += ["", "## Comparison of methods (same budget and seed)", "",
                  f"| method | steps | stop | kept step | last check ({_check_names(compare)}) | forget_rate | "
                  "quality | class_entropy | forget_loss | retain_loss | wall_s |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for row in compare:
            a, last = row.get("after", {}), row.get("last_check") or {}
            names = row.get("check_metrics") or ["forget_rate", "classifier_quality"]  # runs before they were named
            check = ", ".join(_fmt(last.get(n)) for n in names) if last else ""
            lines.append(f"| {row['name']} | {row.get('steps')} | {row.get('stop_reason')} | {row.get('final_step')} | "
                         f"{check} | {_fmt(a.get('forget_rate'))} | {_fmt(a.get('quality'))} | "
                         f"{_fmt(a.get('class_entropy'))} | {_fmt(a.get('forget_loss'))} | {_fmt(a.get('retain_loss'))} | "
                         f"{_fmt(row.get('wall_s'))} |")
        if (run_dir / "pareto.png").exists():
            lines += ["", "![quality vs forget rate](pareto.png)", ""]
    notes = report.get("notes")
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def _check_names(rows) -> str:
    """The stop rules' forget and quality metric names of a comparison (the first row's; older reports: the demo's
    classifier metrics)."""
    names = (rows[0].get("check_metrics") if rows else None) or ["forget_rate", "classifier_quality"]
    return ", ".join(str(n) for n in names)


def _step(x: Optional[int]) -> str:
    return "no" if x is None else f"step {x}"


def _fmt_rate(x: Optional[float]) -> str:
    return "not run" if x is None else f"{x:.4f}"


def _verify_lines(v: Optional[Dict]) -> List[str]:
    """The report's "Proof of deletion" section from the demo's ``audit_run`` summary of ``verify.json``."""
    if not v:
        return []
    folder = v["folder"]
    prompts = any(it.get("prompt") for it in v["items"])
    per = "per forget prompt and model" if prompts else "per model"
    lines = ["", "## Proof of deletion (`siss-fast verify`)", "",
             f"{v['samples']} fresh samples {per} from seed {v['seed']} (disjoint from every seed the stop rule "
             f"used), then {v['relearn_steps']} steps of fine-tuning on the retain set only: "
             f"**{'PASSED' if v['passed'] else 'FAILED'}** in {v['seconds']} s; retain fit final/base "
             f"{v['retain_fit_ratio']:.4f}. Full report: [{folder}/verify.md]({folder}/verify.md).", "",
             "| item | " + ("prompt | " if prompts else "") + "forget rate before [95 % CI] | after [95 % CI] | "
             "membership percentile before -> after | peak rate while relearning (retrained without it) | "
             "back at step (base model: control) |",
             "|---|" + ("---|" if prompts else "") + "---|---|---|---|---|"]

    def rate(r: Dict) -> str:
        return f"{r['rate']:.4f} [{r['ci_low']:.4f}, {r['ci_high']:.4f}]"

    for it in v["items"]:
        pct = it["membership_percentile"]
        lines.append(f"| {it['file']} | " + (f"{it.get('prompt') or ''} | " if prompts else "") +
                     f"{rate(it['base'])} | {rate(it['final'])} | {pct['base']:.1f} -> "
                     f"{pct['final']:.1f} | {it['relearn_peak_rate']:.4f} ({_fmt_rate(it.get('retrained_peak_rate'))})"
                     f" | {_step(it['returned_at_step'])} "
                     f"({_step(it.get('base_control_returned_at_step'))}) |")
    if v.get("perturbation_max_final_rate") is not None:
        lines += ["", f"Prompt perturbations (word dropout, synonyms, noise on the text embedding; "
                      f"{v.get('perturbation_samples')} generations each): highest rate under the final model "
                      f"{v['perturbation_max_final_rate']:.4f} (every variant: {folder}/verify.md)."]
    return lines


def _stop_signal_lines(signal: Optional[Dict]) -> List[str]:
    """The engine's own readings at step 0 and at the kept step (what its stop rules decided on), and how the
    report's table above was measured differently."""
    if not signal:
        return []
    before, kept = signal.get("before") or {}, signal.get("kept") or {}
    lines = ["", "## The stop signal (the engine's own numbers)", "",
             f"Stop rule `{signal.get('stop_reason')}` at step {signal.get('step')}, final model from step "
             f"{signal.get('kept_step')}.", "", "| engine metric | step 0 | kept step |", "|---|---|---|"]
    lines += [f"| {k} | {_fmt(before.get(k))} | {_fmt(kept.get(k))} |" for k in before]
    if signal.get("differs"):
        lines += ["", signal["differs"]]
    return lines


def rebuild_report(run_dir) -> Path:
    """Rewrite ``RUN_DIR/report.md`` from ``RUN_DIR/report.json``. Returns the path written."""
    run_dir = Path(run_dir)
    path = run_dir / "report.json"
    if not path.is_file():
        raise FileNotFoundError(f"RUN_DIR: expected {path} (a run directory written by `siss-fast demo`)")
    report = json.loads(path.read_text())
    out = run_dir / "report.md"
    out.write_text(render_report(report, run_dir))
    return out


def save_pareto_plot(rows: Sequence[Dict], path, *, baseline: Optional[Dict] = None) -> str:
    """Quality vs forget rate, one point per method (the paper's Pareto picture). matplotlib if installed, else a
    plain PIL drawing. Returns the backend used."""
    pts = [(r["name"], r["after"].get("forget_rate", float("nan")), r["after"].get("quality", float("nan")))
           for r in rows]
    if baseline:
        pts.append(("before", baseline.get("forget_rate", float("nan")), baseline.get("quality", float("nan"))))
    merged: Dict[tuple, List[str]] = {}  # methods that kept the same weights (e.g. the base model) share a point
    for name, fr, q in pts:
        merged.setdefault((round(fr, 6), round(q, 6)), []).append(name)
    pts = [(" = ".join(names), fr, q) for (fr, q), names in merged.items()]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4.5), dpi=110)
        x_max = max([100 * fr for _, fr, _ in pts if fr == fr] or [1.0])
        for name, fr, q in pts:
            ax.scatter([100 * fr], [q], marker="x" if "before" in name.split(" = ") else "o", s=50)
            right = 100 * fr > 0.6 * x_max  # labels of points on the right run leftwards, inside the axes
            ax.annotate(name, (100 * fr, q), textcoords="offset points", xytext=(-5, 4) if right else (5, 4),
                        ha="right" if right else "left", fontsize=8)
        ax.set_xlabel("forget rate (% of samples that are the planted image)")
        ax.set_ylabel("quality (classifier Inception-style score)")
        ax.set_title("Unlearning methods: quality vs forget rate (same budget, seed)")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)
        return "matplotlib"
    except ImportError:
        _pil_scatter(pts, path)
        return "pil"


def _pil_scatter(pts: List, path) -> None:
    from PIL import Image, ImageDraw

    W, H, m = 640, 480, 60
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    xs = [100 * p[1] for p in pts if not math.isnan(p[1])] or [0.0]
    ys = [p[2] for p in pts if not math.isnan(p[2])] or [0.0]
    x0, x1 = 0.0, max(xs) * 1.1 + 1e-6
    y0, y1 = min(ys) * 0.95, max(ys) * 1.05 + 1e-6
    d.rectangle([m, m // 2, W - m // 2, H - m], outline="black")
    d.text((W // 2 - 120, H - m + 25), "forget rate (%)", fill="black")
    d.text((5, m // 2 - 20), "quality", fill="black")
    for i in range(5):
        xv, yv = x0 + (x1 - x0) * i / 4, y0 + (y1 - y0) * i / 4
        px = m + (W - 1.5 * m) * i / 4
        py = H - m - (H - 1.5 * m) * i / 4
        d.text((px - 10, H - m + 5), f"{xv:.1f}", fill="black")
        d.text((5, py - 5), f"{yv:.2f}", fill="black")
    for name, fr, q in pts:
        if math.isnan(fr) or math.isnan(q):
            continue
        px = m + (W - 1.5 * m) * (100 * fr - x0) / (x1 - x0)
        py = H - m - (H - 1.5 * m) * (q - y0) / (y1 - y0)
        d.ellipse([px - 4, py - 4, px + 4, py + 4], fill="red" if name == "before" else "blue")
        d.text((px + 6, py - 6), name, fill="black")
    img.save(path)
