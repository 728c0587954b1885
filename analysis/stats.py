"""Statistics across seeds: pure functions on arrays. NaN and infinite values are dropped first
(a diverged seed may report NaN), so `n` counts the finite values actually used."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numpy.typing import ArrayLike
from scipy import optimize, special, stats

# Spreads below this fraction of the values' own size are float rounding, not seed-to-seed variance:
# 0.93 - 0.92 computed on five seeds differs in the 17th digit, and a t-test would call that p = 1e-30.
# Accuracies on a test set move in steps of 1/size (>= 1e-6 for any real split), far above it.
SPREAD_TOLERANCE = 1e-9


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


def no_spread(values: np.ndarray, scale: float | None = None) -> bool:
    """Whether `values` are equal up to rounding, relative to `scale` (default: their own magnitude)."""
    if len(values) == 0:
        return True
    scale = float(np.max(np.abs(values))) if scale is None else scale
    return float(np.ptp(values)) <= SPREAD_TOLERANCE * scale


def summarize(values: ArrayLike, confidence: float = 0.95) -> Summary:
    """Mean, standard deviation and confidence interval of the mean over the finite values."""
    values = finite(values)
    n = len(values)
    if n == 0:
        return Summary(0, np.nan, np.nan, np.nan, np.nan)
    mean = float(values.mean())
    if n == 1:
        return Summary(1, mean, np.nan, np.nan, np.nan)
    std = 0.0 if no_spread(values) else float(values.std(ddof=1))
    half = float(stats.t.ppf((1 + confidence) / 2, n - 1)) * std / np.sqrt(n)
    return Summary(n, mean, std, mean - half, mean + half)


def prediction_interval(values: ArrayLike, confidence: float = 0.95) -> tuple[float, float]:
    """Where a single new run lands with probability `confidence`: mean ± t(n-1) * s * sqrt(1 + 1/n).

    This, not the confidence interval of the mean, is what a published single run should be checked
    against: the CI of the mean shrinks with n, and a run from the very same distribution falls outside it
    32% of the time at 5 seeds and 66% at 20.
    """
    s = summarize(values)
    if s.n < 2:
        return np.nan, np.nan
    half = float(stats.t.ppf((1 + confidence) / 2, s.n - 1)) * s.std * np.sqrt(1 + 1 / s.n)
    return s.mean - half, s.mean + half


def welch_test(a: ArrayLike, b: ArrayLike) -> TestResult:
    """Welch's two-sided t-test (unequal variances) of mean(a) against mean(b)."""
    a, b = finite(a), finite(b)
    if len(a) < 2 or len(b) < 2 or (no_spread(a) and no_spread(b)):
        return TestResult(np.nan, np.nan, np.nan)  # t is undefined: no estimate of the spread
    result = stats.ttest_ind(a, b, equal_var=False)
    return TestResult(float(result.statistic), float(result.pvalue), float(result.df))


def _finite_pairs(a: ArrayLike, b: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a, dtype=float).ravel(), np.asarray(b, dtype=float).ravel()
    keep = np.isfinite(a) & np.isfinite(b)
    return a[keep], b[keep]


def paired_sd(a: ArrayLike, b: ArrayLike) -> float:
    """Standard deviation of the paired differences a - b (pairs with a non-finite side dropped): 0 when they are
    equal up to rounding, relative to the values; NaN with fewer than 2 pairs."""
    a, b = _finite_pairs(a, b)
    if len(a) < 2:
        return np.nan
    scale = float(max(np.max(np.abs(a)), np.max(np.abs(b))))
    return 0.0 if no_spread(a - b, scale) else float(np.std(a - b, ddof=1))


def paired_test(a: ArrayLike, b: ArrayLike) -> TestResult:
    """Paired two-sided t-test of a against b (a[i] and b[i] share seed i); pairs with a non-finite side are dropped."""
    a, b = _finite_pairs(a, b)
    if not paired_sd(a, b) > 0:
        return TestResult(np.nan, np.nan, np.nan)  # no estimate of the spread of the differences
    result = stats.ttest_rel(a, b)
    return TestResult(float(result.statistic), float(result.pvalue), float(len(a) - 1))


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


def rank_key(values: ArrayLike, diverged: ArrayLike, sign: int) -> tuple[bool, bool, float, int]:
    """Sort key (larger is better) of one group of seeds' results; `sign` is 1 for mode max, -1 for min.

    A seed that diverged is a result: it keeps its score when that score is finite (the accuracy of a
    model whose outputs are not finite is that of a model that answers wrong). In order:
    a group whose every seed diverged ranks below any other; a group with a non-finite score on some
    seed (the loss of a diverged model) ranks below every group with a finite score on every seed;
    then the mean over the finite scores decides, then the number of seeds.
    """
    values, diverged = np.asarray(values, dtype=float).ravel(), np.asarray(diverged, dtype=bool).ravel()
    kept = values[np.isfinite(values)]
    mean = sign * float(kept.mean()) if len(kept) else -np.inf
    all_diverged = len(values) > 0 and bool(diverged.all())
    return not all_diverged, bool(len(kept) == len(values) > 0), mean, len(values)


# --- tuning budgets and power ------------------------------------------------------------------------

def expected_best(values: ArrayLike, n_max: int, sign: int = 1) -> np.ndarray:
    """E[best of n trials], n = 1..n_max (<= N), estimated from N observed scores without bias: the mean of the
    best over every n-subset of them (a U-statistic; Dodge et al. 2021, "Expected Validation Performance and
    Estimation of a Random Variable's Maximum"). With the scores sorted from worst to best, v_(1..N):
    E[best of n] = sum_i v_(i) * C(i-1, n-1) / C(N, n). Exact, no Monte Carlo. (Drawing with replacement, as
    Dodge et al. 2019 first did, underestimates the best of n more the closer n gets to N.)"""
    values = sign * np.sort(sign * np.asarray(values, dtype=float).ravel())
    return _best_weights(len(values), min(n_max, len(values))).T @ values


def _best_weights(size: int, n_max: int) -> np.ndarray:
    """(size, n_max): the chance that the i-th worst of `size` values is the best of an n-subset, C(i-1, n-1)/C(size, n)."""
    i, n = np.arange(1, size + 1)[:, None], np.arange(1, n_max + 1)[None, :]
    log_weight = (special.gammaln(i) - special.gammaln(n) - special.gammaln(np.maximum(i - n + 1, 1))
                  - (special.gammaln(size + 1) - special.gammaln(n + 1) - special.gammaln(size - n + 1)))
    return np.where(i >= n, np.exp(log_weight), 0.0)  # in logs: C(1000, 500) overflows a float


BAND_FRACTION = 5  # the band is drawn for n <= N / BAND_FRACTION, where simulation shows it keeps its coverage


def expected_best_band(values: ArrayLike, n_max: int, sign: int = 1,
                       confidence: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """A `confidence` interval for each E[best of n]: the estimate ± t(N-1) times its jackknife standard error.

    Only for n <= N / BAND_FRACTION (NaN beyond): N trials say little about the best of n close to N, and
    there no interval we tried (percentile and basic bootstrap, jackknife) came near its nominal coverage;
    below it the jackknife covered 92-97% in simulations (tests/test_budget.py). The curve itself is unbiased
    for every n <= N.
    """
    values = np.asarray(values, dtype=float).ravel()
    size = len(values)
    low, high = np.full(n_max, np.nan), np.full(n_max, np.nan)
    banded = min(n_max, size // BAND_FRACTION, size - 1)
    if banded < 1:
        return low, high
    estimate = expected_best(values, banded, sign)
    left_out = np.array([expected_best(np.delete(values, j), banded, sign) for j in range(size)])
    error = np.sqrt((size - 1) / size * ((left_out - left_out.mean(axis=0)) ** 2).sum(axis=0))
    half = float(stats.t.ppf((1 + confidence) / 2, size - 1)) * error
    low[:banded], high[:banded] = estimate - half, estimate + half
    return low, high


def paired_power(effect: float, sd: float, n: int, level: float) -> float:
    """Power of the two-sided paired t-test at `level` with `n` pairs whose differences have std `sd`,
    against a true mean difference `effect` (noncentral t)."""
    if n < 2 or not sd > 0:
        return np.nan
    df, critical = n - 1, stats.t.ppf(1 - level / 2, n - 1)
    shift = abs(effect) * np.sqrt(n) / sd
    upper = stats.nct.sf(critical, df, shift)
    if not np.isfinite(upper):  # scipy's noncentral t gives NaN far in its tails
        upper = 1.0 if shift > critical else 0.0
    return float(upper + np.nan_to_num(stats.nct.cdf(-critical, df, shift), nan=0.0))


def minimum_detectable_effect(sd: float, n: int, level: float, power: float = 0.8) -> float:
    """The smallest true difference the paired t-test detects with probability `power`."""
    if n < 2 or not np.isfinite(sd) or not sd > 0:
        return np.nan
    high = sd
    while paired_power(high, sd, n, level) < power:  # bracket the root: power rises with the effect
        high *= 2
    return float(optimize.brentq(lambda d: paired_power(d, sd, n, level) - power, 0.0, high, xtol=1e-9 * sd))


def seeds_needed(effect: float, sd: float, level: float, power: float = 0.8, limit: int = 100_000) -> int | None:
    """The fewest paired seeds with which the paired t-test detects `effect` with probability `power`."""
    if not sd > 0 or not effect:
        return None
    n = 2
    while paired_power(effect, sd, n, level) < power:
        n = n + 1 if n < 64 else int(n * 1.05) + 1  # power rises slowly at large n: coarser steps, then refine
        if n > limit:
            return None
    while n > 2 and paired_power(effect, sd, n - 1, level) >= power:
        n -= 1
    return n
