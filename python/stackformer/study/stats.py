"""Statistics of a study: Student-t confidence intervals of means and of paired differences.

Written out here (no SciPy): the t distribution's CDF through the regularized incomplete beta
function, evaluated by its continued fraction (the modified Lentz method), and its quantile by
bisection on that CDF. The method is documented in docs/STUDY.md.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Sequence

__all__ = ["t_cdf", "t_quantile", "Interval", "mean_ci", "paired_diff", "verdict"]


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function I_x(a, b) (modified Lentz).

    I_x(a,b) = x^a (1-x)^b / (a B(a,b)) * 1/(1+ d1/(1+ d2/(1+ ...))) with
    d_{2m+1} = -(a+m)(a+b+m) x / ((a+2m)(a+2m+1)), d_{2m} = m(b-m) x / ((a+2m-1)(a+2m));
    converges fast for x < (a+1)/(a+b+2)."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10000):
        m2 = 2 * m
        num = m * (b - m) * x / ((a + m2 - 1.0) * (a + m2))
        d = 1.0 + num * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + num / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        num = -(a + m) * (a + b + m) * x / ((a + m2) * (a + m2 + 1.0))
        d = 1.0 + num * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + num / c
        c = c if abs(c) > tiny else tiny
        step = d * c
        h *= step
        if abs(step - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta function I_x(a, b) for 0 <= x <= 1."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    lbeta = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
    front = math.exp(lbeta + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b  # symmetry I_x(a,b) = 1 - I_{1-x}(b,a)


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with df degrees of freedom:
    for t >= 0, 1 - I_{df/(df+t^2)}(df/2, 1/2) / 2 (and symmetric for t < 0)."""
    if df <= 0:
        raise ValueError(f"df must be > 0, got {df}")
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The p-quantile of Student's t with df > 0 degrees of freedom (0 < p < 1).

    df = 1 and 2 have closed forms (Cauchy: tan(pi (p - 1/2)); df 2: (2p-1)/sqrt(2p(1-p)));
    otherwise bisection on t_cdf to ~1e-12."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if df <= 0:
        raise ValueError(f"df must be > 0, got {df}")
    if p == 0.5:
        return 0.0
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    if df == 1:
        return math.tan(math.pi * (p - 0.5))
    if df == 2:
        return (2 * p - 1) / math.sqrt(2 * p * (1 - p))
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        hi *= 2.0
        if hi > 1e12:
            return math.inf
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


@dataclass
class Interval:
    """A mean with its two-sided confidence interval [lo, hi] (NaN bounds when n < 2)."""

    mean: float
    lo: float
    hi: float
    n: int
    sd: float
    level: float = 0.95

    @property
    def half_width(self) -> float:
        return (self.hi - self.lo) / 2.0

    def contains(self, v: float) -> bool:
        return self.lo <= v <= self.hi

    def fmt(self, digits: int = 4) -> str:
        if self.n == 0:
            return "n/a"
        if self.n < 2:
            return f"{self.mean:.{digits}f} (1 seed)"
        return f"{self.mean:.{digits}f} ± {self.half_width:.{digits}f}"


def mean_ci(values: Sequence[float], level: float = 0.95) -> Interval:
    """Mean of `values` ± t_{(1+level)/2, n-1} * s / sqrt(n), s the sample standard deviation
    (n - 1 in the denominator). Non-finite values are left out (a diverged run)."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    n = len(xs)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0, math.nan, level)
    m = math.fsum(xs) / n
    if n < 2:
        return Interval(m, math.nan, math.nan, 1, math.nan, level)
    sd = math.sqrt(math.fsum((x - m) ** 2 for x in xs) / (n - 1))
    half = t_quantile(0.5 + level / 2.0, n - 1) * sd / math.sqrt(n)
    return Interval(m, m - half, m + half, n, sd, level)


def paired_diff(a: Mapping[int, float], b: Mapping[int, float], level: float = 0.95) -> Interval:
    """Interval of the mean of a[s] - b[s] over the seeds s that both have (finite) values:
    each seed is one pair (same data order, same init seed), so the seed-to-seed spread
    that both runs share cancels."""
    diffs = []
    for s in sorted(set(a) & set(b)):
        x, y = a[s], b[s]
        if x is not None and y is not None and math.isfinite(x) and math.isfinite(y):
            diffs.append(float(x) - float(y))
    return mean_ci(diffs, level)


def verdict(diff: Interval, lower_is_better: bool = True) -> str:
    """'better' / 'worse' when the paired interval excludes 0, else 'no difference shown'
    ('n/a' with fewer than 2 pairs: no interval)."""
    if diff.n < 2 or not (math.isfinite(diff.lo) and math.isfinite(diff.hi)):
        return "n/a (< 2 paired seeds)"
    if diff.hi < 0:
        return "better" if lower_is_better else "worse"
    if diff.lo > 0:
        return "worse" if lower_is_better else "better"
    return "no difference shown"
