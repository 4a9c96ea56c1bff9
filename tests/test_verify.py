"""``siss-fast verify`` (issue 15) on a tiny pixel run made here: integrity checks naming the file, fresh seeds
disjoint from the validation seeds, read-only on ``final/``, exit status from the thresholds, Clopper-Pearson."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_helpers import DATA, base_config, tiny_model  # noqa: E402

from siss_fast.cli import main as cli_main  # noqa: E402
from siss_fast.verify import VerifyError, clopper_pearson, verify_run  # noqa: E402
from siss_fast.verify.seeds import run_seeds, verify_seeds  # noqa: E402

SMALL = ["--samples", "16", "--batch-size", "16", "--relearn-steps", "2", "--relearn-every", "1", "--no-plots"]


def _snapshot(folder: Path, skip=("manifest.json",)):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.relative_to(folder).parts[0] not in skip
            and p.relative_to(folder).parts[0] != "verify"}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A finished 2-step run whose forget set holds a planted image: the base model's first fresh sample (seed 1,
    the seed verify picks for this run), so the fresh-seed forget rate of item 0 is > 0."""
    from PIL import Image

    from siss_fast.engine import unlearn
    from siss_fast.engine.models import load_model
    from siss_fast.verify.measure import draw_samples

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("verify")
    model = load_model(str(tiny_model("ddpm")))
    planted = draw_samples(model, model.unet, 1, steps=2, seed=1, batch_size=16, device=torch.device("cpu"))[0]
    forget = root / "forget"
    forget.mkdir()
    arr = (planted.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
    Image.fromarray(arr).save(forget / "a_planted.png")
    shutil.copy(DATA / "forget" / "forget_00.png", forget / "b_checker.png")
    out = root / "run"
    cfg = base_config(tiny_model("ddpm"), out, data={"forget_dir": str(forget)}, train={"steps": 2},
                      validation={"every": 2, "num_samples": 4, "sampler_steps": 2, "batch_size": 4, "seed": 0,
                                  "grids": False, "metrics": ["forget_nn", "retain_fit"],
                                  "forget_metric": "forget_nn", "quality_metric": "retain_fit",
                                  "stop_on_target": False, "metric_options": {"retain_fit": {"images": 8}}})
    unlearn(cfg)
    return out


def _copy(run_dir: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(run_dir, dst, ignore=shutil.ignore_patterns("verify"))
    manifest = json.loads((dst / "manifest.json").read_text())
    manifest.pop("verify", None)
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return dst


def test_clopper_pearson_known_values():
    # closed forms at the edges: x = 0 -> upper 1 - (alpha/2)^(1/n); x = 1 -> lower 1 - (1 - alpha/2)^(1/n)
    assert clopper_pearson(0, 10) == (0.0, pytest.approx(1 - 0.025 ** 0.1, abs=1e-12))
    assert clopper_pearson(10, 10) == (pytest.approx(0.025 ** 0.1, abs=1e-12), 1.0)
    assert clopper_pearson(1, 10)[0] == pytest.approx(1 - 0.975 ** 0.1, abs=1e-12)
    assert clopper_pearson(0, 1000)[1] == pytest.approx(1 - 0.025 ** 0.001, abs=1e-12)
    # tabulated values (R binom.test / scipy.stats.beta.ppf)
    assert clopper_pearson(5, 10) == pytest.approx((0.18708602844739866, 0.8129139715526013), abs=1e-10)
    assert clopper_pearson(1, 10)[1] == pytest.approx(0.4450161170281952, abs=1e-10)
    assert clopper_pearson(40, 1000) == pytest.approx((0.02872762528589115, 0.05407269681936602), abs=1e-10)
    lo, hi = clopper_pearson(3, 1000, alpha=0.1)  # a 90 % interval is inside the 95 % one
    lo95, hi95 = clopper_pearson(3, 1000)
    assert lo95 < lo < 0.003 < hi < hi95 and math.isfinite(hi)
    with pytest.raises(ValueError):
        clopper_pearson(3, 2)


def test_fresh_seeds_are_disjoint_from_validation_seeds(run_dir, tmp_path):
    manifest = json.loads((run_dir / "manifest.json").read_text())
    recorded = manifest["validation_seeds"]
    assert recorded["sampler"]["generator_seeds"] == [0]  # seed 0, 4 samples in one chunk
    assert set(recorded["generator_seeds"]) >= {0}
    # a manifest without the record (an earlier run of this version): derived from its config, the same seeds
    derived = run_seeds({k: v for k, v in manifest.items() if k != "validation_seeds"})
    assert derived["derived"] and derived["generator_seeds"] == recorded["generator_seeds"]

    result = verify_run(run_dir, samples=16, batch_size=16, relearn_steps=0, plots=False, out=tmp_path / "v",
                        log=lambda *_: None)
    s = result.report["seeds"]["verify_seed"]
    own = {x for xs in verify_seeds(s, 16, 16).values() for x in xs}
    assert own.isdisjoint(recorded["generator_seeds"])
    assert own == {x for xs in result.report["seeds"]["verify_generator_seeds"].values() for x in xs}
    with pytest.raises(VerifyError, match="--seed 0"):  # chunk 0 of seed 0 is the run's validation noise
        verify_run(run_dir, samples=16, batch_size=16, relearn_steps=0, seed=0, plots=False, log=lambda *_: None)


def test_read_only_and_exit_status_follows_thresholds(run_dir, tmp_path, capsys):
    before = _snapshot(run_dir)
    manifest_before = json.loads((run_dir / "manifest.json").read_text())
    out = tmp_path / "audit"
    assert cli_main(["verify", str(run_dir), *SMALL, "--out", str(out), "--max-forget-rate", "0.01"]) == 1
    assert "check failed: item 0 (a_planted.png)" in capsys.readouterr().err
    report = json.loads((out / "verify.json").read_text())
    assert report["items"][0]["final"]["count"] >= 1 and report["items"][0]["base"]["count"] >= 1
    assert report["items"][1]["final"]["count"] == 0
    assert cli_main(["verify", str(run_dir), *SMALL, "--out", str(out), "--max-forget-rate", "0.9",
                     "--max-relearn-rate", "0.9"]) == 0
    assert cli_main(["verify", str(run_dir), *SMALL, "--out", str(out), "--max-relearn-rate", "0.01"]) == 1

    assert _snapshot(run_dir) == before  # final/, config, metrics, base files: byte for byte
    manifest = json.loads((run_dir / "manifest.json").read_text())
    strip = lambda m: {k: v for k, v in m.items() if k != "verify"}  # noqa: E731
    assert strip(manifest) == strip(manifest_before)  # every key of the run kept as it was
    entries = manifest["verify"]
    assert entries[:len(manifest_before.get("verify", []))] == manifest_before.get("verify", [])  # appended
    assert [e["passed"] for e in entries[-3:]] == [False, True, False]
    for name, digest in entries[-1]["files"].items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == digest
    assert "## Relearning probe" in (out / "verify.md").read_text()


def _expect(capsys, run, text):
    """Library call and command both refuse ``run`` with a message containing ``text`` (quotes ignored)."""
    with pytest.raises(VerifyError) as info:
        verify_run(run, samples=4, relearn_steps=0, plots=False, log=lambda *_: None)
    assert text in str(info.value).replace("'", "")
    assert cli_main(["verify", str(run), *SMALL]) == 2
    assert text in capsys.readouterr().err.replace("'", "")


def test_unfinished_tampered_missing_and_foreign_runs_fail_naming_the_file(run_dir, tmp_path, capsys):
    run = _copy(run_dir, tmp_path)
    mpath = run / "manifest.json"
    original = mpath.read_text()

    weights = run / "final" / "unet" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    _expect(capsys, run, str(weights))
    data[-1] ^= 1
    weights.write_bytes(bytes(data))

    config = run / "final" / "unet" / "config.json"
    saved = config.read_bytes()
    config.unlink()
    _expect(capsys, run, str(config) + " is missing")
    config.write_bytes(saved)

    extra = run / "final" / "unet" / "extra.safetensors"
    extra.write_bytes(b"x")
    _expect(capsys, run, str(extra))
    extra.unlink()

    for change, match in (({"status": "running"}, "status running, not finished"),
                          ({"software": {"siss_fast": "0.0.1"}}, "written by siss_fast"),
                          ({"manifest_format": 99}, "manifest_format 99")):
        mpath.write_text(json.dumps({**json.loads(original), **change}))
        _expect(capsys, run, match)
        _expect(capsys, run, str(mpath))  # the message names the manifest
    mpath.unlink()
    _expect(capsys, run, str(mpath) + " is missing")
    mpath.write_text(original)
    assert verify_run(run, samples=4, batch_size=4, relearn_steps=0, plots=False, log=lambda *_: None).passed


def test_an_interrupted_run_is_refused(tmp_path, capsys):
    from siss_fast.engine import unlearn

    out = tmp_path / "killed"
    unlearn(base_config(tiny_model("ddpm"), out, train={"steps": 3}, checkpoint={"every": 1}), stop_after=1)
    assert (out / "checkpoints").is_dir() and not (out / "manifest.json").exists()
    _expect(capsys, out, str(out / "manifest.json") + " is missing: the run has not finished")


def test_a_retrained_control_gets_its_own_relearning_curve(run_dir, tmp_path, capsys):
    """``--control MODEL_DIR`` (a model that never saw the items) is fine-tuned beside the final and base models;
    a folder that is not a model of the run's shape is refused."""
    control = tiny_model("ddpm")  # stands in for a retrained model: same architecture and image shape
    out = tmp_path / "audit"
    assert cli_main(["verify", str(run_dir), *SMALL, "--out", str(out), "--control", str(control)]) == 0
    report = json.loads((out / "verify.json").read_text())
    curves = report["relearn"]
    assert len(curves["control"]) == len(curves["final"]) == 3  # steps 0, 1, 2
    assert len(report["relearn"]["control_model"]["sha256"]) == 64
    assert all("control_returned_at_step" in it for it in report["items"])
    assert "retrained without the items (control)" in (out / "verify.md").read_text()
    with pytest.raises(VerifyError, match="--control"):
        verify_run(run_dir, samples=4, relearn_steps=0, plots=False, out=tmp_path / "x", control=tmp_path / "nope",
                   log=lambda *_: None)


def test_a_metric_declares_its_own_seeds_and_verify_avoids_them(tmp_path):
    """A metric registered with ``generator_seeds`` gets them recorded in the manifest (not hard-coded in the engine),
    and verify's fresh seed avoids them: here they are the first chunk seed of verify's seed 1, so it takes 2."""
    from siss_fast.engine import unlearn
    from siss_fast.metrics.registry import register_metric, unregister_metric

    register_metric("_seeded_probe", generator_seeds=lambda opts, n: [opts["base"] + k for k in range(n)])(
        lambda ctx: (lambda samples: 0.0))
    try:
        out = tmp_path / "run"
        unlearn(base_config(tiny_model("ddpm"), out, train={"steps": 1},
                            validation={"every": 1, "num_samples": 2, "sampler_steps": 1, "batch_size": 2, "seed": 0,
                                        "grids": False, "metrics": ["forget_nn", "_seeded_probe"],
                                        "forget_metric": "forget_nn", "quality_metric": None,
                                        "stop_on_target": False,
                                        "metric_options": {"_seeded_probe": {"base": 100003}}}))
        manifest = json.loads((out / "manifest.json").read_text())
        record = manifest["validation_seeds"]
        assert record["metrics"] == {"_seeded_probe": [100003, 100004]}  # two forget items; forget_nn draws none
        assert record["undeclared"] == [] and record["generator_seeds"] == [0, 100003, 100004]
        assert run_seeds({k: v for k, v in manifest.items() if k != "validation_seeds"})["generator_seeds"] == \
            record["generator_seeds"]  # derived from the config by the same declarations
        result = verify_run(out, samples=4, batch_size=4, relearn_steps=0, plots=False, out=tmp_path / "v",
                            log=lambda *_: None)
        assert result.report["seeds"]["verify_seed"] == 2
        with pytest.raises(VerifyError, match="--seed 1"):
            verify_run(out, samples=4, batch_size=4, relearn_steps=0, seed=1, plots=False, log=lambda *_: None)
    finally:
        unregister_metric("_seeded_probe")
    # a manifest written before metrics declared seeds (no "undeclared" key) still reads
    old = {"validation_seeds": {"sampler": None, "metrics": {"forget_probe": [0, 1]}, "generator_seeds": [0, 1]}}
    assert run_seeds(old)["generator_seeds"] == [0, 1] and run_seeds(old)["undeclared"] == []
