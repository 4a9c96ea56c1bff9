"""Could one reading weigh the retain fit and the cluster score into a guard that both orders and trips? (issue 12)

    python benchmarks/guard_composite.py DIR --judge-from JUDGED [--low-lr 1e-4] [--dest benchmarks/results/X]
                                         [--weights 0 0.25 0.5 0.75 1] [--tolerances 0.03 0.04 0.05 0.06 0.08 0.1]

``DIR`` holds ``guard_states.py score`` trajectories (``EXP/lr-LR/trajectory.json``: ``retain_fit`` and
``cluster_default``, the cluster score of the 96 samples validation draws, at every saved state) and ``JUDGED``
their judge (``guard_states.py judge``). The candidate reading, lower is better::

    composite_w = retain_fit / cluster_default ** w          (w = 0: the retain fit alone)

trips when it exceeds ``(1 + tol)`` x its step-0 value. For every ``(w, tol)`` and over-trained run (``EXP@1e-3``):
the Spearman with the classifier and the trip against the classifier's first check below 97 %
(``trajectory_report.fidelity``, the numbers of ``guard-fidelity-*.json``); and, from the default-learning-rate
trajectories of the same experiments (``EXP@LOW_LR``, the states ``guard_states.py dump --lr 1e-4`` saved), the
reading's largest rise over its step-0 value: a tolerance at or below it would stop a default run on the guard.
A setting is *usable* when every over-trained run trips within one check of the classifier and no default run
rises past the tolerance; the issue's bar adds a Spearman >= 0.9 on every run. Writes ``DEST.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))

from stop_calibration import load_runs  # noqa: E402
from trajectory_report import fidelity, with_judge  # noqa: E402

__all__ = ["composite", "table", "main"]


def composite(checks: List[Dict], w: float) -> List[Dict]:
    """``checks`` with ``"composite"`` = ``retain_fit / cluster_default ** w`` (the checks that hold both)."""
    return [{**c, "composite": c["retain_fit"] / c["cluster_default"] ** w} for c in checks
            if "retain_fit" in c and "cluster_default" in c]


def table(over: Dict[str, List[Dict]], low: Dict[str, List[Dict]], weights: Sequence[float],
          tolerances: Sequence[float]) -> List[Dict]:
    """One row per ``(w, tol)``: per over-trained run ``{spearman, trip_vs_classifier}``, per default run the
    largest relative rise, and whether the setting is usable / meets the bar (module doc)."""
    rows = []
    for w in weights:
        rises = {}
        for name, checks in low.items():
            c = composite(checks, w)
            rises[name] = round(max(x["composite"] for x in c) / c[0]["composite"] - 1, 4)
        for tol in tolerances:
            runs = {}
            for name, checks in over.items():
                r = fidelity(composite(checks, w), "composite", tol)
                if r is not None:
                    runs[name] = {"spearman": r["spearman"], "trip_vs_classifier": r["trip_vs_classifier"]}
            on_time = all(r["trip_vs_classifier"] is not None and abs(r["trip_vs_classifier"]) <= 1
                          for r in runs.values())
            quiet = all(rise <= tol for rise in rises.values())
            rows.append({"w": w, "tolerance": tol, "runs": runs, "default_lr_rise": rises,
                         "usable": on_time and quiet,
                         "meets_bar": on_time and quiet and all(r["spearman"] >= 0.9 for r in runs.values())})
    return rows


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dir", type=Path)
    p.add_argument("--judge-from", type=Path, required=True)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--low-lr", type=float, default=1e-4)
    p.add_argument("--weights", type=float, nargs="+", default=[0, 0.25, 0.5, 0.75, 1.0])
    p.add_argument("--tolerances", type=float, nargs="+", default=[0.03, 0.04, 0.05, 0.06, 0.08, 0.1])
    p.add_argument("--dest", type=Path, default=None)
    a = p.parse_args(argv)
    judged = load_runs(a.judge_from, a.lr)
    over = {name: with_judge(checks, judged[name]) for name, checks in load_runs(a.dir, a.lr).items()
            if name in judged}
    low = {name: checks for name, checks in load_runs(a.dir, a.low_lr).items() if len(composite(checks, 0)) >= 3}
    rows = table(over, low, a.weights, a.tolerances)
    for r in rows:
        cells = " | ".join(f"{n.split('@')[0]} {v['spearman']:.2f} {v['trip_vs_classifier']}"
                           for n, v in r["runs"].items())
        rise = max(r["default_lr_rise"].values(), default=float("nan"))
        print(f"w {r['w']:<4} tol {r['tolerance']:<4} | {cells} | default-lr rise <= {rise:+.3f} | "
              f"usable {r['usable']} bar {r['meets_bar']}")
    if a.dest:
        a.dest.parent.mkdir(parents=True, exist_ok=True)
        a.dest.with_suffix(".json").write_text(json.dumps({
            "reading": "retain_fit / cluster_default ** w (lower is better)", "over_trained_lr": a.lr,
            "default_lr": a.low_lr, "judge_from": str(a.judge_from), "over_trained_runs": sorted(over),
            "default_runs": sorted(low), "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
