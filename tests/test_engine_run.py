"""Engine runs on tiny random-weight models (CPU): every method, outputs, resume bit-equality, atomic checkpoints."""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_helpers import DATA, base_config, tiny_model  # noqa: E402

from siss_fast.engine import load_config  # noqa: E402
from siss_fast.engine.checkpoint import CheckpointError, list_checkpoints, load_checkpoint  # noqa: E402
from siss_fast.engine.loop import run  # noqa: E402

METHODS = ["siss", "siss_nois", "naive", "neggrad", "erasediff", "bernoulli"]


def _config(kind, out, **sections):
    cfg = base_config(tiny_model(kind), out, **sections)
    if kind == "sd":
        cfg["data"]["captions"] = str(DATA / "captions.tsv")
    return cfg


def _final_unet(out):
    from safetensors.torch import load_file

    return load_file(str(Path(out) / "final" / "unet" / "diffusion_pytorch_model.safetensors"))


@pytest.mark.parametrize("kind", ["ddpm", "sd"])
@pytest.mark.parametrize("method", METHODS)
def test_every_method_runs(tmp_path, kind, method):
    grad = {"scaling_norm": 1.0} if method == "neggrad" else {}
    cfg = load_config(_config(kind, tmp_path / "run", method={"name": method}, gradient=grad))
    result = run(cfg)
    assert result.stop_reason == "steps" and result.steps_done == 2
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "total_norm" in r]
    assert [r["step"] for r in steps] == [1, 2] and all(not r["skipped"] for r in steps)
    if method not in ("naive",):
        assert all(r["norm_a"] is None or r["norm_a"] >= 0 for r in steps)
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["method"] == method and len(manifest["forget_items"]) == 2
    assert len(manifest["forget_items"][0]["sha256"]) == 64 and manifest["stop_reason"] == "steps"


def test_final_model_loads_with_from_pretrained(tmp_path):
    from diffusers import DDPMPipeline, UNet2DConditionModel

    run(load_config(_config("ddpm", tmp_path / "d")))
    pipe = DDPMPipeline.from_pretrained(str(tmp_path / "d" / "final"), local_files_only=True)
    assert pipe.unet.config.sample_size == 16
    run(load_config(_config("sd", tmp_path / "s", train={"steps": 1})))
    unet = UNet2DConditionModel.from_pretrained(str(tmp_path / "s" / "final"), subfolder="unet",
                                                local_files_only=True, use_safetensors=True)
    assert unet.config.in_channels == 4
    for part in ("vae", "text_encoder", "tokenizer", "scheduler", "model_index.json"):
        assert (tmp_path / "s" / "final" / part).exists()


@pytest.mark.parametrize("kind, extra", [
    ("ddpm", {"method": {"name": "siss"}, "train": {"accumulation_steps": 2}}),
    ("sd", {"gradient": {"mode": "lagged", "lag_every": 2}}),
])
def test_resume_is_bit_identical(tmp_path, kind, extra):
    def cfg(out, **more):
        c = _config(kind, out, train={"steps": 4}, checkpoint={"every": 2})
        for key, value in extra.items():
            c.setdefault(key, {}).update(value)
        for key, value in more.items():
            c.setdefault(key, {}).update(value)
        return load_config(c)

    full = run(cfg(tmp_path / "full"))
    assert full.steps_done == 4
    stopped = run(cfg(tmp_path / "split"), stop_after=2)
    assert stopped.stop_reason == "interrupted" and not (tmp_path / "split" / "final").exists()
    resumed = run(cfg(tmp_path / "split", checkpoint={"resume": "latest"}))
    assert resumed.steps_done == 4
    a, b = _final_unet(tmp_path / "full"), _final_unet(tmp_path / "split")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    lines = (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines if "total_norm" in json.loads(x)] == [1, 2, 3, 4]


def test_resume_latest_without_checkpoint_starts_over(tmp_path, capsys):
    result = run(load_config(_config("ddpm", tmp_path / "r", checkpoint={"resume": "latest"})))
    assert result.steps_done == 2
    assert "no checkpoint yet" in capsys.readouterr().out


def test_interrupted_save_leaves_no_checkpoint_and_corruption_is_caught(tmp_path):
    cfg = load_config(_config("ddpm", tmp_path / "c", train={"steps": 4}, checkpoint={"every": 2, "keep_last": 1}))
    with pytest.raises(KeyboardInterrupt):
        run(cfg, _fail_checkpoint_after="trainer.pt")  # crash in the middle of the first save
    root = tmp_path / "c" / "checkpoints"
    assert list_checkpoints(root) == [] and any(p.name.startswith(".tmp-") for p in root.iterdir())
    resumed = run(load_config(_config("ddpm", tmp_path / "c", train={"steps": 4},
                                      checkpoint={"every": 2, "keep_last": 1, "resume": "latest"})))
    assert resumed.steps_done == 4
    (ckpt,) = list_checkpoints(root)  # keep_last=1, the stale .tmp folder is gone
    assert ckpt.name == "step-000004" and not any(p.name.startswith(".tmp-") for p in root.iterdir())
    assert load_checkpoint(ckpt)["step"] == 4
    weights = ckpt / "unet.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-5] ^= 0xFF
    weights.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="unet.safetensors is damaged"):
        run(load_config(_config("ddpm", tmp_path / "c", train={"steps": 6},
                                checkpoint={"every": 2, "resume": "latest"})))
    (ckpt / "COMPLETE.json").unlink()
    with pytest.raises(CheckpointError, match="incomplete"):
        load_checkpoint(ckpt)


def test_validation_stop_rules_and_best_model(tmp_path):
    from siss_fast.engine.validation import register_metric

    calls = []

    @register_metric("test_forget_countdown")
    def countdown(ctx):
        assert ctx.forget_images.shape == (2, 3, 16, 16) and float(ctx.forget_images.max()) <= 1.0
        def score(samples):
            assert samples.shape == (4, 3, 16, 16)
            calls.append(1)
            return {1: 1.0, 2: 1.0, 3: 0.0}.get(len(calls), 0.0)  # baseline, step 2: not met; step 4: met
        return score

    cfg = _config("ddpm", tmp_path / "v", train={"steps": 10},
                  validation={"every": 2, "num_samples": 4, "sampler_steps": 2, "batch_size": 4,
                              "metrics": ["test_forget_countdown", "retain_distance"],
                              "forget_metric": "test_forget_countdown", "forget_target": 0.5,
                              "quality_tolerance": 10.0})
    result = run(load_config(cfg))
    assert (result.stop_reason, result.steps_done, result.best_step) == ("forget_target", 4, 4)
    manifest = json.loads((tmp_path / "v" / "manifest.json").read_text())
    assert manifest["final_model"]["from"] == "best@4" and manifest["metrics_after"]["test_forget_countdown"] == 0
    assert (tmp_path / "v" / "samples" / "step-000004.png").is_file()

    # the quality guard: a metric that worsens by more than the tolerance stops the run, and nothing met the target
    drift = []

    @register_metric("test_quality_drift")
    def quality(ctx):
        return lambda samples: float(drift.append(1) or len(drift))  # 1, 2, 3, ...: lower is better

    cfg["validation"].update(metrics=["forget_distance", "test_quality_drift"], forget_metric="forget_distance",
                             quality_metric="test_quality_drift", forget_target=-1.0, quality_tolerance=1.5)
    cfg["output_dir"] = str(tmp_path / "g")
    result = run(load_config(cfg))
    assert (result.stop_reason, result.steps_done, result.best_step) == ("quality_guard", 4, None)


def test_non_finite_steps_are_skipped_then_stop(tmp_path, monkeypatch):
    from siss_fast.objectives import Objective

    original = Objective.__call__

    def poisoned(self, *args, **kwargs):
        terms = original(self, *args, **kwargs)
        terms.retain = terms.retain * float("nan")
        return terms

    monkeypatch.setattr(Objective, "__call__", poisoned)
    cfg = load_config(_config("ddpm", tmp_path / "n", method={"name": "siss_nois"}, train={"steps": 5},
                              gradient={"max_consecutive_skips": 3, "scaling_norm": 1.0}))
    before = load_config(cfg.__dict__ and _config("ddpm", tmp_path / "unused"))
    result = run(cfg)
    assert result.stop_reason == "non_finite" and result.steps_done == 3
    from siss_fast.engine.models import load_model

    base = load_model(str(tiny_model("ddpm"))).unet.state_dict()
    final = _final_unet(tmp_path / "n")
    assert all(torch.equal(base[k], final[k]) for k in final)  # weights untouched
    del before
