"""``final/`` is written from the kept state without a second UNet, with the frozen components copied byte for byte
from the base folder; a Stable Diffusion run without validation frees its VAE and text encoder after caching.

The copy matters for correctness too: a ``bf16`` run casts its frozen VAE and text encoder to bf16 in place, and a
``final/`` saved from those objects would have held bf16 copies of components the run never trained.
"""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from engine_helpers import write_images  # noqa: E402


def _sd_run(tmp_path, *extra):
    from siss_fast.engine import load_config
    from siss_fast.engine.loop import run

    write_images(tmp_path / "r", 4, size=16, seed=1)
    write_images(tmp_path / "f", 1, size=16, seed=2)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("{}\n")
    config = load_config(str(cfg), ["model.build=tiny-sd", "model.channels=3", "model.image_size=16",
                                    f"data.retain_dir={tmp_path / 'r'}", f"data.forget_dir={tmp_path / 'f'}",
                                    "data.retain_prompt=a digit", "data.forget_prompt=a shirt", "steps=2",
                                    "batch_size=2", "train.device=cpu", "log.progress=false",
                                    f"output_dir={tmp_path / 'run'}", *extra])
    return run(config)


def _files(folder: Path):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("precision", ["'no'", "bf16"])  # quoted: YAML reads a bare no as false
def test_frozen_components_are_the_base_folders_bytes(tmp_path, precision):
    result = _sd_run(tmp_path, "validation.every=0", f"train.mixed_precision={precision}")
    base, final = tmp_path / "run" / "base_model", result.output_dir / "final"
    for part in ("vae", "text_encoder", "tokenizer"):
        assert _files(final / part) == _files(base / part), part
    from siss_fast.engine.models import load_model

    m, b = load_model(str(final)), load_model(str(base))
    assert all(p.dtype == torch.float32 for p in m.unet.parameters())
    assert {k: v for k, v in m.unet.config.items() if k != "_name_or_path"} == \
        {k: v for k, v in b.unet.config.items() if k != "_name_or_path"}
    trained = [not torch.equal(p, q) for p, q in zip(m.unet.state_dict().values(), b.unet.state_dict().values())]
    assert any(trained)  # the UNet is the run's, not the base's


def test_sd_run_without_validation_frees_the_frozen_parts(tmp_path, monkeypatch):
    from siss_fast.engine import models, trainer

    seen = {}
    original = models.release_frozen

    def spy(model):
        original(model)
        seen["devices"] = {p.device.type for part in (model.vae, model.text_encoder) for p in part.parameters()}
        seen["channels"] = model.image_channels  # configs stay readable

    monkeypatch.setattr(trainer.models, "release_frozen", spy)
    _sd_run(tmp_path, "validation.every=0")
    assert seen == {"devices": {"meta"}, "channels": 3}


def test_sd_run_with_validation_keeps_them(tmp_path, monkeypatch):
    from siss_fast.engine import models, trainer

    calls = []
    monkeypatch.setattr(trainer.models, "release_frozen", lambda model: calls.append(model))
    result = _sd_run(tmp_path, "validation.every=1", "validation.num_samples=2", "validation.sampler_steps=2",
                     "validation.grids=false")
    assert calls == [] and (result.output_dir / "final" / "vae").is_dir()
    assert models.hash_model_folder(result.output_dir / "final" / "vae") == \
        models.hash_model_folder(tmp_path / "run" / "base_model" / "vae")


def test_save_final_without_frozen_from_saves_the_objects(tmp_path):
    """A pipeline built or trained in memory (the text-to-image demo trains its VAE before saving its base model)
    is saved from its objects; ``frozen_from`` (the engine's case) copies the base folder's files instead."""
    from siss_fast.engine.models import build_tiny, load_model, offline, save_final

    with offline():
        build_tiny("tiny-sd", tmp_path / "base", channels=1, image_size=16)
    model = load_model(str(tmp_path / "base"))
    with torch.no_grad():
        for p in model.vae.parameters():
            p.add_(0.5)  # "trained" in memory
    state = {k: v.clone() for k, v in model.unet.state_dict().items()}
    save_final(model, state, tmp_path / "objects")
    save_final(model, state, tmp_path / "copied", frozen_from=tmp_path / "base")
    saved = load_model(str(tmp_path / "objects")).vae.state_dict()
    assert all(torch.equal(saved[k], v) for k, v in model.vae.state_dict().items())
    assert _files(tmp_path / "copied" / "vae") == _files(tmp_path / "base" / "vae")
    unet = load_model(str(tmp_path / "objects")).unet.state_dict()
    assert all(torch.equal(unet[k], v) for k, v in state.items())
