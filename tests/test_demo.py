"""The embedded demo, shortened: data, the shipped base model, a short SISS run, the run directory and report."""

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("sklearn")

from siss_fast.demo.data import FORGET_COPIES, demo_data, to_unit, tshirt_glyph  # noqa: E402
from siss_fast.demo.models import SHIPPED_MODEL  # noqa: E402
from siss_fast.metrics import FORGET_THRESHOLD  # noqa: E402

needs_weights = pytest.mark.skipif(not (SHIPPED_MODEL / "unet").is_dir(),
                                   reason="shipped demo weights missing (siss-fast demo --pretrain)")


def test_demo_data():
    data = demo_data()
    assert data.retain.shape == (1797, 1, 16, 16) and data.retain_labels.shape == (1797,)
    assert data.forget.shape == (FORGET_COPIES, 1, 16, 16)
    assert data.retain.min() >= -1 and data.retain.max() <= 1
    assert 0.03 <= FORGET_COPIES / data.train.shape[0] <= 0.05          # a few percent, like the paper's 1 %
    assert torch.equal(data.forget[0], tshirt_glyph())
    # the planted image is far from every digit (the forget-rate threshold is 4.5)
    dist = (to_unit(data.retain) - to_unit(data.forget_image)).flatten(1).norm(dim=1)
    assert dist.min() > 6.0 > FORGET_THRESHOLD


@needs_weights
def test_shortened_demo_writes_the_run_directory_and_forgets(tmp_path):
    from siss_fast.demo import add_report_arguments, report_main
    from siss_fast.demo.run import DemoConfig, run_demo

    torch.manual_seed(0)
    cfg = DemoConfig(out=str(tmp_path / "run"), num_samples=200, sampler_steps=10, max_steps=30, val_every=10,
                     val_samples=100, likelihood=False, verify_samples=100, verify_relearn_steps=4)
    report = run_demo(cfg)
    run = Path(cfg.out)
    for name in ("report.md", "report.json", "grid_before.png", "grid_after.png", "metrics.jsonl", "manifest.json"):
        assert (run / name).is_file(), name
    saved = json.loads((run / "report.json").read_text())
    for key in ("before", "after", "method", "steps", "wall_s"):
        assert key in saved
    for key in ("forget_rate", "quality", "forget_loss", "retain_loss"):
        assert key in saved["before"] and key in saved["after"]
    before, after = report["before"], report["after"]
    assert before["forget_rate"] > 0                      # the base model generates the planted image
    assert after["forget_rate"] < before["forget_rate"]    # ... and less of it after unlearning
    assert after["forget_loss"] > before["forget_loss"]    # the membership signal moves the right way
    assert after["quality"] > 0.8 * before["quality"]
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["forget_items"][0]["copies_in_training_set"] == FORGET_COPIES
    assert len(manifest["forget_items"][0]["sha256"]) == 64 and len(manifest["base_model"]["sha256"]) == 64
    assert manifest["metrics_before"]["forget_rate"] == before["forget_rate"]
    assert "software" in manifest and "config" in manifest
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    assert lines and all("step" in x for x in lines)
    # siss-fast report RUN_DIR rebuilds report.md from report.json
    (run / "report.md").unlink()
    import argparse

    args = add_report_arguments(argparse.ArgumentParser()).parse_args([str(run)])
    assert report_main(args) == 0
    text = (run / "report.md").read_text()
    assert "forget_rate" in text and "grid_after.png" in text
    # the demo ends with siss-fast verify on its own run: its numbers in the report, its files beside it
    v = saved["verify"]
    assert v["samples"] == 100 and v["relearn_steps"] == 4 and len(v["items"]) == 1
    assert (run / v["folder"] / "verify.json").is_file() and "Proof of deletion" in text
    assert "verify" in json.loads((run / "manifest.json").read_text())
    # the shipped base model's twin retrained without the T-shirt is the second control: it never brings it back
    assert v["items"][0]["retrained_peak_rate"] == 0.0


def test_report_rebuild_requires_report_json(tmp_path):
    from siss_fast.demo.report import rebuild_report

    with pytest.raises(FileNotFoundError, match="report.json"):
        rebuild_report(tmp_path)


def test_pareto_plot_falls_back_to_pil(tmp_path, monkeypatch):
    import builtins

    from siss_fast.demo.report import save_pareto_plot

    rows = [{"name": "siss", "after": {"forget_rate": 0.0, "quality": 7.0}},
            {"name": "naive", "after": {"forget_rate": 0.02, "quality": 7.2}}]
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError("no matplotlib")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    assert save_pareto_plot(rows, tmp_path / "p.png", baseline={"forget_rate": 0.04, "quality": 7.1}) == "pil"
    assert (tmp_path / "p.png").stat().st_size > 0


@needs_weights
def test_compare_mode_runs_every_method(tmp_path):
    """--compare, shortened: every SPEC §5 method through the engine with the same budget; table, plot, per-method
    engine runs; neggrad gets the c SISS's auto rule measured."""
    from siss_fast.demo.run import DemoConfig, compare_methods, run_compare

    cfg = DemoConfig(out=str(tmp_path / "cmp"), num_samples=40, sampler_steps=4, max_steps=2, batch_size=8,
                     val_every=1, val_samples=16, likelihood=False)
    report = run_compare(cfg)
    rows = report["compare"]
    assert [r["name"] for r in rows] == [name for name, _ in compare_methods()]
    assert all(r["steps"] >= 1 and "forget_rate" in r["after"] and "quality" in r["after"] for r in rows)
    siss_c = json.loads((tmp_path / "cmp" / "methods" / "siss_0.5" / "manifest.json").read_text())["scaling_norm"]
    neggrad = next(r for r in rows if r["method"] == "neggrad")
    assert siss_c > 0 and neggrad["scaling_norm"] == pytest.approx(siss_c)
    run = tmp_path / "cmp"
    for name in ("report.md", "report.json", "compare.json", "pareto.png", "metrics.jsonl"):
        assert (run / name).is_file(), name
    methods_logged = {json.loads(x)["method"] for x in (run / "metrics.jsonl").read_text().splitlines()}
    assert methods_logged == {name for name, _ in compare_methods()}
    assert "pareto.png" in (run / "report.md").read_text()


def test_compare_table_names_and_shows_the_stop_rules_own_readings(tmp_path):
    from siss_fast.demo.report import render_report

    row = {"name": "siss(0.5)", "steps": 20, "stop_reason": "quality_guard", "final_step": 0, "wall_s": 1.0,
           "after": {"forget_rate": 0.0, "quality": 7.0}, "check_metrics": ["forget_probe", "retain_fit"],
           "last_check": {"forget_probe": 0.25, "retain_fit": 0.0538, "forget_rate": 0.9}}
    report = {"title": "t", "before": {"forget_rate": 0.045}, "after": {}, "compare": [row]}
    text = render_report(report, tmp_path)
    assert "last check (forget_probe, retain_fit)" in text and "| 0.2500, 0.0538 |" in text
    old = dict(row, check_metrics=None, last_check={"forget_rate": 0.5, "classifier_quality": 1.5})
    text = render_report({**report, "compare": [old]}, tmp_path)  # a report written before the names were kept
    assert "last check (forget_rate, classifier_quality)" in text and "| 0.5000, 1.5000 |" in text
