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


class _Denoiser(torch.nn.Module):
    """Predicts the eps that makes its x0 estimate ``target`` (a model that memorised one image), whatever x_t is."""

    def __init__(self, target, abar):
        super().__init__()
        self.target, self.abar = target, abar
        self.w = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x, t):
        a = self.abar[t].float().view(-1, 1, 1, 1)
        return (x - a.sqrt() * self.target) / (1 - a).sqrt()


def test_forget_probe_reads_memorisation_per_item():
    from types import SimpleNamespace

    from diffusers import DDPMScheduler

    from siss_fast.metrics.registry import MetricContext, build_metrics

    sched = DDPMScheduler(num_train_timesteps=1000)
    gen = torch.Generator().manual_seed(0)
    retain = torch.rand(20, 1, 8, 8, generator=gen) * 0.3
    forget = torch.stack([torch.ones(1, 8, 8), torch.eye(8).view(1, 8, 8)])  # two items far from the retain set
    ctx = MetricContext(retain, forget, kind="ddpm", model=SimpleNamespace(scheduler=sched, vae=None))
    probe = build_metrics(["forget_probe"], ctx, {"forget_probe": {"probes": 8, "steps": 4, "t_frac": 0.5}})["forget_probe"]
    assert probe.uses_unet and probe.calibration is None
    memorised_0 = _Denoiser(2 * forget[0:1] - 1, sched.alphas_cumprod)
    assert probe.per_item(None, unet=memorised_0) == [1.0, 0.0]  # item 0 always comes back, item 1 never
    assert probe(None, unet=memorised_0) == 0.5
    generalising = _Denoiser(2 * retain[3:4] - 1, sched.alphas_cumprod)
    assert probe.per_item(None, unet=generalising) == [0.0, 0.0]
    for bad, key in (({"t_frac": 0}, "t_frac"), ({"probes": 0}, "probes"), ({"depth": 1}, "depth")):
        with pytest.raises(ValueError, match=f"forget_probe.{key}"):
            build_metrics(["forget_probe"], ctx, {"forget_probe": bad})
    with pytest.raises(ValueError, match="pixel DDPMs only"):
        build_metrics(["forget_probe"], MetricContext(retain, forget, kind="sd"), {})


class _Bank(torch.nn.Module):
    """The optimal denoiser of a finite training set ``bank`` ``(B, C, H, W)`` in model space: its x0 estimate is the
    posterior mean ``sum_i softmax_i(-||x - sqrt(abar) y_i||^2 / (2 (1 - abar))) y_i`` -- a model that memorised
    exactly these images. From high noise it lands on a random bank image, from low noise on the nearest one."""

    def __init__(self, bank, abar):
        super().__init__()
        self.bank, self.abar = bank.flatten(1), abar
        self.w = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x, t):
        a = self.abar[t].double().view(-1, 1)
        flat = x.flatten(1).double()
        logits = -torch.cdist(flat / a.sqrt(), self.bank.double()).square() * a / (2 * (1 - a))
        x0 = logits.softmax(1) @ self.bank.double()
        return ((flat - a.sqrt() * x0) / (1 - a).sqrt()).view_as(x).float()


def test_forget_probe_auto_level_is_the_highest_with_a_majority_return():
    """``t_frac: auto`` scans the base model from t = 0.9 T down and keeps, per item, the first level from which the
    item comes back in >= auto_level of the probes; an item that never comes back gets the level of highest return."""
    from types import SimpleNamespace

    from diffusers import DDPMScheduler

    from siss_fast.metrics.forget_probe import AUTO_GRID
    from siss_fast.metrics.registry import MetricContext, build_metrics

    sched = DDPMScheduler(num_train_timesteps=1000)
    gen = torch.Generator().manual_seed(0)
    retain = torch.rand(20, 1, 8, 8, generator=gen) * 0.3
    forget = torch.stack([torch.ones(1, 8, 8), torch.eye(8).view(1, 8, 8)])
    base = _Bank(torch.cat([2 * retain - 1, 2 * forget[:1] - 1]), sched.alphas_cumprod)  # memorised item 0 only
    ctx = MetricContext(retain, forget, kind="ddpm", model=SimpleNamespace(scheduler=sched, vae=None), unet=base)
    probe = build_metrics(["forget_probe"], ctx, {"forget_probe": {"probes": 16, "steps": 5}})["forget_probe"]
    first, second = probe.calibration
    levels = list(first["scanned"])
    assert levels == list(AUTO_GRID[:len(levels)])  # scanned from the top ...
    assert first["scanned"][first["t_frac"]] >= 0.5 and all(r < 0.5 for r in list(first["scanned"].values())[:-1])
    assert first["t_frac"] == levels[-1] and 0.3 < first["t_frac"] < 0.9  # ... down to the first majority return
    assert second["base_rate"] == 0.0 and list(second["scanned"]) == list(AUTO_GRID)  # item 1 was never learned
    assert probe.per_item(None, unet=base)[0] == first["base_rate"]  # the chosen level is used at every check
    forgot = _Bank(2 * retain - 1, sched.alphas_cumprod)  # the same model without item 0
    assert probe.per_item(None, unet=forgot) == [0.0, 0.0]
    with pytest.raises(ValueError, match="forget_probe.auto_level"):
        build_metrics(["forget_probe"], ctx, {"forget_probe": {"auto_level": 0}})


def test_bad_metric_options_fail_before_any_model_loads(tmp_path):
    from siss_fast.engine import ConfigError

    cfg = base_config(tmp_path / "no-model-here", tmp_path / "r",
                      validation={"every": 2, "metrics": ["forget_probe", "retain_distance"],
                                  "forget_metric": "forget_probe", "quality_metric": "retain_distance",
                                  "metric_options": {"forget_probe": {"t_frac": 1.5}}})
    with pytest.raises(ConfigError, match=r"forget_probe\.t_frac"):
        load_config(cfg)
