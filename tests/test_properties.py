"""Property tests (hypothesis) of every op on every backend available for CPU tensors, against the float64 oracle.

Random shapes (B 1-8, odd spatial sizes), dtypes (fp32, fp16, bf16, bf16 predictions with fp32 latents, fp64),
lambda including 0 and 1, weight clipping, magnitudes from 1e-30 to 1e30 (fp16: what it can hold; fp64: up to
1e150), sigma near 0 (t = 0), subnormal inputs, non-contiguous views. For finite inputs (SPEC §8): no NaN ever; inf
only where the exact value overflows the output dtype; where finite, the relative accuracy of SPEC §9.

Accuracy is loosened only where the working precision itself cannot do better: delta is a sum of terms of both
signs, so its absolute error is a few eps (fp32: 6e-8) times ``sum |terms| / (2 sigma^2)``; through a weight that
becomes a relative error times ``|d log w / d delta|`` (1 for lambda in {0, 1}, ~0 for a weight at its limit). With
|delta| >> 1 a tiny weight's relative error is therefore ~|delta| * 6e-8 in every fp32 implementation. Forward
outputs of fp16/bf16 inputs are held to the fp32 bar (the oracle uses the same rounded inputs; the arithmetic is
fp32); gradients in fp16/bf16 to two ulps of that dtype.

Profiles: ``ci`` (default; >= 500 cases per op over the three backends, derandomized) and ``nightly`` (10x), chosen
by ``HYPOTHESIS_PROFILE``. The Triton interpreter is slow, so it gets fewer cases than torch and cpp.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, assume, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import siss_fast as sf  # noqa: E402
from siss_fast import testing as T  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_extreme_values import (  # noqa: E402
    RTOL,
    check_per_sample,
    exact_oracle,
    in_dtype,
    interpreted_triton,
    run_and_check,
    weight_sensitivity,
    weight_tolerance,
)

# Cases per backend and op: the per-op total over the three backends is >= 500 in "ci".
EXAMPLES = {
    "ci": {"torch": 220, "cpp": 220, "triton": 80},
    "nightly": {"torch": 2200, "cpp": 2200, "triton": 800},
}
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
if PROFILE not in EXAMPLES:
    raise ValueError(f"HYPOTHESIS_PROFILE: expected one of {sorted(EXAMPLES)}, got {PROFILE!r}")

DTYPES = {
    "fp32": (torch.float32, torch.float32),
    "fp16": (torch.float16, torch.float16),
    "bf16": (torch.bfloat16, torch.bfloat16),
    "bf16_pred_fp32_latents": (torch.bfloat16, torch.float32),
    "fp64": (torch.float64, torch.float64),
}
# Decimal exponents of the input magnitude each latent dtype can hold (with room for randn and the mixture).
MAGNITUDES = {torch.float32: (-30, 30), torch.bfloat16: (-30, 30), torch.float16: (-4, 3), torch.float64: (-150, 150)}
ABAR = T.linear_alphas_cumprod()


def run_counted(check, backend: str) -> None:
    """Run a @given test and assert that it really executed the profile's number of valid cases."""
    executed = []
    check(executed)
    assert len(executed) >= EXAMPLES[PROFILE][backend], f"only {len(executed)} valid cases ran"


def case_settings(backend: str) -> settings:
    return settings(
        max_examples=EXAMPLES[PROFILE][backend],
        deadline=None,
        derandomize=PROFILE == "ci",
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )


@st.composite
def cases(draw, backend: str):
    """One random input set: a dict like ``testing.make_case`` plus lambd, clip and upstream gradients."""
    combo = draw(st.sampled_from(sorted(DTYPES)))
    pred_dtype, lat_dtype = DTYPES[combo]
    batch = draw(st.integers(1, 8 if backend != "triton" else 4))
    shape = (batch, draw(st.integers(1, 3)), draw(st.sampled_from([1, 3, 5, 7])), draw(st.sampled_from([1, 3, 5, 9])))
    lo, hi = MAGNITUDES[lat_dtype]
    k = draw(st.integers(lo, hi))
    # pred and noise at their own magnitude near the latents' (large weights times small errors, and back)
    k_pred = min(hi, max(lo, k + draw(st.integers(-3, 3))))
    k_noise = min(hi, max(lo, k + draw(st.integers(-3, 3))))
    t = draw(st.one_of(st.just(0), st.just(999), st.integers(0, 999)))
    lambd = draw(st.one_of(st.sampled_from([0.0, 1.0, 0.5, 1e-6, 1 - 1e-6]), st.floats(0.0, 1.0)))
    clip = draw(st.one_of(st.none(), st.floats(0.1, 100.0)))
    noncontig = draw(st.booleans()) and shape[2] > 1 and shape[3] > 1
    # subnormal inputs; the Triton interpreter converts subnormal bf16 wrongly (a GPU does not): not there
    bf16 = torch.bfloat16 in (pred_dtype, lat_dtype)
    denormal = draw(st.integers(0, 4)) == 0 and not (backend == "triton" and bf16 and interpreted_triton())
    seed = draw(st.integers(0, 2**31 - 1))

    gen = torch.Generator().manual_seed(seed)
    timesteps = torch.full((batch,), t, dtype=torch.long)
    acc = torch.float64 if lat_dtype == torch.float64 else torch.float32
    gamma, sigma = ABAR[timesteps].sqrt().to(acc), (1 - ABAR[timesteps]).sqrt().to(acc)
    mask = torch.rand(batch, generator=gen) < 0.5
    tensors = {}
    for name, kk, dtype in (("x0", k, lat_dtype), ("a0", k, lat_dtype), ("noise", k_noise, lat_dtype),
                            ("pred", k_pred, pred_dtype)):
        v = torch.randn(shape, generator=gen, dtype=torch.float64) * 10.0**kk
        if denormal and name in ("x0", "pred"):
            tiny = torch.finfo(dtype).tiny
            pick = torch.rand(shape, generator=gen) < 0.5
            v = torch.where(pick, torch.rand(shape, generator=gen, dtype=torch.float64) * tiny, v)
        tensors[name] = v.to(dtype)
    noisy = T.oracle_mixture_noise(tensors["x0"], tensors["a0"], tensors["noise"], gamma, sigma, mask).to(lat_dtype)
    case = dict(tensors, noisy=noisy, gamma=gamma, sigma=sigma, mask=mask)
    assume(all(bool(torch.isfinite(case[n]).all()) for n in ("pred", "noisy", "x0", "a0", "noise")))
    if noncontig:
        for n in ("pred", "noisy", "x0", "a0", "noise"):
            case[n] = case[n].transpose(-1, -2).contiguous().transpose(-1, -2)
    grad_x = torch.randn(batch, generator=gen, dtype=torch.float64)
    grad_a = torch.randn(batch, generator=gen, dtype=torch.float64)
    if draw(st.booleans()):
        (grad_x if draw(st.booleans()) else grad_a)[0] = 0.0
    return dict(case=case, lambd=lambd, clip=clip, grad_x=grad_x, grad_a=grad_a, pred_dtype=pred_dtype)


def test_siss_loss_forward_backward_properties(backend):
    @case_settings(backend)
    @given(cases(backend))
    def check(executed, draw):
        executed.append(1)
        eps = torch.finfo(draw["pred_dtype"]).eps
        grad_tol = RTOL if draw["pred_dtype"] in (torch.float32, torch.float64) else 2 * eps
        if draw["pred_dtype"] == torch.float64:
            grad_tol = 1e-10
        run_and_check(draw["case"], draw["lambd"], draw["clip"], draw["grad_x"], draw["grad_a"], grad_tol=grad_tol)

    run_counted(check, backend)


def test_importance_weights_properties(backend):
    @case_settings(backend)
    @given(cases(backend))
    def check(executed, draw):
        executed.append(1)
        c, lambd, clip = draw["case"], draw["lambd"], draw["clip"]
        w_x, w_a = sf.importance_weights(c["noisy"], c["x0"], c["a0"], c["gamma"], c["sigma"], lambd,
                                         weight_clip=clip)
        ex = exact_oracle(c["noisy"], c["noisy"], c["x0"], c["a0"], c["gamma"], c["sigma"], lambd, clip)
        eps = torch.finfo(w_x.dtype).eps
        rtol = RTOL if w_x.dtype == torch.float32 else 1e-10
        sens_x, sens_a = weight_sensitivity(ex["w_x"], ex["w_a"], lambd)
        check_per_sample("w_x", w_x, ex["w_x"], weight_tolerance(rtol, 4 * eps * ex["cond"], sens_x))
        check_per_sample("w_a", w_a, ex["w_a"], weight_tolerance(rtol, 4 * eps * ex["cond"], sens_a))
        if clip is not None:
            assert bool((w_x <= torch.tensor(clip, dtype=w_x.dtype)).all())
            assert bool((w_a <= torch.tensor(clip, dtype=w_a.dtype)).all())

    run_counted(check, backend)


def test_mixture_noise_properties(backend):
    @case_settings(backend)
    @given(cases(backend))
    def check(executed, draw):
        executed.append(1)
        c = draw["case"]
        got = sf.mixture_noise(c["x0"], c["a0"], c["noise"], c["gamma"], c["sigma"], c["mask"])
        exact = T.oracle_mixture_noise(c["x0"], c["a0"], c["noise"], c["gamma"], c["sigma"], c["mask"])
        a = got.to(torch.float64)
        e = in_dtype(exact, got.dtype)
        info = torch.finfo(got.dtype)
        assert not torch.isnan(a).any()
        near_max = e.abs() >= info.max * (1 - 1e-3)
        assert bool((torch.isinf(a) == torch.isinf(e)).logical_or(near_max).all())
        # one rounding of the fp32 (fp64) fma and one to the output dtype, relative to the summands' size
        g = c["gamma"].double().reshape(-1, 1, 1, 1)
        s = c["sigma"].double().reshape(-1, 1, 1, 1)
        src = torch.where(c["mask"].reshape(-1, 1, 1, 1), c["a0"].double(), c["x0"].double())
        size = (g * src).abs() + (s * c["noise"].double()).abs()
        acc_eps = torch.finfo(torch.float64 if got.dtype == torch.float64 else torch.float32).eps
        bound = 2 * acc_eps * size + 0.5 * info.eps * e.abs() + info.tiny * info.eps
        finite = torch.isfinite(a) & torch.isfinite(e)
        assert bool(((a - e).abs() <= bound)[finite].all()), float(((a - e).abs() - bound)[finite].max())

    run_counted(check, backend)
