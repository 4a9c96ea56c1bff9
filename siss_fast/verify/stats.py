"""Exact binomial intervals and percentiles for the audit, in plain Python (``math``; no scipy dependency).

Clopper-Pearson interval of a rate from ``x`` hits in ``n`` trials at level ``1 - alpha``::

    lower = B^-1(alpha / 2;     x,     n - x + 1)      (0 when x = 0)
    upper = B^-1(1 - alpha / 2; x + 1, n - x)          (1 when x = n)

with ``B^-1(p; a, b)`` the ``p``-quantile of the Beta(a, b) distribution: the root in ``[0, 1]`` of
``I_z(a, b) = p`` (``I``: the regularized incomplete beta function, evaluated by its continued fraction, Lentz's
method; the root by bisection to below 1e-15). The interval covers the true rate with probability at least
``1 - alpha`` whatever the rate (conservative), which is what a "did it come back" claim needs.
"""

from __future__ import annotations

import math
from typing import Sequence, Tuple

__all__ = ["betainc", "beta_ppf", "clopper_pearson", "percentile_of"]

_TINY = 1e-300


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz), converges for x < (a + 1) / (a + b + 2)."""
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > _TINY else _TINY)
    h = d
    for m in range(1, 10000):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > _TINY else _TINY)
        c = 1.0 + aa / c
        c = c if abs(c) > _TINY else _TINY
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > _TINY else _TINY)
        c = 1.0 + aa / c
        c = c if abs(c) > _TINY else _TINY
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta ``I_x(a, b) = B(x; a, b) / B(a, b)`` for ``a, b > 0``, ``0 <= x <= 1``."""
    if not (a > 0 and b > 0):
        raise ValueError(f"betainc: expected a, b > 0, got a={a}, b={b}")
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def beta_ppf(p: float, a: float, b: float) -> float:
    """The ``p``-quantile of Beta(a, b): ``z`` with ``I_z(a, b) = p`` (bisection; ``I`` is increasing in ``z``)."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"beta_ppf: expected 0 <= p <= 1, got {p}")
    lo, hi = 0.0, 1.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if betainc(a, b, mid) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-16:
            break
    return 0.5 * (lo + hi)


def clopper_pearson(x: int, n: int, alpha: float = 0.05) -> Tuple[float, float]:
    """``(lower, upper)``: the exact two-sided ``1 - alpha`` interval of a binomial rate with ``x`` hits of ``n``."""
    if n < 1 or not 0 <= x <= n:
        raise ValueError(f"clopper_pearson: expected 0 <= x <= n and n >= 1, got x={x}, n={n}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"clopper_pearson: expected 0 < alpha < 1, got {alpha}")
    lower = 0.0 if x == 0 else beta_ppf(alpha / 2, x, n - x + 1)
    upper = 1.0 if x == n else beta_ppf(1 - alpha / 2, x + 1, n - x)
    return lower, upper


def percentile_of(value: float, reference: Sequence[float]) -> float:
    """Percentage (0-100) of ``reference`` strictly below ``value``, ties counted half (the mid-rank percentile)."""
    ref = list(reference)
    if not ref:
        raise ValueError("percentile_of: empty reference")
    below = sum(1 for r in ref if r < value)
    ties = sum(1 for r in ref if r == value)
    return 100.0 * (below + 0.5 * ties) / len(ref)
