"""Guard readings on the saved model states of a planted trajectory (issue 12): sample-based guards, offline.

    python benchmarks/guard_states.py dump EXP --out DIR [--lr 1e-3] [--budget 150] [--every 10]
    python benchmarks/guard_states.py score EXP --out DIR [--lr 1e-3] [--samples 512] [--steps 10]
    python benchmarks/trajectory_report.py DIR --judge-from runs/fid2 --guards retain_fit cluster_default cluster512
    python benchmarks/guard_states.py judge EXP --out DIR --earlier runs/fid2 --dest JUDGED [--seeds 2 3] [--samples 500]
    python benchmarks/trajectory_report.py DIR --judge-from JUDGED --guards ...

``dump`` re-runs ``benchmarks/planted_trajectory.py``'s trajectory of ``EXP`` at ``lr`` (stop rules off, a 16-sample
judge) and saves the UNet state the validator checks (the weights' moving average) at every check to
``DIR/EXP/states-LR/step-NNNN.pt``, recording ``retain_fit`` beside it: equal to an earlier trajectory's reading at
every step, it shows the states are those whose classifier scores that trajectory holds (the training is
deterministic on the CPU). ``score`` draws ``--samples`` DDIM samples (``--steps``, seed 0) from every saved state
and writes ``DIR/EXP/lr-LR/trajectory.json`` in ``planted_trajectory.py``'s format, one check per state:

* ``cluster512``: the registered ``cluster_score`` (:mod:`siss_fast.metrics.cluster_score`, default options) of all
  the samples; ``cluster_default``: of the first ``VALIDATION_DEFAULTS["ddpm"]["num_samples"]`` (96) of them -- what
  the engine's default validation reads;
* ``classifier512``: the digits classifier's score of the samples not assigned to a forget item -- the judge's own
  classifier at this sample count, the reference for how well any reading of these samples can do;
* ``retain_fit`` (from ``dump``) and ``judge_quality`` = ``classifier512`` (``trajectory_report.py --judge-from``
  replaces it with the judge's readings, by step).

The samples themselves are kept beside the states (``samples-NNNN.pt``, ``(N, 1, H, W)`` fp32 in [0, 1]), so other
readings of them can be tried offline without sampling again: ``score EXP --out DIR --rescore DEST`` reads them with
the metrics as they are now and writes ``DEST/EXP/lr-LR/trajectory.json`` (``retain_fit`` from ``dump``).

``judge`` makes the judge itself more precise where it disagrees with itself: it draws ``--samples`` DDIM-25
samples per seed of ``--seeds`` from every saved state and writes ``JUDGED/EXP/lr-LR/trajectory.json`` with, per
check, ``judge_quality`` = the mean of those draws' classifier scores and ``judge2_quality`` = the mean of the
earlier trajectory's two (``--earlier``): the report's classifier score is then the mean of the new draws' mean and
the earlier draws' mean, and its "judge vs itself" compares the new draws with the old. Without ``--earlier`` the
judge is the new draws alone: ``judge_quality`` the first seed's, ``judge2_quality`` the last seed's (the report
averages them and compares them). ``dump`` then ``score`` then ``judge`` on one machine keeps every reading on the
same states; states re-made on another CPU can part from an earlier trajectory's after some steps (fp rounding of
another instruction set), so judge them again rather than borrowing that trajectory's judge.

Sampling the states again costs a fraction of re-running the trajectory with every candidate inside it, so new
sample-based guards can be scored on the same states. One CPU thread.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Dict, Optional, Sequence

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

__all__ = ["dump", "score", "judge", "main"]


def _states(out: Path, exp: str, lr: float) -> Path:
    return Path(out) / exp / f"states-{lr:g}"


def dump(exp: str, out: Path, lr: float = 1e-3, budget: int = 150, every: int = 10) -> Path:
    """Re-run the trajectory and save every validated state (module doc); returns the states folder."""
    import planted_trajectory as pt
    from siss_fast.metrics.registry import register_metric

    folder = _states(out, exp, lr)
    folder.mkdir(parents=True, exist_ok=True)
    count = {"n": 0}

    @register_metric("save_state", higher_is_better=False)
    def _save(ctx):
        def save(samples, unet=None):
            state = {k: v.detach().cpu().clone() for k, v in unet.state_dict().items()}
            torch.save(state, folder / f"step-{count['n'] * every:04d}.pt")
            count["n"] += 1
            return 0.0

        save.uses_unet = True
        return save

    if "save_state" not in pt.METRICS:
        pt.METRICS.append("save_state")
    result = pt.trajectory(exp, out, lr, budget=budget, every=every, judge=16, metrics=["retain_fit", "save_state"])
    fits = {c["step"]: c["retain_fit"] for c in result["checks"]}
    (folder / "retain_fit.json").write_text(json.dumps(fits, indent=1) + "\n")
    return folder


def score(exp: str, out: Path, lr: float = 1e-3, samples: int = 512, steps: int = 10,
          rescore: Optional[Path] = None) -> Dict:
    """Sample every saved state and write the readings as a trajectory (module doc). ``rescore``: read the samples
    an earlier ``score`` kept instead of drawing them, and write the trajectory under ``rescore`` instead of
    ``out`` (a changed reading, the same samples)."""
    import siss_fast.metrics  # noqa: F401
    from siss_fast.engine.defaults import VALIDATION_DEFAULTS
    from siss_fast.metrics.cluster_score import CLUSTER_DEFAULTS
    from siss_fast.engine.models import load_model
    from siss_fast.metrics.engine_metrics import load_classifier
    from siss_fast.metrics.quality import classifier_quality
    from siss_fast.metrics.registry import MetricContext, get_metric
    from siss_fast.metrics.sampling import ddim_sample

    from planted import model_dir
    from planted_data import experiment_data
    from planted_eval import assign_items

    torch.set_num_threads(1)
    folder = _states(out, exp, lr)
    fits = {int(k): v for k, v in json.loads((folder / "retain_fit.json").read_text()).items()}
    data = experiment_data(exp)
    retain, items = (data.retain.float() + 1) / 2, (data.forget_image.float() + 1) / 2
    model = load_model(str(model_dir(exp)))
    ctx = MetricContext(retain, items, {}, model.kind, torch.device("cpu"), model, model.unet)
    cluster = get_metric("cluster_score").factory(ctx)  # built on the base model, as the engine builds it
    trained = type(model.unet).from_config(model.unet.config).eval()  # each saved state is loaded into it
    n_default = VALIDATION_DEFAULTS["ddpm"]["num_samples"]
    classifier, checks = load_classifier(), []
    for path in sorted(folder.glob("step-*.pt")):
        step = int(path.stem.split("-")[1])
        kept = folder / f"samples-{step:04d}.pt"
        if rescore is not None:
            x = torch.load(kept)
        else:
            trained.load_state_dict(torch.load(path))
            with torch.no_grad():
                x = ddim_sample(trained, model.scheduler.alphas_cumprod, samples, tuple(retain.shape[1:]),
                                steps=steps, seed=0, batch_size=256)
            x = ((x + 1) / 2).clamp(0, 1)
            torch.save(x.clone(), kept)  # for readings tried later, offline (--rescore)
        keep = assign_items(x, retain, items)["item"] < 0
        quality = classifier_quality(x[keep], classifier)["quality"]
        checks.append({"step": step, "retain_fit": fits[step], "cluster_default": cluster(x[:n_default]),
                       "cluster512": cluster(x), "classifier512": quality, "judge_quality": quality})
        print(exp, checks[-1], flush=True)
    result = {"experiment": exp, "lr": lr, "samples": int(x.shape[0]), "sampler_steps": steps, "checks": checks,
              "cluster_score_options": dict(CLUSTER_DEFAULTS)}
    dest = Path(rescore if rescore is not None else out) / exp / f"lr-{lr:g}" / "trajectory.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(result, indent=1) + "\n")
    return result


def judge(exp: str, out: Path, earlier: Optional[Path], dest: Path, lr: float = 1e-3, seeds: Sequence[int] = (2, 3),
          samples: int = 500) -> Dict:
    """More draws of the judge on every saved state (module doc)."""
    from siss_fast.engine.models import load_model
    from siss_fast.metrics.engine_metrics import load_classifier
    from siss_fast.metrics.sampling import ddim_sample

    from planted import model_dir
    from planted_data import EXPERIMENTS, experiment_data
    from planted_eval import evaluate_samples_nn

    torch.set_num_threads(1)
    old = {}
    if earlier is not None:
        old = json.loads((Path(earlier) / exp / f"lr-{lr:g}" / "trajectory.json").read_text())["checks"]
        old = {c["step"]: (c["judge_quality"] + c["judge2_quality"]) / 2 for c in old}
    data = experiment_data(exp)
    retain, items = (data.retain.float() + 1) / 2, (data.forget_image.float() + 1) / 2
    model = load_model(str(model_dir(exp)))
    trained = type(model.unet).from_config(model.unet.config).eval()
    classifier, checks = load_classifier(), []
    for path in sorted(_states(out, exp, lr).glob("step-*.pt")):
        step = int(path.stem.split("-")[1])
        trained.load_state_dict(torch.load(path))
        scores = []
        for seed in seeds:
            with torch.no_grad():
                x = ddim_sample(trained, model.scheduler.alphas_cumprod, samples, tuple(retain.shape[1:]), steps=25,
                                seed=seed, batch_size=128)
            judged = evaluate_samples_nn(((x + 1) / 2).clamp(0, 1), retain, items, classifier,
                                         list(EXPERIMENTS[exp].items))
            scores.append(judged["quality"]["quality"])
        if old:
            checks.append({"step": step, "judge_quality": sum(scores) / len(scores), "judge2_quality": old[step],
                           "draws": scores})
        else:  # the first two draws are the judge and its independent repeat (the report averages them)
            checks.append({"step": step, "judge_quality": scores[0], "judge2_quality": scores[-1], "draws": scores})
        print(exp, checks[-1], flush=True)
    result = {"experiment": exp, "lr": lr, "seeds": list(seeds), "samples": samples,
              "earlier": None if earlier is None else str(earlier),
              "checks": checks}
    target = Path(dest) / exp / f"lr-{lr:g}" / "trajectory.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(result, indent=1) + "\n")
    return result


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("dump", "score", "judge"):
        s = sub.add_parser(name)
        s.add_argument("exp")
        s.add_argument("--out", type=Path, required=True)
        s.add_argument("--lr", type=float, default=1e-3)
        if name == "dump":
            s.add_argument("--budget", type=int, default=150)
            s.add_argument("--every", type=int, default=10)
        elif name == "score":
            s.add_argument("--samples", type=int, default=512)
            s.add_argument("--steps", type=int, default=10)
            s.add_argument("--rescore", type=Path, default=None,
                           help="read the samples kept by an earlier score; write the trajectory here")
        else:
            s.add_argument("--earlier", type=Path, default=None)
            s.add_argument("--dest", type=Path, required=True)
            s.add_argument("--seeds", type=int, nargs="+", default=[2, 3])
            s.add_argument("--samples", type=int, default=500)
    a = p.parse_args(argv)
    if a.cmd == "dump":
        print(dump(a.exp, a.out, a.lr, a.budget, a.every))
    elif a.cmd == "score":
        score(a.exp, a.out, a.lr, a.samples, a.steps, a.rescore)
    else:
        judge(a.exp, a.out, a.earlier, a.dest, a.lr, a.seeds, a.samples)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
