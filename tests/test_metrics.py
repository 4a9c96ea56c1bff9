"""siss_fast.metrics on synthetic cases with known answers (tiny tensors, CPU, no diffusers needed)."""

import math

import pytest
import torch
from torch import nn

from siss_fast.metrics import (FORGET_THRESHOLD, bits_per_dim_vlb, class_balance, classifier_quality, ddim_sample,
                               ddim_timesteps, denoising_loss, evaluate_samples, forget_distances, forget_rate,
                               image_similarity, inception_score, membership_signal, noise_norm_signal)

T = 100
ABAR = torch.cumprod(1 - torch.linspace(1e-4, 0.2, T, dtype=torch.float64), 0)


class Oracle(nn.Module):
    """The exact noise predictor of a one-image data set {a}: eps(x_t, t) = (x_t - sqrt(abar_t) a) / sqrt(1 - abar_t)."""

    def __init__(self, a):
        super().__init__()
        self.a = nn.Parameter(a.clone(), requires_grad=False)

    def forward(self, x, t):
        g = ABAR[t].sqrt().float().view(-1, 1, 1, 1)
        s = (1 - ABAR[t]).sqrt().float().view(-1, 1, 1, 1)
        return (x - g * self.a) / s


def _image(seed, shape=(1, 1, 4, 4)):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_forget_rate_counts_samples_within_threshold():
    a = torch.zeros(1, 1, 4, 4)
    near = a + 0.1                       # L2 distance 0.4
    far = torch.ones(1, 1, 4, 4)         # L2 distance 4.0
    samples = torch.cat([a, near, far, far])
    assert forget_distances(samples, a).tolist() == pytest.approx([0.0, 0.4, 4.0, 4.0])
    assert forget_rate(samples, a, threshold=1.0) == pytest.approx(0.5)
    assert forget_rate(samples, a, threshold=0.3) == pytest.approx(0.25)
    # nearest of several forget images
    assert forget_rate(far, torch.cat([a, far]), threshold=0.1) == 1.0
    assert 0 < FORGET_THRESHOLD < 6.0  # below the nearest real digit (6.75, see test_demo_data)


def test_forget_rate_rejects_mismatched_images():
    with pytest.raises(ValueError, match="forget_images"):
        forget_rate(torch.zeros(2, 1, 4, 4), torch.zeros(1, 1, 5, 5))


def test_inception_score_known_values():
    k = 10
    balanced_confident = torch.eye(k).repeat(3, 1)
    assert inception_score(balanced_confident) == pytest.approx(k, rel=1e-6)
    one_class = torch.zeros(30, k)
    one_class[:, 3] = 1
    assert inception_score(one_class) == pytest.approx(1.0, rel=1e-6)
    uniform = torch.full((30, k), 1.0 / k)
    assert inception_score(uniform) == pytest.approx(1.0, rel=1e-6)
    # two classes, confident, equally often: exp(log 2) = 2
    two = torch.zeros(20, k)
    two[:10, 0] = 1
    two[10:, 1] = 1
    assert inception_score(two) == pytest.approx(2.0, rel=1e-6)
    assert math.isnan(inception_score(torch.zeros(0, k)))


def test_class_balance_known_values():
    balanced = class_balance(torch.eye(10).repeat(2, 1))
    assert balanced["class_entropy"] == pytest.approx(1.0)
    assert balanced["min_class_share"] == pytest.approx(1.0)
    missing = torch.eye(10)[:5].repeat(2, 1)
    res = class_balance(missing)
    assert res["min_class_share"] == 0.0
    assert res["class_entropy"] == pytest.approx(math.log(5) / math.log(10))


class _FirstPixelClassifier(nn.Module):
    """10 logits: class = round(9 * first pixel); very confident."""

    def forward(self, x):
        idx = (x[:, 0, 0, 0] * 9).round().long().clamp(0, 9)
        return torch.nn.functional.one_hot(idx, 10).float() * 50.0


def test_evaluate_samples_scores_quality_on_non_forget_samples():
    forget = torch.zeros(1, 1, 4, 4)
    digits = torch.ones(10, 1, 4, 4)
    digits[:, 0, 0, 0] = torch.arange(10) / 9.0   # ten balanced classes, far from the forget image
    samples = torch.cat([digits, forget.expand(10, -1, -1, -1)])
    res = evaluate_samples(samples, forget, _FirstPixelClassifier(), threshold=1.0)
    assert res["forget_rate"] == pytest.approx(0.5)
    assert res["n_samples"] == 20
    assert res["quality"] == pytest.approx(10.0, rel=1e-4)   # forget samples excluded: balanced and confident
    assert classifier_quality(digits, _FirstPixelClassifier())["class_entropy"] == pytest.approx(1.0)


def test_denoising_loss_is_zero_for_the_memorized_image_only():
    a = _image(0)
    oracle = Oracle(a)
    others = torch.cat([_image(i) for i in range(1, 5)])
    ts = (5, 50, 95)
    assert denoising_loss(oracle, a, ABAR, timesteps=ts) == pytest.approx(0.0, abs=1e-10)
    sig = membership_signal(oracle, others, a.expand(3, -1, -1, -1), ABAR, timesteps=ts)
    assert sig["forget_loss"] == pytest.approx(0.0, abs=1e-10)
    assert sig["retain_loss"] > 0.01
    # closed form for another image b: pred - eps = sqrt(abar_t) (b - a) / sqrt(1 - abar_t)
    b = others[:1]
    expected = sum((ABAR[t] / (1 - ABAR[t])).item() * (b - a).square().mean().item() for t in ts) / len(ts)
    assert denoising_loss(oracle, b, ABAR, timesteps=ts) == pytest.approx(expected, rel=1e-4)


def test_denoising_loss_is_deterministic_and_checks_timesteps():
    oracle, b = Oracle(_image(0)), _image(1)
    assert denoising_loss(oracle, b, ABAR, seed=3) == denoising_loss(oracle, b, ABAR, seed=3)
    with pytest.raises(ValueError, match="timesteps"):
        denoising_loss(oracle, b, ABAR, timesteps=(T,))


def test_bits_per_dim_vlb_of_the_memorized_image_is_near_zero():
    a = torch.round((_image(0) + 1) * 127.5) / 127.5 - 1   # on the 8-bit grid
    oracle = Oracle(a)
    bpd_memorized = bits_per_dim_vlb(oracle, a, ABAR)
    # every KL term vanishes; what is left is the prior term (~0 here) and the decoder's 8-bit bin probability
    # under N(a, posterior variance at t = 1): -log(Phi(h / s) - Phi(-h / s)), h = 1/255 (interior pixels)
    abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), ABAR[:-1]])
    betas = 1 - ABAR / abar_prev
    s = math.sqrt(betas[1] * (1 - abar_prev[1]) / (1 - ABAR[1]))
    z = (1 / 255) / s
    decoder_nats = -math.log(0.5 * (math.erf(z / math.sqrt(2)) - math.erf(-z / math.sqrt(2))))
    assert bool((a.abs() < 0.999).all())
    assert bpd_memorized == pytest.approx(decoder_nats / math.log(2), rel=1e-3)
    bpd_other = bits_per_dim_vlb(oracle, _image(1), ABAR)
    assert bpd_other > bpd_memorized + 1.0
    # the stratified estimate agrees with the full sum
    assert bits_per_dim_vlb(oracle, _image(1), ABAR, t_stride=4) == pytest.approx(bpd_other, rel=0.1)


def test_ddim_sampler_reaches_the_memorized_image_and_is_deterministic():
    a = _image(0) * 0.9
    oracle = Oracle(a)
    assert ddim_timesteps(T, 10)[0] == T - 1 and ddim_timesteps(T, 10)[-1] >= 0
    x = ddim_sample(oracle, ABAR, 6, (1, 4, 4), steps=10, seed=1, batch_size=4)
    assert x.shape == (6, 1, 4, 4)
    assert (x - a).abs().max().item() < 1e-4
    zero = nn.Conv2d(1, 1, 1)
    nn.init.zeros_(zero.weight)
    nn.init.zeros_(zero.bias)
    model = lambda x, t: zero(x)  # noqa: E731
    model.parameters = zero.parameters
    y1 = ddim_sample(model, ABAR, 6, (1, 4, 4), steps=5, seed=2, batch_size=4)
    y2 = ddim_sample(model, ABAR, 4, (1, 4, 4), steps=5, seed=2, batch_size=4)
    assert torch.equal(y1[:4], y2)


def test_image_similarity():
    ref = _image(0)[0]
    imgs = torch.stack([ref, -ref, 0.5 * ref + 0.2])
    assert image_similarity(imgs, ref).tolist() == pytest.approx([1.0, -1.0, 1.0])


class _CondUNet(nn.Module):
    """eps = 0.1 x + mean of the text embedding (broadcast): the conditional-unconditional gap is known."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))

    def forward(self, x, t, encoder_hidden_states):
        return 0.1 * x + encoder_hidden_states.mean(dim=(1, 2)).view(-1, 1, 1, 1)


def test_noise_norm_signal_known_value():
    cond = torch.full((1, 3, 8), 0.5)
    uncond = torch.zeros(1, 3, 8)
    d, first, latents = noise_norm_signal(_CondUNet(), ABAR, cond, uncond, (2, 4, 4), n=3, steps=5,
                                          guidance_scale=2.0, batch_size=2)  # two chunks: norms land per sample
    assert d.shape == first.shape == (3,) and latents.shape == (3, 2, 4, 4)
    assert d.tolist() == pytest.approx([0.5 * math.sqrt(32)] * 3, rel=1e-5)
    assert first.tolist() == pytest.approx([0.5 * math.sqrt(32)] * 3, rel=1e-5)
    assert float(latents.abs().max()) > 1.0  # latents are not clamped like images
    d0, _, _ = noise_norm_signal(_CondUNet(), ABAR, uncond, uncond, (2, 4, 4), n=2, steps=5)
    assert d0.tolist() == pytest.approx([0.0, 0.0], abs=1e-7)


def test_engine_registry_plugins():
    validation = pytest.importorskip("siss_fast.engine.validation")
    import siss_fast.metrics  # noqa: F401  (registers on import)

    assert "forget_rate" in validation.list_metrics()
    ctx = validation.MetricContext(retain_images=torch.rand(4, 1, 16, 16), forget_images=torch.zeros(1, 1, 16, 16))
    fn = validation.get_metric("forget_rate").factory(ctx)
    samples = torch.cat([torch.zeros(1, 1, 16, 16), torch.ones(3, 1, 16, 16)])
    assert fn(samples) == pytest.approx(0.25)
    assert validation.get_metric("classifier_quality").higher_is_better
