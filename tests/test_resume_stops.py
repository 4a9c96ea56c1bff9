"""A resumed run makes the stop decisions of the uninterrupted run, and a finished run is never reopened.

Runs that end on the forget target, on the quality guard and on the budget are killed at seeded random moments --
after any file write, rename or optimizer step, including between the checkpoint of the stopping step and the final
write -- and resumed (``resume=latest``) until done; each must end bit-identical to the uninterrupted run with the
same stop rule, step and kept step. A "kill" here raises from inside the run right after the chosen operation
completed (the on-disk state a SIGKILL at that instant leaves; kills in the middle of a write are the subprocess
SIGKILL test of ``test_reliability.py``).

The stop rules are driven by two test metrics whose value is looked up by the sha256 of the validation samples:
the samples depend only on the weights (fixed seeds), so a calibration run maps each validation step to its samples
and the schedule below decides at which steps the target is met or the guard trips -- identically in every run.
"""

import hashlib
import json
import os
import pathlib
import random
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_helpers import base_config, tiny_model  # noqa: E402

from siss_fast.cli import main as cli_main  # noqa: E402
from siss_fast.engine import load_config  # noqa: E402
from siss_fast.engine import loop as engine_loop  # noqa: E402
from siss_fast.engine.checkpoint import CheckpointError  # noqa: E402
from siss_fast.engine.loop import run  # noqa: E402
from siss_fast.engine.run_record import FinishedRunError  # noqa: E402
from siss_fast.engine.step import UnlearnStep  # noqa: E402
from siss_fast.engine.validation import register_metric  # noqa: E402

SCHEDULE = {"forget": {}, "quality": {}}  # sample digest -> metric value (default 1.0)
SEEN = []  # digests of the validation samples, in order


def _digest(samples):
    return hashlib.sha256(samples.numpy().tobytes()).hexdigest()


@register_metric("test_sched_forget")
def _sched_forget(ctx):
    def score(samples):
        SEEN.append(_digest(samples))
        return SCHEDULE["forget"].get(SEEN[-1], 1.0)
    return score


@register_metric("test_sched_quality")
def _sched_quality(ctx):
    return lambda samples: SCHEDULE["quality"].get(_digest(samples), 1.0)


VALIDATION = {"every": 2, "num_samples": 4, "sampler_steps": 2, "batch_size": 4,
              "metrics": ["test_sched_forget", "test_sched_quality"], "forget_metric": "test_sched_forget",
              "forget_target": 0.5, "quality_metric": "test_sched_quality", "quality_tolerance": 0.5}

# rule -> (budget, forget values by step, quality values by step, expected (reason, step, kept step, final_from))
SCENARIOS = {
    # met at 4 alone (patience 2), missed at 6, met at 8 and 10: stops at 10, keeps 10
    "forget_target": (16, {4: 0.0, 8: 0.0, 10: 0.0}, {}, ("forget_target", 10, 10, "best@10")),
    # quality 1.0 -> 1.2 (within 0.5) -> 2.0 (tripped) at 6: keeps the last state within the guard, 4
    "quality_guard": (16, {}, {4: 1.2, 6: 2.0}, ("quality_guard", 6, 4, "last_good@4")),
    # nothing fires: the budget of 9 steps ends it, the end state is kept
    "steps": (9, {}, {}, ("steps", 9, 9, "end@9")),
}


def _cfg(out, steps, **extra):
    sections = dict(train={"steps": steps}, checkpoint={"every": 3, "keep_last": 2}, validation=dict(VALIDATION))
    for key, value in extra.items():
        sections[key] = {**sections.get(key, {}), **value}
    return base_config(tiny_model("ddpm"), out, **sections)


@pytest.fixture(scope="module")
def digests(tmp_path_factory):
    """step -> digest of that step's validation samples (one calibration run, stop rules off)."""
    SCHEDULE["forget"].clear(), SCHEDULE["quality"].clear()
    SEEN.clear()
    out = tmp_path_factory.mktemp("calibration")
    run(load_config(_cfg(out, 16, validation={"stop_on_target": False, "stop_on_guard": False})))
    assert len(SEEN) == 9 and len(set(SEEN)) == 9  # steps 0, 2, ..., 16, all different samples
    return dict(zip(range(0, 17, 2), SEEN))


def _use(rule, digests):
    _, forget, quality, _ = SCENARIOS[rule]
    SCHEDULE["forget"] = {digests[s]: v for s, v in forget.items()}
    SCHEDULE["quality"] = {digests[s]: v for s, v in quality.items()}


class _Killed(BaseException):
    """What the kill injector raises (a BaseException: nothing in the engine may catch it)."""


class _Injector:
    """Counts the run's side effects -- renames, file writes, tensor saves, metrics records, optimizer steps -- and
    raises :class:`_Killed` right after the ``kill_at``-th (1-based; None: count only)."""

    def __init__(self, monkeypatch, kill_at=None):
        self.kill_at, self.events = kill_at, []
        wrap = self._wrap
        monkeypatch.setattr(os, "replace", wrap("replace", os.replace))
        monkeypatch.setattr(torch, "save", wrap("torch.save", torch.save))
        import safetensors.torch as st

        monkeypatch.setattr(st, "save_file", wrap("save_file", st.save_file))
        monkeypatch.setattr(pathlib.Path, "write_text", wrap("write_text", pathlib.Path.write_text))
        monkeypatch.setattr(engine_loop._MetricsLog, "write", wrap("metrics", engine_loop._MetricsLog.write))
        monkeypatch.setattr(UnlearnStep, "__call__", wrap("step", UnlearnStep.__call__))

    def _wrap(self, label, fn):
        def wrapped(*args, **kwargs):
            out = fn(*args, **kwargs)
            target = args[1] if label == "replace" else (args[0] if label == "write_text" else None)
            self.events.append((label, str(target) if target is not None else ""))
            if self.kill_at is not None and len(self.events) == self.kill_at:
                raise _Killed(f"killed after event {len(self.events)}: {self.events[-1]}")
            return out
        return wrapped


def _final_unet(out):
    from safetensors.torch import load_file

    return load_file(str(Path(out) / "final" / "unet" / "diffusion_pytorch_model.safetensors"))


def _snapshot(folder):
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def _records(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _kill_points(events, stop_step, count, seed):
    """``count`` event numbers: seeded random ones, plus right after the stopping step's checkpoint lands and right
    after ``final/`` lands (before the manifest)."""
    n = len(events)
    ckpt = next(i + 1 for i, (label, target) in enumerate(events)
                if label == "replace" and target.endswith(f"step-{stop_step:06d}"))
    final = next(i + 1 for i, (label, target) in enumerate(events) if label == "replace" and target.endswith("final"))
    rng = random.Random(seed)
    points = {ckpt, final, n}  # n: after the manifest's rename, i.e. killed on the way out of a finished run
    while len(points) < count:
        points.add(rng.randint(1, n))
    return sorted(points)


@pytest.mark.parametrize("rule", list(SCENARIOS))
def test_killed_at_random_moments_then_resumed_ends_like_uninterrupted(rule, digests, tmp_path, monkeypatch):
    _use(rule, digests)
    steps, _, _, (reason, stop_step, kept_step, final_from) = SCENARIOS[rule]
    with monkeypatch.context() as m:
        counter = _Injector(m)
        reference = run(load_config(_cfg(tmp_path / "reference", steps)))
    assert (reference.stop_reason, reference.steps_done, reference.kept_step) == (reason, stop_step, kept_step)
    ref_manifest = json.loads((tmp_path / "reference" / "manifest.json").read_text())
    assert ref_manifest["status"] == "finished" and ref_manifest["final_model"]["from"] == final_from
    ref_weights, ref_records = _final_unet(tmp_path / "reference"), _records(tmp_path / "reference")
    assert (tmp_path / "reference" / "checkpoints" / f"step-{stop_step:06d}").is_dir()  # the stop is checkpointed

    rng = random.Random(f"{rule}-second-kills")
    points = _kill_points(counter.events, stop_step, 11, seed=rule)
    for k in points:
        out = tmp_path / f"kill-{k}"
        with monkeypatch.context() as m:
            _Injector(m, kill_at=k)
            with pytest.raises(_Killed):
                run(load_config(_cfg(out, steps)))
        resumes = 0
        while True:  # resume until done; now and then the resumed run is killed too
            second = rng.randint(1, 60) if (resumes == 0 and rng.random() < 0.5) else None
            try:
                with monkeypatch.context() as m:
                    _Injector(m, kill_at=second)
                    result = run(load_config(_cfg(out, steps, checkpoint={"resume": "latest"})))
                break
            except _Killed:
                resumes += 1
        assert (result.stop_reason, result.steps_done, result.kept_step) == (reason, stop_step, kept_step), k
        weights = _final_unet(out)
        assert weights.keys() == ref_weights.keys()
        assert all(torch.equal(weights[key], ref_weights[key]) for key in ref_weights), f"kill point {k}"
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["stop"] == ref_manifest["stop"] and manifest["final_model"]["sha256"] == \
            ref_manifest["final_model"]["sha256"], k
        records = _records(out)  # every step and validation once, one closing record

        def strip(recs):
            timings = ("step_time_s", "images_per_s", "validation_s")
            return [{k: v for k, v in r.items() if k not in timings} for r in recs]

        assert strip(records) == strip(ref_records), k


@pytest.mark.parametrize("rule", list(SCENARIOS))
def test_a_finished_run_is_never_reopened(rule, digests, tmp_path, capsys):
    import yaml

    _use(rule, digests)
    steps, _, _, (reason, stop_step, kept_step, _) = SCENARIOS[rule]
    out = tmp_path / "run"
    run(load_config(_cfg(out, steps)))
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(yaml.safe_dump(_cfg(out, steps)))
    before = _snapshot(out)
    capsys.readouterr()

    # a retry (resume=latest, or resuming its own stop checkpoint), with a larger budget too: nothing changes, exit 0
    assert cli_main(["unlearn", str(cfg_path), "resume=latest"]) == 0
    said = capsys.readouterr().out
    assert "is a finished run" in said and f"stop rule {reason} at step {stop_step}, kept step {kept_step}" in said
    assert cli_main(["unlearn", str(cfg_path), "resume=latest", f"steps={steps + 10}"]) == 0
    ckpt = out / "checkpoints" / f"step-{stop_step:06d}"
    result = run(load_config(_cfg(out, steps, checkpoint={"resume": str(ckpt)})))
    assert (result.stop_reason, result.steps_done, result.kept_step) == (reason, stop_step, kept_step)
    assert _snapshot(out) == before  # byte-identical, not even rewritten

    # a new run into its folder is refused before any model loads
    assert cli_main(["unlearn", str(cfg_path)]) == 2
    assert "holds a finished run" in capsys.readouterr().err
    with pytest.raises(FinishedRunError, match="new output_dir"):
        run(load_config(_cfg(out, steps)))
    assert _snapshot(out) == before

    # continuing past the stop is a new run seeded from the final model, in a new folder
    more = run(load_config(base_config(out / "final", tmp_path / "more", train={"steps": 2})))
    assert more.steps_done == 2 and _snapshot(out) == before

    # a final model changed after the fact is caught on the next retry, naming the folder
    weights = out / "final" / "unet" / "diffusion_pytorch_model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-3] ^= 0xFF
    weights.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="final.*does not match the sha256"):
        run(load_config(_cfg(out, steps, checkpoint={"resume": "latest"})))


def test_a_kept_state_changed_outside_the_run_is_refused(digests, tmp_path):
    _use("forget_target", digests)
    out = tmp_path / "run"
    interrupted = run(load_config(_cfg(out, 16)), stop_after=10)  # the stop fired at 10; outputs not written
    assert interrupted.stop_reason == "interrupted" and (out / "best.safetensors").is_file()
    raw = bytearray((out / "best.safetensors").read_bytes())
    raw[-3] ^= 0xFF
    (out / "best.safetensors").write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="best.safetensors.*sha256 mismatch"):
        run(load_config(_cfg(out, 16, checkpoint={"resume": "latest"})))
    assert not (out / "manifest.json").exists()
