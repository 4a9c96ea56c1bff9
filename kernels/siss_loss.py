"""Fused SISS loss (SPEC §4) in Triton: forward reductions, finishing step (weights, losses) and backward.

Per sample b with D elements (m = noisy, g = gamma[b], s = sigma[b], all math in the accumulation dtype ``acc`` =
gamma's dtype, fp32 or fp64):

    eps_x = (m - g*x0)/s                eps_a = (m - g*a0)/s
    delta = sum_i g*(a0-x0)_i * (2m - g*(x0+a0))_i / (2 s^2)     (one sum of per-element differences)
    sse_x = sum_i (pred - eps_x)_i^2    sse_a = sum_i (pred - eps_a)_i^2
    log w_x = -logaddexp(log(1-lam), log(lam) + delta)    log w_a = -logaddexp(log(1-lam) - delta, log(lam))
    (log 0 = -inf), w = exp(log w), optional clip w <- min(w, clip) on the weight itself
    ell_x = w_x * (sse_x / D)           ell_a = w_a * (sse_a / D)
    backward: dpred = (2/D) * (c_x*(pred - eps_x) + c_a*(pred - eps_a)),  c = g_ell*w, and c = 0 where g_ell == 0

Forward = two launches, no atomics, so the result is bitwise reproducible run to run:

1. ``siss_partials_kernel``: grid B * n_chunks; each program reduces one chunk of one sample into three partial
   sums (delta numerator, sse_x, sse_a) written to a ``(3, B, n_chunks)`` buffer in ``acc``.
2. ``siss_finish_kernel``: one program per BLOCK_B samples sums the partials in a fixed order and computes delta, the
   log-space weights and the losses, in fp64 (B scalars: free), rounding to acc at the end. A sample whose fast sums
   are unusable (overflow; fp32 underflow where it matters; csrc/siss_fast.h "Extreme magnitudes") is recomputed
   there in fp64 (inputs scaled by 2^-600 for fp64), so normal inputs pay nothing for SPEC §8.

The chunking (BLOCK, chunk size, warps) of the reduction is a fixed function of D, not autotuned: an autotuner picks
its configuration by timing, and a different configuration would change the fp32 summation order, so results could
differ in the last bits between processes. The backward pass is elementwise and autotuned (its result does not
depend on the configuration). Nothing per-element is saved between forward and backward.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._indexing import row_chunk
from ._rounding import cast_to_output
from ._launch import INTERPRET, as_rows, as_vector, check_device, elementwise_configs, split_hi_lo

__all__ = [
    "siss_loss_forward",
    "siss_loss_backward",
    "siss_partials_kernel",
    "siss_finish_kernel",
    "siss_backward_kernel",
]


# ---------------------------------------------------------------------------------------------------------------
# Forward, step 1: per-chunk partial sums.
# ---------------------------------------------------------------------------------------------------------------


@triton.jit
def _div(x, y):
    """IEEE round-to-nearest division. Triton's ``/`` on fp32 is div.full.f32 on NVIDIA GPUs (up to 2 ulp); the
    kernels are memory-bound, so the exact division costs nothing measurable and matches torch's rounding. fp64
    ``/`` is already IEEE (and the precise-division op accepts fp32 only)."""
    if x.dtype == tl.float64:
        return x / y
    return tl.fdiv(x, y, ieee_rounding=True)


@triton.jit
def siss_partials_kernel(
    pred_ptr,  # (B, D) prediction dtype (may differ from the latents: bf16 pred vs fp32 latents)
    noisy_ptr,  # (B, D) latent dtype
    x0_ptr,  # (B, D) latent dtype
    a0_ptr,  # (B, D) latent dtype
    gamma_ptr,  # (B,) acc dtype
    sigma_ptr,  # (B,) acc dtype
    partial_ptr,  # (3, B, n_chunks) acc dtype: delta numerator, sse_x, sse_a
    D,  # elements per sample
    chunk_size,  # elements per chunk, a multiple of BLOCK
    n_chunks,  # cdiv(D, chunk_size)
    plane,  # B * n_chunks: stride between the three partial planes
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    row = pid // n_chunks
    chunk = pid % n_chunks
    acc_ty = gamma_ptr.dtype.element_ty
    g = tl.load(gamma_ptr + row)
    s = tl.load(sigma_ptr + row)

    # int64: row * D and chunk * chunk_size can exceed 2**31.
    row_base = row.to(tl.int64) * D
    start = chunk.to(tl.int64) * chunk_size
    stop = tl.minimum(start + chunk_size, D)

    # Vector accumulators (one slot per lane), reduced once at the end: the summation order is fixed by BLOCK and
    # the chunk size, never by scheduling.
    acc_delta = tl.zeros([BLOCK], dtype=acc_ty)
    acc_sse_x = tl.zeros([BLOCK], dtype=acc_ty)
    acc_sse_a = tl.zeros([BLOCK], dtype=acc_ty)
    for k in range(start, stop, BLOCK):
        col = k + tl.arange(0, BLOCK)
        inside = col < stop
        offs = row_base + col
        # Out-of-range lanes load 0 for every input, which makes each of the three summands exactly 0
        # (res = 0 - (0 - g*0)/s = 0, delta term = g*0*(0 - g*0) = 0): no tl.where needed.
        p = tl.load(pred_ptr + offs, mask=inside, other=0.0).to(acc_ty)
        m = tl.load(noisy_ptr + offs, mask=inside, other=0.0).to(acc_ty)
        x = tl.load(x0_ptr + offs, mask=inside, other=0.0).to(acc_ty)
        a = tl.load(a0_ptr + offs, mask=inside, other=0.0).to(acc_ty)
        # m - g*x is a cancellation when sigma is small (m ~ g*x + sigma*eps): one fma rounds it once instead of
        # rounding the product g*x first. The same holds for 2m - g(x + a) below.
        res_x = p - _div(tl.fma(-g, x, m), s)  # pred - eps_x
        res_a = p - _div(tl.fma(-g, a, m), s)  # pred - eps_a
        # d_x - d_a per element, times 2 s^2: ||m - g x||^2 - ||m - g a||^2 = g(a - x) . (2m - g(x + a)).
        # Summing this difference directly avoids the cancellation of two large sums d_x and d_a (SPEC §4).
        acc_delta += (g * (a - x)) * tl.fma(-g, x + a, 2.0 * m)
        acc_sse_x += res_x * res_x
        acc_sse_a += res_a * res_a

    tl.store(partial_ptr + pid, tl.sum(acc_delta, axis=0))
    tl.store(partial_ptr + plane + pid, tl.sum(acc_sse_x, axis=0))
    tl.store(partial_ptr + 2 * plane + pid, tl.sum(acc_sse_a, axis=0))


# ---------------------------------------------------------------------------------------------------------------
# Forward, step 2: fixed-order sum of the partials, log-space weights, losses.
# ---------------------------------------------------------------------------------------------------------------


@triton.jit
def _join_hi_lo(zero, hi, lo):
    """hi + lo in zero's dtype (acc). ``zero + hi`` is exact (hi is an fp32 value); in fp32 adding lo rounds back
    to hi, in fp64 it restores ~48 bits of the Python float. (Scalar kernel arguments are fp32 on the GPU and Python
    floats in the interpreter: adding them to a typed zero works for both.)"""
    return (zero + hi) + lo


@triton.jit
def _log1p_small(u):
    """log(1 + u) for u in [0, 1] without libdevice: Goldberg's trick log(y) * u / (y - 1), y = fl(1 + u).

    y - 1 is exact (Sterbenz), and the ratio u / (y - 1) corrects the rounding of 1 + u, so the result keeps full
    relative accuracy for small u; when 1 + u rounds to 1, log1p(u) = u to working precision.
    """
    y = 1.0 + u
    return tl.where(y == 1.0, u, tl.log(y) * (u / (y - 1.0)))


@triton.jit
def _logaddexp(a, b):
    """log(e^a + e^b) = max + log1p(e^(min - max)), with log 0 = -inf handled: logaddexp(-inf, b) = b exactly.

    e^(min - max) is in [0, 1], so nothing overflows. When min = -inf, min - max is -inf (or NaN when both are
    -inf), so that case returns max directly: this is what makes lambda = 0 and lambda = 1 exact.
    """
    hi = tl.maximum(a, b)
    lo = tl.minimum(a, b)
    return tl.where(lo == float("-inf"), hi, hi + _log1p_small(tl.exp(lo - hi)))


@triton.jit
def _pow2_f64(k):
    """2^k as fp64 for an integer k in [-1022, 1023], built from its bits (exact; fp64 constants written in the
    kernel would be fp32)."""
    return ((k.to(tl.int64) + 1023) << 52).to(tl.float64, bitcast=True)


@triton.jit
def _exponent_f64(x):
    """The exponent e of frexp for a positive normal fp64 x (x = f * 2^e, f in [0.5, 1)); -1022 for subnormals."""
    return ((x.to(tl.int64, bitcast=True) >> 52) & 0x7FF).to(tl.int32) - 1022


@triton.jit
def _log_times_exp(log_c, delta):
    """log(c * e^delta) = log_c + delta, with log 0 staying log 0 (0 * e^delta = 0 also for a delta that overflowed
    to +-inf, where -inf + inf would be NaN)."""
    return tl.where(log_c == float("-inf"), log_c, log_c + delta)


@triton.jit
def siss_finish_kernel(
    partial_ptr,  # (3, B, n_chunks) acc dtype
    pred_ptr,  # (B, D) prediction dtype: read again only by the wide path
    noisy_ptr,  # (B, D) latent dtype, likewise x0, a0
    x0_ptr,
    a0_ptr,
    gamma_ptr,  # (B,) acc dtype
    sigma_ptr,  # (B,) acc dtype
    ell_x_ptr,  # (B,) acc dtype outputs
    ell_a_ptr,
    w_x_ptr,
    w_a_ptr,
    B,
    D,
    n_chunks,
    plane,  # B * n_chunks: stride between the three partial planes
    # Python floats arrive as fp32 scalars; (hi, lo) pairs rebuild them in fp64.
    log_keep_hi,  # log(1 - lambda), -inf for lambda = 1
    log_keep_lo,
    log_lambd_hi,  # log(lambda), -inf for lambda = 0
    log_lambd_lo,
    clip_hi,  # weight_clip, +inf without clipping
    clip_lo,
    BLOCK_B: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_W: tl.constexpr,  # elements per step of the wide path
):
    """Per sample: fixed-order sum of the partials, the wide path where a sum is unusable, then delta, weights and
    losses, all in fp64 (one scalar per sample: free), rounded to acc at the end, like csrc/siss_fast.h."""
    acc_ty = sigma_ptr.dtype.element_ty
    f64 = tl.float64
    lanes = tl.arange(0, BLOCK_B)
    rows = tl.program_id(0) * BLOCK_B + lanes
    row_ok = rows < B
    base = rows.to(tl.int64)[:, None] * n_chunks

    # Fixed-order sum over chunks: column j of the tile accumulates chunks j, j + BLOCK_C, ...; then one tree sum.
    sum_delta = tl.zeros([BLOCK_B, BLOCK_C], dtype=f64)
    sum_sse_x = tl.zeros([BLOCK_B, BLOCK_C], dtype=f64)
    sum_sse_a = tl.zeros([BLOCK_B, BLOCK_C], dtype=f64)
    for c0 in range(0, n_chunks, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        ok = row_ok[:, None] & (cols < n_chunks)[None, :]
        idx = base + cols[None, :]
        sum_delta += tl.load(partial_ptr + idx, mask=ok, other=0.0).to(f64)
        sum_sse_x += tl.load(partial_ptr + plane + idx, mask=ok, other=0.0).to(f64)
        sum_sse_a += tl.load(partial_ptr + 2 * plane + idx, mask=ok, other=0.0).to(f64)
    delta_num = tl.sum(sum_delta, axis=1)
    sse_x = tl.sum(sum_sse_x, axis=1)
    sse_a = tl.sum(sum_sse_a, axis=1)

    s = tl.load(sigma_ptr + rows, mask=row_ok, other=1.0).to(f64)
    zero = tl.zeros([BLOCK_B], dtype=f64)
    numel = zero + D

    # Usable fast sums (csrc/siss_fast.h, "Extreme magnitudes"): finite, and for fp32 accumulation not spoiled by
    # underflow (sse >= D * 2^-100; 2 sigma^2 >= D * 2^-109 for delta). x - x == 0 is false for inf and NaN.
    ok_d = (delta_num - delta_num) == 0.0
    ok_x = (sse_x - sse_x) == 0.0
    ok_a = (sse_a - sse_a) == 0.0
    if acc_ty != tl.float64:
        ok_d = ok_d & ((2.0 * s) * s >= numel * 1.5407439555097887e-33)  # 2^-109
        ok_x = ok_x & (sse_x >= numel * 7.888609052210118e-31)  # 2^-100
        ok_a = ok_a & (sse_a >= numel * 7.888609052210118e-31)
    need = row_ok & ~(ok_d & ok_x & ok_a)
    # The wide path recomputes the three sums of such a sample in fp64 (inputs scaled by 2^-600 for fp64
    # accumulation, so the sums carry a factor 2^1200). Normal inputs never enter this branch.
    wide_d = zero
    wide_x = zero
    wide_a = zero
    if tl.max(need.to(tl.int32), axis=0) > 0:
        if acc_ty == tl.float64:
            scale = _pow2_f64(tl.full([], -600, tl.int32))
        else:
            scale = _pow2_f64(tl.full([], 0, tl.int32))
        for r in range(0, BLOCK_B):
            this = lanes == r
            if tl.sum(tl.where(this & need, 1, 0), axis=0) > 0:
                row = tl.program_id(0) * BLOCK_B + r
                g = tl.load(gamma_ptr + row).to(f64)
                sg = tl.load(sigma_ptr + row).to(f64)
                acc_d = tl.zeros([BLOCK_W], dtype=f64)
                acc_x = tl.zeros([BLOCK_W], dtype=f64)
                acc_a = tl.zeros([BLOCK_W], dtype=f64)
                for k in range(0, D, BLOCK_W):
                    col = k + tl.arange(0, BLOCK_W)
                    inside = col < D
                    offs = row.to(tl.int64) * D + col
                    p = tl.load(pred_ptr + offs, mask=inside, other=0.0).to(acc_ty).to(f64) * scale
                    m = tl.load(noisy_ptr + offs, mask=inside, other=0.0).to(acc_ty).to(f64) * scale
                    x = tl.load(x0_ptr + offs, mask=inside, other=0.0).to(acc_ty).to(f64) * scale
                    a = tl.load(a0_ptr + offs, mask=inside, other=0.0).to(acc_ty).to(f64) * scale
                    u_x = tl.fma(-g, x, m)
                    u_a = tl.fma(-g, a, m)
                    acc_d += (g * (a - x)) * (u_x + u_a)
                    r_x = p - u_x / sg
                    r_a = p - u_a / sg
                    acc_x += r_x * r_x
                    acc_a += r_a * r_a
                wide_d = tl.where(this, tl.sum(acc_d, axis=0), wide_d)
                wide_x = tl.where(this, tl.sum(acc_x, axis=0), wide_x)
                wide_a = tl.where(this, tl.sum(acc_a, axis=0), wide_a)
    delta_num = tl.where(ok_d, delta_num, wide_d)
    sse_x = tl.where(ok_x, sse_x, wide_x)
    sse_a = tl.where(ok_a, sse_a, wide_a)

    # delta = delta_num / (2 sigma^2) (two divisions where 2 sigma^2 underflows), times 2^1200 for a scaled sum:
    # beyond the fp64 range it is +-inf, which the weights below turn into their exact limits.
    two_s2 = (2.0 * s) * s
    tiny = _pow2_f64(tl.full([], -1022, tl.int32))
    delta = tl.where(two_s2 >= tiny, delta_num / two_s2, (delta_num / (2.0 * s)) / s)
    # Exponents of the sums: 0, or 2 * 600 where the scaled wide path replaced them (fp64 accumulation only).
    if acc_ty == tl.float64:
        wide_exponent = 1200
    else:
        wide_exponent = 0
    e_d = tl.where(ok_d, 0, wide_exponent)
    e_x = tl.where(ok_x, 0, wide_exponent)
    e_a = tl.where(ok_a, 0, wide_exponent)
    delta = _ldexp_f64(delta, e_d)

    keep = _join_hi_lo(zero, log_keep_hi, log_keep_lo)
    lambd = _join_hi_lo(zero, log_lambd_hi, log_lambd_lo)
    # The clip rounded to acc (as in every backend): the stored weight never exceeds it, even by a rounding.
    clip = _join_hi_lo(tl.zeros([BLOCK_B], dtype=acc_ty), clip_hi, clip_lo).to(f64)

    # w_x = 1 / ((1-lam) + lam e^delta), w_a = 1 / ((1-lam) e^-delta + lam), in log space so that e^delta is never
    # formed alone; for 0 < lam < 1 both are bounded (w_x <= 1/(1-lam), w_a <= 1/lam).
    # The clip applies to the weight itself, after the exponential: a clipped weight never exceeds the clip, even by
    # a rounding, and an overflow to inf is clipped too.
    log_w_x = -_logaddexp(keep, _log_times_exp(lambd, delta))
    log_w_a = -_logaddexp(_log_times_exp(keep, -delta), lambd)
    w_x = tl.minimum(tl.exp(log_w_x), clip)
    w_a = tl.minimum(tl.exp(log_w_a), clip)

    tl.store(w_x_ptr + rows, w_x.to(acc_ty), mask=row_ok)
    tl.store(w_a_ptr + rows, w_a.to(acc_ty), mask=row_ok)
    tl.store(ell_x_ptr + rows, _weighted_mean(w_x, log_w_x, sse_x / numel, e_x).to(acc_ty), mask=row_ok)
    tl.store(ell_a_ptr + rows, _weighted_mean(w_a, log_w_a, sse_a / numel, e_a).to(acc_ty), mask=row_ok)


@triton.jit
def _ldexp_f64(x, e):
    """x * 2^e for an integer tensor e, in three exact steps of one sign (|e| clamped to 2300, beyond which the
    result is 0 or inf anyway): an intermediate overflows only when the result does."""
    e = tl.minimum(tl.maximum(e, -2300), 2300)
    magnitude = tl.where(e < 0, -e, e) // 3
    third = tl.where(e < 0, -magnitude, magnitude)  # e/3 rounded toward 0: same sign as e
    return x * _pow2_f64(third) * _pow2_f64(third) * _pow2_f64(e - 2 * third)


@triton.jit
def _weighted_mean(w, log_w, mean, exponent):
    """w * mean * 2^exponent in fp64, like ``weighted_mean`` of csrc/siss_fast.h.

    0 where w == 0 or mean == 0 (the exact product is 0; no 0 * inf). Otherwise the mantissas and exponents are
    multiplied separately (w = f_w 2^e_w, mean = f_m 2^e_m): one rounding, no intermediate overflow or underflow.
    A weight that overflowed fp64 (lambda in {0, 1} without clip, log_w > 709.78) joins in log space.
    """
    inf = float("inf")
    e_w = _exponent_f64(w)
    e_m = _exponent_f64(mean)
    f_w = w * _pow2_f64(-e_w)
    f_m = mean * _pow2_f64(-e_m)
    product = _ldexp_f64(f_w * f_m, e_w + e_m + exponent)
    ln2 = tl.full([], 0x3FE62E42FEFA39EF, tl.int64).to(tl.float64, bitcast=True)
    via_log = tl.exp(log_w + tl.log(mean) + exponent.to(tl.float64) * ln2)
    out = tl.where(w == inf, via_log, product)
    return tl.where((w == 0.0) | (mean == 0.0), 0.0, out)


# ---------------------------------------------------------------------------------------------------------------
# Backward: one elementwise pass.
# ---------------------------------------------------------------------------------------------------------------


@triton.jit
def siss_backward_kernel(
    pred_ptr,  # (B, D) prediction dtype
    noisy_ptr,  # (B, D) latent dtype
    x0_ptr,
    a0_ptr,
    gamma_ptr,  # (B,) acc dtype
    sigma_ptr,
    grad_x_ptr,  # (B,) upstream gradients of ell_x, ell_a (any float dtype)
    grad_a_ptr,
    w_x_ptr,  # (B,) weights saved by the forward pass
    w_a_ptr,
    out_ptr,  # (B, D) dpred, prediction dtype
    D,
    two_over_d_hi,  # 2 / D as a (hi, lo) fp32 pair
    two_over_d_lo,
    BLOCK: tl.constexpr,
):
    row, _, in_row, offs = row_chunk(D, BLOCK)  # 1-D grid of B * cdiv(D, BLOCK) programs, int64 offsets

    acc_ty = gamma_ptr.dtype.element_ty
    f64 = tl.float64
    g = tl.load(gamma_ptr + row)
    s = tl.load(sigma_ptr + row)
    two_over_d = _join_hi_lo(tl.zeros_like(g).to(f64), two_over_d_hi, two_over_d_lo)
    # c = 2*g*w/D in fp64, exactly 0 where g == 0 or w == 0: an unused term whose weight overflowed to inf
    # (lambda in {0, 1} without clipping) then contributes 0 instead of 0 * inf = NaN.
    gx = tl.load(grad_x_ptr + row).to(f64)
    ga = tl.load(grad_a_ptr + row).to(f64)
    wx = tl.load(w_x_ptr + row).to(f64)
    wa = tl.load(w_a_ptr + row).to(f64)
    c_x = tl.where((gx == 0.0) | (wx == 0.0), 0.0, gx * wx * two_over_d)
    c_a = tl.where((ga == 0.0) | (wa == 0.0), 0.0, ga * wa * two_over_d)
    # c = c' * 2^shift with max |c'| in [0.5, 1) (csrc/siss_fast.h, backward_coefficients): c itself may leave
    # acc's range although c * (pred - eps) does not; scaling by a power of two is exact, so on normal inputs the
    # result is bitwise the unscaled product. Infinite c (an infinite weight) or 2^shift beyond acc's range: the
    # exact fp64 path, 0 where pred - eps == 0.
    big = tl.maximum(tl.abs(c_x), tl.abs(c_a))
    shift = _exponent_f64(big)
    if acc_ty == tl.float64:
        limit = 1000
    else:
        limit = 120
    exact = (big == float("inf")) | (shift < -limit) | (shift > limit)
    exact = exact & (big != 0.0)

    p = tl.load(pred_ptr + offs, mask=in_row, other=0.0).to(acc_ty)
    m = tl.load(noisy_ptr + offs, mask=in_row, other=0.0).to(acc_ty)
    x = tl.load(x0_ptr + offs, mask=in_row, other=0.0).to(acc_ty)
    a = tl.load(a0_ptr + offs, mask=in_row, other=0.0).to(acc_ty)
    if exact:
        g64 = g.to(f64)
        s64 = s.to(f64)
        r_x = p.to(f64) - (m.to(f64) - g64 * x.to(f64)) / s64
        r_a = p.to(f64) - (m.to(f64) - g64 * a.to(f64)) / s64
        term_x = tl.where(c_x == 0.0, 0.0, tl.where(r_x == 0.0, 0.0, c_x * r_x))
        term_a = tl.where(c_a == 0.0, 0.0, tl.where(r_a == 0.0, 0.0, c_a * r_a))
        dpred = (term_x + term_a).to(acc_ty)
    else:
        safe_shift = tl.where(big == 0.0, 0, shift)
        cx = (c_x * _pow2_f64(-safe_shift)).to(acc_ty)
        ca = (c_a * _pow2_f64(-safe_shift)).to(acc_ty)
        scale = _pow2_f64(safe_shift).to(acc_ty)
        res_x = p - _div(tl.fma(-g, x, m), s)  # same arithmetic as the forward pass (single rounding of m - g*x)
        res_a = p - _div(tl.fma(-g, a, m), s)
        # A zero coefficient drops its term (no 0 * inf from a residual beyond the range).
        dpred = (tl.where(cx == 0.0, 0.0, cx * res_x) + tl.where(ca == 0.0, 0.0, ca * res_a)) * scale
    tl.store(out_ptr + offs, cast_to_output(dpred, out_ptr.dtype.element_ty), mask=in_row)


_siss_backward_tuned = None if INTERPRET else triton.autotune(elementwise_configs(triton), key=["D"])(
    siss_backward_kernel
)


# ---------------------------------------------------------------------------------------------------------------
# Launch configuration.
# ---------------------------------------------------------------------------------------------------------------

# GPU reduction: BLOCK lanes per step with 8 warps (8 elements per thread per input); each program reduces
# `iters` blocks, iters = clamp(blocks_per_sample // 32, 1, 8): small samples get many short chunks (parallelism),
# large ones chunks of up to 16K elements (fewer partials). A pure function of D: reproducible across processes
# and independent of the batch size.
_GPU_REDUCE_BLOCK = 2048
_GPU_REDUCE_WARPS = 8
_GPU_FINISH_BLOCK_B = 32
_GPU_FINISH_BLOCK_C = 32


def reduction_layout(d: int) -> Tuple[int, int, int]:
    """``(BLOCK, chunk_size, n_chunks)`` of the forward reduction for D elements per sample (deterministic in D)."""
    if INTERPRET:
        # ~1 ms per program instance in the interpreter: one chunk per sample up to 64K elements.
        block = min(8192, max(16, triton.next_power_of_2(d)))
        chunk = block * min(8, triton.cdiv(d, block))
    else:
        block = _GPU_REDUCE_BLOCK
        chunk = block * min(8, max(1, triton.cdiv(d, block) // 32))
    return block, chunk, triton.cdiv(d, chunk)


def _finish_blocks(batch: int, n_chunks: int) -> Tuple[int, int]:
    if INTERPRET:
        return min(64, max(2, triton.next_power_of_2(batch))), min(64, max(2, triton.next_power_of_2(n_chunks)))
    return _GPU_FINISH_BLOCK_B, _GPU_FINISH_BLOCK_C


def _wide_block(d: int) -> int:
    """Elements per step of the finish kernel's wide path (taken only for samples with unusable fast sums)."""
    if INTERPRET:
        return min(8192, max(16, triton.next_power_of_2(max(d, 1))))
    return 1024


def _log_coefficients(lambd: float, weight_clip: Optional[float]) -> Tuple[float, float, float]:
    """(log(1 - lambda), log(lambda), clip) with log 0 = -inf and no clip = +inf."""
    log_keep = math.log1p(-lambd) if lambd < 1.0 else -math.inf
    log_lambd = math.log(lambd) if lambd > 0.0 else -math.inf
    clip = float(weight_clip) if weight_clip is not None else math.inf
    return log_keep, log_lambd, clip


def siss_loss_forward(pred: Tensor, noisy: Tensor, x0: Tensor, a0: Tensor, gamma: Tensor, sigma: Tensor, lambd: float,
                      weight_clip: Optional[float] = None) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Fused SISS forward: ``(ell_x, ell_a, w_x, w_a)``, each ``(B,)`` in the accumulation dtype (gamma's).

    Args:
        pred: ``(B, ...)`` fp16/bf16/fp32/fp64, any strides.
        noisy, x0, a0: pred's shape, one latent dtype (may differ from pred's), any strides.
        gamma, sigma: ``(B,)`` fp32 (fp64 for fp64 inputs), sigma > 0.
        lambd: mixture probability in [0, 1]; weight_clip: None or > 0.

    ``ell_x = w_x * sum_i (pred - eps_x)^2 / D``, likewise ``ell_a``; weights as in
    :func:`siss_fast.reference.log_weights`. Two launches, no atomics: bitwise deterministic.
    """
    check_device(pred, noisy, x0, a0, gamma, sigma)
    batch = pred.shape[0]
    acc = gamma.dtype
    device = pred.device
    p, m, x, a = as_rows(pred, batch), as_rows(noisy, batch), as_rows(x0, batch), as_rows(a0, batch)
    gamma, sigma = gamma.contiguous(), sigma.contiguous()
    d = p.shape[1]
    block, chunk, n_chunks = reduction_layout(d)

    partials = torch.empty((3, batch, n_chunks), dtype=acc, device=device)
    if n_chunks > 0:
        grid = (batch * n_chunks,)
        siss_partials_kernel[grid](
            p, m, x, a, gamma, sigma, partials, d, chunk, n_chunks, batch * n_chunks, BLOCK=block,
            num_warps=4 if INTERPRET else _GPU_REDUCE_WARPS,
        )

    ell_x = torch.empty(batch, dtype=acc, device=device)
    ell_a = torch.empty(batch, dtype=acc, device=device)
    w_x = torch.empty(batch, dtype=acc, device=device)
    w_a = torch.empty(batch, dtype=acc, device=device)
    log_keep, log_lambd, clip = _log_coefficients(lambd, weight_clip)
    block_b, block_c = _finish_blocks(batch, n_chunks)
    siss_finish_kernel[(triton.cdiv(batch, block_b),)](
        partials, p, m, x, a, gamma, sigma, ell_x, ell_a, w_x, w_a, batch, d, n_chunks, batch * n_chunks,
        *split_hi_lo(log_keep), *split_hi_lo(log_lambd), *split_hi_lo(clip),
        BLOCK_B=block_b, BLOCK_C=block_c, BLOCK_W=_wide_block(d), num_warps=4,
    )
    return ell_x, ell_a, w_x, w_a


def siss_loss_backward(grad_ell_x: Tensor, grad_ell_a: Tensor, w_x: Tensor, w_a: Tensor, pred: Tensor, noisy: Tensor,
                       x0: Tensor, a0: Tensor, gamma: Tensor, sigma: Tensor) -> Tensor:
    """Gradient of ``sum_b g_x[b]*ell_x[b] + g_a[b]*ell_a[b]`` w.r.t. pred, one elementwise pass.

    ``dpred = (2/D) * (c_x*(pred - eps_x) + c_a*(pred - eps_a))`` with ``c = g*w`` (0 where g == 0).
    ``grad_ell_*``, ``w_*``: ``(B,)``; returns a contiguous tensor of pred's shape and dtype.
    """
    check_device(grad_ell_x, grad_ell_a, w_x, w_a, pred, noisy, x0, a0, gamma, sigma)
    batch = pred.shape[0]
    out = torch.empty(pred.shape, dtype=pred.dtype, device=pred.device)
    if out.numel() == 0:
        return out
    p, m, x, a = as_rows(pred, batch), as_rows(noisy, batch), as_rows(x0, batch), as_rows(a0, batch)
    d = p.shape[1]
    args = (
        p, m, x, a, gamma.contiguous(), sigma.contiguous(),
        as_vector(grad_ell_x), as_vector(grad_ell_a), as_vector(w_x), as_vector(w_a),
        out, d, *split_hi_lo(2.0 / d),
    )
    if INTERPRET:
        block = min(16384, max(16, triton.next_power_of_2(d)))
        siss_backward_kernel[(batch * triton.cdiv(d, block),)](*args, BLOCK=block)
    else:
        _siss_backward_tuned[lambda meta: (batch * triton.cdiv(d, meta["BLOCK"]),)](*args)
    return out
