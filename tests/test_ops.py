"""The op registry: torch.library.opcheck, gradcheck in fp64, torch.compile(fullgraph=True), SISSLoss."""

import pytest
import torch
from torch import nn

import siss_fast as sf
from siss_fast import ops
from siss_fast import testing as T


def normalised(c, dtype=torch.float32):
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    return (c["pred"].to(dtype), c["noisy"].to(dtype), c["x0"].to(dtype), c["a0"].to(dtype),
            c["gamma"].to(acc), c["sigma"].to(acc))


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64))
def test_opcheck_every_op(backend, dtype):
    c = T.make_case((3, 2, 5, 7), t=600, seed=1)
    pred, noisy, x0, a0, gamma, sigma = normalised(c, dtype)
    torch.library.opcheck(ops.mixture_noise, (x0, a0, c["noise"].to(dtype), gamma, sigma, c["mask"]))
    torch.library.opcheck(ops.mixture_noise,
                          (x0.requires_grad_(), a0, c["noise"].to(dtype), gamma, sigma, c["mask"]))
    x0 = x0.detach()
    for clip in (None, 3.0):
        torch.library.opcheck(ops.siss_loss, (pred.clone().requires_grad_(), noisy, x0, a0, gamma, sigma, 0.5, clip))
    w = torch.rand(3, dtype=gamma.dtype)
    torch.library.opcheck(ops.siss_loss_backward, (torch.randn(3, dtype=gamma.dtype), torch.randn(3, dtype=gamma.dtype),
                                                   w, w, pred, noisy, x0, a0, gamma, sigma))


def test_gradcheck_fp64(backend):
    c = T.make_case((2, 3, 4, 5), t=950, dtype=torch.float64, seed=2)
    pred = c["pred"].clone().requires_grad_(True)

    def f(p):
        terms = sf.siss_loss(p, c["noisy"], c["x0"], c["a0"], c["gamma"], c["sigma"], 0.4, reduction="none")
        return terms.loss_x, terms.loss_a

    assert torch.autograd.gradcheck(f, (pred,), eps=1e-6, atol=1e-9)


class TinyDenoiser(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.temb = nn.Embedding(1000, 4)

    def forward(self, x, t):
        return self.conv(x) + self.temb(t)[:, :, None, None]


def test_compiled_fullgraph_forward_backward_equals_eager(backend):
    if backend == "triton":
        pytest.skip("torch.compile of interpreter-run Triton kernels is covered by the GPU suite")
    torch.manual_seed(0)
    model = TinyDenoiser()
    c = T.make_case((3, 4, 8, 8), t=900, seed=3)

    def step(model, x0, a0, noise, timesteps, mask):
        gamma, sigma = sf.schedule_coefficients(T.linear_alphas_cumprod(), timesteps)
        noisy = sf.mixture_noise(x0, a0, noise, gamma, sigma, mask)
        terms = sf.siss_loss(model(noisy, timesteps), noisy, x0, a0, gamma, sigma, 0.5, weight_clip=10.0)
        return terms.loss_x - 0.3 * terms.loss_a

    args = (c["x0"], c["a0"], c["noise"], c["timesteps"], c["mask"])
    eager = step(model, *args)
    eager.backward()
    eager_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    with torch._dynamo.config.patch(error_on_recompile=False):
        out = compiled(model, *args)
    out.backward()
    torch.testing.assert_close(out, eager, rtol=1e-6, atol=0)
    for g, e in zip((p.grad for p in model.parameters()), eager_grads):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-7)


def test_compiled_inductor_fullgraph(backend):
    """The real compiler (inductor) traces the ops without graph breaks and gives the eager result."""
    if backend == "triton":
        pytest.skip("covered by the GPU suite")
    c = T.make_case((2, 4, 8, 8), t=500, seed=4)

    def f(pred, noisy, x0, a0, gamma, sigma):
        t = sf.siss_loss(pred, noisy, x0, a0, gamma, sigma, 0.5)
        return t.loss_x * 2 - t.loss_a

    args = normalised(c)
    torch._dynamo.reset()
    got = torch.compile(f, fullgraph=True)(*args)
    torch.testing.assert_close(got, f(*args), rtol=1e-6, atol=0)


def test_sissloss_module_matches_functional(backend):
    torch.manual_seed(0)
    model = TinyDenoiser()
    abar = T.linear_alphas_cumprod()
    loss_fn = sf.SISSLoss(abar, lambd=0.5, weight_clip=5.0)
    x0, a0 = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    terms = loss_fn(model, x0, a0, generator=torch.Generator().manual_seed(1))
    # the same draws, by hand
    gen = torch.Generator().manual_seed(1)
    t = torch.randint(0, 1000, (4,), generator=gen)
    noise = torch.randn(x0.shape, generator=gen)
    mask = torch.rand(4, generator=gen) < 0.5
    gamma, sigma = sf.schedule_coefficients(abar, t)
    noisy = sf.mixture_noise(x0, a0, noise, gamma, sigma, mask)
    want = sf.siss_loss(model(noisy, t), noisy, x0, a0, gamma, sigma, 0.5, weight_clip=5.0)
    for a, b in zip(terms, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    (terms.loss_x - terms.loss_a).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_sissloss_selects_forget_conditioning_per_sample(backend):
    seen = {}

    def model(x, t, cond):
        seen["cond"] = cond
        return x * 0 + cond.mean()

    loss_fn = sf.SISSLoss(T.linear_alphas_cumprod(), lambd=0.5)
    x0, a0 = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    mask = torch.tensor([True, False, True])
    loss_fn(model, x0, a0, model_kwargs={"cond": torch.zeros(3, 5)}, forget_model_kwargs={"cond": torch.ones(3, 5)},
            mask=mask)
    assert seen["cond"][:, 0].tolist() == [1.0, 0.0, 1.0]
