"""Guard fidelity on the planted trajectories: each guard's reading against the classifier, per experiment.

    python benchmarks/trajectory_report.py DIR [DIR ...] [--dest benchmarks/results/guard-fidelity-fit]
                                           [--guards KEY ...] [--judge-from JUDGE_DIR]

Reads ``EXP/lr-LR/trajectory.json`` (or a run's ``metrics.jsonl``) from ``benchmarks/planted_trajectory.py``. At every
check the classifier score is ``judge_quality`` (the digits classifier's score of the judge's samples, seed 0: the
quality the guard stands in for), averaged with ``judge2_quality`` (the same on an independent draw, seed 1) when it
was recorded. The guards (:data:`GUARDS`): ``retain_fit`` and ``fd_default`` (``feature_fd`` on samples drawn as the
engine's default validation draws them), each with its registered default tolerance; ``--guards`` scores other
recorded keys (e.g. ``fit05`` ... ``fit_grid``: ``retain_fit`` at other noise levels). ``--judge-from`` scores guard
readings re-recorded with a tiny judge against the judge readings of an earlier trajectory of the same runs, by step
(:func:`with_judge`; the training is deterministic, so the same step is the same model state -- compare the
``retain_fit`` both recorded to confirm it). For each run and guard:

* ``spearman``: rank correlation of the negated guard reading with the classifier score over all checks (step 0
  included); ``judge_self_spearman``: ``judge_quality`` against ``judge2_quality`` -- how well the classifier orders
  the same checks against itself, the ceiling of any guard's Spearman on that run;
* ``classifier_97``: the first check whose classifier score is below 97 % of step 0's;
* ``guard_trip``: the first check at which the guard trips, ``reading > (1 + tol) x reading(0)`` (a guard whose
  registered metric is ``higher_is_better``, e.g. ``cluster_score``: ``reading < (1 - tol) x reading(0)``);
* ``trip_vs_classifier``: ``guard_trip - classifier_97`` in checks (within one check is the issue's bar).

Writes ``DEST.json`` and ``DEST.png`` (one panel per run: classifier score and each guard against step, relative to
step 0, the tolerance lines and the 97 % line).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))

from stop_calibration import load_runs  # noqa: E402

__all__ = ["spearman", "fidelity", "with_judge", "guard_metric", "main"]

GUARDS = {"retain_fit": "retain_fit", "fd_default": "feature_fd", "cluster_default": "cluster_score",
          "cluster512": "cluster_score", "classifier512": "classifier_quality"}  # key -> metric (tolerance, direction)
JUDGE, JUDGE2 = "judge_quality", "judge2_quality"
_COLORS = ("tab:red", "tab:blue", "tab:green", "tab:orange", "tab:purple", "tab:brown", "tab:pink", "tab:olive",
           "tab:cyan", "tab:gray")  # one per plotted guard (at most 10 are drawn)


def guard_metric(key: str) -> str:
    """The registered metric whose tolerance a recorded guard key uses: :data:`GUARDS`, ``retain_fit`` for the
    ``fit*`` variants of ``planted_trajectory.py`` (``retain_fit`` at other ``t_fracs``), else the key itself."""
    return GUARDS.get(key, "retain_fit" if key.startswith("fit") else key)


def with_judge(checks: List[Dict], judged: List[Dict]) -> List[Dict]:
    """``checks`` with their judge readings (``judge_quality``, ``judge2_quality``) replaced by those of ``judged``
    at the same step (another trajectory of the same run, e.g. one recorded with a 500-sample judge), so that guard
    readings recorded with a tiny judge can be scored against a full one; checks at steps ``judged`` lacks are
    dropped."""
    by_step = {c["step"]: c for c in judged}
    out = []
    for c in checks:
        ref = by_step.get(c["step"])
        if ref is None or JUDGE not in ref:
            continue
        row = {k: v for k, v in c.items() if k not in (JUDGE, JUDGE2)}
        row.update({k: ref[k] for k in (JUDGE, JUDGE2) if k in ref})
        out.append(row)
    return out


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


def _judge(c: Dict) -> float:
    """The classifier score of a check: the mean over both judge draws when the second one was recorded."""
    return (c[JUDGE] + c[JUDGE2]) / 2 if JUDGE2 in c else c[JUDGE]


def fidelity(checks: List[Dict], guard: str, tolerance: float, higher_is_better: bool = False) -> Optional[Dict]:
    """The numbers of the module doc for one run and one guard (None without the guard's readings); a guard that
    is ``higher_is_better`` trips below ``(1 - tol) x reading(0)`` and is not negated for the Spearman."""
    rows = [c for c in checks if guard in c and JUDGE in c]
    if len(rows) < 3 or rows[0]["step"] != 0:
        return None
    q0, g0 = _judge(rows[0]), rows[0][guard]
    later = rows[1:]
    every = later[0]["step"]
    c97 = next((c["step"] for c in later if _judge(c) < 0.97 * q0), None)
    sign = 1 if higher_is_better else -1
    trip = next((c["step"] for c in later if sign * (c[guard] - g0) < -tolerance * abs(g0)), None)
    out = {"checks": len(rows), "tolerance": tolerance, "higher_is_better": higher_is_better,
           "spearman": round(spearman([sign * c[guard] for c in rows], [_judge(c) for c in rows]), 3),
           "classifier_97": c97, "guard_trip": trip,
           "trip_vs_classifier": None if c97 is None or trip is None else (trip - c97) // every,
           "steps": [c["step"] for c in rows], "quality_ratio": [round(_judge(c) / q0, 4) for c in rows],
           "guard_ratio": [round(c[guard] / g0, 4) for c in rows]}
    if all(JUDGE2 in c for c in rows):  # the judge against itself: the ceiling of any guard's Spearman
        out["judge_self_spearman"] = round(spearman([c[JUDGE] for c in rows], [c[JUDGE2] for c in rows]), 3)
    return out


def _plot(results: Dict[str, Dict[str, Dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted(results)
    cols = 3
    rows = (len(names) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.4 * cols, 3.2 * rows), dpi=100, squeeze=False)
    for ax, name in zip(axes.flat, names):
        first = next(iter(results[name].values()))
        ax.plot(first["steps"], first["quality_ratio"], "ko-", ms=3, label="classifier score / step 0")
        ax.axhline(0.97, color="grey", ls=":", lw=1)
        title = []
        for (guard, r), color in zip(results[name].items(), _COLORS):
            up = r.get("higher_is_better", False)
            ax.plot(r["steps"], [g if up else 1 / g for g in r["guard_ratio"]], "s-", ms=3, color=color,
                    label=f"{guard} / step 0" if up else f"step 0 / {guard}")
            ax.axhline(1 - r["tolerance"] if up else 1 / (1 + r["tolerance"]), color=color, ls="--", lw=0.8)
            title.append(f"{guard} rho {r['spearman']}")
        self_rho = first.get("judge_self_spearman")
        lines = [", ".join(title[i:i + 2]) for i in range(0, len(title), 2)]  # two guards a line
        ax.set_title(f"{name}: " + "\n".join(lines) + (f"\njudge vs itself {self_rho}" if self_rho is not None
                                                      else ""), fontsize=8)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle("Guards (dashed: their default tolerance) vs the digits classifier (dotted: 97 %)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dirs", type=Path, nargs="+")
    p.add_argument("--dest", type=Path, default=None)
    p.add_argument("--guards", nargs="+", default=list(GUARDS),
                   help="recorded keys to score (default: %(default)s; fit* use retain_fit's tolerance)")
    p.add_argument("--judge-from", type=Path, default=None,
                   help="take the judge readings from this folder's trajectory of the same EXP@LR, by step")
    a = p.parse_args(argv)
    from siss_fast.metrics.registry import DEFAULT_TOLERANCE, get_metric

    guards = {key: (DEFAULT_TOLERANCE if (m := get_metric(guard_metric(key))).tolerance is None else m.tolerance,
                    m.higher_is_better) for key in a.guards}
    runs: Dict[str, List[Dict]] = {}
    for folder in a.dirs:
        runs.update(load_runs(folder))
    if a.judge_from:
        judged = load_runs(a.judge_from)
        runs = {name: with_judge(checks, judged[name]) for name, checks in runs.items() if name in judged}
    results: Dict[str, Dict[str, Dict]] = {}
    for name, checks in sorted(runs.items()):
        per = {g: r for g, (tol, up) in guards.items() if (r := fidelity(checks, g, tol, up))}
        if per:
            results[name] = per
    for name, per in results.items():
        for g, r in per.items():
            print(f"{name:16s} {g:11s} rho {r['spearman']:6} (judge vs itself {r.get('judge_self_spearman')}) "
                  f"classifier<97% at {r['classifier_97']}, trips at {r['guard_trip']} "
                  f"({r['trip_vs_classifier']} checks)")
    if a.dest:
        a.dest.parent.mkdir(parents=True, exist_ok=True)
        a.dest.with_suffix(".json").write_text(json.dumps({"guards": guards, "judge": [JUDGE, JUDGE2],
                                                           "judge_from": a.judge_from and str(a.judge_from),
                                                           "runs": results}, indent=1) + "\n")
        _plot(results, a.dest.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
