"""Guard fidelity on the planted trajectories: the default guard's reading against the classifier, per experiment.

    python benchmarks/trajectory_report.py DIR [DIR ...] [--dest benchmarks/results/guard-fidelity-defaults]

Reads ``EXP/lr-LR/trajectory.json`` (or a run's ``metrics.jsonl``) from ``benchmarks/planted_trajectory.py``: at every
check, ``judge_quality`` (the digits classifier's score of 400 samples, seed 0: the quality the guard stands in for)
and ``fd_default`` (``feature_fd`` on samples drawn as the engine's default validation draws them). For each run:

* Spearman rank correlation of ``-fd_default`` with ``judge_quality`` over the checks after step 0;
* ``classifier_97``: the first check whose classifier score is below 97 % of step 0's;
* ``guard_trip``: the first check at which the guard with the default tolerance (``feature_fd``'s registered one)
  trips, ``fd_default > (1 + tol) x fd_default(0)``;
* ``trip_vs_classifier``: ``guard_trip - classifier_97`` in checks (within one check is the issue's bar).

Writes ``DEST.json`` and ``DEST.png`` (one panel per run: classifier score and guard reading against step, both
relative to step 0, the tolerance line and the 97 % line).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))

from stop_calibration import load_runs  # noqa: E402

__all__ = ["spearman", "fidelity", "main"]

GUARD = "fd_default"
JUDGE = "judge_quality"


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rho of two equal-length sequences (average ranks for ties)."""
    def ranks(x: Sequence[float]) -> List[float]:
        order = sorted(range(len(x)), key=lambda i: x[i])
        r = [0.0] * len(x)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and x[order[j + 1]] == x[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r

    ra, rb = ranks(a), ranks(b)
    n = len(a)
    ma, mb = sum(ra) / n, sum(rb) / n
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    var = (sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb)) ** 0.5
    return cov / var if var else float("nan")


def fidelity(checks: List[Dict], tolerance: float) -> Optional[Dict]:
    """The numbers of the module doc for one run (None without the guard's readings)."""
    rows = [c for c in checks if GUARD in c and JUDGE in c]
    if len(rows) < 3 or rows[0]["step"] != 0:
        return None
    q0, g0 = rows[0][JUDGE], rows[0][GUARD]
    later = rows[1:]
    every = later[0]["step"]
    c97 = next((c["step"] for c in later if c[JUDGE] < 0.97 * q0), None)
    trip = next((c["step"] for c in later if c[GUARD] > (1 + tolerance) * g0), None)
    return {"checks": len(rows), "spearman": round(spearman([-c[GUARD] for c in later], [c[JUDGE] for c in later]), 3),
            "classifier_97": c97, "guard_trip": trip,
            "trip_vs_classifier": None if c97 is None or trip is None else (trip - c97) // every,
            "steps": [c["step"] for c in rows], "quality_ratio": [round(c[JUDGE] / q0, 4) for c in rows],
            "guard_ratio": [round(c[GUARD] / g0, 4) for c in rows]}


def _plot(results: Dict[str, Dict], tolerance: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted(results)
    cols = 3
    rows = (len(names) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.1 * rows), dpi=100, squeeze=False)
    for ax, name in zip(axes.flat, names):
        r = results[name]
        ax.plot(r["steps"], r["quality_ratio"], "o-", label="classifier score / step 0")
        ax.plot(r["steps"], [1 / g for g in r["guard_ratio"]], "s-", label="step 0 / feature_fd (guard)")
        ax.axhline(0.97, color="grey", ls=":", lw=1)
        ax.axhline(1 / (1 + tolerance), color="red", ls="--", lw=1)
        ax.set_title(f"{name}  rho {r['spearman']}", fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"Guard (feature_fd, tolerance {tolerance}: red) vs the digits classifier (97 %: grey)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dirs", type=Path, nargs="+")
    p.add_argument("--dest", type=Path, default=None)
    a = p.parse_args(argv)
    from siss_fast.metrics.feature_guard import FD_TOLERANCE

    runs: Dict[str, List[Dict]] = {}
    for folder in a.dirs:
        runs.update(load_runs(folder))
    results = {name: r for name, checks in sorted(runs.items()) if (r := fidelity(checks, FD_TOLERANCE))}
    for name, r in results.items():
        print(f"{name:18s} rho {r['spearman']:6} classifier<97% at {r['classifier_97']} guard trips at "
              f"{r['guard_trip']} ({r['trip_vs_classifier']} checks)")
    if a.dest:
        a.dest.parent.mkdir(parents=True, exist_ok=True)
        a.dest.with_suffix(".json").write_text(json.dumps({"guard": GUARD, "judge": JUDGE, "tolerance": FD_TOLERANCE,
                                                           "runs": results}, indent=1) + "\n")
        _plot(results, FD_TOLERANCE, a.dest.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
