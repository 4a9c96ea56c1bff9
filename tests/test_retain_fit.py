"""The retain-fit quality guard (siss_fast.metrics.retain_fit): fixed inputs, the formula, sensitivity to damage,
read-only on the UNet, option errors, latent models (CPU, one thread, a few seconds)."""

import pytest
import torch

pytest.importorskip("diffusers")

from siss_fast.metrics.registry import MetricContext, get_metric  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from siss_fast.engine.models import build_tiny, load_model

    torch.set_num_threads(1)
    model = load_model(str(build_tiny("tiny-ddpm", tmp_path_factory.mktemp("ddpm"))))
    size = model.unet.config.sample_size
    images = torch.rand(40, model.image_channels, size, size, generator=torch.Generator().manual_seed(0))
    return model, images


def _ctx(model, retain, options=None):
    return MetricContext(retain, retain[:1], dict(options or {}), model.kind, torch.device("cpu"), model, model.unet)


class _Zero(torch.nn.Module):
    """eps_theta = 0: the error is the noise's own mean square."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x, t):
        return x * self.w


def test_formula_and_fixed_inputs(tiny):
    model, images = tiny
    score = get_metric("retain_fit").factory(_ctx(model, images, {"images": 16, "t_fracs": [0.1, 0.5]}))
    fit = score.fit
    assert fit.x_t.shape == (32, *images.shape[1:]) and fit.timesteps == [100, 500]
    # the formula: with eps_theta = 0 the reading is mean_i mean_d eps_id^2 of the stored noise
    assert score(images, unet=_Zero()) == pytest.approx(float(fit.eps.double().square().mean()), rel=1e-12)
    # x_t = sqrt(abar_t) z + sqrt(1 - abar_t) eps with z one of the retain images in model space
    abar = model.scheduler.alphas_cumprod.double()
    z = (fit.x_t[0].double() - (1 - abar[100]).sqrt() * fit.eps[0].double()) / abar[100].sqrt()
    assert min(float((z - (2 * im.double() - 1)).abs().max()) for im in images) < 1e-4
    # the same weights give the same reading, whatever samples are passed
    first = score(images, unet=model.unet)
    assert score(images[:3], unet=model.unet) == first
    rebuilt = get_metric("retain_fit").factory(_ctx(model, images, {"images": 16, "t_fracs": [0.1, 0.5]}))
    assert rebuilt(images, unet=model.unet) == first


def test_damage_raises_it_and_the_unet_is_left_as_it_was(tiny):
    import copy

    model, images = tiny
    score = get_metric("retain_fit").factory(_ctx(model, images))
    unet = copy.deepcopy(model.unet).train()
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    clean = score(images, unet=unet)
    assert unet.training  # train/eval mode restored
    assert all(torch.equal(before[k], v) for k, v in unet.state_dict().items())
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * p.abs().mean())
    assert score(images, unet=unet) > clean
    assert get_metric("retain_fit").higher_is_better is False
    assert get_metric("retain_fit").tolerance > 0


@pytest.mark.parametrize("options,bad", [({"images": 0}, "images"), ({"t_fracs": [1.5]}, "t_fracs"),
                                         ({"t_fracs": []}, "t_fracs"), ({"seed": -1}, "seed"),
                                         ({"batch_size": True}, "batch_size"), ({"t": 100}, "t")])
def test_bad_options_raise_naming_the_option(tiny, options, bad):
    model, images = tiny
    with pytest.raises(ValueError, match=rf"retain_fit\.{bad}\b"):
        get_metric("retain_fit").factory(_ctx(model, images, options))
    with pytest.raises(ValueError, match=rf"retain_fit\.{bad}\b"):
        get_metric("retain_fit").check_options(options)


def test_needs_the_model_and_the_unet(tiny):
    model, images = tiny
    with pytest.raises(ValueError, match="retain_fit"):
        get_metric("retain_fit").factory(MetricContext(images, images[:1]))
    with pytest.raises(ValueError, match="unet=unet"):
        get_metric("retain_fit").factory(_ctx(model, images))(images)


def test_latent_model(tmp_path):
    from siss_fast.engine.models import build_tiny, load_model

    torch.set_num_threads(1)
    model = load_model(str(build_tiny("tiny-sd", tmp_path / "sd")))
    size = model.unet.config.sample_size * model.vae_scale
    images = torch.rand(6, model.image_channels, size, size, generator=torch.Generator().manual_seed(0))
    score = get_metric("retain_fit").factory(_ctx(model, images, {"images": 4}))
    assert score.fit.x_t.shape[1] == model.unet.config.in_channels
    value = score(images, unet=model.unet)
    assert 0 < value < float("inf") and score(images, unet=model.unet) == value
