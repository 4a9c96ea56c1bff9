"""The local-weights metric plug-ins: ``sscd`` (copy detection, a TorchScript descriptor network) and ``clip_fd``
(Fréchet distance in a local CLIP model's image embeddings), with tiny scripted / random stand-ins for the real
networks; bad paths fail at config validation, before any model loads, naming the key."""

import json

import pytest
import torch

from siss_fast.metrics.registry import MetricContext, get_metric


class _TinyDescriptor(torch.nn.Module):
    """An SSCD stand-in: (N, 3, S, S) -> (N, 16) descriptors (conv, ReLU, global average pool, linear)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.fc = torch.nn.Linear(8 * 4, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x))
        h = torch.nn.functional.adaptive_avg_pool2d(h, 2).flatten(1)
        return self.fc(h)


@pytest.fixture
def sscd_file(tmp_path):
    path = tmp_path / "sscd.torchscript.pt"
    torch.jit.script(_TinyDescriptor()).save(str(path))
    return path


def _images(n, seed, channels=1, size=16):
    return torch.rand((n, channels, size, size), generator=torch.Generator().manual_seed(seed))


def test_sscd_counts_copies_per_item(sscd_file):
    forget, retain = _images(2, 1), _images(8, 2)
    ctx = MetricContext(retain, forget, options={"weights": str(sscd_file), "threshold": 0.999, "size": 32})
    score = get_metric("sscd").factory(ctx)
    samples = torch.cat([forget[1:2], forget[1:2], forget[0:1], retain[:5]])  # 3 exact copies among 8
    assert score(samples) == pytest.approx(3 / 8)
    assert score.per_item(samples) == pytest.approx([1 / 8, 2 / 8])
    assert score.assign(samples)[:3].tolist() == [1, 1, 0]
    sims = score.similarity(samples)
    assert sims.shape == (8, 2) and torch.allclose(sims[0, 1], torch.tensor(1.0), atol=1e-5)
    # a threshold of -1 < thr <= 1 that nothing reaches counts nothing
    ctx.options["threshold"] = 1.0
    assert get_metric("sscd").factory(ctx)(retain) == 0.0


def _rejects(check, options, pattern):
    with pytest.raises(ValueError, match=pattern):
        check(options)


def test_sscd_option_errors_name_the_key(tmp_path, sscd_file):
    check = get_metric("sscd").check_options
    _rejects(check, {}, r"sscd\.weights: required")
    _rejects(check, {"weights": str(tmp_path / "missing.pt")}, r"sscd\.weights: file .* not found")
    state = tmp_path / "state.pt"
    torch.save(_TinyDescriptor().state_dict(), state)
    _rejects(check, {"weights": str(state)}, r"sscd\.weights: .* torch\.save checkpoint, not a TorchScript")
    (tmp_path / "notes.txt").write_text("hello")
    _rejects(check, {"weights": str(tmp_path / "notes.txt")}, r"sscd\.weights: .*not a zip file")
    _rejects(check, {"weights": str(sscd_file), "threshold": 1.5}, r"sscd\.threshold")
    _rejects(check, {"weights": str(sscd_file), "colour": 1}, r"sscd\.colour: unknown option")
    check({"weights": str(sscd_file), "threshold": 0.5})


@pytest.fixture
def clip_folder(tmp_path):
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    cfg = CLIPConfig(text_config={"vocab_size": 100, "hidden_size": 16, "intermediate_size": 32,
                                  "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 8},
                     vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                                    "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
                     projection_dim=8)
    folder = tmp_path / "clip"
    CLIPModel(cfg).save_pretrained(str(folder))
    return folder


def test_clip_fd_reads_the_distance_to_the_retain_set(clip_folder):
    retain = _images(40, 3, channels=3)
    ctx = MetricContext(retain, _images(1, 4, channels=3), options={"model": str(clip_folder)})
    score = get_metric("clip_fd").factory(ctx)
    same = score(retain)
    assert same == pytest.approx(0.0, abs=1e-6)
    shifted = score((retain * 0.3).clamp(0, 1))  # darker images: another distribution
    assert shifted > 10 * max(same, 1e-9)
    # the embeddings are the folder's CLIP projection of the vision tower
    from transformers import CLIPModel

    full = CLIPModel.from_pretrained(str(clip_folder)).eval()
    from siss_fast.metrics.clip_quality import CLIP_MEAN, CLIP_STD
    from siss_fast.metrics.local_weights import prepare_images

    with torch.no_grad():
        pooled = full.vision_model(pixel_values=prepare_images(retain[:4], 32, CLIP_MEAN, CLIP_STD)).pooler_output
        want = torch.nn.functional.normalize(full.visual_projection(pooled).double(), dim=1)
    assert torch.allclose(score.embed(retain[:4]), want, atol=1e-6)


def test_clip_fd_option_errors_name_the_key(tmp_path, clip_folder):
    check = get_metric("clip_fd").check_options
    _rejects(check, {}, r"clip_fd\.model: required")
    _rejects(check, {"model": str(tmp_path / "nowhere")}, r"clip_fd\.model: folder .* not found")
    other = tmp_path / "unet"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    _rejects(check, {"model": str(other)}, r"clip_fd\.model: .* type None, expected one of")
    from transformers import CLIPVisionConfig, CLIPVisionModel

    bare = tmp_path / "vision-only"
    CLIPVisionModel(CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     image_size=32, patch_size=8)).save_pretrained(str(bare))
    check({"model": str(bare)})  # the right kind of folder ...
    ctx = MetricContext(_images(4, 3, channels=3), _images(1, 4, channels=3), options={"model": str(bare)})
    with pytest.raises(ValueError, match=r"clip_fd\.model: .* lacks weights .* no projection"):
        get_metric("clip_fd").factory(ctx)  # ... without CLIP's projection: never a silently random one
    _rejects(check, {"model": str(clip_folder), "max_retain": 1}, r"clip_fd\.max_retain")
    check({"model": str(clip_folder)})


def test_missing_weights_fail_before_any_model_loads(tmp_path, monkeypatch):
    from siss_fast.engine import ConfigError, load_config
    from siss_fast.engine import models as engine_models

    def no_load(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(engine_models, "load_model", no_load)
    for d in ("r", "f"):
        (tmp_path / d).mkdir()
        from PIL import Image

        Image.new("L", (16, 16)).save(tmp_path / d / "a.png")
    base = ["model.build=tiny-ddpm", "model.channels=1", f"data.retain_dir={tmp_path / 'r'}",
            f"data.forget_dir={tmp_path / 'f'}", f"output_dir={tmp_path / 'run'}"]
    cfg = tmp_path / "c.yaml"
    cfg.write_text("{}\n")
    with pytest.raises(ConfigError, match=r"sscd\.weights: file .*missing\.pt.* not found"):
        load_config(str(cfg), base + ["validation.metrics=[sscd]",
                                      f"validation.metric_options={{sscd: {{weights: {tmp_path / 'missing.pt'}}}}}"])
    with pytest.raises(ConfigError, match=r"clip_fd\.model: folder .* not found"):
        load_config(str(cfg), base + ["validation.metrics=[clip_fd]",
                                      f"validation.metric_options={{clip_fd: {{model: {tmp_path / 'clip'}}}}}"])
