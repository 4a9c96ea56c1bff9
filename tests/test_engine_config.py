"""Engine config: every error is a ConfigError naming the key or file, raised before any model loads."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_helpers import DATA, EXAMPLES, base_config, tiny_model, write_images  # noqa: E402

from siss_fast.engine.config import ConfigError, load_config  # noqa: E402


def _cfg(tmp_path, **sections):
    return base_config(tiny_model("ddpm"), tmp_path / "out", **sections)


def _fails(cfg, match, overrides=()):
    with pytest.raises(ConfigError, match=match):
        load_config(cfg, overrides)


def test_examples_load_and_overrides(tmp_path):
    cfg = load_config(EXAMPLES / "tiny-ddpm.yaml", ["steps=7", f"output_dir={tmp_path}", "checkpoint_every=3",
                                                     "resume=latest", "train.lr=1e-4", "method.lambd=0.25"])
    assert (cfg.train.steps, cfg.checkpoint.every, cfg.checkpoint.resume) == (7, 3, "latest")
    assert cfg.output_dir == str(tmp_path) and cfg.train.lr == 1e-4 and cfg.method.lambd == 0.25
    assert cfg.data.retain_dir == str(DATA / "retain")  # relative to the YAML file
    sd = load_config(EXAMPLES / "tiny-sd.yaml", [f"model={tiny_model('sd')}"])
    assert sd.model.build is None and sd.model.path == str(tiny_model("sd"))


@pytest.mark.parametrize("overrides, match", [
    (["train.lrr=1"], r"train\.lrr: unknown key.*lr"),
    (["bogus=1"], r"bogus: unknown key"),
    (["steps=ten"], r"train\.steps: expected an integer"),
    (["train.mixed_precision=fp8"], r"train\.mixed_precision: expected one of"),
    (["steps=0"], r"train\.steps: expected an integer >= 1"),
    (["method.lambd=1.5"], r"method\.lambd: expected 0 <= lambd <= 1"),
    (["method=naive", "method.lambd=0.5"], r"method\.lambd: only siss and bernoulli"),
    (["method=magic"], r"method\.name: expected one of"),
    (["method.weight_clip=-1"], r"method\.weight_clip: expected a finite number > 0"),
    (["method.t_range=[0,1000]"], r"method\.t_range: expected t_max < 1000"),
    (["gradient.rule=sum"], r"gradient\.rule: expected one of"),
    (["gradient.scaling_norm=big"], r"gradient\.scaling_norm: expected a number > 0 or 'auto'"),
    (["gradient.mode=fast"], r"gradient\.mode"),
    (["method=neggrad", "gradient.scaling_norm=auto"], r"gradient\.scaling_norm: expected a number > 0 for method neggrad"),
    (["checkpoint.keep_last=0"], r"checkpoint\.keep_last"),
    (["resume=/nonexistent/ckpt"], r"checkpoint\.resume"),
    (["validation.metrics=[nope]"], r"validation\.metrics\[0\]: unknown metric 'nope'"),
    (["validation.metrics=[os:nope]"], r"validation\.metrics\[0\]: module 'os' has no callable"),
    (["validation.forget_metric=other"], r"validation\.forget_metric"),
    (["validation.forget_target_ratio=1.5"], r"validation\.forget_target_ratio: expected a number in \[0, 1\)"),
    (["model=/nonexistent/model"], r"model\.path: .*not a folder"),
    (["model.allow_pickle=maybe"], r"model\.allow_pickle: expected true/false"),
    (["data.retain_prompt=hello"], r"data\.retain_prompt: a pixel DDPM is unconditional"),
])
def test_config_errors(tmp_path, overrides, match):
    _fails(_cfg(tmp_path), match, overrides)


def test_model_build_and_path_exclusive(tmp_path):
    cfg = _cfg(tmp_path)
    cfg["model"]["build"] = "tiny-ddpm"
    _fails(cfg, r"model: expected exactly one of model\.path .* or model\.build")
    _fails(_cfg(tmp_path), r"model\.build: expected one of", ["model.path=null", "model.build=huge"])


def test_data_errors(tmp_path):
    _fails(_cfg(tmp_path, data={"retain_dir": str(tmp_path / "missing")}), r"data\.retain_dir: folder .* not found")
    (tmp_path / "empty").mkdir()
    _fails(_cfg(tmp_path, data={"forget_dir": str(tmp_path / "empty")}), r"data\.forget_dir: no images")
    big = write_images(tmp_path / "big", 2, size=32)
    _fails(_cfg(tmp_path, data={"forget_dir": str(big)}), r"data\.forget_dir: images are 32x32, the model expects 16")
    mixed = write_images(tmp_path / "mixed", 2, size=16)
    write_images(tmp_path / "mixed2", 1, size=24)
    (tmp_path / "mixed2" / "img_00.png").rename(mixed / "z_other.png")
    _fails(_cfg(tmp_path, data={"retain_dir": str(mixed)}), r"data\.retain_dir: images of different sizes.*z_other")
    broken = write_images(tmp_path / "broken", 2)
    raw = (broken / "img_01.png").read_bytes()
    (broken / "img_01.png").write_bytes(raw[: len(raw) // 2])
    _fails(_cfg(tmp_path, data={"retain_dir": str(broken)}), r"cannot read image .*img_01\.png")


def test_sd_prompt_errors(tmp_path):
    cfg = base_config(tiny_model("sd"), tmp_path / "out")
    _fails(cfg, r"data\.retain_prompt: Stable Diffusion needs prompts")
    captions = tmp_path / "captions.tsv"
    captions.write_text("retain_00.png\ta caption\n")
    cfg["data"]["captions"] = str(captions)
    _fails(cfg, r"data\.captions: '.*' has no caption for \['retain_01\.png'")
    cfg["data"].update(retain_prompt="a", forget_prompt="b")
    load_config(cfg)  # one prompt per set wins


def test_not_a_model_and_pickle(tmp_path):
    (tmp_path / "junk").mkdir()
    _fails(_cfg(tmp_path), r"is not a diffusers model folder", [f"model={tmp_path / 'junk'}"])
    import shutil

    from siss_fast.engine.models import ModelError, load_model

    pick = tmp_path / "pickled"
    shutil.copytree(tiny_model("ddpm"), pick)
    from safetensors.torch import load_file
    import torch

    state = load_file(str(pick / "unet" / "diffusion_pytorch_model.safetensors"))
    (pick / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    torch.save(state, pick / "unet" / "diffusion_pytorch_model.bin")
    with pytest.raises(ModelError, match=r"only pickle weights.*allow_pickle"):
        load_model(str(pick))
    loaded = load_model(str(pick), allow_pickle=True)  # weights_only=True
    assert torch.equal(loaded.unet.state_dict()["conv_in.weight"], state["conv_in.weight"])
