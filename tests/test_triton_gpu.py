"""Compiled Triton kernels on a CUDA GPU: against the float64 reference, run-to-run determinism, int64 offsets,
and the public ops on the triton backend under ``torch.compile``. Skipped without CUDA (and under TRITON_INTERPRET=1,
where nothing is compiled)."""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from siss_fast import reference as R  # noqa: E402

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="compiled kernels only (TRITON_INTERPRET=1)"),
]

DEVICE = torch.device("cuda")
LAMBDAS = [0.0, 1e-6, 0.5, 1 - 1e-6, 1.0]
SHAPES = [(1, 7), (3, 5, 11), (4, 17, 23), (4, 64, 64), (16, 3, 32, 32), (3, 3, 256, 256)]


def _kernels():
    try:
        return importlib.import_module("siss_fast.kernels")
    except ImportError:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        return importlib.import_module("kernels")


def _noncontiguous(t: torch.Tensor) -> torch.Tensor:
    """Same values, transposed strides (B stays the leading dimension)."""
    return t.transpose(0, -1).contiguous().transpose(0, -1) if t.dim() >= 2 else t


def _inputs(shape, latent_dtype, pred_dtype, seed=0, noncontiguous=False):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    batch = shape[0]
    acc = torch.float64 if latent_dtype == torch.float64 else torch.float32
    d = 1
    for n in shape[1:]:
        d *= n
    # |delta| stays moderate (gamma^2/sigma^2 <= 9, ||a0 - x0|| = 2): fp32 knows delta only to ~|delta| * 6e-8,
    # so a relative 1e-5 bar on e^delta-like weights needs |delta| well below 100.
    x0 = torch.randn(shape, generator=gen, dtype=torch.float64)
    a0 = x0 + (2.0 / d**0.5) * torch.randn(shape, generator=gen, dtype=torch.float64)
    noise = torch.randn(shape, generator=gen, dtype=torch.float64)
    pred = torch.randn(shape, generator=gen, dtype=torch.float64)
    abar = torch.rand(batch, generator=gen, dtype=torch.float64) * 0.89 + 0.01
    mask = torch.rand(batch, generator=gen) < 0.5
    conv = _noncontiguous if noncontiguous else (lambda t: t)
    lat = [conv(t.to(DEVICE, latent_dtype)) for t in (x0, a0, noise)]
    return dict(
        x0=lat[0], a0=lat[1], noise=lat[2], pred=conv(pred.to(DEVICE, pred_dtype)),
        gamma=abar.sqrt().to(DEVICE, acc), sigma=(1 - abar).sqrt().to(DEVICE, acc), mask=mask.to(DEVICE),
    )


def _rel(a, b):
    """Max relative error over the entries whose reference value is finite and normal in a's dtype."""
    a64, b64 = a.double(), b.double()
    finite = torch.isfinite(b.to(a.dtype))
    assert torch.equal(torch.isfinite(a), finite), (a, b)
    tiny = torch.finfo(a.dtype).tiny * 1e8
    keep = finite & (b64.abs() > tiny)
    if not keep.any():
        return 0.0
    return ((a64 - b64).abs() / b64.abs())[keep].max().item()


def _normwise(a, b):
    a64, b64 = a.double(), b.double()
    return ((a64 - b64).norm() / b64.norm().clamp_min(1e-300)).item()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_float64_reference(shape, dtype):
    K = _kernels()
    inp = _inputs(shape, dtype, dtype, noncontiguous=True)
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    m = K.mixture_noise(inp["x0"], inp["a0"], inp["noise"], inp["gamma"], inp["sigma"], inp["mask"])
    m_ref = R.mixture_noise(*(inp[k].double() for k in ("x0", "a0", "noise", "gamma", "sigma")), inp["mask"])
    assert m.dtype == dtype and m.is_contiguous()
    assert _normwise(m, m_ref) < (1e-14 if dtype == torch.float64 else 1e-6)
    args = (inp["pred"], m, inp["x0"], inp["a0"], inp["gamma"], inp["sigma"])
    args64 = tuple(t.double() for t in args)
    for lambd in LAMBDAS:
        for clip in (None, 2.0):
            out = K.siss_loss_forward(*args, lambd, clip)
            ref = R.siss_loss_forward(*args64, lambd, clip)
            for name, o, r in zip(("ell_x", "ell_a", "w_x", "w_a"), out, ref):
                assert o.dtype == inp["gamma"].dtype and o.shape == (shape[0],)
                # fp32: the log-density gap itself is only known to ~|delta| * 6e-8; the inputs keep |delta| moderate.
                err = _rel(o, r)
                assert err < tol, f"{name} lambda={lambd} clip={clip}: rel err {err:.3e}"
            w_x, w_a = out[2], out[3]
            g_x = torch.linspace(0.5, 1.5, shape[0], device=DEVICE, dtype=w_x.dtype)
            g_a = -torch.linspace(0.2, 0.7, shape[0], device=DEVICE, dtype=w_x.dtype)
            if lambd == 0.0:
                g_a = torch.zeros_like(g_a)  # w_a may be inf there; an unused term must give 0, not NaN
            if lambd == 1.0:
                g_x = torch.zeros_like(g_x)
            grad = K.siss_loss_backward(g_x, g_a, w_x, w_a, *args)
            grad_ref = R.siss_loss_backward(g_x.double(), g_a.double(), w_x.double(), w_a.double(), *args64)
            assert grad.dtype == dtype and grad.shape == inp["pred"].shape and grad.is_contiguous()
            if torch.isfinite(grad_ref.to(dtype)).all():
                assert torch.isfinite(grad).all()
                assert _normwise(grad, grad_ref) < tol


@pytest.mark.parametrize(
    "pred_dtype,latent_dtype",
    [(torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32)],
)
def test_low_precision_within_twice_torch(pred_dtype, latent_dtype):
    """SPEC §9: error against fp64 at most 2x that of the plain-PyTorch reference in the same dtypes (+ a floor)."""
    K = _kernels()
    inp = _inputs((4, 4, 64, 64), latent_dtype, pred_dtype, seed=1, noncontiguous=True)
    m = K.mixture_noise(inp["x0"], inp["a0"], inp["noise"], inp["gamma"], inp["sigma"], inp["mask"])
    args = (inp["pred"], m, inp["x0"], inp["a0"], inp["gamma"], inp["sigma"])
    args64 = tuple(t.double() for t in args)
    for lambd in (0.0, 0.5, 1.0):
        out = K.siss_loss_forward(*args, lambd, 2.0)
        same = R.siss_loss_forward(*args, lambd, 2.0)
        ref = R.siss_loss_forward(*args64, lambd, 2.0)
        for o, s, r in zip(out, same, ref):
            assert _rel(o, r) <= 2 * _rel(s, r) + 2e-6
        g = torch.full((4,), 0.25, device=DEVICE, dtype=out[2].dtype)
        grad = K.siss_loss_backward(g, -g, out[2], out[3], *args)
        grad_same = R.siss_loss_backward(g, -g, out[2], out[3], *args)
        grad_ref = R.siss_loss_backward(g.double(), -g.double(), out[2].double(), out[3].double(), *args64)
        assert _normwise(grad, grad_ref) <= 2 * _normwise(grad_same, grad_ref) + 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bitwise_deterministic_run_to_run(dtype):
    K = _kernels()
    inp = _inputs((8, 4, 96, 96), dtype, dtype, seed=2)
    runs = []
    for _ in range(5):
        m = K.mixture_noise(inp["x0"], inp["a0"], inp["noise"], inp["gamma"], inp["sigma"], inp["mask"])
        out = K.siss_loss_forward(inp["pred"], m, inp["x0"], inp["a0"], inp["gamma"], inp["sigma"], 0.5, None)
        g = torch.ones(8, device=DEVICE, dtype=out[2].dtype)
        latents = (m, inp["x0"], inp["a0"], inp["gamma"], inp["sigma"])
        grad = K.siss_loss_backward(g, -g, out[2], out[3], inp["pred"], *latents)
        runs.append((m, *out, grad))
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


def test_int64_offsets():
    """B * D > 2**31: the last sample's results equal those computed on that sample alone (the reduction layout
    depends only on D, so they must be bitwise equal), which fails if an offset wraps around in int32."""
    total = torch.cuda.get_device_properties(DEVICE).total_memory
    if total < 60 * 2**30:
        pytest.skip("needs ~40 GiB of GPU memory")
    K = _kernels()
    batch, d = 3, 2**30 + 7
    gen = torch.Generator(device=DEVICE).manual_seed(3)
    x0, a0, noise = (torch.randn(batch, d, device=DEVICE, dtype=torch.float16, generator=gen) for _ in range(3))
    gamma = torch.tensor([0.9, 0.8, 0.7], device=DEVICE)
    sigma = (1 - gamma * gamma).sqrt()
    mask = torch.tensor([False, True, True], device=DEVICE)
    m = K.mixture_noise(x0, a0, noise, gamma, sigma, mask)
    last = slice(batch - 1, batch)
    m_last = K.mixture_noise(x0[last], a0[last], noise[last], gamma[last], sigma[last], mask[last])
    assert torch.equal(m[last], m_last)
    del noise
    out = K.siss_loss_forward(x0, m, x0, a0, gamma, sigma, 0.5, None)  # pred = x0: any tensor will do
    out_last = K.siss_loss_forward(x0[last], m[last], x0[last], a0[last], gamma[last], sigma[last], 0.5, None)
    for a, b in zip(out, out_last):
        assert torch.equal(a[last], b)
    g = torch.ones(batch, device=DEVICE)
    grad = K.siss_loss_backward(g, g, out[2], out[3], x0, m, x0, a0, gamma, sigma)
    grad_last = K.siss_loss_backward(
        g[last], g[last], out[2][last], out[3][last], x0[last], m[last], x0[last], a0[last], gamma[last], sigma[last]
    )
    assert torch.equal(grad[last], grad_last)


def test_public_ops_on_triton_under_compile():
    """The one public op per operation (``siss_fast::mixture_noise``, ``siss_fast::siss_loss`` and its backward)
    with the ``triton`` backend beneath it matches the plain launchers, eager and under
    ``torch.compile(fullgraph=True)``."""
    import siss_fast as sf

    K = _kernels()
    inp = _inputs((4, 4, 32, 32), torch.float32, torch.float32, seed=4)

    def step(pred, x0, a0, noise, gamma, sigma, mask):
        m = sf.mixture_noise(x0, a0, noise, gamma, sigma, mask)
        terms = sf.siss_loss(pred, m, x0, a0, gamma, sigma, 0.5, weight_clip=2.0, reduction="none")
        (grad,) = torch.autograd.grad((terms.loss_x - terms.loss_a).sum(), pred)
        return m, terms.loss_x, terms.loss_a, terms.weight_x, terms.weight_a, grad

    args = (inp["pred"].clone().requires_grad_(True), inp["x0"], inp["a0"], inp["noise"], inp["gamma"],
            inp["sigma"], inp["mask"])
    previous = sf.get_backend()
    sf.set_backend("triton")
    try:
        eager = step(*args)
        m = K.mixture_noise(*args[1:])
        plain = K.siss_loss_forward(inp["pred"], m, inp["x0"], inp["a0"], inp["gamma"], inp["sigma"], 0.5, 2.0)
        g = torch.ones_like(plain[2])
        plain = (m, *plain, K.siss_loss_backward(g, -g, plain[2], plain[3], inp["pred"], m, inp["x0"], inp["a0"],
                                                  inp["gamma"], inp["sigma"]))
        for a, b in zip(eager, plain):
            assert torch.equal(a, b)
        compiled = torch.compile(step, fullgraph=True)(*args)
        for a, b in zip(compiled, eager):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    finally:
        sf.set_backend(previous)
