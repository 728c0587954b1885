"""Statistics across seeds: pure functions on arrays. NaN and infinite values are dropped first
(a diverged seed may report NaN), so `n` counts the finite values actually used."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numpy.typing import ArrayLike
from scipy import stats


class Summary(NamedTuple):
    n: int
    mean: float
    std: float  # sample standard deviation (ddof=1); NaN with fewer than 2 values
    ci_low: float  # Student-t confidence interval of the mean; NaN with fewer than 2 values
    ci_high: float


class TestResult(NamedTuple):
    statistic: float  # Welch's t
    p_value: float  # two-sided; NaN when the test is undefined (fewer than 2 values, or no variance)
    df: float  # Welch-Satterthwaite degrees of freedom


def finite(values: ArrayLike) -> np.ndarray:
    values = np.asarray(values, dtype=float).ravel()
    return values[np.isfinite(values)]


def summarize(values: ArrayLike, confidence: float = 0.95) -> Summary:
    """Mean, standard deviation and confidence interval of the mean over the finite values."""
    values = finite(values)
    n = len(values)
    if n == 0:
        return Summary(0, np.nan, np.nan, np.nan, np.nan)
    mean = float(values.mean())
    if n == 1:
        return Summary(1, mean, np.nan, np.nan, np.nan)
    std = float(values.std(ddof=1))
    half = float(stats.t.ppf((1 + confidence) / 2, n - 1)) * std / np.sqrt(n)
    return Summary(n, mean, std, mean - half, mean + half)


def welch_test(a: ArrayLike, b: ArrayLike) -> TestResult:
    """Welch's two-sided t-test (unequal variances) of mean(a) against mean(b)."""
    a, b = finite(a), finite(b)
    if len(a) < 2 or len(b) < 2 or (np.ptp(a) == 0 and np.ptp(b) == 0):
        return TestResult(np.nan, np.nan, np.nan)  # t is undefined: no estimate of the spread
    result = stats.ttest_ind(a, b, equal_var=False)
    return TestResult(float(result.statistic), float(result.pvalue), float(result.df))


def paired_test(a: ArrayLike, b: ArrayLike) -> TestResult:
    """Paired two-sided t-test of a against b (a[i] and b[i] share seed i); pairs with a non-finite side are dropped."""
    a, b = np.asarray(a, dtype=float).ravel(), np.asarray(b, dtype=float).ravel()
    keep = np.isfinite(a) & np.isfinite(b)
    diff = a[keep] - b[keep]
    if len(diff) < 2 or np.ptp(diff) == 0:
        return TestResult(np.nan, np.nan, np.nan)  # no estimate of the spread of the differences
    result = stats.ttest_rel(a[keep], b[keep])
    return TestResult(float(result.statistic), float(result.pvalue), float(len(diff) - 1))


def holm(p_values: ArrayLike) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values: reject where adjusted p < alpha keeps the family-wise error <= alpha.
    NaN p-values stay NaN and do not count towards the family size."""
    p = np.asarray(p_values, dtype=float)
    adjusted = np.full_like(p, np.nan)
    valid = np.flatnonzero(np.isfinite(p))
    order = valid[np.argsort(p[valid])]
    m = len(order)
    running = 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[index]))  # step-down, kept monotone
        adjusted[index] = running
    return adjusted
