"""Fidelity of the classifier-free quality guards and of the forget signals (issue 12), on over-trained engine runs.

    python benchmarks/guard_fidelity.py run EXP --out DIR [--lr 6e-4] [--steps 300] [--every 10] [--samples 512]
    python benchmarks/guard_fidelity.py analyze DIR/EXP-LR ... [--json benchmarks/results/guard-fidelity.json]
                                                            [--png benchmarks/results/guard-fidelity.png]

``run``: an engine run on a planted experiment (``EXP``: a key of ``planted_data.EXPERIMENTS``; ``demo`` = the
shipped digits + T-shirt model) with the stop rules off (``stop_on_target`` / ``stop_on_guard`` false), so every
``every`` steps the validation records every metric in ``metrics.jsonl``: ``classifier_quality`` (the independent
judge), ``retain_distance`` / ``forget_distance`` (the built-ins), ``feature_fd`` / ``feature_kid`` /
``forget_nn`` (this issue's metrics), and the validation samples themselves (``DIR/samples_pt/vNNN.pt``, ``(N, 1,
16, 16)`` fp32 in [0, 1]) so that feature choices can be compared afterwards on the very same samples.

``analyze``: per run, the readings per validated step; for each guard (and each feature variant: block sets x
timesteps x Fréchet / kernel distance, recomputed from the saved samples) the Spearman correlation of ``-guard``
with ``classifier_quality`` over the validated steps (1 = same order), its trip step at the default tolerance (first
step with ``(g - g_0) > tol |g_0|``), the classifier's 97 % step (first step with ``q < 0.97 q_0``), and the window
of tolerances whose trip lies within one check of the classifier's step: ``[max_{j<=c-2} r_j, max_{j<=c+1} r_j)``
with ``r_j = (g_j - g_0) / |g_0|`` and ``c`` the index of the classifier's step. Forget signals: per step, the share
of samples each rule counts, and over all saved samples the copies that ``forget_nn`` counts and ``forget_distance``
misses (with their RMS distance to the item). One torch thread throughout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

__all__ = ["GUARDS", "VARIANT_TS", "VARIANT_BLOCKS", "run", "analyze_run", "trip_index", "tolerance_window", "main"]

GUARDS = {"feature_fd": 0.15, "feature_kid": None, "retain_distance": 0.15}  # name -> default tolerance
CLASSIFIER_FRACTION = 0.97
OTHER_FRACTIONS = (0.95, 0.9)  # tolerance windows for looser classifier bars too
VARIANT_TS = (20, 100, 300)
VARIANT_BLOCKS = {"down0": ["down0"], "down1": ["down1"], "down2": ["down2"], "mid": ["mid"],
                  "down1+down2+mid": ["down1", "down2", "mid"], "all": ["down0", "down1", "down2", "mid"]}
RESULTS = Path(__file__).resolve().parent / "results"


def _run_dir(out: Path, exp: str, lr: float) -> Path:
    return Path(out) / f"{exp}-lr{lr:g}"


def run(exp: str, out: Path, lr: float = 6e-4, steps: int = 300, every: int = 10, samples: int = 512,
        models: Optional[Path] = None) -> Path:
    """One over-trained engine run of ``exp``; returns its folder (``out/EXP-lrLR``). The base model:
    ``planted.model_dir(exp, models)`` (``models/EXP/model`` when built there by ``planted.py build``)."""
    import siss_fast.metrics  # noqa: F401  (registers the metrics)
    from planted import model_dir
    from planted_data import write_experiment_folders
    from siss_fast.engine import unlearn
    from siss_fast.engine.validation import register_metric

    torch.set_num_threads(1)
    folder = _run_dir(out, exp, lr)
    dump = folder / "samples_pt"
    dump.mkdir(parents=True, exist_ok=True)
    calls = [0]

    @register_metric("_save_samples")
    def _save(_ctx):
        def score(s):
            torch.save(s.clone(), dump / f"v{calls[0]:03d}.pt")
            calls[0] += 1
            return 0.0
        return score

    folders = write_experiment_folders(exp, folder / "data")
    start = time.perf_counter()
    result = unlearn({
        "model": {"path": str(Path(model_dir(exp, models)).resolve())},
        "data": {"retain_dir": str(folders["retain"]), "forget_dir": str(folders["forget"])},
        "train": {"steps": steps, "device": "cpu", "lr": lr, "cpu_threads": 1},
        "validation": {"every": every, "num_samples": samples, "stop_on_target": False, "stop_on_guard": False,
                       "metrics": ["forget_distance", "retain_distance", "classifier_quality", "forget_nn",
                                   "feature_fd", "feature_kid", "_save_samples"]},
        "log": {"progress": False}, "output_dir": str(folder)})
    (folder / "fidelity-run.json").write_text(json.dumps({
        "experiment": exp, "lr": lr, "steps": steps, "every": every, "samples": samples,
        "wall_s": round(time.perf_counter() - start, 1), "stop_reason": result.stop_reason}, indent=2))
    return folder


# ------------------------------------------------------------------------------------------------------ analysis


def trip_index(relative: List[float], tol: float) -> Optional[int]:
    """First index ``j >= 1`` with ``relative[j] > tol`` (``relative[0]`` is the baseline), else None."""
    return next((j for j in range(1, len(relative)) if relative[j] > tol), None)


def tolerance_window(relative: List[float], c: Optional[int]) -> Optional[List[float]]:
    """``[lo, hi)``: the tolerances whose trip index is within one check of ``c`` (None: no classifier step)."""
    if c is None:
        return None
    lo = max([0.0] + relative[1:max(c - 1, 1)])
    hi = max(relative[1:min(c + 2, len(relative))])
    return [lo, hi] if hi > lo else None


def _relative(values: List[float]) -> List[float]:
    return [(v - values[0]) / abs(values[0]) for v in values]


def _guard_summary(steps: List[int], values: List[float], quality: List[float], tol: Optional[float],
                   c: Optional[int]) -> Dict:
    from scipy.stats import spearmanr

    rel = _relative(values)
    trip = trip_index(rel, tol) if tol is not None else None
    return {"spearman": float(spearmanr([-v for v in values], quality).statistic),
            "tolerance": tol, "trip_step": steps[trip] if trip is not None else None,
            "trip_within_one_check": (trip is not None and c is not None and abs(trip - c) <= 1) if tol else None,
            "tolerance_window": tolerance_window(rel, c), "relative": [round(r, 4) for r in rel],
            "tolerance_window_by_fraction": {str(f): tolerance_window(rel, _first_below(quality, f))
                                             for f in OTHER_FRACTIONS}}


def _first_below(quality: List[float], fraction: float) -> Optional[int]:
    """Index of the first validation (after step 0) whose classifier score is below ``fraction`` x step 0's."""
    return next((j for j in range(1, len(quality)) if quality[j] < fraction * quality[0]), None)


def _context(folder: Path):
    """The engine's reference sets (PNG folders, as the engine loads them) and the base model of a run folder."""
    from siss_fast.engine import data as D
    from siss_fast.engine.models import load_model
    from siss_fast.engine.validation import MetricContext

    cfg = json.loads((folder / "config.json").read_text())
    cfg = cfg.get("config", cfg)
    model = load_model(cfg["model"]["path"])
    images = [(D.load_images(D.scan_folder(cfg["data"][key], key).files, model.image_channels) + 1) / 2
              for key in ("retain_dir", "forget_dir")]
    return MetricContext(images[0], images[1], {}, model.kind, torch.device("cpu"), model, model.unet)


def _variants(ctx, dumps: List[torch.Tensor]) -> Dict[str, List[float]]:
    """Guard readings of every feature variant on the saved samples (forget copies left out, pool ``meanstd``,
    standardised as in :mod:`siss_fast.metrics.feature_guard`): ``{"fd|kid t=T blocks": [per step]}``, and
    ``"eps_err t=T"``: the mean noise-prediction error of the base UNet on the kept samples."""
    from siss_fast.metrics.feature_guard import DEFAULT_OPTIONS, BaseFeatures, frechet_distance, kernel_distance
    from siss_fast.metrics.forget_signal import nearest_item

    every_item = torch.full((ctx.forget_images.shape[0],), float("inf"))
    keep = [nearest_item(s, ctx.forget_images, ctx.retain_images, every_item) < 0 for s in dumps]
    out: Dict[str, List[float]] = {}
    for t in VARIANT_TS:
        feats = BaseFeatures(ctx, t=t, blocks=["mid"], pool="meanstd", seed=0, batch_size=64)
        ref = feats.blockwise(ctx.retain_images[:DEFAULT_OPTIONS["max_retain"]], 1)
        per_step = [{k: v[kept] for k, v in feats.blockwise(s, 0).items()} for s, kept in zip(dumps, keep)]
        for label, blocks in VARIANT_BLOCKS.items():
            r = torch.cat([ref[b] for b in blocks], 1)
            mean, std = r.mean(0), r.std(0).clamp_min(1e-8)
            rs = (r - mean) / std
            samples = [(torch.cat([p[b] for b in blocks], 1) - mean) / std for p in per_step]
            out[f"fd t={t} {label}"] = [frechet_distance(s, rs) for s in samples]
            out[f"kid t={t} {label}"] = [100 * kernel_distance(s, rs) for s in samples]
        out[f"eps_err t={t}"] = [float(p["eps_err"].mean()) for p in per_step]
    return out


def _forget_signals(ctx, dumps: List[torch.Tensor], steps: List[int], grid: Optional[Path] = None) -> Dict:
    """Per step: shares counted by forget_distance (auto radius), forget_nn, and the uncapped NN rule; over all
    saved samples: copies counted by forget_nn that forget_distance misses, with their RMS distances."""
    from siss_fast.metrics.distances import forget_thresholds, rms_distances
    from siss_fast.metrics.forget_signal import item_radii, nearest_item

    forget, retain = ctx.forget_images, ctx.retain_images
    half, radii = forget_thresholds(forget, retain), item_radii(forget, retain)
    per_step, missed, images = [], [], []
    for step, s in zip(steps, dumps):
        d = rms_distances(s, forget)
        fd_hit = (d < half[None]).any(1)
        nn = nearest_item(s, forget, retain, radii)
        nn_free = nearest_item(s, forget, retain, torch.full_like(radii, float("inf")))
        per_step.append({"step": step, "forget_distance": float(fd_hit.double().mean()),
                         "forget_nn": float((nn >= 0).double().mean()),
                         "forget_nn_per_item": [float((nn == k).double().mean()) for k in range(forget.shape[0])],
                         "nn_uncapped": float((nn_free >= 0).double().mean())})
        gap = (nn >= 0) & ~fd_hit
        missed += [round(float(d[i, nn[i]]), 4) for i in torch.nonzero(gap).flatten().tolist()]
        images.append(s[gap])
    total = sum(s.shape[0] for s in dumps)
    if grid is not None and missed:  # the missed copies, then the forget items
        from siss_fast.engine.validation import save_grid

        save_grid(torch.cat(images + [forget]), grid)
    return {"radius_forget_distance": half.tolist(), "radius_forget_nn": radii.tolist(), "per_step": per_step,
            "all_samples": total, "counted_by_forget_nn_missed_by_forget_distance": len(missed),
            "their_rms_to_item": sorted(missed)}


def analyze_run(folder: Path, variants: bool = True) -> Dict:
    """Readings, Spearman, trip points and forget signals of one ``run`` folder (see the module doc)."""
    from siss_fast.metrics.feature_guard import DEFAULT_OPTIONS

    torch.set_num_threads(1)
    folder = Path(folder)
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "validation" in r]
    steps = [r["step"] for r in rows]
    readings = {k: [r["validation"][k] for r in rows] for k in rows[0]["validation"] if not k.startswith("_")}
    dumps = [torch.load(p) for p in sorted((folder / "samples_pt").glob("v*.pt"))][:len(steps)]
    ctx = _context(folder)
    from siss_fast.metrics.registry import build_metrics

    fns = build_metrics(["feature_fd", "feature_kid", "forget_nn", "retain_distance"], ctx, {})
    if "feature_fd" not in readings:  # runs made before the metrics existed: the same functions on the same samples
        for name in ("feature_fd", "feature_kid", "forget_nn"):
            readings[name] = [float(fns[name](s)) for s in dumps]
    timing = {}  # seconds per validation call on this machine's one thread (step 0's samples)
    for name, fn in fns.items():
        start = time.perf_counter()
        fn(dumps[0])
        timing[name] = round(time.perf_counter() - start, 3)
    quality = readings["classifier_quality"]
    c = _first_below(quality, CLASSIFIER_FRACTION)
    guards = {name: _guard_summary(steps, readings[name], quality, tol, c) for name, tol in GUARDS.items()}
    from scipy.stats import spearmanr

    judge = build_metrics(["classifier_quality"], ctx, {})["classifier_quality"]
    halves = [[judge(s[h::2]) for s in dumps] for h in (0, 1)]
    ceiling = {"classifier_split_half_spearman": float(spearmanr(*halves).statistic),
               "note": "Spearman of classifier_quality on the even vs the odd half of each step's samples: how well "
                       "the judge orders the checkpoints against itself at half the samples (a noise ceiling)"}
    out = {"folder": str(folder), "run": json.loads((folder / "fidelity-run.json").read_text())
           if (folder / "fidelity-run.json").is_file() else None,
           "steps": steps, "readings": {k: [round(v, 6) for v in vs] for k, vs in readings.items()},
           "classifier_97_step": steps[c] if c is not None else None,
           "classifier_step_by_fraction": {str(f): (steps[j] if j is not None else None) for f in OTHER_FRACTIONS
                                           for j in [_first_below(quality, f)]},
           "guards": guards, "judge_noise": ceiling, "seconds_per_validation": timing,
           "samples_per_validation": int(dumps[0].shape[0]),
           "default_feature_options": DEFAULT_OPTIONS,
           "forget_signals": _forget_signals(ctx, dumps, steps, folder / "forget-nn-missed.png")}
    if variants:
        out["variants"] = {name: {**_guard_summary(steps, vals, quality, None, c),
                                  "readings": [round(v, 6) for v in vals]}
                           for name, vals in _variants(ctx, dumps).items()}
    return out


def plot(results: List[Dict], path: Path) -> None:
    """Per run: classifier score (left axis) and each guard relative to its step-0 value (right axis) vs step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6.5 * len(results), 4.2), squeeze=False)
    for ax, res in zip(axes[0], results):
        steps, q = res["steps"], res["readings"]["classifier_quality"]
        ax.plot(steps, q, "k-o", ms=3, label="classifier_quality (left)")
        ax.axhline(CLASSIFIER_FRACTION * q[0], color="k", ls=":", lw=1, label="97 % of step 0")
        ax.set_xlabel("step")
        ax.set_ylabel("classifier quality (IS, max 10)")
        twin = ax.twinx()
        for name, color in (("feature_fd", "tab:red"), ("feature_kid", "tab:orange"), ("retain_distance", "tab:blue")):
            g = res["readings"][name]
            twin.plot(steps, [v / g[0] for v in g], color=color, marker=".", label=f"{name} / step 0 (right)")
        twin.set_yscale("log")
        twin.set_ylabel("guard / its step-0 value (log; lower = better)")
        run = res.get("run") or {}
        ax.set_title(f"{run.get('experiment', Path(res['folder']).name)} lr {run.get('lr', '?')}: Spearman "
                     + ", ".join(f"{k} {v['spearman']:.2f}" for k, v in res["guards"].items()), fontsize=8)
        lines = ax.get_legend_handles_labels()
        lines2 = twin.get_legend_handles_labels()
        ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("exp")
    r.add_argument("--out", type=Path, default=Path("runs/guard-fidelity"))
    r.add_argument("--lr", type=float, default=6e-4)
    r.add_argument("--steps", type=int, default=300)
    r.add_argument("--every", type=int, default=10)
    r.add_argument("--samples", type=int, default=512)
    r.add_argument("--models", type=Path, default=Path("runs/planted"), help="where planted.py build put models")
    a = sub.add_parser("analyze")
    a.add_argument("folders", type=Path, nargs="+")
    a.add_argument("--json", type=Path, default=RESULTS / "guard-fidelity.json")
    a.add_argument("--png", type=Path, default=RESULTS / "guard-fidelity.png")
    a.add_argument("--no-variants", action="store_true")
    args = p.parse_args(argv)
    if args.cmd == "run":
        print(run(args.exp, args.out, args.lr, args.steps, args.every, args.samples, args.models))
        return 0
    results = [analyze_run(f, not args.no_variants) for f in args.folders]
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"runs": results}, indent=1) + "\n")
    plot(results, args.png)
    for res in results:
        print(res["folder"], "classifier 97 % step:", res["classifier_97_step"],
              {k: (round(v["spearman"], 3), v["trip_step"]) for k, v in res["guards"].items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
