"""``siss-fast verify`` on a Stable Diffusion run (issue 15): each forget item re-measured with its own prompt, the
run's forget rule, membership under the prompts, the relearning probe on latents, the prompt perturbation probe and
its threshold, read-only on ``final/`` (a tiny random-weight SD made here; CPU, one thread, seconds)."""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("diffusers")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_helpers import DATA, base_config, tiny_model  # noqa: E402

from siss_fast.cli import main as cli_main  # noqa: E402
from siss_fast.verify import VerifyError, verify_run  # noqa: E402
from siss_fast.verify.perturb import word_variants  # noqa: E402
from siss_fast.verify.seeds import verify_seeds  # noqa: E402

PLANTED_PROMPT = "the planted checkerboard"
OTHER_PROMPT = "a photo of a red t-shirt,"
GUIDANCE = 2.0
SMALL = ["--samples", "6", "--batch-size", "6", "--relearn-steps", "2", "--relearn-every", "1", "--relearn-samples",
         "3", "--perturb-samples", "3", "--sampler-steps", "2", "--no-plots"]


def _snapshot(folder: Path):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != "manifest.json"
            and p.relative_to(folder).parts[0] != "verify"}


@pytest.fixture(scope="module")
def sd_run(tmp_path_factory):
    """A finished 2-step SISS run on a tiny SD whose forget set holds a planted image -- the base model's first
    generation for its prompt under verify's fresh seed (1) -- and a checkerboard with another prompt."""
    from PIL import Image

    from siss_fast.engine import unlearn
    from siss_fast.engine.models import load_model
    from siss_fast.text_encoding import encode_prompts
    from siss_fast.verify.measure import draw_samples

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("verify_sd")
    model = load_model(str(tiny_model("sd")))
    emb, _ = encode_prompts(model.tokenizer, model.text_encoder, [PLANTED_PROMPT, ""], torch.device("cpu"),
                            torch.float32)
    planted = draw_samples(model, model.unet, 1, steps=2, seed=1, batch_size=6, device=torch.device("cpu"),
                           cond=emb[:1], uncond=emb[1:], guidance_scale=GUIDANCE)[0]
    forget = root / "forget"
    forget.mkdir()
    arr = (planted.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
    Image.fromarray(arr).save(forget / "a_planted.png")
    shutil.copy(DATA / "forget" / "forget_00.png", forget / "b_checker.png")
    retain = sorted(p.name for p in (DATA / "retain").iterdir())
    captions = root / "captions.tsv"
    captions.write_text("".join(f"{name}\ta soft gradient with a blob\n" for name in retain)
                        + f"a_planted.png\t{PLANTED_PROMPT}\nb_checker.png\t{OTHER_PROMPT}\n")
    out = root / "run"
    cfg = base_config(tiny_model("sd"), out, data={"forget_dir": str(forget), "captions": str(captions)},
                      train={"steps": 2},
                      validation={"every": 2, "num_samples": 4, "sampler_steps": 2, "batch_size": 4, "seed": 0,
                                  "grids": False, "metrics": ["forget_nn", "retain_fit"], "guidance_scale": GUIDANCE,
                                  "forget_metric": "forget_nn", "quality_metric": "retain_fit",
                                  "stop_on_target": False, "metric_options": {"retain_fit": {"images": 4}}})
    unlearn(cfg)
    return out


def test_verify_an_sd_run_per_item_prompts_perturbations_read_only(sd_run, tmp_path):
    before = _snapshot(sd_run)
    out = tmp_path / "audit"
    result = verify_run(sd_run, samples=6, batch_size=6, relearn_steps=2, relearn_every=1, relearn_samples=3,
                        perturb_samples=3, sampler_steps=2, plots=False, out=out, log=lambda *_: None)
    r = result.report
    assert r["kind"] == "sd" and r["settings"]["guidance_scale"] == GUIDANCE
    assert [it["prompt"] for it in r["items"]] == [PLANTED_PROMPT, OTHER_PROMPT]
    assert "forget_nn" in r["rule"] and "the run's forget metric" in r["rule"]
    assert r["items"][0]["base"]["count"] >= 1 and r["items"][0]["base"]["n"] == 6  # the planted generation
    s = r["seeds"]["verify_seed"]
    own = {x for xs in verify_seeds(s, 6, 6).values() for x in xs}
    assert own.isdisjoint(r["seeds"]["run_validation_seeds"]["generator_seeds"])
    # membership under the prompts, retain_fit in latent space, the relearning curve on latents
    assert len(r["membership"]["items"]) == 2 and r["membership"]["reference_images"] == 12
    assert r["quality"]["feature_fd"] is None and r["quality"]["retain_fit"]["base"] > 0
    assert r["quality"]["conditional_retain_loss"]["ratio"] > 0
    assert [p["step"] for p in r["relearn"]["final"]] == [0, 1, 2]
    assert r["relearn"]["final"][-1]["loss"] > 0 and r["settings"]["relearn_batch"] == 8  # the engine's SD batch
    # the perturbation table: each item's prompt, then dropout / synonyms / embedding noise
    rows = r["perturbation"]["rows"]
    kinds = {(row["item"], row["kind"]) for row in rows}
    assert {(k, kind) for k in (0, 1) for kind in ("original", "dropout", "embedding_noise")} <= kinds
    assert (1, "synonym") in kinds and (0, "synonym") not in kinds  # "photo", "red", "t-shirt" have synonyms
    assert any(row["variant"] == "a picture of a red t-shirt," for row in rows)
    assert sum(row["kind"] == "embedding_noise" for row in rows) == 2 * 3
    original = next(row for row in rows if row["item"] == 0 and row["kind"] == "original")
    assert original["final"]["n"] == 3 and original["base"]["count"] >= 1  # the re-measurement's first 3 samples
    md = (out / "verify.md").read_text()
    assert "## Prompt perturbation probe" in md and "a picture of a red t-shirt," in md and PLANTED_PROMPT in md
    assert _snapshot(sd_run) == before  # final/, base model, config, metrics: byte for byte


def test_max_perturbed_rate_sets_the_exit_status(sd_run, tmp_path, capsys):
    out = tmp_path / "audit"
    assert cli_main(["verify", str(sd_run), *SMALL, "--out", str(out), "--max-perturbed-rate", "1.0"]) == 0
    report = json.loads((out / "verify.json").read_text())
    highest = report["perturbation"]["max_final_rate"]
    assert highest > 0  # the planted generation survives a small perturbation of its prompt under the final model
    assert cli_main(["verify", str(sd_run), *SMALL, "--out", str(out), "--max-perturbed-rate",
                     str(highest / 2)]) == 1
    assert "perturbed prompt" in capsys.readouterr().err
    entries = json.loads((sd_run / "manifest.json").read_text())["verify"]
    assert [e["passed"] for e in entries[-2:]] == [True, False]
    # --perturb-samples 0: no probe, and the threshold is reported as not checked (a pass)
    assert cli_main(["verify", str(sd_run), *SMALL[:-3], "--perturb-samples", "0", "--no-plots", "--out", str(out),
                     "--max-perturbed-rate", "0"]) == 0
    report = json.loads((out / "verify.json").read_text())
    assert report["perturbation"] is None and "not checked" in report["checks"]["notes"][0]


def test_word_variants():
    v = word_variants("A photo of a t-shirt.")
    drops = [x["prompt"] for x in v if x["kind"] == "dropout"]
    assert drops == ["A photo of a", "A of a t-shirt.", "A photo a t-shirt."]  # longest words first, at most 3
    syns = [x["prompt"] for x in v if x["kind"] == "synonym"]
    assert syns == ["A picture of a t-shirt.", "A image of a t-shirt.", "A photo of a shirt."]  # punctuation kept
    assert word_variants("t-shirt") == [{"kind": "synonym", "change": "'t-shirt' -> 'shirt'", "prompt": "shirt"},
                                        {"kind": "synonym", "change": "'t-shirt' -> 'tee'", "prompt": "tee"}]
    assert word_variants("zebra") == []  # one word (its dropout is the empty prompt), no synonym


def test_forget_rule_reads_a_share_metric_per_item():
    from siss_fast.metrics.registry import register_metric, unregister_metric
    from siss_fast.verify.sd import ForgetRule

    def share(ctx):  # samples whose mean is within 0.01 of the (only) forget image's mean
        ref = ctx.forget_images.mean()
        return lambda samples: float(((samples.flatten(1).mean(1) - ref).abs() < 0.01).double().mean())

    def per_item(ctx):  # the same, read per item through ``per_item`` (the engine's per-item stop rule)
        score = share(ctx)
        score.per_item = lambda samples: [share(SimpleNamespace(forget_images=ctx.forget_images[k:k + 1]))(samples)
                                          for k in range(ctx.forget_images.shape[0])]
        return score

    register_metric("_share_probe")(share)
    register_metric("_per_item_probe")(per_item)
    register_metric("_not_a_share")(lambda ctx: (lambda samples: 0.37))
    try:
        forget = torch.stack([torch.full((1, 2, 2), 0.2), torch.full((1, 2, 2), 0.8)])
        samples = torch.cat([forget[:1].expand(3, -1, -1, -1), forget[1:].expand(1, -1, -1, -1),
                             torch.full((2, 1, 2, 2), 0.5)])
        model = SimpleNamespace(unet=None)
        rule = ForgetRule({"forget_metric": "_share_probe"}, model, forget, forget, torch.device("cpu"))
        assert [rule.count(k, samples) for k in (0, 1)] == [3, 1] and rule.note is None
        rule = ForgetRule({"forget_metric": "_per_item_probe"}, model, forget, forget, torch.device("cpu"))
        assert [rule.count(k, samples) for k in (0, 1)] == [3, 1] and "per-item share" in rule.describe()
        with pytest.raises(VerifyError, match="_not_a_share"):
            ForgetRule({"forget_metric": "_not_a_share"}, model, forget, forget, torch.device("cpu")).count(0, samples)
        fallback = ForgetRule({"forget_metric": None}, model, torch.rand(4, 1, 2, 2), forget, torch.device("cpu"))
        assert fallback.name == "forget_nn" and "names no forget metric" in fallback.describe()
    finally:
        unregister_metric("_share_probe")
        unregister_metric("_per_item_probe")
        unregister_metric("_not_a_share")
