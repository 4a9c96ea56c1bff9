"""Tests specific to the compiled extension siss_fast._C (backends ``cpp`` and ``cuda``).

The shared oracle suite runs every backend through the public API; this file checks what only the extension
promises: its operators are registered under their names, CPU results do not depend on the thread count, fp64
agrees with siss_fast.reference to rounding, mixed pred/latent dtypes work, and the CUDA kernels (GPU only)
match the CPU ones. The CPU checks run for every CPU kernel build this machine supports (default, avx2, avx512),
and the runtime CPU dispatch has tests of its own. Everything skips with a reason when the extension is not built.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest
import torch

from siss_fast import _extension as ext
from siss_fast import reference as ref

pytestmark = pytest.mark.skipif(not ext.available(), reason=f"siss_fast._C unavailable: {ext.failure_reason()}")

LOW_PRECISION = (torch.float32, torch.float16, torch.bfloat16)
SHAPES = [(1, 4, 17, 23), (3, 4, 64, 64), (2, 3, 64, 67), (5, 7)]
LAMBDAS = [(0.5, None), (0.0, None), (1.0, None), (0.3, 20.0), (0.0, 5.0)]
CAPABILITIES = ext.supported_cpu_capabilities() or ("default",)


@pytest.fixture(params=CAPABILITIES)
def capability(request):
    """Runs the test with the CPU kernels of one capability, then restores the automatic choice."""
    before = ext.cpu_capability()
    ext.set_cpu_capability(request.param)
    try:
        yield request.param
    finally:
        ext.set_cpu_capability(before)


def _case(shape, device="cpu", seed=0):
    """fp64 inputs: x0, a0, noise, gamma, sigma (one sample at t = T-1), mask, the mixture m and a prediction."""
    gen = torch.Generator().manual_seed(seed)
    batch = shape[0]
    x0, a0, noise = (torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(3))
    alphas_cumprod = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
    t = torch.randint(0, 1000, (batch,), generator=gen)
    t[0] = 999
    gamma, sigma = alphas_cumprod[t].sqrt(), (1 - alphas_cumprod[t]).sqrt()
    mask = torch.rand(batch, generator=gen) < 0.5
    m = ref.mixture_noise(x0, a0, noise, gamma, sigma, mask)
    pred = noise + 0.1 * torch.randn(shape, generator=gen, dtype=torch.float64)
    out = dict(x0=x0, a0=a0, noise=noise, gamma=gamma, sigma=sigma, mask=mask, m=m, pred=pred)
    return {k: v.to(device) for k, v in out.items()}


def _loss_args(c, pred_dtype=torch.float64, latent_dtype=torch.float64):
    acc = torch.float64 if latent_dtype == torch.float64 else torch.float32
    return (c["pred"].to(pred_dtype), c["m"].to(latent_dtype), c["x0"].to(latent_dtype), c["a0"].to(latent_dtype),
            c["gamma"].to(acc), c["sigma"].to(acc))


def _upstream(batch, lambd, weight_clip, dtype, device="cpu"):
    """Upstream gradients that are not 1; the term whose weight may be infinite gets g = 0 (SPEC §8)."""
    gen = torch.Generator().manual_seed(1)
    g_x = (torch.rand(batch, generator=gen, dtype=torch.float64) + 0.5).to(dtype).to(device)
    g_a = (torch.rand(batch, generator=gen, dtype=torch.float64) - 1.5).to(dtype).to(device)
    if weight_clip is None and lambd == 0.0:
        g_a.zero_()
    if weight_clip is None and lambd == 1.0:
        g_x.zero_()
    return g_x, g_a


def _max_rel(actual, expected):
    actual, expected = actual.double().cpu(), expected.double().cpu()
    return ((actual - expected).abs() / expected.abs().clamp_min(1e-300)).max().item()


def _finite(t):
    return bool(torch.isfinite(t).all()) and bool((t.abs() < 1e30).all())


# ----------------------------------------------------------------------------------------------------------------
# Registration and loader
# ----------------------------------------------------------------------------------------------------------------


def test_ops_registered_under_expected_names():
    for name in ("mixture_noise_ext", "siss_loss_forward_ext", "siss_loss_backward_ext"):
        qualified = f"siss_fast::{name}"
        assert hasattr(torch.ops.siss_fast, name)
        assert torch._C._dispatch_has_kernel_for_dispatch_key(qualified, "CPU"), qualified
        if ext.cuda_available():
            assert torch._C._dispatch_has_kernel_for_dispatch_key(qualified, "CUDA"), qualified
    schema = str(torch.ops.siss_fast.siss_loss_forward_ext.default._schema)
    assert "float lambd" in schema and "float? weight_clip" in schema


def test_build_info_and_failure_reason():
    info = ext.build_info()
    assert info["available"] is True and ext.failure_reason() is None
    assert info["with_cuda"] == ext.cuda_available()
    assert info["built_against_torch"]
    assert not info["torch_mismatch"], f"built against torch {info['built_against_torch']}, running {torch.__version__}"


# ----------------------------------------------------------------------------------------------------------------
# CPU: fp64 agreement, determinism, mixed dtypes
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("lambd,weight_clip", LAMBDAS)
def test_fp64_matches_reference(shape, lambd, weight_clip, capability):
    c = _case(shape)
    args = _loss_args(c)
    got = ext.ops().siss_loss_forward(*args, lambd, weight_clip)
    want = ref.siss_loss_forward(*args, lambd, weight_clip)
    for name, g, w in zip(("ell_x", "ell_a", "w_x", "w_a"), got, want):
        assert g.dtype == torch.float64 and g.shape == (shape[0],)
        assert torch.equal(torch.isinf(g), torch.isinf(w)), name
        finite = torch.isfinite(w)
        assert _max_rel(g[finite], w[finite]) < 1e-12, name
    if lambd == 0.0 and weight_clip is None:
        assert torch.equal(got[2], torch.ones_like(got[2]))  # lambda = 0: w_x is exactly 1
    if lambd == 1.0 and weight_clip is None:
        assert torch.equal(got[3], torch.ones_like(got[3]))

    g_x, g_a = _upstream(shape[0], lambd, weight_clip, torch.float64)
    dpred = ext.ops().siss_loss_backward(g_x, g_a, got[2], got[3], *args)
    dpred_ref = ref.siss_loss_backward(g_x, g_a, want[2], want[3], *args)
    assert dpred.dtype == torch.float64 and dpred.shape == shape and not dpred.isnan().any()
    scale = dpred_ref.abs().max().item()
    assert (dpred - dpred_ref).abs().max().item() <= 1e-12 * scale

    mixed = ext.ops().mixture_noise(c["x0"], c["a0"], c["noise"], c["gamma"], c["sigma"], c["mask"])
    torch.testing.assert_close(mixed, c["m"], rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("pred_dtype", LOW_PRECISION)
@pytest.mark.parametrize("latent_dtype", LOW_PRECISION)
def test_mixed_dtypes_meet_the_bar(pred_dtype, latent_dtype, capability):
    """SPEC §9: error vs the fp64 oracle (on the same rounded inputs) within 1e-5 (fp32) or 2x plain PyTorch."""
    shape = (3, 4, 32, 33)
    c = _case(shape)
    args = _loss_args(c, pred_dtype, latent_dtype)
    oracle_args = [a.double() for a in args]
    for lambd, weight_clip in ((0.5, None), (0.2, 20.0)):
        got = ext.ops().siss_loss_forward(*args, lambd, weight_clip)
        plain = ref.siss_loss_forward(*args, lambd, weight_clip)
        oracle = ref.siss_loss_forward(*oracle_args, lambd, weight_clip)
        for g, p, o in zip(got, plain, oracle):
            assert g.dtype == torch.float32
            assert _max_rel(g, o) <= max(1e-5, 2 * _max_rel(p, o))
        g_x, g_a = _upstream(shape[0], lambd, weight_clip, torch.float32)
        dpred = ext.ops().siss_loss_backward(g_x, g_a, got[2], got[3], *args)
        dpred_plain = ref.siss_loss_backward(g_x, g_a, plain[2], plain[3], *args)
        dpred_oracle = ref.siss_loss_backward(g_x.double(), g_a.double(), oracle[2], oracle[3], *oracle_args)
        assert dpred.dtype == pred_dtype and dpred.shape == shape
        scale = dpred_oracle.abs().max().item()
        err = (dpred.double() - dpred_oracle).abs().max().item() / scale
        err_plain = (dpred_plain.double() - dpred_oracle).abs().max().item() / scale
        floor = 1e-6 if pred_dtype == torch.float32 else torch.finfo(pred_dtype).eps
        assert err <= 2 * err_plain + floor


@pytest.mark.parametrize("latent_dtype", (*LOW_PRECISION, torch.float64))
def test_mixture_noise_matches_oracle(latent_dtype, capability):
    c = _case((3, 4, 17, 23))
    acc = torch.float64 if latent_dtype == torch.float64 else torch.float32
    args = (c["x0"].to(latent_dtype), c["a0"].to(latent_dtype), c["noise"].to(latent_dtype), c["gamma"].to(acc),
            c["sigma"].to(acc), c["mask"])
    got = ext.ops().mixture_noise(*args)
    oracle = ref.mixture_noise(*[a.double() if a.is_floating_point() else a for a in args])
    assert got.dtype == latent_dtype and got.is_contiguous()
    # One rounding to the output dtype, plus the accumulation's own rounding of the two products.
    src = torch.where(c["mask"].view(-1, 1, 1, 1), args[1], args[0]).double()
    magnitude = (args[3].double().view(-1, 1, 1, 1) * src).abs() + (args[4].double().view(-1, 1, 1, 1)
                                                                    * args[2].double()).abs()
    bound = torch.finfo(latent_dtype).eps * oracle.abs() + 2 * torch.finfo(acc).eps * magnitude
    assert ((got.double() - oracle).abs() <= bound).all()


def test_cpu_results_independent_of_thread_count(capability):
    c = _case((3, 3, 128, 129))  # several chunks per sample, a ragged tail
    args = _loss_args(c, torch.float32, torch.float32)
    g_x, g_a = _upstream(3, 0.5, None, torch.float32)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            fwd = ext.ops().siss_loss_forward(*args, 0.5, None)
            bwd = ext.ops().siss_loss_backward(g_x, g_a, fwd[2], fwd[3], *args)
            mix = ext.ops().mixture_noise(args[2], args[3], c["noise"].float(), args[4], args[5], c["mask"])
            results.append((*fwd, bwd, mix))
    finally:
        torch.set_num_threads(before)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


def test_non_contiguous_inputs(capability):
    c = _case((4, 4, 16, 16))
    args = _loss_args(c, torch.float32, torch.float32)
    strided = [a.transpose(-1, -2) for a in args[:4]]  # same values, non-contiguous layout
    contiguous = [s.contiguous() for s in strided]
    assert not strided[0].is_contiguous()
    got = ext.ops().siss_loss_forward(*strided, *args[4:], 0.5, None)
    want = ext.ops().siss_loss_forward(*contiguous, *args[4:], 0.5, None)
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    g_x, g_a = _upstream(4, 0.5, None, torch.float32)
    dg = ext.ops().siss_loss_backward(g_x, g_a, got[2], got[3], *strided, *args[4:])
    dw = ext.ops().siss_loss_backward(g_x, g_a, want[2], want[3], *contiguous, *args[4:])
    assert dg.is_contiguous() and torch.equal(dg, dw)


def test_expanded_upstream_gradient():
    """Upstream gradients may be expanded scalars (stride 0), as autograd produces for a sum."""
    c = _case((3, 5, 9))
    args = _loss_args(c, torch.float32, torch.float32)
    fwd = ext.ops().siss_loss_forward(*args, 0.5, None)
    g = torch.tensor(0.25).expand(3)
    got = ext.ops().siss_loss_backward(g, g, fwd[2], fwd[3], *args)
    want = ext.ops().siss_loss_backward(g.contiguous(), g.contiguous(), fwd[2], fwd[3], *args)
    assert torch.equal(got, want)


def test_extreme_lambda_gives_no_nan(capability):
    """SPEC §8: lambda in {0, 1} without clipping may give inf weights, never NaN, and a g = 0 term adds nothing."""
    c = _case((2, 4, 32, 32))
    args = _loss_args(c, torch.float32, torch.float32)
    for lambd in (0.0, 1.0):
        fwd = ext.ops().siss_loss_forward(*args, lambd, None)
        assert not any(t.isnan().any() for t in fwd)
        g_x, g_a = _upstream(2, lambd, None, torch.float32)
        assert not ext.ops().siss_loss_backward(g_x, g_a, fwd[2], fwd[3], *args).isnan().any()


def test_weight_clip_bounds_weights(capability):
    c = _case((4, 3, 8, 8))
    args = _loss_args(c, torch.float32, torch.float32)
    _, _, w_x, w_a = ext.ops().siss_loss_forward(*args, 0.0, 3.0)
    assert (w_x <= 3.0).all() and (w_a <= 3.0).all()
    _, _, w_x, w_a = ext.ops().siss_loss_forward(*args, 0.25, None)  # w_x <= 1/(1-lambda), w_a <= 1/lambda
    assert (w_x <= 1 / 0.75 * (1 + 1e-6)).all() and (w_a <= 4.0 * (1 + 1e-6)).all()


def _cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def test_cpu_dispatch_picks_the_widest_supported_build():
    supported = ext.supported_cpu_capabilities()
    assert supported[0] == "default" and set(supported) <= {"default", "avx2", "avx512"}
    info = ext.build_info()
    assert info["cpu_capability"] in supported and info["cpu_capabilities"] == supported
    if os.environ.get("SISS_FAST_CPU_CAPABILITY") is None:  # automatic: AVX2 if available (AVX-512 on request)
        assert ext.cpu_capability() == ("avx2" if "avx2" in supported else "default")
    # setup.py builds the AVX kernels on x86-64: a capable CPU must find them (a build that silently lost them
    # would run the baseline kernels, several times slower).
    flags = _cpu_flags()
    if platform.machine().lower() in ("x86_64", "amd64") and sys.platform.startswith("linux"):
        if {"avx2", "fma"} <= flags:
            assert "avx2" in supported
        if {"avx512f", "avx512bw", "avx512vl", "avx512dq", "fma"} <= flags:
            assert "avx512" in supported


def test_set_cpu_capability_rejects_unknown_names():
    before = ext.cpu_capability()
    with pytest.raises(ValueError, match="sse9"):
        ext.set_cpu_capability("sse9")
    assert ext.cpu_capability() == before


def test_cpu_capability_environment_override():
    code = "from siss_fast import _extension as e; print(e.cpu_capability())"
    env = {**os.environ, "SISS_FAST_CPU_CAPABILITY": "default"}
    import siss_fast

    # the child imports the same siss_fast as this process (installed or in-tree build), not the cwd's source tree
    root = os.path.dirname(os.path.dirname(os.path.abspath(siss_fast.__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                         cwd=os.path.dirname(root))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "default"


def test_cpu_capabilities_agree_to_rounding():
    c = _case((3, 4, 64, 64))
    args = _loss_args(c, torch.float32, torch.float32)
    oracle = ref.siss_loss_forward(*[a.double() for a in args], 0.5, None)
    g_x, g_a = _upstream(3, 0.5, None, torch.float32)
    dpred_oracle = ref.siss_loss_backward(g_x.double(), g_a.double(), oracle[2], oracle[3],
                                          *[a.double() for a in args])
    before = ext.cpu_capability()
    try:
        for name in CAPABILITIES:
            ext.set_cpu_capability(name)
            got = ext.ops().siss_loss_forward(*args, 0.5, None)
            for g, o in zip(got, oracle):
                assert _max_rel(g, o) <= 1e-5, name
            dpred = ext.ops().siss_loss_backward(g_x, g_a, got[2], got[3], *args)
            err = (dpred.double() - dpred_oracle).abs().max().item() / dpred_oracle.abs().max().item()
            assert err <= 1e-5, name  # SPEC §9 fp32 bar
    finally:
        ext.set_cpu_capability(before)


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64))
def test_weight_clip_applies_after_exponentiation(dtype, capability):
    """The clip bounds the weight itself (w = min(exp(log w), clip), clip rounded to the accumulation dtype): a
    clipped weight is never above the clip, even by the rounding of exp(log(clip)), and an overflow is clipped."""
    gen = torch.Generator().manual_seed(3)
    shape = (8, 4, 16, 16)
    x0, a0, noise = (torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(3))
    t = torch.randint(100, 900, (shape[0],), generator=gen)
    alphas_cumprod = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
    gamma, sigma = alphas_cumprod[t].sqrt(), (1 - alphas_cumprod[t]).sqrt()
    mask = torch.ones(shape[0], dtype=torch.bool)  # forget samples: delta > 0, so w_a > 1 at lambda = 0.1
    m = ref.mixture_noise(x0, a0, noise, gamma, sigma, mask)
    pred = noise + 0.1 * torch.randn(shape, generator=gen, dtype=torch.float64)
    acc = dtype
    args = (pred.to(dtype), m.to(dtype), x0.to(dtype), a0.to(dtype), gamma.to(acc), sigma.to(acc))
    _, _, _, w_a_free = ext.ops().siss_loss_forward(*args, 0.1, None)
    assert (w_a_free > 1.05).all(), "precondition: every unclipped w_a exceeds the clip"
    ell_x, ell_a, w_x, w_a = ext.ops().siss_loss_forward(*args, 0.1, 1.05)
    assert w_x.dtype == dtype
    assert (w_x <= 1.05).all() and (w_a <= 1.05).all()
    assert torch.equal(w_a, torch.full_like(w_a, 1.05))  # clipped to the clip rounded to the dtype, exactly
    want = ref.siss_loss_forward(*args, 0.1, 1.05)
    assert torch.equal(w_a, want[3]) and _max_rel(w_x, want[2]) <= 1e-5
    # lambda = 0 without a bound on w_a = e^delta: a delta this large overflows exp even in fp64; the clip holds.
    far = (pred.to(dtype), m.to(dtype), (x0 + 1e3).to(dtype), a0.to(dtype), gamma.to(acc), sigma.to(acc))
    _, _, _, w_a_inf = ext.ops().siss_loss_forward(*far, 0.0, None)
    assert torch.isinf(w_a_inf).all()
    _, ell_a, _, w_a = ext.ops().siss_loss_forward(*far, 0.0, 5.0)
    assert torch.equal(w_a, torch.full_like(w_a, 5.0)) and torch.isfinite(ell_a).all()


def test_direct_op_call_rejects_bad_arguments():
    c = _case((2, 3, 4))
    args = _loss_args(c, torch.float32, torch.float32)
    with pytest.raises(RuntimeError, match="lambd"):
        torch.ops.siss_fast.siss_loss_forward_ext(*args, 1.5, None)
    with pytest.raises(RuntimeError, match="gamma and sigma"):
        torch.ops.siss_fast.siss_loss_forward_ext(*args[:4], args[4][:1], args[5], 0.5, None)
    with pytest.raises(RuntimeError, match="share one shape"):
        torch.ops.siss_fast.siss_loss_forward_ext(args[0][:, :2], *args[1:], 0.5, None)


# ----------------------------------------------------------------------------------------------------------------
# CUDA (skipped without a GPU or without the CUDA kernels)
# ----------------------------------------------------------------------------------------------------------------


def _needs_cuda():
    if not ext.cuda_available():
        pytest.skip("siss_fast._C was compiled without CUDA kernels")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")


@pytest.mark.cuda
@pytest.mark.parametrize("shape", [(1, 4, 17, 23), (4, 4, 64, 64), (2, 3, 256, 256), (3, 5, 7)])
@pytest.mark.parametrize("lambd,weight_clip", LAMBDAS)
def test_cuda_fp64_matches_reference(shape, lambd, weight_clip):
    _needs_cuda()
    c = _case(shape, device="cuda")
    args = _loss_args(c)
    got = ext.ops().siss_loss_forward(*args, lambd, weight_clip)
    want = ref.siss_loss_forward(*args, lambd, weight_clip)
    for g, w in zip(got, want):
        assert g.is_cuda and g.dtype == torch.float64
        finite = torch.isfinite(w)
        assert _max_rel(g[finite], w[finite]) < 1e-12
    g_x, g_a = _upstream(shape[0], lambd, weight_clip, torch.float64, "cuda")
    dpred = ext.ops().siss_loss_backward(g_x, g_a, got[2], got[3], *args)
    dpred_ref = ref.siss_loss_backward(g_x, g_a, want[2], want[3], *args)
    assert (dpred - dpred_ref).abs().max().item() <= 1e-12 * dpred_ref.abs().max().item()
    mixed = ext.ops().mixture_noise(c["x0"], c["a0"], c["noise"], c["gamma"], c["sigma"], c["mask"])
    torch.testing.assert_close(mixed, c["m"], rtol=1e-14, atol=1e-14)


@pytest.mark.cuda
@pytest.mark.parametrize("pred_dtype", LOW_PRECISION)
@pytest.mark.parametrize("latent_dtype", LOW_PRECISION)
@pytest.mark.parametrize("shape", [(3, 4, 64, 64), (2, 3, 17, 23)])  # vectorized and element-wise paths
def test_cuda_matches_cpu_kernels(pred_dtype, latent_dtype, shape):
    _needs_cuda()
    c = _case(shape)
    args = _loss_args(c, pred_dtype, latent_dtype)
    oracle_args = [a.double() for a in args]
    cuda_args = [a.cuda() for a in args]
    got = ext.ops().siss_loss_forward(*cuda_args, 0.5, 30.0)
    cpu = ext.ops().siss_loss_forward(*args, 0.5, 30.0)
    oracle = ref.siss_loss_forward(*oracle_args, 0.5, 30.0)
    for g, p, o in zip(got, cpu, oracle):
        assert g.is_cuda and g.dtype == torch.float32
        assert _max_rel(g, o) <= max(1e-5, 2 * _max_rel(p, o))
    g_x, g_a = _upstream(shape[0], 0.5, 30.0, torch.float32)
    dpred = ext.ops().siss_loss_backward(g_x.cuda(), g_a.cuda(), got[2], got[3], *cuda_args)
    dpred_cpu = ext.ops().siss_loss_backward(g_x, g_a, cpu[2], cpu[3], *args)
    assert dpred.dtype == pred_dtype
    scale = dpred_cpu.double().abs().max().item()
    tol = 1e-5 if pred_dtype == torch.float32 else 2 * torch.finfo(pred_dtype).eps
    assert (dpred.cpu().double() - dpred_cpu.double()).abs().max().item() <= tol * scale


@pytest.mark.cuda
def test_cuda_deterministic_and_unaligned():
    _needs_cuda()
    c = _case((5, 4, 64, 64), device="cuda")
    args = _loss_args(c, torch.float32, torch.float32)
    first = ext.ops().siss_loss_forward(*args, 0.5, None)
    second = ext.ops().siss_loss_forward(*args, 0.5, None)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    # Storage offset of one element: misaligned for 128-bit packs, so the element-wise kernels run.
    flat = [torch.cat([a.new_zeros(1), a.flatten()])[1:].view_as(a) for a in args[:4]]
    unaligned = ext.ops().siss_loss_forward(*flat, *args[4:], 0.5, None)
    for a, b in zip(first, unaligned):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=0)
