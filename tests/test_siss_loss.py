"""The fused SISS loss against the float64 oracle, on every backend available (SPEC §4, §9)."""

import math

import pytest
import torch

import siss_fast as sf
from siss_fast import testing as T

LAMBDAS = (0.0, 1e-6, 0.5, 1 - 1e-6, 1.0)
TIMESTEPS = (0, 1, 500, 999)
# (shape, non-contiguous?) — real sizes and awkward ones; the triton interpreter gets the small ones only
SHAPES = [
    ((1, 4, 64, 64), False),
    ((3, 4, 17, 23), False),
    ((16, 4, 17, 23), False),
    ((3, 4, 64, 64), True),
    ((2, 3, 256, 256), False),
]
RTOL = 1e-5


def in_dtype(expected: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The oracle as the output dtype can hold it: values that overflow become inf, underflows round."""
    info = torch.finfo(dtype)
    e = expected.to(torch.float64)
    outside = (e.abs() > info.max) | (e.abs() < info.tiny)
    return torch.where(outside, e.to(dtype).to(torch.float64), e)


def assert_per_sample(actual, expected, *, rtol=RTOL, what=""):
    exp = in_dtype(expected, actual.dtype)
    err = T.max_rel_error(actual, exp, floor=torch.finfo(actual.dtype).tiny)
    assert err <= rtol, f"{what}: relative error {err:.3g} > {rtol:g}\nactual={actual}\nexpected={exp}"


def views(case, noncontiguous):
    """Non-contiguous inputs: transposed copies viewed back to the original logical layout."""
    if not noncontiguous:
        return case
    out = dict(case)
    for k in ("pred", "noisy", "x0", "a0"):
        out[k] = case[k].transpose(-1, -2).contiguous().transpose(-1, -2)
        assert not out[k].is_contiguous()
    return out


def loss_args(c):
    return c["pred"], c["noisy"], c["x0"], c["a0"], c["gamma"], c["sigma"]


def too_slow(backend, shape):
    return backend == "triton" and math.prod(shape) > 3 * 4 * 64 * 64


@pytest.mark.parametrize("shape,noncontig", SHAPES)
@pytest.mark.parametrize("t", TIMESTEPS)
@pytest.mark.parametrize("scale", (1.0, 1e4))
def test_forward_matches_oracle(backend, shape, noncontig, t, scale):
    if too_slow(backend, shape) and t not in (0, 999):
        pytest.skip("interpreter: large shapes at the extreme timesteps only")
    c = views(T.make_case(shape, t=t, scale=scale, seed=hash((shape, t)) % 1000), noncontig)
    for lambd in LAMBDAS:
        for clip in (None, 2.0):
            got = sf.siss_loss(*loss_args(c), lambd, weight_clip=clip, reduction="none")
            want = T.oracle_siss_loss(*loss_args(c), lambd, clip)
            for name, a, e in zip(("loss_x", "loss_a", "weight_x", "weight_a"), got, want):
                assert a.dtype == torch.float32 and a.shape == (shape[0],)
                assert_per_sample(a, e, what=f"{name} lambd={lambd} clip={clip}")


@pytest.mark.parametrize("shape,noncontig", SHAPES)
@pytest.mark.parametrize("t", (0, 999))
def test_backward_matches_oracle(backend, shape, noncontig, t):
    """Gradients w.r.t. pred for upstream gradients that are not 1 (and one that is exactly 0)."""
    c = views(T.make_case(shape, t=t, seed=7), noncontig)
    gen = torch.Generator().manual_seed(3)
    g_x = torch.randn(shape[0], generator=gen, dtype=torch.float64)
    g_a = torch.randn(shape[0], generator=gen, dtype=torch.float64)
    g_a[0] = 0.0
    for lambd in (0.0, 0.5, 1.0):
        pred = c["pred"].detach().clone().requires_grad_(True)
        got = sf.siss_loss(pred, *loss_args(c)[1:], lambd, weight_clip=4.0, reduction="none")
        ((got.loss_x * g_x.float()).sum() + (got.loss_a * g_a.float()).sum()).backward()
        want = T.oracle_grad(*loss_args(c), lambd, 4.0, g_x, g_a)
        assert pred.grad.dtype == pred.dtype and pred.grad.shape == pred.shape
        err = T.norm_rel_error(pred.grad, want)
        assert err <= RTOL, f"grad lambd={lambd}: norm-wise relative error {err:.3g}"


@pytest.mark.parametrize("reduction", ("mean", "sum", "none"))
def test_reductions(backend, reduction):
    c = T.make_case((3, 4, 17, 23), t=700, seed=11)
    pred = c["pred"].clone().requires_grad_(True)
    got = sf.siss_loss(pred, *loss_args(c)[1:], 0.5, reduction=reduction)
    ell_x, ell_a, _, _ = T.oracle_siss_loss(*loss_args(c), 0.5)
    d = 4 * 17 * 23
    expected = {"mean": (ell_x.mean(), ell_a.mean()), "sum": (d * ell_x.sum(), d * ell_a.sum()),
                "none": (ell_x, ell_a)}[reduction]
    assert_per_sample(got.loss_x.reshape(-1), expected[0].reshape(-1), what="loss_x")
    assert_per_sample(got.loss_a.reshape(-1), expected[1].reshape(-1), what="loss_a")
    # the "mean" gradient is the SPEC's 2 w (pred - eps)/(B D)
    if reduction == "mean":
        got.loss_x.backward()
        eps_x = (c["noisy"].double() - c["gamma"].double().view(-1, 1, 1, 1) * c["x0"].double()) / c["sigma"].double().view(-1, 1, 1, 1)
        want = 2 * got.weight_x.double().view(-1, 1, 1, 1) * (c["pred"].double() - eps_x) / (3 * d)
        assert T.norm_rel_error(pred.grad, want) <= RTOL


@pytest.mark.parametrize("pred_dtype,latent_dtype", [
    (torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32),
])
def test_low_precision_within_twice_reference_error(backend, pred_dtype, latent_dtype):
    """fp16/bf16: error against fp64 at most 2x that of plain PyTorch in the same dtype, plus a floor (one bf16 ulp
    for the Triton interpreter, whose downcast truncates)."""
    c = T.make_case((3, 4, 32, 32), t=400, dtype=latent_dtype, pred_dtype=pred_dtype, seed=5)
    want = T.oracle_siss_loss(*loss_args(c), 0.5)
    # plain PyTorch in the same dtype: the research formulation, per sample
    g = c["gamma"].to(latent_dtype).view(-1, 1, 1, 1)
    s = c["sigma"].to(latent_dtype).view(-1, 1, 1, 1)
    eps_x = (c["noisy"] - g * c["x0"]) / s
    plain = ((c["pred"].to(latent_dtype) - eps_x) ** 2).flatten(1).mean(1) * want[2]
    plain_err = T.max_rel_error(plain, want[0])
    got = sf.siss_loss(*loss_args(c), 0.5, reduction="none")
    floor = 2 ** -7 if backend == "triton" else 1e-6
    err = T.max_rel_error(got.loss_x, want[0])
    assert err <= 2 * plain_err + floor, f"{err:.3g} vs plain {plain_err:.3g}"
    assert_per_sample(got.weight_x, want[2], rtol=1e-3, what="weight_x")

    pred = c["pred"].clone().requires_grad_(True)
    sf.siss_loss(pred, *loss_args(c)[1:], 0.5).loss_x.backward()
    assert pred.grad.dtype == pred_dtype
    g_want = T.oracle_grad(*loss_args(c), 0.5, None, torch.full((3,), 1 / 3, dtype=torch.float64),
                           torch.zeros(3, dtype=torch.float64))
    assert T.norm_rel_error(pred.grad, g_want) <= 2 * torch.finfo(pred_dtype).eps


def test_fp64_inputs_compute_in_fp64(backend):
    c = T.make_case((3, 4, 17, 23), t=999, dtype=torch.float64, seed=2)
    got = sf.siss_loss(*loss_args(c), 0.5, reduction="none")
    want = T.oracle_siss_loss(*loss_args(c), 0.5)
    assert got.loss_x.dtype == torch.float64
    for a, e in zip(got, want):
        assert T.max_rel_error(a, e) <= 1e-12


def test_weights_carry_no_gradient(backend):
    c = T.make_case((2, 4, 8, 8), t=900, seed=4)
    pred = c["pred"].clone().requires_grad_(True)
    got = sf.siss_loss(pred, *loss_args(c)[1:], 0.5)
    assert got.loss_x.requires_grad and got.loss_a.requires_grad
    assert not got.weight_x.requires_grad and not got.weight_a.requires_grad


def test_unused_infinite_weight_gives_no_nan(backend):
    """lambd = 0 without clipping: w_a = e^delta overflows; backpropagating loss_x alone must stay finite."""
    c = T.make_case((2, 4, 17, 23), t=0, scale=10.0, seed=8, mask=torch.tensor([True, True]))
    pred = c["pred"].clone().requires_grad_(True)
    got = sf.siss_loss(pred, *loss_args(c)[1:], 0.0)
    assert torch.isinf(got.weight_a).any()
    got.loss_x.backward()
    assert torch.isfinite(pred.grad).all()
