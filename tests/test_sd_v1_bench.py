"""``benchmarks/sd_v1_unlearn.py``: the SD-v1 engine benchmark's machinery (its numbers come from the benchmark run).

A case that needs more memory than the limit must come back as a clean "does not fit in N GB" row (the process
fails at an allocation, it is not killed and the parent goes on); each case's config is a valid engine config; the
targets are judged from the rows; the resident-set sampler closes one window per step record.
"""

import json
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import sd_v1_unlearn as SB  # noqa: E402


def test_case_over_the_memory_limit_is_a_clean_row(tmp_path):
    inputs = {"model": str(tmp_path / "none"), "retain": str(tmp_path), "forget": str(tmp_path)}
    row = SB.run_case("lean-exact", inputs, steps=2, threads=1, limit_gb=0.3, work=tmp_path, tiny=True)
    assert row["status"] == "does not fit in 0.3 GB", row
    assert row["median_step_s"] is None and row["peak_step_gb"] is None
    assert row["limit_gb"] == 0.3 and row["what"] == SB.CASES["lean-exact"]["what"]


@pytest.mark.parametrize("case", [c for c in SB.CASES if c != "research-loop"])
def test_every_engine_case_is_a_valid_config(tmp_path, case):
    from siss_fast.engine import load_config
    from siss_fast.engine.models import build_tiny, offline

    with offline():
        build_tiny("tiny-sd", tmp_path / "model", channels=3, image_size=32)
    SB.write_images(tmp_path / "r", 2, 32, seed=1)
    SB.write_images(tmp_path / "f", 1, 32, seed=2)
    inputs = {"model": str(tmp_path / "model"), "retain": str(tmp_path / "r"), "forget": str(tmp_path / "f")}
    cfg_dict = SB.engine_config(case, inputs, 3, 1, tmp_path / "run")
    import yaml

    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg_dict))
    cfg = load_config(str(tmp_path / "c.yaml"), [])
    assert cfg.train.steps == 3 and cfg.train.batch_size == 1 and cfg.validation.every == 0
    assert cfg.gradient.scaling_norm == SB.SCALING_NORM
    assert cfg.train.gradient_checkpointing is (case != "lean-exact-no-ckpt")
    assert cfg.train.mixed_precision == ("bf16" if case in ("lean-exact-bf16", "lora-r8-bf16") else "no")
    assert cfg.train.lora_rank == (8 if case.startswith("lora-r8") else 0)
    assert SB.CASES[case].get("env", {}) == ({"MALLOC_MMAP_THRESHOLD_": "65536"} if case == "lora-r8-mmap64k" else {})
    assert cfg.method.name == ("naive" if case == "naive-finetune" else "siss")
    assert cfg.gradient.mode == ("lagged" if case == "lean-lagged" else "exact")


def _row(case, status="ok", step=None, peak=None, limit=20.0):
    return SB.summarise({"case": case, "what": case, "status": status, "limit_gb": limit,
                         "step_s": [] if step is None else [step * 2, step, step],
                         "step_peak_gb": [] if peak is None else [peak / 2, peak, peak - 1]})


def test_targets_from_rows():
    rows = {"lean-exact": _row("lean-exact", step=10.0, peak=15.0), "naive-finetune": _row("naive-finetune", step=9.0, peak=14.0),
            "lora-r8": _row("lora-r8", step=5.0, peak=5.5), "lora-r8-bf16": _row("lora-r8-bf16", step=4.0, peak=3.5),
            "research-loop": _row("research-loop", status="does not fit in 20 GB")}
    verdicts = {t["statement"]: (t["verdict"], t["value"]) for t in SB.evaluate(rows)}
    assert verdicts["lean exact peak <= 17 GB"] == ("PASS", 15.0)
    assert verdicts["LoRA rank 8 peak <= 5 GB"] == ("FAIL", 5.5)
    assert verdicts["LoRA rank 8 peak <= 5 GB, bf16 autocast (frozen base stored in bf16)"] == ("PASS", 3.5)
    assert verdicts["a lean exact step <= 1.2x a naive fine-tuning step"][0] == "PASS"
    # 20 GB limit - 15 GB lean peak: the research loop needs more than 5 GB more, which does not decide >= 10 GB
    assert verdicts["the research loop needs >= 10 GB more than lean exact"] == ("inconclusive",
                                                                                  "> 5.0 GB more (does not fit in 20 GB)")
    by_count = {t["statement"]: t for t in SB.evaluate(rows, unet_gb=3.44)}["the research loop needs >= 10 GB more than lean exact"]
    assert by_count["verdict"] == "PASS by count" and "3 gradient copies x 3.44 GB = +10.3 GB" in by_count["value"]
    rows["research-loop"] = _row("research-loop", step=20.0, peak=26.0, limit=40.0)
    verdicts = {t["statement"]: t for t in SB.evaluate(rows)}
    assert verdicts["the research loop needs >= 10 GB more than lean exact"]["verdict"] == "PASS"
    rows["naive-finetune"]["invocation"] = "2026-12-07 18:00"  # measured in another invocation: not compared
    verdicts = {t["statement"]: t for t in SB.evaluate(rows)}
    assert verdicts["a lean exact step <= 1.2x a naive fine-tuning step"]["verdict"].startswith("not measured")
    del rows["naive-finetune"]
    verdicts = {t["statement"]: t for t in SB.evaluate(rows)}
    assert verdicts["a lean exact step <= 1.2x a naive fine-tuning step"]["verdict"] == "not measured"
    assert "| lean-exact |" in SB.render_markdown({"title": "t", "header": {}, "threads": 1, "steps": 3,
                                                   "limit_gb": 20.0, "file": "x.json", "rows": list(rows.values()),
                                                   "targets": SB.evaluate(rows)})


def test_sampler_closes_one_window_per_step_record(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    sampler = SB.RssSampler(period=0.005, metrics=metrics)
    try:
        metrics.write_text(json.dumps({"step": 1, "step_time_s": 0.1}) + "\n" + json.dumps({"validation": 1}) + "\n")
        deadline = time.time() + 5
        while len(sampler.windows) < 1 and time.time() < deadline:
            time.sleep(0.01)
        with metrics.open("a") as f:
            f.write(json.dumps({"step": 2, "step_time_s": 0.1}) + "\n")
        while len(sampler.windows) < 2 and time.time() < deadline:
            time.sleep(0.01)
    finally:
        sampler.close()
    assert len(sampler.windows) == 2 and all(w > 0.01 for w in sampler.windows)


def test_readme_benchmark_block_is_generated_from_the_results():
    """The README's benchmark block (SD-v1 rows included) is exactly what ``benchmarks/summary.py`` renders from the
    committed result files: no number in it is typed by hand."""
    import summary

    readme = summary.README.read_text()
    block = readme.split(summary.BEGIN, 1)[1].split(summary.END, 1)[0]
    assert block.strip() == summary.build(summary.default_files()).strip()
