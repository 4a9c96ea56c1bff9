"""Many deletion requests in one Stable Diffusion run (issue 13, item 3): each forget item is measured on generations
for its own prompt, the run stops only when every item met its target, and the manifest lists every item."""

import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_helpers import DATA, base_config, tiny_model, write_images  # noqa: E402

from siss_fast.engine import ConfigError, load_config  # noqa: E402
from siss_fast.engine.loop import run  # noqa: E402
from siss_fast.metrics.registry import register_metric  # noqa: E402

PROMPTS = ["ring", "cone", "ring"]  # items 0 and 2 share a prompt: two generation sets per check

_SEEN = []


@register_metric("test_sd_items")
def _sd_items(ctx):
    """Each item reads the mean of the generations it is given (so the test can tell which prompt's they were);
    items 0 and 1 drop to 0 from the first check after the baseline, item 2 only from the third."""

    def per_item(samples):
        _SEEN.append(samples.clone())
        check = (len(_SEEN) - 1) // 2  # two prompts: two calls per check
        level = float(samples.mean())
        return [level if check < 1 else 0.0, level if check < 1 else 0.0, level if check < 3 else 0.0]

    def score(samples):
        return float(samples.mean())

    score.per_item = per_item
    return score


def _multi_item_data(root: Path, captions: dict) -> dict:
    forget = write_images(root / "forget", 3, seed=5)
    lines = [f"{p.name}\ta soft gradient with a blob" for p in sorted((DATA / "retain").glob("*.png"))]
    lines += [f"{name}\t{prompt}" for name, prompt in captions.items()]
    (root / "captions.tsv").write_text("\n".join(lines) + "\n")
    return {"retain_dir": str(DATA / "retain"), "forget_dir": str(forget), "captions": str(root / "captions.tsv")}


def _config(tmp_path: Path, data: dict, **validation):
    v = {"every": 2, "num_samples": 2, "sampler_steps": 2, "batch_size": 2, "guidance_scale": 2.0,
         "metrics": ["test_sd_items", "forget_nn"], "forget_metric": "test_sd_items", "quality_metric": None,
         "target_patience": 1, "grids": False, **validation}
    return base_config(tiny_model("sd"), tmp_path / "run", data=data, train={"steps": 20, "lr": 1e-5},
                       validation=v)


def test_sd_run_measures_each_item_on_its_own_prompt_and_stops_when_all_met(tmp_path):
    from siss_fast.engine.models import load_model
    from siss_fast.engine.data import encode_prompts
    from siss_fast.engine.validation import sample_images

    _SEEN.clear()
    names = [f"img_{i:02d}.png" for i in range(3)]
    data = _multi_item_data(tmp_path / "data", dict(zip(names, PROMPTS)))
    result = run(load_config(_config(tmp_path, data)))
    # checks at 0 (baseline), 2 and 4 (item 2 still there), 6 (every item met): stops at 6, not at 2
    assert (result.stop_reason, result.steps_done) == ("forget_target", 6)
    assert len(_SEEN) == 2 * 4  # one generation set per distinct prompt per check

    # the baseline check generated, for each distinct prompt, what the one sampler gives for that prompt
    model = load_model(str(tiny_model("sd")))
    emb, idx = encode_prompts(model.tokenizer, model.text_encoder, ["ring", "cone", ""], torch.device("cpu"),
                              torch.float32)
    for k, prompt_row in enumerate(idx[:2]):
        want = sample_images(model, model.unet, num_samples=2, steps=2, seed=0, batch_size=2,
                             device=torch.device("cpu"), autocast_dtype=None,
                             encoder_hidden_states=emb[prompt_row:prompt_row + 1],
                             uncond_hidden_states=emb[idx[2]:idx[2] + 1], guidance_scale=2.0)
        assert torch.allclose(_SEEN[k], want, atol=1e-6), PROMPTS[k]
    assert not torch.equal(_SEEN[0], _SEEN[1])  # two prompts, two different generation sets

    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    before, after = manifest["metrics_before"], manifest["metrics_after"]
    # every item has its before / after in the manifest; items 0 and 2 ("ring") read the same generations
    assert before["test_sd_items[0]"] == pytest.approx(float(_SEEN[0].mean()))
    assert before["test_sd_items[1]"] == pytest.approx(float(_SEEN[1].mean()))
    assert before["test_sd_items[2]"] == before["test_sd_items[0]"] != before["test_sd_items[1]"]
    assert [after[f"test_sd_items[{k}]"] for k in range(3)] == [0.0, 0.0, 0.0]
    for k in range(3):  # the built-in forget signal is per item too
        assert f"forget_nn[{k}]" in before and f"forget_nn[{k}]" in after
    assert [item["file"] for item in manifest["forget_items"]] == names  # item k = the k-th forget file
    metrics = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    checks = [m for m in metrics if "validation" in m]
    assert [c["target_met"] for c in checks] == [False, False, False, True]


def test_validation_prompt_still_measures_every_item_on_one_prompt(tmp_path):
    _SEEN.clear()
    names = [f"img_{i:02d}.png" for i in range(3)]
    data = _multi_item_data(tmp_path / "data", dict(zip(names, PROMPTS)))
    cfg = _config(tmp_path, data, prompt="ring")
    cfg["train"]["steps"] = 2
    run(load_config(cfg))
    assert len(_SEEN) == 2  # one generation set per check (steps 0 and 2)


def test_captions_missing_a_forget_item_fail_before_any_model_loads(tmp_path, monkeypatch):
    import siss_fast.engine.models as models
    from siss_fast.engine import unlearn

    def no_load(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(models, "load_model", no_load)
    data = _multi_item_data(tmp_path / "data", {"img_00.png": "ring", "img_02.png": "cone"})  # img_01.png: none
    with pytest.raises(ConfigError) as err:
        unlearn(_config(tmp_path, data))
    message = str(err.value)
    assert "data.captions" in message and "img_01.png" in message and "img_00.png" not in message
    assert "captions.tsv" in message  # the file, by its path
    assert not (tmp_path / "run").exists()  # nothing was written either


def test_sd_check_interval_scales_with_the_distinct_forget_prompts():
    """A check samples every distinct forget prompt, so the default interval grows with their number and a check
    keeps costing what the training between checks does (engine/defaults.py)."""
    from siss_fast.engine.config import ValidationConfig
    from siss_fast.engine.defaults import VALIDATION_DEFAULTS, resolve_validation

    every = VALIDATION_DEFAULTS["sd"]["every"]
    assert resolve_validation(ValidationConfig(), "sd", 1)["every"] == every
    assert resolve_validation(ValidationConfig(), "sd", 3)["every"] == 3 * every
    assert resolve_validation(ValidationConfig(prompt="one prompt"), "sd", 3)["every"] == every  # one prompt sampled
    assert resolve_validation(ValidationConfig(every=7), "sd", 3)["every"] == 7  # set by the user: kept
    assert resolve_validation(ValidationConfig(every=0), "sd", 3)["every"] == 0  # off stays off
    assert resolve_validation(ValidationConfig(), "ddpm", 3)["every"] == VALIDATION_DEFAULTS["ddpm"]["every"]
