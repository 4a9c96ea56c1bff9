"""The stop signal: per-item forget targets, the one sampler, and the robust auto scaling norm in the engine."""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_helpers import base_config, tiny_model  # noqa: E402

from siss_fast.engine import load_config  # noqa: E402
from siss_fast.engine.loop import run  # noqa: E402
from siss_fast.engine.stop_rules import StopRules  # noqa: E402
from siss_fast.metrics.registry import register_metric  # noqa: E402


def test_every_forget_item_must_meet_its_own_target():
    rules = StopRules("forget_distance", None, None, 0.1, True, True, 1, 0.1, 1)
    rules.update(0, {"forget_distance": 0.03, "forget_distance[0]": 0.04, "forget_distance[1]": 0.02})
    assert rules.target(key="forget_distance[1]") == pytest.approx(0.002)
    # the overall rate is far below its target, but item 1 is still generated at half its rate: not met
    assert not rules.update(1, {"forget_distance": 0.001, "forget_distance[0]": 0.0,
                                "forget_distance[1]": 0.01})["target_met"]
    assert rules.update(2, {"forget_distance": 0.001, "forget_distance[0]": 0.004,
                            "forget_distance[1]": 0.002})["target_met"]
    # an absolute target applies to every item
    absolute = StopRules("forget_distance", 0.005, None, 0.1, True, True, 1, 0.1, 1)
    absolute.update(0, {"forget_distance": 0.05, "forget_distance[0]": 0.05, "forget_distance[1]": 0.05})
    assert not absolute.target_met({"forget_distance": 0.003, "forget_distance[0]": 0.0,
                                    "forget_distance[1]": 0.006})


_CALLS = []


@register_metric("test_two_items")
def _two_items(ctx):
    """Overall 0.5 and items [0.5, 0.5] at the baseline; item 0 gone from the second check, item 1 from the fourth."""
    def per_item(samples):
        _CALLS.append(1)
        n = len(_CALLS)
        return [0.5 if n < 2 else 0.0, 0.5 if n < 4 else 0.0]

    def score(samples):
        return 0.5

    score.per_item = per_item
    return score


def test_a_run_stops_only_when_every_item_met_its_target(tmp_path):
    _CALLS.clear()
    cfg = base_config(tiny_model("ddpm"), tmp_path / "r", train={"steps": 20},
                      validation={"every": 2, "num_samples": 4, "sampler_steps": 2, "batch_size": 4,
                                  "metrics": ["test_two_items"], "forget_metric": "test_two_items",
                                  "quality_metric": None, "target_patience": 1})
    result = run(load_config(cfg))
    # checks at 0 (baseline), 2 (item 1 left), 4 (item 1 left), 6 (both gone): stops at 6
    assert (result.stop_reason, result.steps_done) == ("forget_target", 6)
    manifest = json.loads((tmp_path / "r" / "manifest.json").read_text())
    assert manifest["metrics_before"]["test_two_items[1]"] == 0.5
    assert manifest["metrics_after"]["test_two_items[0]"] == 0.0 and manifest["metrics_after"]["test_two_items[1]"] == 0.0


def test_engine_validation_samples_come_from_the_one_sampler():
    """The engine's validation images equal :func:`ddim_sample`'s for the same model, seed and chunking."""
    from siss_fast.engine.models import load_model
    from siss_fast.engine.validation import sample_images
    from siss_fast.metrics.sampling import ddim_sample

    model = load_model(tiny_model("ddpm"))
    got = sample_images(model, model.unet, num_samples=5, steps=3, seed=7, batch_size=2, device=torch.device("cpu"),
                        autocast_dtype=None)
    want = ddim_sample(model.unet, model.scheduler.alphas_cumprod, 5, (3, 16, 16), steps=3, seed=7, batch_size=2,
                       clip=bool(model.scheduler.config.clip_sample))
    assert torch.equal(got, ((want + 1) / 2).clamp(0, 1))
