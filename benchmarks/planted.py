"""Planted-image experiments for calibrating the engine's defaults (issue 12, "the stop signal").

    python benchmarks/planted.py build EXP --out DIR [--data-only] [--steps N]   # data folders + base model
    python benchmarks/planted.py evaluate MODEL_DIR --exp EXP [--samples 2000] [--seed 1000003] [--json FILE]
    python benchmarks/planted.py run EXP --out DIR [--budget 200] [key=value ...]  # engine defaults + evaluate
    python benchmarks/planted.py report DIR [--dest benchmarks/results/planted-defaults-before.json]
    python benchmarks/planted.py table                                           # the experiments (JSON)

``EXP`` is a key of :data:`planted_data.EXPERIMENTS` (``demo``, ``checker1``, ``checker3``, ``near3``, ``five10``).
Layout under ``DIR/EXP/``: ``retain/NNNN.png`` (1,797 digits), ``forget/forget_KKK.png`` (one PNG per distinct
forget item: the engine samples with replacement, so one file stands for all its copies, as in the demo),
``model/`` (a diffusers ``DDPMPipeline`` folder + ``pretrain.json``), ``run/`` (the engine's run folder),
``result.json``. Base models are committed under ``benchmarks/planted_models/EXP/`` (the demo's is the shipped
asset), so ``build --data-only`` + ``run`` need no pretraining. Every torch call here runs on ONE CPU thread.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from planted_data import EXPERIMENTS, duplication, experiment_data, write_experiment_folders  # noqa: E402

__all__ = ["COMMITTED", "model_dir", "build", "pretrain_base", "run_experiment", "report", "main"]

COMMITTED = Path(__file__).resolve().parent / "planted_models"
PRETRAIN_SEED = 0


def model_dir(exp: str, out: Optional[Path] = None) -> Path:
    """The experiment's base model: ``out/EXP/model`` when built there, else the committed copy
    (``benchmarks/planted_models/EXP``; the demo: the shipped ``siss_fast/assets/digits_ddpm``)."""
    from siss_fast.demo.models import SHIPPED_MODEL

    if out is not None and (Path(out) / exp / "model" / "unet").is_dir():
        return Path(out) / exp / "model"
    return SHIPPED_MODEL if exp == "demo" else COMMITTED / exp


def pretrain_base(exp: str, folder: Path, steps: Optional[int] = None, seed: int = PRETRAIN_SEED) -> Dict:
    """Train the experiment's base DDPM with :func:`siss_fast.demo.pretrain.train_ddpm` (batch 64, lr 2e-3, EMA)
    on its training set (retain + all copies), save it to ``folder`` and write ``folder/pretrain.json``."""
    from siss_fast.demo.models import model_hash
    from siss_fast.demo.pretrain import UNET_CONFIG, _save_pipeline, file_sha256, train_ddpm

    spec = EXPERIMENTS[exp]
    steps = steps or spec.pretrain_steps
    data = experiment_data(exp)
    start = time.perf_counter()
    unet, scheduler, losses = train_ddpm(data, seed=seed, steps=steps, start=start)
    wall = time.perf_counter() - start
    folder = Path(folder)
    _save_pipeline(unet, scheduler, folder)
    each, total = duplication(spec)
    record = {
        "command": f"python benchmarks/planted.py build {exp} --out DIR --steps {steps}",
        "experiment": exp, "items": list(spec.items), "copies_each": spec.copies, "share_each": each,
        "share_total": total, "train_images": int(data.train.shape[0]), "seed": seed, "ddpm_steps": steps,
        "batch_size": 64, "unet_config": {k: list(v) if isinstance(v, tuple) else v for k, v in UNET_CONFIG.items()},
        "losses": losses, "final_loss": losses[-1]["loss"] if losses else None, "train_wall_s": round(wall, 1),
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "sha256": {str(p.relative_to(folder)): file_sha256(p) for p in sorted(folder.rglob("*.safetensors"))},
        "model_hash": model_hash(folder),
    }
    (folder / "pretrain.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def build(exp: str, out: Path, data_only: bool = False, steps: Optional[int] = None) -> Dict:
    """Write ``out/EXP/{retain,forget}`` and (unless ``data_only`` or ``exp == "demo"``) pretrain ``out/EXP/model``."""
    root = Path(out) / exp
    folders = write_experiment_folders(exp, root)
    info = {"experiment": exp, "retain": str(folders["retain"]), "forget": str(folders["forget"])}
    if not data_only and exp != "demo":
        info["pretrain"] = {k: v for k, v in pretrain_base(exp, root / "model", steps).items() if k != "losses"}
    info["model"] = str(model_dir(exp, out))
    return info


def _steps_time(run_dir: Path) -> Dict[str, float]:
    """Sum of ``step_time_s`` over the step records of ``metrics.jsonl`` (the optimizer steps' own time)."""
    steps_s, n = 0.0, 0
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "step_time_s" in rec:
            steps_s, n = steps_s + float(rec["step_time_s"]), n + 1
    return {"steps_s": steps_s, "steps": n}


@contextlib.contextmanager
def _timed_validator(clock: Dict[str, float]):
    """Accumulate the wall time of every validation call (``clock["validation_s"]``, ``clock["validations"]``) by
    wrapping ``__call__`` of the validator class that :mod:`siss_fast.engine.loop` uses (found by name: the class
    whose name ends in ``Validator``); without one, nothing is wrapped and ``validation_s`` stays absent."""
    from siss_fast.engine import loop

    cls = next((v for k, v in vars(loop).items() if isinstance(v, type) and k.endswith("Validator")), None)
    if cls is None:
        yield clock
        return
    original = cls.__call__

    def timed(self, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return original(self, *args, **kwargs)
        finally:
            clock["validation_s"] = clock.get("validation_s", 0.0) + time.perf_counter() - t0
            clock["validations"] = clock.get("validations", 0) + 1

    cls.__call__ = timed
    try:
        yield clock
    finally:
        cls.__call__ = original


def _git_state() -> str:
    """``HEAD`` commit, plus ``+dirty: FILES`` when engine or metrics files differ from it (what the run used)."""
    import subprocess

    repo = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "siss_fast/engine", "siss_fast/metrics"],
                               cwd=repo, capture_output=True, text=True, check=True).stdout.split("\n")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    files = [line[3:] for line in dirty if line.strip()]
    return head + (f" +dirty: {', '.join(files)}" if files else "")


def run_experiment(exp: str, out: Path, budget: int = 200, overrides: Sequence[str] = (), samples: int = 2000,
                   seed: int = 1000003) -> Dict:
    """Run the engine with its defaults (only model, data, budget, ``train.cpu_threads: 1``, CPU, no progress
    bar, plus ``overrides``), time it, evaluate base and final models, write ``out/EXP/result.json``.

    Timing: ``wall_s`` is the wall time of ``run(cfg)``; ``steps_s`` the sum of the steps' ``step_time_s`` from
    ``metrics.jsonl``; ``validation_s`` the summed wall time of the validator's calls (timed directly by wrapping
    them, :func:`_timed_validator`); ``validation_share = validation_s / wall_s`` (``(wall_s - steps_s) / wall_s``,
    validation + overhead, if the validator could not be wrapped). The rest is loading, data and saving.
    """
    import siss_fast.metrics  # noqa: F401  (registers the package's metrics with the engine)
    from siss_fast.engine import load_config
    from siss_fast.engine.loop import run
    from planted_eval import evaluate

    root = Path(out) / exp
    folders = write_experiment_folders(exp, root)
    base = model_dir(exp, out)
    run_dir = root / "run"
    shutil.rmtree(run_dir, ignore_errors=True)  # the engine refuses to start over a finished run
    cfg = load_config({"model": {"path": str(base)},
                       "data": {"retain_dir": str(folders["retain"]), "forget_dir": str(folders["forget"])},
                       "train": {"steps": budget, "cpu_threads": 1, "device": "cpu"},
                       "log": {"progress": False}, "output_dir": str(run_dir)}, list(overrides))
    with _timed_validator({}) as clock:
        t0 = time.perf_counter()
        result = run(cfg)
        wall = time.perf_counter() - t0
    timing = _steps_time(run_dir)
    before_path = root / "base_eval.json"
    if before_path.is_file() and json.loads(before_path.read_text()).get("samples", 0) >= samples:
        before = json.loads(before_path.read_text())  # the base model's evaluation (same seed; >= samples)
    else:
        before = evaluate(base, exp, samples=samples, seed=seed)
        before_path.write_text(json.dumps(before, indent=2) + "\n")
    after = evaluate(Path(result.final_dir), exp, samples=samples, seed=seed, histogram=True)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    record = {
        "experiment": exp, "budget": budget, "overrides": list(overrides), "base_model": str(base),
        "git": _git_state(), "samples_before": before["samples"], "samples_after": after["samples"],
        "stop_reason": result.stop_reason, "stop_step": result.steps_done, "kept_step": result.kept_step,
        "final_from": manifest["final_model"]["from"],
        "engine_metrics_before": manifest.get("metrics_before"), "engine_metrics_after": manifest.get("metrics_after"),
        "forget_rate_before": before["forget_rate"], "forget_rate_after": after["forget_rate"],
        "forget_rate_capped_before": before["forget_rate_capped"], "forget_rate_capped_after": after["forget_rate_capped"],
        "quality_before": before["quality"]["quality"], "quality_after": after["quality"]["quality"],
        "quality_ratio": after["quality"]["quality"] / before["quality"]["quality"],
        "wall_s": round(wall, 1), "steps_s": round(timing["steps_s"], 1),
        "validation_and_overhead_s": round(wall - timing["steps_s"], 1),
        "validation_s": round(clock["validation_s"], 1) if "validation_s" in clock else None,
        "validations": clock.get("validations"),
        "validation_share": round(clock.get("validation_s", wall - timing["steps_s"]) / wall, 3),
        "config": json.loads((run_dir / "config.json").read_text()),
        "evaluation": {"before": before, "after": after},
    }
    (root / "result.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def _engine_forget(rec: Dict) -> str:
    """``name a -> b`` of the engine's forget metric at step 0 and at the kept step (from its manifest)."""
    name = rec["config"]["validation"]["forget_metric"] if "config" in rec else None
    before, after = rec.get("engine_metrics_before") or {}, rec.get("engine_metrics_after") or {}
    if name not in before or name not in after:
        return "-"
    return f"{name} {before[name]:.4f} -> {after[name]:.4f}"


def report(out: Path, dest: Path) -> Dict:
    """Collect ``out/*/result.json`` into ``dest`` (JSON, without configs and histograms) and ``dest`` with
    ``.md`` (one row per experiment)."""
    rows = {}
    for path in sorted(Path(out).glob("*/result.json")):
        rec = json.loads(path.read_text())
        rec["per_item"] = {name: {"before": rec["evaluation"]["before"]["per_item"][name]["rate"],
                                  "after": rec["evaluation"]["after"]["per_item"][name]["rate"]}
                           for name in rec["evaluation"]["before"]["per_item"]}
        rec["engine_forget"] = _engine_forget(rec)
        rows[rec["experiment"]] = {k: v for k, v in rec.items() if k not in ("config", "evaluation")}
    lines = ["| experiment | items (share each) | stop rule (step) | kept step | engine's forget metric before -> "
             "kept | judge: forget rate before -> after (capped) | per item after | quality before -> after (ratio) | "
             "wall s | validation share |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        spec = EXPERIMENTS[name]
        items = ", ".join(f"{k} {v['after']:.4f}" for k, v in r["per_item"].items())
        lines.append(
            f"| {name} | {' + '.join(spec.items)} ({100 * duplication(spec)[0]:.1f} %, {spec.kind}) | "
            f"{r['stop_reason']} ({r['stop_step']}) | {r['kept_step']} | {r['engine_forget']} | "
            f"{r['forget_rate_before']:.4f} -> "
            f"{r['forget_rate_after']:.4f} ({r['forget_rate_capped_before']:.4f} -> "
            f"{r['forget_rate_capped_after']:.4f}) | {items} | {r['quality_before']:.3f} -> "
            f"{r['quality_after']:.3f} ({r['quality_ratio']:.3f}) | {r['wall_s']} | {r['validation_share']:.2f} |")
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(rows, indent=2) + "\n")
    dest.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return rows


def main(argv: Optional[List[str]] = None) -> int:
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="write data folders and pretrain the base model")
    b.add_argument("exp", choices=sorted(EXPERIMENTS))
    b.add_argument("--out", required=True, type=Path)
    b.add_argument("--data-only", action="store_true")
    b.add_argument("--steps", type=int, default=None, help="DDPM steps (default: the table's)")
    e = sub.add_parser("evaluate", help="the independent judge of a model folder")
    e.add_argument("model", type=Path)
    e.add_argument("--exp", required=True, choices=sorted(EXPERIMENTS))
    e.add_argument("--samples", type=int, default=2000)
    e.add_argument("--seed", type=int, default=1000003)
    e.add_argument("--json", type=Path, default=None)
    e.add_argument("--histogram", action="store_true", help="include the distance histograms")
    r = sub.add_parser("run", help="engine defaults + evaluate")
    r.add_argument("exp", choices=sorted(EXPERIMENTS))
    r.add_argument("--out", required=True, type=Path)
    r.add_argument("--budget", type=int, default=200)
    r.add_argument("--samples", type=int, default=2000)
    r.add_argument("--seed", type=int, default=1000003)
    r.add_argument("overrides", nargs="*", help="engine key=value overrides")
    t = sub.add_parser("report", help="collect DIR/*/result.json into a JSON + markdown table")
    t.add_argument("out", type=Path)
    t.add_argument("--dest", type=Path, default=Path("benchmarks/results/planted-defaults-before.json"))
    sub.add_parser("table", help="print the experiments table")
    args, extra = p.parse_known_args(argv)
    if extra and (args.cmd != "run" or any("=" not in x for x in extra)):
        p.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.cmd == "run":
        args.overrides = list(args.overrides) + extra
    if args.cmd == "build":
        out = build(args.exp, args.out, args.data_only, args.steps)
    elif args.cmd == "evaluate":
        from planted_eval import evaluate

        out = evaluate(args.model, args.exp, samples=args.samples, seed=args.seed, histogram=args.histogram)
    elif args.cmd == "run":
        out = run_experiment(args.exp, args.out, args.budget, args.overrides, args.samples, args.seed)
        out = {k: v for k, v in out.items() if k not in ("config", "evaluation")}
    elif args.cmd == "report":
        out = report(args.out, args.dest)
    else:
        out = {name: {"items": list(s.items), "copies_each": s.copies, "kind": s.kind,
                      "share_each": round(duplication(s)[0], 4), "share_total": round(duplication(s)[1], 4),
                      "pretrain_steps": s.pretrain_steps, "note": s.note} for name, s in EXPERIMENTS.items()}
    text = json.dumps(out, indent=2)
    if getattr(args, "json", None):
        args.json.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
