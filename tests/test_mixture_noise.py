"""Mixture forward noising (SPEC §3) and schedule coefficients against the float64 oracle."""

import pytest
import torch

import siss_fast as sf
from siss_fast import testing as T


@pytest.mark.parametrize("shape", [(1, 4, 64, 64), (3, 4, 17, 23), (16, 3, 5, 7), (2, 3, 256, 256)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("t", (0, 999))
def test_mixture_noise_matches_oracle(backend, shape, dtype, t):
    if backend == "triton" and shape[-1] == 256 and dtype != torch.float32:
        pytest.skip("interpreter: one dtype at the large size")
    c = T.make_case(shape, t=t, dtype=dtype, scale=3.0, seed=1)
    c["mask"][0] = True  # both components present
    if shape[0] > 1:
        c["mask"][1] = False
    got = sf.mixture_noise(c["x0"], c["a0"], c["noise"], c["gamma"], c["sigma"], c["mask"])
    want = T.oracle_mixture_noise(c["x0"], c["a0"], c["noise"], c["gamma"], c["sigma"], c["mask"])
    assert got.dtype == dtype and got.shape == shape and got.is_contiguous()
    # fp32 math, one rounding to the output dtype (the interpreter truncates: one ulp)
    ulp = torch.finfo(dtype).eps
    tol = {torch.float64: 1e-15, torch.float32: 1e-6}.get(dtype, 2 * ulp)
    assert T.norm_rel_error(got, want) <= tol


def test_mixture_noise_noncontiguous_and_gradients(backend):
    c = T.make_case((3, 4, 9, 11), t=250, dtype=torch.float64, seed=2)
    x0 = c["x0"].transpose(-1, -2).contiguous().transpose(-1, -2).requires_grad_(True)
    a0 = c["a0"].clone().requires_grad_(True)
    noise = c["noise"][:, :, :, :].clone().requires_grad_(True)
    g, s = c["gamma"].double(), c["sigma"].double()
    assert torch.autograd.gradcheck(
        lambda x, a, n: sf.mixture_noise(x, a, n, g, s, c["mask"]), (x0, a0, noise), eps=1e-6, atol=1e-8
    )


def test_mixture_noise_mask_semantics(backend):
    x0 = torch.zeros(2, 3)
    a0 = torch.ones(2, 3)
    noise = torch.zeros(2, 3)
    out = sf.mixture_noise(x0, a0, noise, torch.tensor([2.0, 2.0]), torch.tensor([1.0, 1.0]), torch.tensor([True, False]))
    assert out.tolist() == [[2.0, 2.0, 2.0], [0.0, 0.0, 0.0]]


def test_schedule_coefficients_fp64_sqrt():
    abar = T.linear_alphas_cumprod()
    t = torch.tensor([0, 1, 500, 999])
    gamma, sigma = sf.schedule_coefficients(abar, t)
    assert gamma.dtype == sigma.dtype == torch.float32
    assert torch.equal(gamma, abar[t].sqrt().float())
    assert torch.equal(sigma, (1 - abar[t]).sqrt().float())
    # an fp32 table is still square-rooted in fp64
    g32, s32 = sf.schedule_coefficients(abar.float(), t, dtype=torch.float64)
    assert torch.equal(s32, (1 - abar.float().double()[t]).sqrt())
