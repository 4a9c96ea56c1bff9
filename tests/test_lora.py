"""LoRA adapters (``train.lora_rank``): adapter-only gradients, merged final model, exact resume, config errors."""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_helpers import DATA, base_config, tiny_model  # noqa: E402

from siss_fast.engine import ConfigError, load_config  # noqa: E402
from siss_fast.engine.loop import run  # noqa: E402

peft = pytest.importorskip("peft")


def _config(kind, out, train=None, **sections):
    cfg = base_config(tiny_model(kind), out, train={"lora_rank": 4, **(train or {})}, **sections)
    if kind == "sd":
        cfg["data"]["captions"] = str(DATA / "captions.tsv")
    return cfg


def _final_unet(out):
    from safetensors.torch import load_file

    return load_file(str(Path(out) / "final" / "unet" / "diffusion_pytorch_model.safetensors"))


@pytest.mark.parametrize("kind, targets", [("ddpm", "attention+conv"), ("sd", "attention")])
def test_only_adapters_train_and_base_weights_stay_bit_unchanged(kind, targets):
    from siss_fast.engine import models
    from siss_fast.engine.setup import Dist, prepare_data
    from siss_fast.engine.step import UnlearnStep

    cfg = load_config(_config(kind, "/tmp/unused", train={"lora_targets": targets, "ema_decay": 0.9}))
    model = models.load_model(str(tiny_model(kind)))
    base = {k: v.clone() for k, v in model.unet.state_dict().items()}
    step = UnlearnStep(cfg, model, prepare_data(cfg, model, torch.device("cpu")), torch.device("cpu"), dist=Dist())
    names = {id(p): n for n, p in step.unet.named_parameters()}
    held = [names[id(p)] for group in step.optimizer.param_groups for p in group["params"]]
    assert held and all(".lora_A." in n or ".lora_B." in n for n in held)
    assert {names[id(p)] for p in step.params} == set(held)
    assert all(not p.requires_grad for n, p in step.unet.named_parameters() if n not in held)
    if targets == "attention+conv":
        assert any(".conv1.lora_A." in n for n in held)
    for _ in range(2):
        result = step()
        assert not result.info.skipped
    after = step.unet.state_dict()
    for key, value in base.items():  # the adapted layers keep their weight under ``base_layer``
        current = after.get(key, after.get(key.rsplit(".", 1)[0] + ".base_layer." + key.rsplit(".", 1)[1]))
        assert torch.equal(current, value), key
    assert any(after[n].abs().sum() > 0 for n in held if ".lora_B." in n)  # the adapter did move
    ema_state = step.ema.state_dict()  # the average holds the adapter alone and shares the base weights
    assert set(ema_state) == set(held)
    assert all(a is b for (n, a), b in zip(step.ema.module.named_parameters(), step.unet.parameters())
               if n not in held)


@pytest.mark.parametrize("kind", ["ddpm", "sd"])
def test_final_model_is_base_plus_adapter_merged(tmp_path, kind):
    from diffusers import UNet2DConditionModel, UNet2DModel
    from peft import PeftModel

    out = tmp_path / "run"
    run(load_config(_config(kind, out, train={"steps": 3, "lr": 1e-2})))
    manifest = json.loads((out / "manifest.json").read_text())
    adapter = out / "final_adapter"
    assert manifest["final_adapter"]["path"] == str(adapter) and len(manifest["final_adapter"]["sha256"]) == 64
    assert set(manifest["final_adapter"]["files"]) >= {"adapter_config.json", "adapter_model.safetensors"}
    cls = UNet2DModel if kind == "ddpm" else UNet2DConditionModel
    # final/ is a plain diffusers folder
    merged = cls.from_pretrained(str(out / "final"), subfolder="unet", local_files_only=True, use_safetensors=True)
    base = cls.from_pretrained(str(tiny_model(kind)), subfolder="unet", local_files_only=True, use_safetensors=True)
    expected = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
    got, want = merged.state_dict(), expected.state_dict()
    assert got.keys() == want.keys()
    for key in got:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-6)
    untouched = cls.from_pretrained(str(tiny_model(kind)), subfolder="unet", local_files_only=True,
                                    use_safetensors=True).state_dict()  # (peft merged into ``base`` in place)
    changed = [k for k in got if not torch.equal(got[k], untouched[k])]
    assert changed and all(k.endswith(".weight") for k in changed)
    # and the merged model computes what base + adapter computes
    torch.manual_seed(0)
    x, t = torch.randn(2, merged.config.in_channels, 8, 8), torch.tensor([10, 500])
    cond = {} if kind == "ddpm" else {"encoder_hidden_states": torch.randn(2, 4, 32)}
    with torch.no_grad():
        torch.testing.assert_close(merged(x, t, **cond).sample, expected(x, t, **cond).sample, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind, extra", [
    ("ddpm", {"method": {"name": "siss"}, "train": {"accumulation_steps": 2, "ema_decay": 0.9}}),
    ("sd", {"gradient": {"mode": "lagged", "lag_every": 2}}),
    ("sd", {"train": {"mixed_precision": "bf16"}}),  # the frozen base stored in bf16 (store_frozen_in)
])
def test_resume_with_adapters_is_bit_identical(tmp_path, kind, extra):
    def cfg(out, **more):
        sections = {"train": {"steps": 4}, "checkpoint": {"every": 2}}
        for part in (extra, more):
            for key, value in part.items():
                sections[key] = {**sections.get(key, {}), **value}
        train = sections.pop("train")
        return load_config(_config(kind, out, train=train, **sections))

    run(cfg(tmp_path / "full"))
    stopped = run(cfg(tmp_path / "split"), stop_after=2)
    assert stopped.stop_reason == "interrupted"
    from safetensors.torch import load_file

    ckpt = load_file(str(tmp_path / "split" / "checkpoints" / "step-000002" / "unet.safetensors"))
    assert ckpt and all(".lora_" in k for k in ckpt)  # checkpoints hold the adapter alone
    run(cfg(tmp_path / "split", checkpoint={"resume": "latest"}))
    a, b = _final_unet(tmp_path / "full"), _final_unet(tmp_path / "split")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    fa, fb = (load_file(str(tmp_path / d / "final_adapter" / "adapter_model.safetensors")) for d in ("full", "split"))
    assert fa.keys() == fb.keys() and all(torch.equal(fa[k], fb[k]) for k in fa)


def test_kept_validation_states_hold_the_adapter_only(tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "v"
    validation = {"every": 2, "num_samples": 4, "sampler_steps": 2, "batch_size": 4, "metrics": ["forget_nn"],
                  "forget_metric": "forget_nn", "forget_target": 0.0, "quality_metric": None}
    run(load_config(_config("ddpm", out, train={"steps": 2}, validation=validation)))
    kept = load_file(str(out / "last_good.safetensors"))
    assert kept and all(".lora_" in k for k in kept)
    assert (out / "final" / "unet" / "diffusion_pytorch_model.safetensors").is_file()


@pytest.mark.parametrize("train, key, words", [
    ({"lora_rank": -1}, "train.lora_rank", ">= 0"),
    ({"lora_rank": 33}, "train.lora_rank", "smallest targeted layer"),  # tiny-ddpm's attention is 32 wide
    ({"lora_targets": "mlp"}, "train.lora_targets", "attention+conv"),
    ({"lora_alpha": 0}, "train.lora_alpha", "> 0"),
])
@pytest.mark.parametrize("source", ["path", "build"])
def test_config_errors_name_the_key_before_any_model_loads(tmp_path, monkeypatch, train, key, words, source):
    from siss_fast.engine import models

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded or built")

    monkeypatch.setattr(models, "load_model", refuse)
    monkeypatch.setattr(models, "build_tiny", refuse)
    cfg = _config("ddpm", tmp_path / "a", train=train)
    if source == "build":
        cfg["model"] = {"build": "tiny-ddpm"}
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as err:
        load_config(cfg)
    assert words in str(err.value)


def test_rank_check_uses_the_targeted_layers(tmp_path):
    # tiny-sd: attention layers 32..64 wide (cross-attention keys come from 32-wide text states)
    load_config(_config("sd", tmp_path / "ok", train={"lora_rank": 32}))
    with pytest.raises(ConfigError, match=r"train\.lora_rank: 33"):
        load_config(_config("sd", tmp_path / "big", train={"lora_rank": 33}))
    # attention+conv on the ddpm: its first block's convs are 16 wide
    with pytest.raises(ConfigError, match=r"train\.lora_rank: 17 .*16"):
        load_config(_config("ddpm", tmp_path / "c", train={"lora_rank": 17, "lora_targets": "attention+conv"}))


def test_missing_peft_fails_at_config_time(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft -> ImportError
    with pytest.raises(ConfigError, match=r"train\.lora_rank: .*pip install peft"):
        load_config(_config("ddpm", tmp_path / "p"))
    load_config(_config("ddpm", tmp_path / "q", train={"lora_rank": 0}))  # the full UNet needs no peft


def _adapted(kind, seed=0):
    from siss_fast.engine import models
    from siss_fast.engine.lora import attach

    cfg = load_config(_config(kind, "/tmp/unused"))
    unet = models.load_model(str(tiny_model(kind))).unet
    torch.manual_seed(seed)
    attach(unet, cfg.train)
    with torch.no_grad():  # a non-zero adapter, so that its path shows in the output
        for name, p in unet.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn_like(p) * 0.1)
    return unet


@pytest.mark.parametrize("kind", ["ddpm", "sd"])
def test_low_precision_storage_computes_the_same_bits_under_autocast(kind):
    from siss_fast.engine.lora import store_frozen_in

    ref, low = _adapted(kind), _adapted(kind)
    freed = store_frozen_in(low, torch.bfloat16)
    stored = {n: p.dtype for n, p in low.named_parameters()}
    assert freed > 0 and any(d == torch.bfloat16 for d in stored.values())
    assert all(d == torch.float32 for n, d in stored.items() if ".lora_" in n or "norm" in n or
               n.startswith(("conv_in.", "conv_out.")))  # adapters, norms and the outer convs stay fp32
    assert next(low.parameters()).dtype == torch.float32  # diffusers' model dtype: the first parameter's
    torch.manual_seed(1)
    x, t = torch.randn(2, ref.config.in_channels, 8, 8), torch.tensor([10, 700])
    cond = {} if kind == "ddpm" else {"encoder_hidden_states": torch.randn(2, 4, 32)}
    outs, grads = [], []
    for unet in (ref, low):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = unet(x, t, **cond).sample
        out.float().pow(2).mean().backward()
        outs.append(out)
        grads.append({n: p.grad for n, p in unet.named_parameters() if p.requires_grad})
    assert torch.equal(outs[0], outs[1])
    assert grads[0].keys() == grads[1].keys() and all(torch.equal(grads[0][k], grads[1][k]) for k in grads[0])
    with torch.no_grad():  # outside autocast a stored layer computes in bf16 and hands back fp32
        plain = low(x, t, **cond).sample
    assert plain.dtype == torch.float32
    torch.testing.assert_close(plain, outs[0].float(), rtol=0.05, atol=0.05)


def test_bf16_lora_run_stores_the_base_low_and_merges_into_the_fp32_file(tmp_path):
    from diffusers import UNet2DModel
    from peft import PeftModel

    from siss_fast.engine import models
    from siss_fast.engine.setup import Dist, prepare_data
    from siss_fast.engine.step import UnlearnStep

    train = {"steps": 3, "lr": 1e-2, "mixed_precision": "bf16"}
    validation = {"every": 3, "num_samples": 4, "sampler_steps": 2, "batch_size": 4}  # the defaults' metrics
    cfg = load_config(_config("ddpm", tmp_path / "unused", train=train))
    model = models.load_model(str(tiny_model("ddpm")))
    step = UnlearnStep(cfg, model, prepare_data(cfg, model, torch.device("cpu")), torch.device("cpu"), dist=Dist())
    assert any(p.dtype == torch.bfloat16 for p in step.unet.parameters())
    out = tmp_path / "run"
    result = run(load_config(_config("ddpm", out, train=train, validation=validation)))
    assert result.stop_reason  # validation (retain_fit and the probe call the UNet outside autocast) ran
    merged = UNet2DModel.from_pretrained(str(out / "final"), subfolder="unet", local_files_only=True).state_dict()
    base = UNet2DModel.from_pretrained(str(tiny_model("ddpm")), subfolder="unet", local_files_only=True)
    expected = PeftModel.from_pretrained(base, str(out / "final_adapter")).merge_and_unload().state_dict()
    assert merged.keys() == expected.keys()
    assert all(merged[k].dtype == torch.float32 for k in merged)
    for key in merged:  # the fp32 base plus the adapter: nothing was rounded to bf16
        torch.testing.assert_close(merged[key], expected[key], rtol=0, atol=1e-6)


def test_merging_a_low_precision_base_reads_the_fp32_file(tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from siss_fast.engine.lora import merged_state, store_frozen_in

    unet = _adapted("ddpm")
    reference = merged_state(unet)  # fp32 storage: the in-memory weights
    store_frozen_in(unet, torch.bfloat16)
    with pytest.raises(ValueError, match="base_folder"):
        merged_state(unet)
    folder = tmp_path / "unet"
    shutil.copytree(tiny_model("ddpm") / "unet", folder)
    weights = load_file(str(folder / "diffusion_pytorch_model.safetensors"))  # an fp16 variant beside it is not read
    save_file({k: torch.zeros_like(v).half() for k, v in weights.items()},
              str(folder / "diffusion_pytorch_model.fp16.safetensors"))
    merged = merged_state(unet, base_folder=folder)
    assert merged.keys() == reference.keys()
    assert all(merged[k].dtype == torch.float32 and torch.equal(merged[k], reference[k]) for k in merged)
