"""``siss-fast demo --text-to-image``, shortened: a tiny Stable Diffusion memorizes three images, each for its own
prompt, and SISS unlearns them in one engine run (and, compared, one run each)."""

import argparse
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
pytest.importorskip("sklearn")

from siss_fast.demo.t2i_base import DIGIT_PROMPTS, FORGET_PROMPT, MemorizeSettings, check_prompts  # noqa: E402
from siss_fast.demo.t2i_items import item_glyphs  # noqa: E402
from siss_fast.demo.text_to_image import REPRODUCTION_METRIC, T2IConfig, run_text_to_image  # noqa: E402


def test_prompts_fit_the_tiny_tokenizer(tmp_path):
    from siss_fast.engine.models import write_tiny_tokenizer
    from transformers import CLIPTokenizer

    write_tiny_tokenizer(tmp_path / "tok")
    tok = CLIPTokenizer.from_pretrained(str(tmp_path / "tok"), local_files_only=True)
    check_prompts(tok, [FORGET_PROMPT, *item_glyphs(3)[0], *DIGIT_PROMPTS])
    with pytest.raises(ValueError, match="tokens"):
        check_prompts(tok, ["a handwritten digit seven"])


def test_shortened_text_to_image_demo(tmp_path):
    """Three memorized items forgotten in one engine run, and (--compare-separate) each in its own run."""
    from siss_fast.demo import add_report_arguments, report_main

    torch.manual_seed(0)
    run = tmp_path / "run"
    cfg = T2IConfig(
        out=str(run), threads=1, vae_steps=100,
        memorize=MemorizeSettings(forget_per_batch=12, min_steps=400, max_steps=800, check_every=100,
                                  check_samples=8, target_rate=0.25),
        num_samples=16, other_samples=2, other_prompts=("one", "four", "seven"), sampler_steps=10, probe_size=32,
        retain_per_class=5, retain_generations=4, max_generations=128, generation_chunk=64,
        max_steps=60, val_every=10, val_samples=8, compare_separate=True)
    assert cfg.items == 3
    report = run_text_to_image(cfg, ["--text-to-image", "--out", str(run)])
    prompts, _ = item_glyphs(3)

    for name in ("report.md", "report.json", "grid_before.png", "grid_after.png", "other_before.png",
                 "other_after.png", "metrics.jsonl", "manifest.json", "memorize.jsonl", "base_model/model_index.json",
                 "final/unet/config.json", "data/captions.tsv", "separate/item_2/manifest.json"):
        assert (run / name).is_file(), name
    saved = json.loads((run / "report.json").read_text())
    for key in ("before", "after", "method", "steps", "wall_s", "pass_criteria", "items", "stop_signal",
                "separate_runs"):
        assert key in saved, key
    keys = ("forget_similarity", "reproduction_rate", "noise_norm_forget", "noise_norm_other",
            "noise_norm_forget_first", "noise_norm_other_first", "forget_loss", "retain_loss", "prompt_accuracy")
    for key in keys:
        assert key in saved["before"] and key in saved["after"], key
    for p in prompts:  # every item before and after
        for key in ("reproduction_rate", "forget_similarity", "noise_norm_forget_first"):
            assert f"{key}[{p}]" in saved["before"] and f"{key}[{p}]" in saved["after"], (key, p)
    assert "other_prompt_similarity_to_before" in saved["after"]
    assert saved["method"]["name"] == "siss" and saved["method"]["lambd"] == 0.5

    before, after = report["before"], report["after"]
    for p in prompts:
        assert before[f"reproduction_rate[{p}]"] > 0                        # the base model reproduces each item
        assert after[f"reproduction_rate[{p}]"] < before[f"reproduction_rate[{p}]"]
        assert after[f"forget_similarity[{p}]"] < before[f"forget_similarity[{p}]"]
    assert after["noise_norm_forget_first"] < before["noise_norm_forget_first"]  # memorization signal drops
    assert after["other_prompt_similarity_to_before"] > 0.5           # the other prompts are not wrecked

    # the engine measured each item on its own prompt and its stop rule read every item
    for p in prompts:
        assert f"{REPRODUCTION_METRIC}['{p}']" in saved["stop_signal"]["before"]
        assert f"{REPRODUCTION_METRIC}['{p}']" in saved["stop_signal"]["kept"]
    manifest = json.loads((run / "manifest.json").read_text())
    assert [item["prompt"] for item in manifest["forget_items"]] == list(prompts)
    for item, row in zip(manifest["forget_items"], saved["items"]):
        assert len(item["sha256"]) == 64 and item["before"] == row["before"] and item["after"] == row["after"]
    assert manifest["base_model"]["sha256"] == saved["base_model_sha256"]
    assert manifest["metrics_before"] == before and "software" in manifest and "config" in manifest
    assert manifest["demo_config"]["memorize"]["target_rate"] == 0.25
    assert manifest["config"]["model"]["path"] and manifest["status"] == "finished"  # the engine's record kept
    assert manifest["config"]["validation"]["prompt"] is None  # each item generates with its own prompt
    for k in range(3):
        assert f"{REPRODUCTION_METRIC}[{k}]" in manifest["engine_validation"]["before"]
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    assert lines and all("step" in x for x in lines)
    captions = (run / "data" / "captions.tsv").read_text().splitlines()
    for k, p in enumerate(prompts):
        assert f"forget_{k:03d}.png\t{p}" in captions
        assert sum(line.startswith(f"gen_{k}_") and line.endswith("\t" + p) for line in captions) >= 1

    separate = saved["separate_runs"]
    assert [r["prompt"] for r in separate["runs"]] == list(prompts)
    assert separate["sum_unlearn_wall_s"] == pytest.approx(sum(r["unlearn_wall_s"] for r in separate["runs"]),
                                                           abs=0.2)
    assert separate["combined_unlearn_wall_s"] == saved["unlearn_wall_s"]
    for k, r in enumerate(separate["runs"]):
        one = json.loads((run / "separate" / f"item_{k}" / "manifest.json").read_text())
        assert len(one["forget_items"]) == 1 and "reproduction_rate" in r["after"]

    (run / "report.md").unlink()
    args = add_report_arguments(argparse.ArgumentParser()).parse_args([str(run)])
    assert report_main(args) == 0
    text = (run / "report.md").read_text()
    assert "noise_norm_forget" in text and "reproduction_rate" in text and "grid_after.png" in text
    assert "| reproduction_rate[box] |" in text and "separate runs" in text
    table = [ln for ln in text.splitlines() if ln.startswith("| noise_norm_forget |")]
    assert len(table) == 1 and table[0].count("|") == 7  # the definition holds no stray '|' (a norm bar)


def test_cli_dispatches_text_to_image(monkeypatch, tmp_path):
    """``--text-to-image`` reaches run_text_to_image with the text-to-image defaults, not the pixel demo's."""
    import siss_fast.demo as demo
    import siss_fast.demo.text_to_image as t2i

    seen = {}

    def fake_run(cfg, argv):
        seen["cfg"], seen["argv"] = cfg, argv
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
        Path(cfg.out, "report.md").write_text("# report\n")
        return {"pass_criteria": {"ok": True}}

    monkeypatch.setattr(t2i, "run_text_to_image", fake_run)
    out = str(tmp_path / "t2i")
    assert demo.main(["--text-to-image", "--out", out, "--threads", "1"]) == 0
    cfg = seen["cfg"]
    default = T2IConfig()
    assert (cfg.max_steps, cfg.num_samples, cfg.sampler_steps) == (default.max_steps, default.num_samples,
                                                                    default.sampler_steps)
    assert cfg.out == out and cfg.threads == 1
    assert cfg.items == default.items == 3 and not cfg.compare_separate and cfg.lora_rank is None
    with pytest.raises(SystemExit):
        demo.main(["--text-to-image", "--compare"])

    # the single-item demo of earlier versions, the separate-runs comparison and LoRA stay reachable
    assert demo.main(["--text-to-image", "--out", out, "--items", "1", "--compare-separate", "--lora-rank", "4"]) == 0
    cfg = seen["cfg"]
    assert (cfg.items, cfg.compare_separate, cfg.lora_rank) == (1, True, 4)
    for flags in (["--items", "2"], ["--compare-separate"], ["--lora-rank", "4"]):  # text-to-image only
        with pytest.raises(SystemExit, match="--text-to-image"):
            demo.main(["--out", out, *flags])
