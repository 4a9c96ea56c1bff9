"""Issue 12: for Stable Diffusion a validation check costs <= 2x the training between checks, in UNet
forward-equivalents -- counted on the tiny SD under the engine's own SD defaults (``benchmarks/validation_cost.py``
wraps the UNet's forward and attributes each call to the validator or to the optimizer step it happens in)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import validation_cost as VC  # noqa: E402
from engine_helpers import tiny_model  # noqa: E402

from siss_fast.engine.defaults import KIND_DEFAULTS, VALIDATION_DEFAULTS  # noqa: E402


def _measure(steps, **validation):
    return VC.measure(steps, model={"path": str(tiny_model("sd"))}, validation=validation or None)


def test_sd_default_check_costs_at_most_twice_the_training_between_checks():
    m = _measure(VALIDATION_DEFAULTS["sd"]["every"])  # one full interval: checks at step 0 and at `every`
    v, t = m["settings"]["validation"], m["settings"]["train"]
    # the run used the engine's SD defaults (nothing in the config overrides them)
    for key in ("every", "num_samples", "sampler_steps", "metrics"):
        assert v[key] == VALIDATION_DEFAULTS["sd"][key], key
    assert t["batch_size"] == KIND_DEFAULTS["sd"]["batch_size"] and v["guidance_scale"] == 1.0
    assert (m["settings"]["method"], m["settings"]["gradient"]) == ("siss", {"mode": "exact", "partitioned": True})
    steps, checks = m["optimizer_steps"], m["checks"]
    assert (steps, checks) == (v["every"], 2)
    c = m["counts"]

    # what was counted is what the engine does: each check samples num_samples x sampler_steps UNet sample-forwards
    # (one chunk of num_samples per sampler step) and decodes each sample once ...
    assert c["validation"]["unet_samples"] == checks * v["num_samples"] * v["sampler_steps"]
    assert c["validation"]["unet_backward_samples"] == 0
    assert c["validation"]["vae_decoder_samples"] == checks * v["num_samples"]
    # ... and the partitioned exact step runs one forward per sample (its retain / forget / mixed groups partition
    # the micro-batch), one backward per sample plus a second one through each mixed sample (metrics.jsonl's count)
    assert c["training"]["unet_samples"] == steps * t["batch_size"] * t["accumulation_steps"]
    assert c["training"]["unet_backward_samples"] == c["training"]["unet_samples"] + m["training_mixed_samples_logged"]
    assert c["setup"]["unet_samples"] == 0 and c["training"]["vae_decoder_samples"] == 0
    assert m["validated_unet_is_trained_unet"]

    # the bound, from the counted forwards: check <= 2 x (3 fe x training sample-forwards between checks)
    per_check = c["validation"]["unet_samples"] / checks
    training_fe = VC.FE_TRAINING_SAMPLE * c["training"]["unet_samples"] / steps * v["every"]
    assert per_check <= VC.BOUND * training_fe, (per_check, training_fe)
    assert m["within_bound"] and m["ratio"] == per_check / training_fe
    # the counts follow the formula (so the SD-v1 figure, same defaults, is the same ratio)
    assert m["counts_match_formula"]
    assert m["formula"]["check_unet_forwards"] == per_check
    assert m["formula"]["training_fe_between_checks"] == training_fe


def test_guidance_doubles_the_counted_check():
    m = _measure(1, guidance_scale=7.5)  # checks at step 0 and at the last step
    v = m["settings"]["validation"]
    assert v["guidance_scale"] == 7.5 and m["checks"] == 2
    per_check = m["counts"]["validation"]["unet_samples"] / m["checks"]
    assert per_check == 2 * v["num_samples"] * v["sampler_steps"] == m["formula"]["check_unet_forwards"]
    assert m["per_check"]["unet_calls"] == v["sampler_steps"]  # both branches in one batched call per step
    assert m["per_check"]["vae_decoder_samples"] == v["num_samples"]
