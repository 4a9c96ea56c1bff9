"""siss_fast.objectives: every method of SPEC §5 on a tiny model, its draws, scales, conditioning and checks."""

import math

import pytest
import torch

import siss_fast as sf
from siss_fast.methods import get_method, method_names
from siss_fast.objectives import Objective, ObjectiveTerms, make_objective

METHODS = method_names()  # the built-in records

T = 1000
SHAPE = (2, 6, 5)
BATCH = 5


def alphas_cumprod():
    return torch.cumprod(1.0 - torch.linspace(1e-4, 0.02, T, dtype=torch.float32), dim=0)


class TinyNet(torch.nn.Module):
    """``model(x, t, encoder_hidden_states=None) -> tensor``; records its inputs."""

    def __init__(self, channels=SHAPE[0], hidden=4):
        super().__init__()
        self.conv = torch.nn.Conv2d(channels, channels, 3, padding=1)
        self.proj = torch.nn.Linear(hidden, channels)
        self.calls = []

    def forward(self, x, t, encoder_hidden_states=None):
        self.calls.append((x.detach().clone(), t.clone(), encoder_hidden_states))
        out = self.conv(x) + (t.float() / T).view(-1, 1, 1, 1)
        if encoder_hidden_states is not None:
            out = out + self.proj(encoder_hidden_states.mean(dim=1))[:, :, None, None]
        return out


class FreePrediction(torch.nn.Module):
    """The prediction is a free parameter P (B, ...): d loss / d P is d loss / d pred. Returns a tuple, like
    diffusers with return_dict=False."""

    def __init__(self):
        super().__init__()
        self.pred = torch.nn.Parameter(torch.randn(BATCH, *SHAPE, generator=torch.Generator().manual_seed(9)))
        self.calls = []

    def forward(self, x, t, **kwargs):
        self.calls.append((x.detach().clone(), t.clone(), kwargs))
        return (self.pred * 1.0,)


def batch(seed=0):
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.rand((BATCH, *SHAPE), generator=gen) * 2 - 1
    a0 = torch.rand((BATCH, *SHAPE), generator=gen) * 2 - 1
    return x0, a0


def draws(seed, lambd=None, t_range=(0, T - 1), uniform=False):
    """The documented draw order: timesteps, noise, mask (lambda methods), u (erasediff)."""
    gen = torch.Generator().manual_seed(seed)
    t = torch.randint(t_range[0], t_range[1] + 1, (BATCH,), generator=gen)
    noise = torch.randn((BATCH, *SHAPE), generator=gen)
    mask = torch.rand((BATCH,), generator=gen) < lambd if lambd is not None else None
    u = torch.rand((BATCH, *SHAPE), generator=gen) if uniform else None
    return t, noise, mask, u


def gen(seed):
    return torch.Generator().manual_seed(seed)


def noised(z, t, noise):
    """gamma_t z + sigma_t noise in float64, straight from the table."""
    abar = alphas_cumprod().double()[t].view(-1, 1, 1, 1)
    return abar.sqrt() * z.double() + (1 - abar).sqrt() * noise.double()


def mse_per_sample(pred, target):
    return (pred.double() - target.double()).square().flatten(1).mean(1)


EXPECTED_TERMS = {  # (has retain, has forget, forward passes)
    "siss": (True, True, 1),
    "siss_nois": (True, True, 2),
    "naive": (True, False, 1),
    "neggrad": (False, True, 1),
    "erasediff": (True, True, 2),
    "bernoulli": (True, True, 1),
}


@pytest.mark.parametrize("method", METHODS)
def test_each_method_terms_and_gradients(method):
    torch.manual_seed(0)
    model = TinyNet()
    x0, a0 = batch()
    terms = Objective(method, alphas_cumprod())(model, x0, a0, generator=gen(1))
    assert isinstance(terms, ObjectiveTerms)
    has_retain, has_forget, passes = EXPECTED_TERMS[method]
    assert len(model.calls) == passes
    assert (terms.retain is not None) == has_retain and (terms.forget is not None) == has_forget
    assert terms.timesteps.shape == (BATCH,)
    params = list(model.parameters())
    present = []
    for name, total, per_sample in (("retain", terms.retain, terms.retain_per_sample),
                                    ("forget", terms.forget, terms.forget_per_sample)):
        if total is None:
            assert per_sample is None
            continue
        assert total.dim() == 0 and torch.isfinite(total) and total >= 0
        assert per_sample.shape == (BATCH,)
        torch.testing.assert_close(per_sample.mean(), total)
        grads = torch.autograd.grad(total, params, allow_unused=True, retain_graph=True)
        assert all(g is None or torch.isfinite(g).all() for g in grads)
        assert any(g is not None and g.abs().sum() > 0 for g in grads)
        present.append((name, total.detach(), grads))
    # sign: a small step against a term's gradient lowers that (positive) term, same draws
    for name, total, grads in present:
        norm = sum(float(g.square().sum()) for g in grads if g is not None) ** 0.5
        saved = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, g in zip(params, grads):
                if g is not None:
                    p -= 1e-3 * g / norm
            stepped = Objective(method, alphas_cumprod())(model, x0, a0, generator=gen(1))
            assert getattr(stepped, name) < total, name
            for p, s in zip(params, saved):
                p.copy_(s)
    stats = terms.float_stats()
    assert all(isinstance(v, float) and math.isfinite(v) for v in stats.values())
    assert 0 <= stats["timestep_mean"] <= T - 1


def test_siss_equals_hand_computation_with_siss_loss():
    torch.manual_seed(0)
    model = TinyNet()
    x0, a0 = batch(2)
    h_x, h_a = torch.randn(BATCH, 3, 4), torch.randn(BATCH, 3, 4)
    terms = Objective("siss", alphas_cumprod(), lambd=0.5)(
        model, x0, a0, cond_x={"encoder_hidden_states": h_x}, cond_a={"encoder_hidden_states": h_a},
        generator=gen(3),
    )
    t, noise, mask, _ = draws(3, lambd=0.5)
    assert torch.equal(terms.timesteps, t) and torch.equal(terms.mask, mask)
    assert 0 < int(mask.sum()) < BATCH, "pick a seed whose mask mixes both components"
    gamma, sigma = sf.schedule_coefficients(alphas_cumprod(), t)
    noisy = sf.mixture_noise(x0, a0, noise, gamma, sigma, mask)
    cond = torch.where(mask.view(-1, 1, 1), h_a, h_x)
    seen_x, seen_t, seen_cond = model.calls[-1]
    assert torch.equal(seen_x, noisy) and torch.equal(seen_t, t) and torch.equal(seen_cond, cond)
    hand = sf.siss_loss(model(noisy, t, encoder_hidden_states=cond), noisy, x0, a0, gamma, sigma, 0.5)
    torch.testing.assert_close(terms.retain, hand.loss_x, rtol=1e-6, atol=0)
    torch.testing.assert_close(terms.forget, hand.loss_a, rtol=1e-6, atol=0)
    torch.testing.assert_close(terms.weight_x, hand.weight_x)
    torch.testing.assert_close(terms.weight_a, hand.weight_a)
    # the mixture sample really is gamma*(a0 if mask else x0) + sigma*noise
    expected = torch.where(mask.view(-1, 1, 1, 1), noised(a0, t, noise), noised(x0, t, noise))
    torch.testing.assert_close(noisy.double(), expected, rtol=1e-6, atol=1e-6)


def test_siss_gradient_scale_wrt_prediction():
    """d retain / d pred = 2 w_x (pred - eps_x) / (B D), likewise for the forget term (SPEC §4)."""
    model = FreePrediction()
    x0, a0 = batch(4)
    terms = Objective("siss", alphas_cumprod(), lambd=0.5, weight_clip=1.5)(model, x0, a0, generator=gen(5))
    t, noise, mask, _ = draws(5, lambd=0.5)
    m = model.calls[-1][0].double()
    abar = alphas_cumprod().double()[t].view(-1, 1, 1, 1)
    eps_x = (m - abar.sqrt() * x0.double()) / (1 - abar).sqrt()
    eps_a = (m - abar.sqrt() * a0.double()) / (1 - abar).sqrt()
    d = x0[0].numel()
    assert float(terms.weight_x.max()) <= 1.5 and float(terms.weight_a.max()) <= 1.5
    for total, w, eps in ((terms.retain, terms.weight_x, eps_x), (terms.forget, terms.weight_a, eps_a)):
        (grad,) = torch.autograd.grad(total, [model.pred], retain_graph=True)
        expected = 2 * w.double().view(-1, 1, 1, 1) * (model.pred.detach().double() - eps) / (BATCH * d)
        scale = float(expected.abs().max())
        torch.testing.assert_close(grad.double(), expected, rtol=1e-5, atol=1e-6 * scale)


@pytest.mark.parametrize("method", ["siss_nois", "naive", "neggrad", "erasediff"])
def test_plain_methods_against_formulas(method):
    """x_t, a_t built from the table in float64; targets eps (or u ~ U[0,1) for erasediff's forget term)."""
    model = FreePrediction()
    x0, a0 = batch(6)
    terms = Objective(method, alphas_cumprod(), t_range=(100, 200))(model, x0, a0, generator=gen(7))
    t, noise, _, u = draws(7, t_range=(100, 200), uniform=method == "erasediff")
    assert torch.equal(terms.timesteps, t) and terms.mask is None
    inputs = [call[0] for call in model.calls]
    pred = model.pred.detach()
    d = x0[0].numel()
    if terms.retain is not None:
        torch.testing.assert_close(inputs[0].double(), noised(x0, t, noise), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(terms.retain_per_sample.double(), mse_per_sample(pred, noise), rtol=1e-6, atol=0)
        (grad,) = torch.autograd.grad(terms.retain, [model.pred], retain_graph=True)
        torch.testing.assert_close(grad.double(), 2 * (pred.double() - noise.double()) / (BATCH * d))
    if terms.forget is not None:
        torch.testing.assert_close(inputs[-1].double(), noised(a0, t, noise), rtol=1e-6, atol=1e-6)
        target = u if method == "erasediff" else noise
        torch.testing.assert_close(terms.forget_per_sample.double(), mse_per_sample(pred, target), rtol=1e-6, atol=0)


def test_bernoulli_scaling_and_conditioning():
    lambd = 0.4
    model = FreePrediction()
    x0, a0 = batch(8)
    h_x, h_a = torch.zeros(BATCH, 2, 4), torch.ones(BATCH, 2, 4)
    terms = Objective("bernoulli", alphas_cumprod(), lambd=lambd)(
        model, x0, a0, cond_x={"encoder_hidden_states": h_x}, cond_a={"encoder_hidden_states": h_a},
        generator=gen(11),
    )
    t, noise, mask, _ = draws(11, lambd=lambd)
    assert torch.equal(terms.mask, mask) and 0 < int(mask.sum()) < BATCH
    seen_x, _, seen_kw = model.calls[-1]
    expected_input = torch.where(mask.view(-1, 1, 1, 1), noised(a0, t, noise), noised(x0, t, noise))
    torch.testing.assert_close(seen_x.double(), expected_input, rtol=1e-6, atol=1e-6)
    assert torch.equal(seen_kw["encoder_hidden_states"][:, 0, 0], mask.float())
    ell = mse_per_sample(model.pred.detach(), noise)
    zero = torch.zeros_like(ell)
    torch.testing.assert_close(terms.retain_per_sample.double(), torch.where(mask, zero, ell / (1 - lambd)))
    torch.testing.assert_close(terms.forget_per_sample.double(), torch.where(mask, ell, zero))


@pytest.mark.parametrize("method", ["siss", "siss_nois", "bernoulli", "neggrad"])
def test_full_retain_source_scaling(method):
    n, k = 10, 3
    x0, a0 = batch(12)
    torch.manual_seed(0)
    model = TinyNet()
    base = Objective(method, alphas_cumprod())(model, x0, a0, generator=gen(13))
    full = Objective(method, alphas_cumprod(), retain_source="full", n=n, k=k)(model, x0, a0, generator=gen(13))
    if base.retain is not None:
        torch.testing.assert_close(full.retain, base.retain * n / (n - k))
        torch.testing.assert_close(full.retain_per_sample, base.retain_per_sample * n / (n - k))
    torch.testing.assert_close(full.forget, base.forget * k / (n - k))
    torch.testing.assert_close(full.forget_per_sample, base.forget_per_sample * k / (n - k))


def test_t_range_and_shared_conditioning():
    model = TinyNet()
    x0, a0 = batch(14)
    h = torch.randn(BATCH, 3, 4)
    terms = Objective("siss", alphas_cumprod(), t_range=(990, 999))(
        model, x0, a0, cond_x={"encoder_hidden_states": h}, generator=gen(15)
    )
    assert int(terms.timesteps.min()) >= 990 and int(terms.timesteps.max()) <= 999
    assert torch.equal(model.calls[-1][2], h)  # cond_a defaults to cond_x
    terms = Objective("naive", alphas_cumprod(), t_range=[7, 7])(model, x0, a0)
    assert torch.equal(terms.timesteps, torch.full((BATCH,), 7))


def test_siss_without_generator_uses_default_rng():
    model = TinyNet()
    x0, a0 = batch(16)
    objective = make_objective("siss", alphas_cumprod(), lambd=0.0, weight_clip=10.0)
    torch.manual_seed(21)
    first = objective(model, x0, a0)
    torch.manual_seed(21)
    second = objective(model, x0, a0)
    assert torch.equal(first.retain, second.retain) and not bool(first.mask.any())
    assert float(first.weight_a.max()) <= 10.0


def test_rule_hints():
    assert set(METHODS) == set(EXPECTED_TERMS)
    for method in METHODS:
        assert Objective(method, alphas_cumprod()).rule_hint == get_method(method).rule
    rules = {m: get_method(m).rule for m in METHODS}
    assert rules["erasediff"] == "erasediff" and rules["siss"] == "rescale" and rules["naive"] is None


@pytest.mark.parametrize(
    "kwargs, exc, word",
    [
        (dict(method="sis"), ValueError, "method"),
        (dict(method="siss", lambd=-0.1), ValueError, "lambd"),
        (dict(method="siss", lambd=1.5), ValueError, "lambd"),
        (dict(method="siss", lambd="half"), TypeError, "lambd"),
        (dict(method="bernoulli", lambd=1.0), ValueError, "lambd"),
        (dict(method="bernoulli", lambd=0.0), ValueError, "lambd"),
        (dict(method="naive", lambd=0.5), ValueError, "lambd"),
        (dict(method="siss", weight_clip=0.0), ValueError, "weight_clip"),
        (dict(method="siss", weight_clip=-1.0), ValueError, "weight_clip"),
        (dict(method="siss", weight_clip=float("nan")), ValueError, "weight_clip"),
        (dict(method="siss_nois", weight_clip=2.0), ValueError, "weight_clip"),
        (dict(method="siss", retain_source="everything"), ValueError, "retain_source"),
        (dict(method="siss", retain_source="full"), ValueError, "n, k"),
        (dict(method="siss", retain_source="full", n=10), ValueError, "n, k"),
        (dict(method="naive", retain_source="full", n=10, k=2), ValueError, "retain_source"),
        (dict(method="erasediff", retain_source="full", n=10, k=2), ValueError, "retain_source"),
        (dict(method="siss", retain_source="full", n=3, k=3), ValueError, "n"),
        (dict(method="siss", n=10, k=0), ValueError, "k"),
        (dict(method="siss", n=10.5, k=2), TypeError, "n"),
        (dict(method="siss", t_range=(5, 3)), ValueError, "t_range"),
        (dict(method="siss", t_range=(0, T)), ValueError, "t_range"),
        (dict(method="siss", t_range=(-1, 10)), ValueError, "t_range"),
        (dict(method="siss", t_range=(1, 2, 3)), ValueError, "t_range"),
        (dict(method="siss", t_range=(0.5, 10)), TypeError, "t_range"),
        (dict(method="siss", alphas_cumprod=torch.ones(2, 3)), ValueError, "alphas_cumprod"),
        (dict(method="siss", alphas_cumprod=torch.arange(10)), ValueError, "alphas_cumprod"),
    ],
)
def test_bad_parameters_raise(kwargs, exc, word):
    kwargs = dict(kwargs)
    method = kwargs.pop("method")
    table = kwargs.pop("alphas_cumprod", alphas_cumprod())
    with pytest.raises(exc, match=word):
        Objective(method, table, **kwargs)


def test_bad_inputs_raise():
    objective = Objective("siss", alphas_cumprod())
    model = TinyNet()
    x0, a0 = batch(17)
    with pytest.raises(ValueError, match="a0"):
        objective(model, x0, a0[:2])
    with pytest.raises(TypeError, match="x0"):
        objective(model, x0.long(), a0)
    with pytest.raises(ValueError, match="x0"):
        objective(model, x0[:0], a0[:0])
