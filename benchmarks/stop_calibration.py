"""Choose the stop rules on the planted trajectories: replay the engine's own StopRules over recorded checks.

    python benchmarks/stop_calibration.py DIR [DIR ...] [--lr LR] [--dest benchmarks/results/stop-calibration.json]

``DIR`` holds ``EXP/lr-LR/trajectory.json`` files (``benchmarks/planted_trajectory.py``): at every check of a run
with the stop rules off, the judge's forget rate (per item) and quality, and every candidate signal. For each
candidate rule set -- forget signal and its target (ratio of step 0 or absolute, per item), patience, guard signal and
tolerance, check interval (a multiple of the recorded one) -- :class:`siss_fast.engine.stop_rules.StopRules` (the
engine's class, not a re-implementation) is fed the recorded scores in order, and the kept step is what
:meth:`~siss_fast.engine.validator.Validator.final_state` would keep: the confirmed best state, else the last state
within the guard when the guard stopped the run, else the end of the budget. The judge's readings at the kept step
decide whether the run *passes* (issue 12's bar):

    forget_after <= 0.1 x forget_before  and  forget_after <= 0.01      (every item: rate_k <= max(0.1 x before_k, 0))
    quality_after >= 0.97 x quality_before

The output ranks rule sets by the number of (experiment, lr) trajectories they pass, then by the steps spent.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))

from planted_trajectory import PROBE_LEVELS, register_calibration_metrics  # noqa: E402

__all__ = ["replay", "passes", "main"]


def replay(checks: List[Dict], *, forget: str, target: Optional[float], ratio: float, patience: int, guard: str,
           tolerance: float, stride: int = 1) -> Dict:
    """Feed every ``stride``-th check (step 0 always) to the engine's StopRules; ``{"stop", "step", "kept"}``."""
    from siss_fast.engine.stop_rules import StopRules

    rules = StopRules(forget, target, guard, tolerance, True, True, 1, ratio, patience)
    last_good, stop, step = None, "budget", checks[-1]["step"]
    used = [c for i, c in enumerate(checks) if i % stride == 0]
    for c in used:
        verdict = rules.update(c["step"], c)
        if rules.best_step is None and not verdict["guard_tripped"]:
            last_good = c["step"]
        if verdict["stop"]:
            stop, step = verdict["stop"], c["step"]
            break
    else:
        step = used[-1]["step"] if used[-1]["step"] == checks[-1]["step"] else checks[-1]["step"]
    if rules.best_step is not None:
        kept = rules.best_step
    elif stop == "quality_guard":
        kept = last_good
    else:
        kept = checks[-1]["step"]
    return {"stop": stop, "step": step, "kept": kept}


def passes(checks: List[Dict], kept: int) -> Dict:
    """The judge at step 0 and at ``kept``: forget (total and per item), quality, and whether issue 12's bar holds."""
    by_step = {c["step"]: c for c in checks}
    b, a = by_step[0], by_step[kept]
    items = sorted(k for k in b if k.startswith("judge_forget["))
    items_ok = all(a[k] <= 0.1 * b[k] + 1e-12 for k in items)
    forget_ok = a["judge_forget"] <= min(0.1 * b["judge_forget"], 0.01) + 1e-12 and items_ok
    q_ratio = a["judge_quality"] / b["judge_quality"]
    return {"forget_before": b["judge_forget"], "forget_after": a["judge_forget"], "quality_ratio": round(q_ratio, 4),
            "forget_ok": forget_ok, "quality_ok": q_ratio >= 0.97, "pass": forget_ok and q_ratio >= 0.97}


def candidates() -> List[Dict]:
    probes = ["forget_probe"] + [f"probe{p}" for p in PROBE_LEVELS]
    forget = [(name, None, r) for name in probes for r in (0.1, 0.25, 0.5)]
    forget += [("forget_nn128", 0.0, 0.1), ("forget_nn128", None, 0.25)]
    guards = [("fd128_s10", t) for t in (0.15, 0.3, 0.5, 1.0)] + [("feature_fd", t) for t in (0.15, 0.3, 0.5)]
    out = []
    for (name, target, ratio), patience, (guard, tol), stride in itertools.product(forget, (1, 2), guards, (1, 2)):
        out.append({"forget": name, "target": target, "ratio": ratio, "patience": patience, "guard": guard,
                    "tolerance": tol, "stride": stride})
    return out


def load_runs(root: Path, lr: Optional[float] = None) -> Dict[str, List[Dict]]:
    """``{"EXP@LR": checks}`` from ``trajectory.json`` files, or from the ``metrics.jsonl`` of a run still going (or
    stopped early): its validation records so far."""
    runs = {}
    for folder in sorted(Path(root).glob("*/lr-*")):
        exp, rate = folder.parent.name, float(folder.name[3:])
        if lr is not None and abs(rate - lr) > 1e-12:
            continue
        if (folder / "trajectory.json").is_file():
            checks = json.loads((folder / "trajectory.json").read_text())["checks"]
        elif (folder / "run" / "metrics.jsonl").is_file():
            checks = [{"step": r["step"], **r["validation"]} for r in map(json.loads,
                      (folder / "run" / "metrics.jsonl").read_text().splitlines()) if "validation" in r]
        else:
            continue
        if len(checks) >= 3:
            runs[f"{exp}@{rate:g}"] = checks
    return runs


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dirs", type=Path, nargs="+")
    p.add_argument("--dest", type=Path, default=None)
    p.add_argument("--lr", type=float, default=None, help="only trajectories at this learning rate")
    p.add_argument("--top", type=int, default=15)
    a = p.parse_args(argv)

    register_calibration_metrics("demo")  # names only (the replay needs higher_is_better of each signal)
    runs: Dict[str, List[Dict]] = {}
    for folder in a.dirs:
        runs.update(load_runs(folder, a.lr))
    ranked = []
    for cand in candidates():
        rows = {}
        for name, checks in runs.items():
            r = replay(checks, **cand)
            rows[name] = {**r, **passes(checks, r["kept"])}
        by_lr: Dict[str, List[bool]] = {}
        for name, row in rows.items():
            by_lr.setdefault(name.split("@")[1], []).append(row["pass"])
        ranked.append({"rule": cand, "passed": sum(r["pass"] for r in rows.values()), "of": len(rows),
                       "by_lr": {lr: f"{sum(v)}/{len(v)}" for lr, v in by_lr.items()},
                       "steps": sum(r["step"] for r in rows.values()), "runs": rows})
    ranked.sort(key=lambda r: (-r["passed"], r["steps"]))
    for r in ranked[:a.top]:
        print(r["passed"], "/", r["of"], r["by_lr"], r["steps"], json.dumps(r["rule"]))
    if a.dest:
        a.dest.parent.mkdir(parents=True, exist_ok=True)
        a.dest.write_text(json.dumps({"runs": sorted(runs), "ranked": ranked[:50]}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
