"""The base-feature quality guard (feature_fd / feature_kid) and the nearest-neighbour forget signal (forget_nn),
on the demo's shipped model and digits (CPU, one thread, a few seconds)."""

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("diffusers")
pytest.importorskip("sklearn")

from siss_fast.demo.data import demo_data, to_unit  # noqa: E402
from siss_fast.metrics.registry import MetricContext, build_metrics, get_metric  # noqa: E402


@pytest.fixture(scope="module")
def setting():
    from siss_fast.demo.models import SHIPPED_MODEL
    from siss_fast.engine.models import load_model

    torch.set_num_threads(1)
    data = demo_data()
    model = load_model(str(SHIPPED_MODEL))
    digits = to_unit(data.retain)
    shirt = to_unit(data.forget_image)
    return model, digits, shirt


def _ctx(model, retain, forget, options=None):
    return MetricContext(retain, forget, dict(options or {}), model.kind, torch.device("cpu"), model, model.unet)


def _blur(x):
    return F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)


@pytest.mark.parametrize("name", ["feature_fd", "feature_kid"])
def test_guard_ranks_clean_images_better_than_degraded(setting, name):
    model, digits, shirt = setting
    retain, held_out = digits[:300], digits[300:460]
    score = get_metric(name).factory(_ctx(model, retain, shirt))
    noisy = (held_out + 0.15 * torch.randn(held_out.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    clean, blurred, noised = score(held_out), score(_blur(held_out)), score(noisy)
    assert clean < blurred and clean < noised, (clean, blurred, noised)
    assert score(held_out) == clean  # fixed noise: the same reading for the same samples
    assert get_metric(name).higher_is_better is False


def test_guard_does_not_change_the_training_unet(setting):
    model, digits, shirt = setting
    before = {k: v.clone() for k, v in model.unet.state_dict().items()}
    score = get_metric("feature_fd").factory(_ctx(model, digits[:64], shirt, {"blocks": ["mid"], "t": 50}))
    assert score.features.unet is not model.unet
    assert all(not p.requires_grad for p in score.features.unet.parameters())
    clean = score(digits[64:96])
    assert all(torch.equal(before[k], v) for k, v in model.unet.state_dict().items())
    # forget copies among the samples are left out (exclude_forget, default true) ...
    with_copies = torch.cat([digits[64:96], shirt.repeat(4, 1, 1, 1)])
    assert score(with_copies) == pytest.approx(clean, rel=1e-6)
    # ... and would otherwise read as worse quality
    keep_all = get_metric("feature_fd").factory(_ctx(model, digits[:64], shirt, {"blocks": ["mid"], "t": 50,
                                                                                  "exclude_forget": False}))
    assert keep_all(with_copies) > clean


def _second_item():
    """A 4-pixel checkerboard, far from the digits (RMS 0.58) and the T-shirt: the second forget item."""
    yy, xx = torch.meshgrid(torch.arange(16), torch.arange(16), indexing="ij")
    return ((yy // 4 + xx // 4) % 2).float()[None, None]


def test_forget_nn_counts_exact_and_degraded_copies_per_item(setting):
    model, digits, shirt = setting
    forget = torch.cat([shirt, _second_item()])
    retain = digits
    metrics = build_metrics(["forget_nn", "forget_distance"],
                            _ctx(model, retain, forget), {})
    score, fd = metrics["forget_nn"], metrics["forget_distance"]
    gen = torch.Generator().manual_seed(1)
    # degraded: blurred, dimmed, noised copies (RMS 0.2-0.3 from the item: outside forget_distance's auto radius)
    degraded = (0.75 * _blur(forget) + 0.1 + 0.12 * torch.randn(forget.shape, generator=gen)).clamp(0, 1)
    from siss_fast.metrics.distances import forget_thresholds, rms_distances

    gap = rms_distances(degraded, forget).diagonal()
    assert (gap > forget_thresholds(forget, retain)).all()  # forget_distance's radius misses them ...
    assert fd(degraded) == 0.0
    samples = torch.cat([forget[:1].repeat(3, 1, 1, 1), degraded[:1], forget[1:], degraded[1:].repeat(2, 1, 1, 1),
                         digits[:14]])  # 4 of item 0, 3 of item 1, 14 retain images
    n = samples.shape[0]
    assert score.per_item(samples) == pytest.approx([4 / n, 3 / n])  # ... forget_nn counts them, per item
    assert score(samples) == pytest.approx(7 / n)
    assert score.assign(samples).tolist() == [0] * 4 + [1] * 3 + [-1] * 14
    assert score(digits[:200]) == 0.0 and score.per_item(digits[:200]) == [0.0, 0.0]
    # a flat grey image is far from everything: nearest to the T-shirt perhaps, but outside its radius
    assert score(torch.full((1, 1, 16, 16), 0.5)) == 0.0
    one = get_metric("forget_nn").factory(_ctx(model, retain, shirt))
    assert len(one.per_item(samples)) == 1 and len(score.per_item(samples)) == 2


@pytest.mark.parametrize("name,options,bad", [
    ("feature_fd", {"t": -1}, "t"), ("feature_fd", {"t": 5000}, "t"), ("feature_fd", {"blocks": ["up0"]}, "blocks"),
    ("feature_kid", {"pool": "max"}, "pool"), ("feature_kid", {"blocks": []}, "blocks"),
    ("feature_fd", {"batch_size": 0}, "batch_size"), ("feature_fd", {"layers": 1}, "layers"),
    ("feature_fd", {"exclude_forget": "yes"}, "exclude_forget"),
    ("forget_nn", {"radius": -1}, "radius"), ("forget_nn", {"radius": "far"}, "radius"),
    ("forget_nn", {"radius_scale": 0}, "radius_scale"), ("forget_nn", {"k": 1}, "k")])
def test_bad_options_raise_naming_the_option(setting, name, options, bad):
    model, digits, shirt = setting
    with pytest.raises(ValueError, match=rf"{name}\.{bad}\b"):
        get_metric(name).factory(_ctx(model, digits[:32], shirt, options))


def test_guard_needs_the_model():
    ctx = MetricContext(torch.rand(4, 1, 16, 16), torch.rand(1, 1, 16, 16))
    with pytest.raises(ValueError, match="feature_fd"):
        get_metric("feature_fd").factory(ctx)


def test_guard_on_a_latent_model(tmp_path):
    from siss_fast.engine.models import build_tiny, load_model

    torch.set_num_threads(1)
    model = load_model(str(build_tiny("tiny-sd", tmp_path / "sd")))
    size = model.unet.config.sample_size * model.vae_scale
    images = torch.rand(12, model.image_channels, size, size, generator=torch.Generator().manual_seed(0))
    for name in ("feature_fd", "feature_kid"):
        score = get_metric(name).factory(_ctx(model, images[:8], images[8:9], {"blocks": ["down0", "mid"]}))
        value = score(images[8:])
        assert value == value and abs(value) < float("inf")
