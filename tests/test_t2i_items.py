"""The text-to-image demo's memorized items and its multi-item engine inputs (no training: seconds)."""

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
pytest.importorskip("sklearn")

from siss_fast.demo.t2i_base import DIGIT_PROMPTS, REPRODUCTION_THRESHOLD  # noqa: E402
from siss_fast.demo.t2i_items import FORGET_ITEMS, item_data, item_glyphs, pass_criteria  # noqa: E402
from siss_fast.demo.text_to_image import REPRODUCTION_METRIC, T2IConfig, engine_config, write_t2i_folders  # noqa: E402
from siss_fast.metrics import image_similarity  # noqa: E402


def test_items_are_distinct_from_each_other_and_from_the_digits():
    data, prompts = item_data(3)
    assert prompts == ("a t-shirt", "box", "cross") and data.forget_image.shape == (3, 1, 16, 16)
    assert torch.equal(data.forget_image[0], item_data(1)[0].forget_image[0])  # item 0: the single-item T-shirt
    for k in range(3):
        others = torch.cat([data.forget_image[:k], data.forget_image[k + 1:]])
        assert image_similarity(others, data.forget_image[k]).max() < 0.5
        assert image_similarity(data.retain, data.forget_image[k]).max() < 0.7  # far below the 0.9 threshold
    # prompts differ from each other and from every digit word from their first character on
    firsts = [p[0] for p in prompts] + [w[0] for w in DIGIT_PROMPTS]
    assert len(set(p[0] for p in prompts)) == len(prompts) and not set(p[0] for p in prompts) & set(firsts[3:])
    with pytest.raises(ValueError, match="items"):
        item_glyphs(len(FORGET_ITEMS) + 1)


def test_multi_item_engine_inputs(tmp_path):
    from siss_fast.engine import load_config
    from siss_fast.engine.models import build_tiny

    data, prompts = item_data(3)
    gens = [torch.zeros(2, 1, 16, 16), torch.zeros(0, 1, 16, 16), -torch.ones(1, 1, 16, 16)]
    folders = write_t2i_folders(data, tmp_path / "data", prompts, [0, 5, 9], gens)
    captions = dict(line.split("\t") for line in folders["captions"].read_text().splitlines())
    assert {f"forget_{k:03d}.png": p for k, p in enumerate(prompts)}.items() <= captions.items()
    assert captions["gen_0_001.png"] == "a t-shirt" and captions["gen_2_000.png"] == "cross"
    assert sorted(p.name for p in folders["forget"].iterdir()) == [f"forget_{k:03d}.png" for k in range(3)]
    with pytest.raises(ValueError, match="one prompt"):
        write_t2i_folders(data, tmp_path / "bad", prompts[:2], [0], gens[:2])

    base = build_tiny("tiny-sd", tmp_path / "base", channels=1, image_size=16)
    cfg = T2IConfig(out=str(tmp_path / "run"), lora_rank=2)
    engine = engine_config(cfg, base, tmp_path / "run", folders)
    v = engine["validation"]
    assert "prompt" not in v and v["forget_metric"] == REPRODUCTION_METRIC and v["num_samples"] == cfg.val_samples
    assert engine["train"]["lora_rank"] == 2 and "lora_rank" not in engine_config(T2IConfig(), base, tmp_path,
                                                                                  folders)["train"]
    resolved = load_config(engine)  # valid before any weights load: every forget item has its caption
    assert resolved.data.captions == str(folders["captions"]) and resolved.validation.prompt is None


def test_reproduction_metric_reads_each_item():
    from siss_fast.metrics.registry import MetricContext, get_metric

    data, _ = item_data(3)
    unit = (data.forget_image + 1) / 2
    score = get_metric(REPRODUCTION_METRIC).factory(MetricContext(unit[:0], unit, {}))
    samples = torch.cat([unit[0:1], unit[0:1], unit[2:3], torch.rand(1, 1, 16, 16)])
    assert score.per_item(samples) == [0.5, 0.0, 0.25] and score(samples) == 0.75
    assert REPRODUCTION_THRESHOLD == 0.9


def test_pass_criteria_cover_every_item():
    prompts = ("a t-shirt", "box")
    before = {f"{k}[{p}]": v for p in prompts for k, v in (("reproduction_rate", 0.5), ("forget_similarity", 0.9),
                                                           ("noise_norm_forget_first", 0.6))}
    after = {**{k: v / 10 for k, v in before.items()}, "reproduction_rate[box]": 0.2,
             "other_prompt_similarity_to_before": 0.9}
    checks = pass_criteria(before, after, prompts, 0.8)
    assert len(checks) == 4 * 2 + 1
    failed = [name for name, ok in checks.items() if not ok]
    assert failed == ["'box': reproduction rate after (0.200) <= 10 % of before (0.500)"]


def test_notes_state_the_separate_runs_comparison():
    from siss_fast.demo.t2i_items import notes

    prompts = ("a t-shirt", "box")
    gens = [{"prompt": p, "digit_max_similarity": 0.5, "kept": 3, "drawn": 64, "threshold": 0.5} for p in prompts]
    split = {"train_s": 2.0, "validation_s": 3.0, "validation_share": 0.6}
    runs = [{"prompt": p, "unlearn_wall_s": w, "steps": 10, "stop_reason": "forget_target", "engine_time": split,
             "after": {"reproduction_rate": 0.0, "other_prompt_similarity_to_before": 0.9}}
            for p, w in zip(prompts, (4.0, 6.0))]
    separate = {"runs": runs, "sum_unlearn_wall_s": 10.0, "combined_unlearn_wall_s": 7.5, "combined_time": split,
                "ratio_combined_to_separate": 0.75}
    text = notes(T2IConfig(), prompts, {}, {"digits": 200, "generations": gens}, separate)[-1]
    assert "7.5 s for 2 items (2.0 s training, 3.0 s validation)" in text
    assert "4.0 s ('a t-shirt': 10 steps" in text and "= 10.0 s; combined / separate = 0.75" in text
