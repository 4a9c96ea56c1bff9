"""Extreme magnitudes on every backend (SPEC §8): for finite inputs no NaN, inf only where the exact value overflows
the output dtype, and the oracle's value wherever it is finite.

The table: input magnitudes 1e-30 .. 1e30 (fp32) x t in {0 (sigma = 0.01), 999} x lambda in {0, 0.5, 1} x clip in
{None, 5}, forward and backward; fp64 inputs up to 1e200; denormal inputs. Before the fix every backend returned NaN
here from 1e20 on (fp32 products overflowing to inf, then inf - inf or 0 * inf).

The oracle below (also used by tests/test_properties.py) is float64 and exact enough even where float64 itself
would overflow: all four inputs are scaled by 2^-k (exact), which scales delta, the squared errors and sse by
2^-2k, and the scale is put back per sample with frexp/ldexp in Python. The delta is one direct sum (not the
difference of two large sums), so its own rounding stays far below the kernels'.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

import siss_fast as sf
from siss_fast import testing as T

SCALES = (1e-30, 1e-20, 1e-5, 1.0, 1e5, 1e15, 1e20, 1e30)
RTOL = 1e-5


def _b(v, like):
    return v.reshape(-1, *([1] * (like.dim() - 1)))


def _times_pow2(x: float, e: int) -> float:
    """x * 2^e in Python floats, inf on overflow (math.ldexp raises instead)."""
    try:
        return math.ldexp(x, e)
    except OverflowError:
        return math.copysign(math.inf, x)


def _product(w: float, mean: float, e: int) -> float:
    """w * mean * 2^e for w, mean >= 0: 0 if either is 0 (exact: the other is finite in exact arithmetic)."""
    if w == 0.0 or mean == 0.0:
        return 0.0
    if math.isinf(w):
        return math.inf
    f_w, e_w = math.frexp(w)
    f_m, e_m = math.frexp(mean)
    return _times_pow2(f_w * f_m, e_w + e_m + e)


def exact_oracle(pred, noisy, x0, a0, gamma, sigma, lambd, clip, grad_x=None, grad_a=None, shift=None):
    """fp64 ``(ell_x, ell_a, w_x, w_a)`` per sample, the conditioning ``sum_i |term_i| / (2 sigma^2)`` of delta, and
    (with upstream gradients) dpred, all with values that overflow fp64 as +inf.

    ``shift``: the inputs are multiplied by 2^-shift (default: enough to keep fp64 products finite).
    """
    p, m, x, a = (t.detach().to(torch.float64) for t in (pred, noisy, x0, a0))
    if shift is None:
        peak = max(float(t.abs().max()) for t in (p, m, x, a)) if p.numel() else 0.0
        shift = max(0, math.frexp(peak)[1] - 400) if peak > 0 else 0
    p, m, x, a = (torch.ldexp(t, torch.tensor(-shift)) for t in (p, m, x, a))
    g, s = _b(gamma.double(), p), _b(sigma.double(), p)
    batch = p.shape[0]
    d = p[0].numel()
    u_x, u_a = m - g * x, m - g * a
    terms = (g * (a - x)) * (u_x + u_a)
    r_x, r_a = p - u_x / s, p - u_a / s
    two_s2 = (2 * sigma.double() ** 2).tolist()
    delta_scaled = terms.reshape(batch, -1).sum(1).tolist()
    cond_scaled = terms.abs().reshape(batch, -1).sum(1).tolist()
    sse_x = r_x.square().reshape(batch, -1).sum(1).tolist()
    sse_a = r_a.square().reshape(batch, -1).sum(1).tolist()
    delta = torch.tensor([_times_pow2(v / t, 2 * shift) for v, t in zip(delta_scaled, two_s2)], dtype=torch.float64)
    cond = torch.tensor([_times_pow2(v / t, 2 * shift) for v, t in zip(cond_scaled, two_s2)], dtype=torch.float64)
    w_x, w_a = T.oracle_weights(delta, lambd, clip)
    ell_x = torch.tensor([_product(w, v / d, 2 * shift) for w, v in zip(w_x.tolist(), sse_x)], dtype=torch.float64)
    ell_a = torch.tensor([_product(w, v / d, 2 * shift) for w, v in zip(w_a.tolist(), sse_a)], dtype=torch.float64)
    out = {"ell_x": ell_x, "ell_a": ell_a, "w_x": w_x, "w_a": w_a, "delta": delta, "cond": cond}
    if grad_x is not None:
        # dpred = sum_k 2 g_k w_k r_k / D, each term 0 where g w == 0 or r == 0; r_true = r' * 2^shift
        grad = torch.zeros_like(p)
        terms_out = []
        for gk, wk, rk in ((grad_x, w_x, r_x), (grad_a, w_a, r_a)):
            c = gk.double() * wk * (2.0 / d)
            c = torch.where((gk.double() == 0) | (wk == 0), torch.zeros_like(c), c)
            cb = _b(c, rk)
            term = torch.ldexp(torch.ldexp(cb * rk, torch.tensor(shift // 2)), torch.tensor(shift - shift // 2))
            term = torch.where((cb == 0) | (rk == 0), torch.zeros_like(term), term)
            terms_out.append(term)
            grad = grad + term
        out["grad"] = grad
        out["grad_terms"] = terms_out
    return out


def in_dtype(expected: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The exact value as ``dtype`` holds it: inf where it overflows, rounded where it underflows."""
    info = torch.finfo(dtype)
    e = expected.to(torch.float64)
    outside = (e.abs() > info.max) | (e.abs() < info.tiny)
    return torch.where(outside, e.to(dtype).to(torch.float64), e)


def weight_sensitivity(w_x, w_a, lambd):
    """|d log w / d delta| per weight: 1 - (1-lambda) w_x and 1 - lambda w_a (in [0, 1]); a relative error e of
    delta becomes a relative error of about e * |delta| * sensitivity of the weight."""
    sens_x = torch.nan_to_num((1 - (1 - lambd) * w_x).abs(), nan=1.0, posinf=1.0).clamp(0, 1)
    sens_a = torch.nan_to_num((1 - lambd * w_a).abs(), nan=1.0, posinf=1.0).clamp(0, 1)
    return sens_x, sens_a


def weight_tolerance(rtol, d_delta, sens):
    """rtol + |delta error| * sensitivity, exactly rtol where the weight does not depend on delta."""
    extra = torch.where(sens == 0, torch.zeros_like(sens), torch.nan_to_num(d_delta, nan=math.inf) * sens)
    return rtol + extra


def check_per_sample(name, actual, exact, tol, *, allow_inf=None):
    """No NaN; inf exactly where the exact value overflows the output dtype (up to a rounding at the boundary, or
    where ``allow_inf``); elsewhere relative error <= tol (per sample tensor), with a floor of the dtype's tiny."""
    a = actual.detach().to(torch.float64).cpu()
    e = in_dtype(exact, actual.dtype)
    info = torch.finfo(actual.dtype)
    assert not torch.isnan(a).any(), f"{name}: NaN for finite inputs: {a.tolist()}"
    near_max = e.abs() >= info.max * (1 - 1e-4)
    bad_inf = torch.isinf(a) & ~torch.isinf(e) & ~near_max
    if allow_inf is not None:
        bad_inf &= ~allow_inf
    assert not bad_inf.any(), f"{name}: inf where the exact value {e.tolist()} is finite: {a.tolist()}"
    missing_inf = torch.isinf(e) & ~torch.isinf(a) & ~(a.abs() >= info.max * (1 - 1e-4))
    assert not missing_inf.any(), f"{name}: finite {a.tolist()} where the exact value overflows"
    both = torch.isfinite(a) & torch.isfinite(e)
    err = (a - e).abs() / e.abs().clamp(min=info.tiny)
    tol = torch.as_tensor(tol, dtype=torch.float64).expand_as(err)
    bad = both & (err > tol)
    assert not bad.any(), f"{name}: relative error {err[bad].tolist()} > {tol[bad].tolist()}\n{a=}\n{e=}"


def check_grad(name, actual, exact, tol, weight_inf, bound=None):
    """The gradient: no NaN; inf only where the exact value overflows pred's dtype or where a saved weight is
    itself inf (lambda in {0, 1} without clip: the backward sees only that inf); norm-wise relative error <= tol,
    plus ``bound`` (elementwise: what the weights' own tolerance allows)."""
    a = actual.detach().to(torch.float64).cpu()
    e = in_dtype(exact, actual.dtype)
    info = torch.finfo(actual.dtype)
    assert not torch.isnan(a).any(), f"{name}: NaN in the gradient for finite inputs"
    allowed = torch.isinf(e) | (e.abs() >= info.max * (1 - 1e-3)) | _b(weight_inf, a).expand_as(a)
    assert not (torch.isinf(a) & ~allowed).any(), f"{name}: inf in the gradient where the exact value is finite"
    both = torch.isfinite(a) & torch.isfinite(e) & ~_b(weight_inf, a).expand_as(a)
    if both.any():
        scale = max(float(e[both].abs().max()), info.tiny)
        excess = (a - e).abs() - (bound if bound is not None else 0.0)
        err = float(excess[both].max()) / scale
        assert err <= tol, f"{name}: norm-wise relative error {err:.3g} > {tol:.3g}"


def interpreted_triton() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def loss_args(c):
    return c["pred"], c["noisy"], c["x0"], c["a0"], c["gamma"], c["sigma"]


def run_and_check(c, lambd, clip, grad_x, grad_a, *, grad_tol):
    """siss_loss forward + backward through the public API against :func:`exact_oracle`."""
    pred = c["pred"].detach().clone().requires_grad_(True)
    got = sf.siss_loss(pred, *loss_args(c)[1:], lambd, weight_clip=clip, reduction="none")
    acc = got.loss_x.dtype
    ex = exact_oracle(*loss_args(c), lambd, clip, grad_x, grad_a)
    eps = torch.finfo(acc).eps
    rtol = RTOL if acc == torch.float32 else 1e-10
    # delta is a sum in acc of terms of both signs: its absolute error is a few eps times sum |terms| / (2 sigma^2);
    # fp32 (fp64) cannot do better. Through a weight it becomes a relative error * |d log w / d delta|.
    d_delta = 4 * eps * ex["cond"]
    sens_x, sens_a = weight_sensitivity(ex["w_x"], ex["w_a"], lambd)
    tol_x, tol_a = weight_tolerance(rtol, d_delta, sens_x), weight_tolerance(rtol, d_delta, sens_a)
    check_per_sample("weight_x", got.weight_x, ex["w_x"], tol_x)
    check_per_sample("weight_a", got.weight_a, ex["w_a"], tol_a)
    check_per_sample("loss_x", got.loss_x, ex["ell_x"], tol_x + rtol)
    check_per_sample("loss_a", got.loss_a, ex["ell_a"], tol_a + rtol)
    # upstream gradients not 1, one of them 0 (an unused term must add nothing, even with an infinite weight)
    total = (got.loss_x * grad_x.to(acc)).sum() + (got.loss_a * grad_a.to(acc)).sum()
    total.backward()
    w_inf = torch.isinf(got.weight_x.detach()) | torch.isinf(got.weight_a.detach())
    term_x, term_a = ex["grad_terms"]
    bound = term_x.abs() * _b(tol_x, term_x) + term_a.abs() * _b(tol_a, term_a)
    check_grad("grad", pred.grad, ex["grad"], grad_tol, w_inf.cpu(), torch.nan_to_num(bound, nan=math.inf))
    return got


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("t", (0, 999))
def test_extreme_table_fp32(backend, scale, t):
    c = T.make_case((3, 2, 5, 7), t=t, scale=scale, seed=1)
    gen = torch.Generator().manual_seed(5)
    grad_x = torch.randn(3, generator=gen, dtype=torch.float64)
    grad_a = torch.randn(3, generator=gen, dtype=torch.float64)
    grad_a[1] = 0.0
    for lambd in (0.0, 0.5, 1.0):
        for clip in (None, 5.0):
            run_and_check(c, lambd, clip, grad_x, grad_a, grad_tol=RTOL)


@pytest.mark.parametrize("scale", (1e-150, 1e-30, 1e30, 1e150, 1e200))
@pytest.mark.parametrize("t", (0, 999))
def test_extreme_fp64(backend, scale, t):
    """fp64 inputs: products of 1e150-magnitude values overflow fp64; the scaled wide path keeps them exact."""
    c = T.make_case((2, 3, 5, 5), t=t, scale=scale, seed=3, dtype=torch.float64)
    c["gamma"], c["sigma"] = c["gamma"].double(), c["sigma"].double()
    grad_x = torch.tensor([0.7, -1.3], dtype=torch.float64)
    grad_a = torch.tensor([0.0, 0.4], dtype=torch.float64)
    for lambd in (0.0, 0.5, 1.0):
        for clip in (None, 5.0):
            run_and_check(c, lambd, clip, grad_x, grad_a, grad_tol=1e-10)


@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16))
def test_denormal_inputs(backend, dtype):
    """Subnormal inputs at t = 0: exact values, no NaN."""
    if backend == "triton" and dtype == torch.bfloat16 and interpreted_triton():
        pytest.skip("the Triton interpreter converts subnormal bf16 <-> fp32 wrongly (5e-40 -> 2e-39); GPUs do not")
    info = torch.finfo(dtype)
    c = T.make_case((2, 1, 3, 5), t=0, scale=1.0, seed=4, dtype=dtype)
    gen = torch.Generator().manual_seed(9)
    for k in ("x0", "a0", "noise", "pred"):
        c[k] = (torch.rand(c[k].shape, generator=gen, dtype=torch.float64) * info.tiny).to(dtype)
    c["noisy"] = T.oracle_mixture_noise(c["x0"], c["a0"], c["noise"], c["gamma"], c["sigma"], c["mask"]).to(dtype)
    grad_x = torch.tensor([1.0, 0.5], dtype=torch.float64)
    grad_a = torch.tensor([-0.5, 0.0], dtype=torch.float64)
    for lambd in (0.0, 0.5, 1.0):
        for clip in (None, 5.0):
            run_and_check(c, lambd, clip, grad_x, grad_a, grad_tol=2 * max(RTOL, torch.finfo(dtype).eps))


def test_huge_weight_times_tiny_error(backend):
    """lambda = 0 without clip: w_a = e^delta can exceed fp32 while ell_a = w_a * sse_a / D is representable (the
    squared errors underflow fp32): ell must be the exact finite value, and w_a = inf is the only allowed inf."""
    g = torch.tensor([1.0, 1.0])
    s = torch.tensor([1.0, 1.0])
    x0 = torch.zeros(2, 8)
    a0 = torch.full((2, 8), 1.0)
    noisy = torch.full((2, 8), 12.0)  # delta = sum (a0 - x0)(2m - x0 - a0) / 2 = 8 * 23 / 2 = 92 > log(fp32 max)
    pred = noisy - a0 + torch.full((2, 8), 1e-20)  # pred - eps_a = 1e-20: squares 1e-40 (subnormal in fp32)
    got = sf.siss_loss(pred, noisy, x0, a0, g, s, 0.0, reduction="none")
    ex = exact_oracle(pred, noisy, x0, a0, g, s, 0.0, None)
    assert torch.isinf(got.weight_a).all()
    check_per_sample("loss_a", got.loss_a, ex["ell_a"], 1e-4)  # the residual 1e-20 is itself rounded in fp32
    assert torch.isfinite(got.loss_a).all()


@pytest.mark.parametrize("scale", (1e20, 1e30))
def test_mixture_noise_extreme(backend, scale):
    c = T.make_case((3, 2, 5, 7), t=0, scale=scale, seed=2)
    got = sf.mixture_noise(c["x0"], c["a0"], c["noise"], c["gamma"], c["sigma"], c["mask"])
    want = T.oracle_mixture_noise(c["x0"], c["a0"], c["noise"], c["gamma"], c["sigma"], c["mask"])
    assert torch.isfinite(got).all()
    assert T.max_rel_error(got.flatten(), want.flatten()) <= 1e-6


def test_importance_weights_extreme(backend):
    for scale in SCALES:
        c = T.make_case((3, 2, 5, 7), t=0, scale=scale, seed=6)
        for lambd in (0.0, 0.5, 1.0):
            w_x, w_a = sf.importance_weights(c["noisy"], c["x0"], c["a0"], c["gamma"], c["sigma"], lambd)
            ex = exact_oracle(c["noisy"], *loss_args(c)[1:], lambd, None)
            sens_x, sens_a = weight_sensitivity(ex["w_x"], ex["w_a"], lambd)
            d_delta = 4 * torch.finfo(torch.float32).eps * ex["cond"]
            check_per_sample("w_x", w_x, ex["w_x"], weight_tolerance(RTOL, d_delta, sens_x))
            check_per_sample("w_a", w_a, ex["w_a"], weight_tolerance(RTOL, d_delta, sens_a))
