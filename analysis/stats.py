"""Statistics across seeds: pure functions on arrays. NaN and infinite values are dropped first
(a diverged seed may report NaN), so `n` counts the finite values actually used."""

from __future__ import annotations

import functools
from collections.abc import Mapping
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
    ci_low: float  # Student-t confidence interval of the mean, within the metric's bounds; NaN with fewer than 2 values
    ci_high: float


class TestResult(NamedTuple):
    statistic: float  # t
    p_value: float  # two-sided; NaN when the test is undefined (fewer than 2 values, or no variance)
    df: float  # degrees of freedom the p-value was read at


UNBOUNDED = (-np.inf, np.inf)


def metric_range(metric: str) -> tuple[float, float]:
    """The values a metric can take, by its name: [0, 1] for accuracies (`*_acc`) and `ece`, [-1, 1] for `gen_gap`
    (an accuracy minus another), [0, inf) for losses and `weight_l2`, else unbounded."""
    if metric.endswith("_acc") or metric == "ece":
        return 0.0, 1.0
    if metric == "gen_gap":
        return -1.0, 1.0
    if metric.endswith("_loss") or metric == "weight_l2":
        return 0.0, np.inf
    return UNBOUNDED


def finite(values: ArrayLike) -> np.ndarray:
    values = np.asarray(values, dtype=float).ravel()
    return values[np.isfinite(values)]


def no_spread(values: np.ndarray, scale: float | None = None) -> bool:
    """Whether `values` are equal up to rounding, relative to `scale` (default: their own magnitude)."""
    if len(values) == 0:
        return True
    scale = float(np.max(np.abs(values))) if scale is None else scale
    return float(np.ptp(values)) <= SPREAD_TOLERANCE * scale


def metric_resolution(metric: str, confusion: Mapping[str, tuple[list[str], list[list[float]]]]) -> float:
    """The step between `metric`'s possible values, 0 when continuous or unknown: 1 / (images scored) for `val_acc`,
    whose split the final confusion matrices count (trial id -> (classes, counts), `Results.confusion`; the largest
    total, since a model's non-finite outputs are left out of its matrix). Nothing records the test split's size."""
    totals = [float(np.sum(counts)) for _, counts in confusion.values()] if metric == "val_acc" else []
    return 1 / max(totals) if totals and max(totals) > 0 else 0.0


def interval_sd(std: float, resolution: float) -> float:
    """The standard deviation an interval is built from: the sample's, but at least half a step of the metric.

    Values on a grid of `resolution` (an accuracy over N images moves in steps of 1/N) tie often, and a tie says
    only that the spread is below what the grid shows; half a step is the most that rounding to the grid can hide.
    Simulated at 2 to 10 seeds and spreads of 0.05 to 4 steps: with half a step, 95% CIs and PIs kept >= 94.8%
    coverage; with no floor a PI covered 77% to 79%, with a step / sqrt(12) floor 94% (checked in tests/test_stats.py).
    """
    return max(std, resolution / 2)


def _clip(low: float, high: float, bounds: tuple[float, float]) -> tuple[float, float]:
    return max(low, bounds[0]), min(high, bounds[1])


def summarize(values: ArrayLike, confidence: float = 0.95, *, bounds: tuple[float, float] = UNBOUNDED,
              resolution: float = 0.0) -> Summary:
    """Mean, standard deviation and confidence interval of the mean over the finite values.

    The interval is clipped to `bounds`, the values the metric can take (`metric_range`): its mean lies within
    them, so clipping never uncovers it. It is built from `interval_sd(std, resolution)`, `resolution` being the
    metric's step (0: continuous); `std` is the plain sample standard deviation.
    """
    values = finite(values)
    n = len(values)
    if n == 0:
        return Summary(0, np.nan, np.nan, np.nan, np.nan)
    mean = float(values.mean())
    if n == 1:
        return Summary(1, mean, np.nan, np.nan, np.nan)
    std = 0.0 if no_spread(values) else float(values.std(ddof=1))
    half = float(stats.t.ppf((1 + confidence) / 2, n - 1)) * interval_sd(std, resolution) / np.sqrt(n)
    return Summary(n, mean, std, *_clip(mean - half, mean + half, bounds))


def prediction_interval(values: ArrayLike, confidence: float = 0.95, *, bounds: tuple[float, float] = UNBOUNDED,
                        resolution: float = 0.0) -> tuple[float, float]:
    """Where a single new run lands with probability `confidence`: mean ± t(n-1) * s * sqrt(1 + 1/n), clipped to
    `bounds` (a new run's value lies within them, so clipping never uncovers it), with s = `interval_sd`.

    This, not the confidence interval of the mean, is what a published single run should be checked
    against: the CI of the mean shrinks with n, and a run from the very same distribution falls outside it
    32% of the time at 5 seeds and 66% at 20.
    """
    s = summarize(values)
    if s.n < 2:
        return np.nan, np.nan
    half = float(stats.t.ppf((1 + confidence) / 2, s.n - 1)) * interval_sd(s.std, resolution) * np.sqrt(1 + 1 / s.n)
    return _clip(s.mean - half, s.mean + half, bounds)


def welch_test(a: ArrayLike, b: ArrayLike) -> TestResult:
    """Welch's two-sided t-test (unequal variances) of mean(a) against mean(b), read at Hsu's min(n_a, n_b) - 1
    degrees of freedom.

    With few seeds on one side the Welch-Satterthwaite degrees of freedom make the test too liberal (under the
    null, 2 against 8 seeds said "different" 9.9% of the time at 0.05); min(n_a, n_b) - 1 keeps the false positive
    rate at most the level for every ratio of variances with normal data (Hsu 1938; Mickey and Brown 1966), at some
    loss of power when the smaller sample is the noisier one. Simulated in tests/test_stats.py.
    """
    a, b = finite(a), finite(b)
    if len(a) < 2 or len(b) < 2 or (no_spread(a) and no_spread(b)):
        return TestResult(np.nan, np.nan, np.nan)  # t is undefined: no estimate of the spread
    statistic = float(stats.ttest_ind(a, b, equal_var=False).statistic)
    df = min(len(a), len(b)) - 1
    return TestResult(statistic, float(2 * stats.t.sf(abs(statistic), df)), float(df))


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


BAND_FRACTION = 5  # the band is drawn for n <= N / BAND_FRACTION; beyond it no interval we tried kept its coverage
BAND_RESAMPLES = 2000  # bootstrap resamples of each kind, from a fixed seed: the same scores give the same band


def expected_best_band(values: ArrayLike, n_max: int, sign: int = 1,
                       confidence: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """A `confidence` interval for each E[best of n], n <= N / BAND_FRACTION (NaN beyond): the union of two
    bootstrap intervals, each from BAND_RESAMPLES resamples of a fixed seed (the same scores give the same band).

    - bootstrap-t: resampling the N scores with replacement, the quantiles of (resampled estimate - estimate) over
      the resample's jackknife standard error, times the scores' own, set the ends. It keeps its coverage for
      skewed scores, where the jackknife interval used before (estimate ± t(N-1) * standard error) covered down
      to 86% (exponential scores) and 83% (lognormal).
    - Bayesian bootstrap: under random Dirichlet(1, ..., 1) weights on the N scores, the quantiles of the best of
      n drawn with replacement, moved by the unbiased curve minus the with-replacement one. It keeps its coverage
      when a cluster of scores lies far below the rest, as diverged trials at chance accuracy do: with fewer than
      n of them among the N, the unbiased curve and its jackknife give them no weight at all (with 30% of the
      trials diverged the jackknife interval covered down to 68%, the bootstrap-t alone down to 74%).

    Simulated coverage of the 95% band (tests/test_budget.py; N = 10, 20, 40, every n <= N/5): 93-96% for normal
    and for right-skewed scores (exponential, beta(2, 8)), 94-98% for left-skewed, 93-99% for 30%-diverged, but
    only 90-94% when a few configurations are far better than the rest (lognormal, sigma 0.75: the N scores
    rarely show how far the upper tail reaches). Beyond N/5 N trials say little about the best of n, and no
    interval we tried (jackknife, percentile and basic bootstrap) came near its nominal coverage. The curve itself
    is unbiased for every n <= N.
    """
    values = np.asarray(values, dtype=float).ravel()
    size = len(values)
    low, high = np.full(n_max, np.nan), np.full(n_max, np.nan)
    banded = min(n_max, size // BAND_FRACTION, size - 1)
    if banded < 1:
        return low, high
    best_low, best_high = _best_band(np.sort(sign * values)[None], banded, confidence, np.random.default_rng(0))
    low[:banded], high[:banded] = (best_low[0], best_high[0]) if sign > 0 else (-best_high[0], -best_low[0])
    return low, high


def _best_band(rows: np.ndarray, n_max: int, confidence: float, rng: np.random.Generator,
               resamples: int = BAND_RESAMPLES) -> tuple[np.ndarray, np.ndarray]:
    """expected_best_band for E[max of n], n = 1..n_max, of each row of `rows` (R, N), sorted ascending:
    (R, n_max) low and high. Vectorised over rows so the coverage tests can afford thousands of samples."""
    count, size = rows.shape
    weights = _best_weights(size, n_max)
    estimate, error = rows @ weights, _jackknife_error(rows, n_max)
    tolerance = SPREAD_TOLERANCE * np.maximum(np.abs(rows).max(axis=1), 1e-300)[:, None]  # (R, 1)
    plug_in = _best_with_replacement(rows, np.arange(1, size + 1) / size, n_max)
    studentised, bayes = [], []
    chunk = max(1, 4_000_000 // (count * size * n_max))
    for start in range(0, resamples, chunk):
        shape = (count, min(chunk, resamples - start), size)
        drawn = np.take_along_axis(rows[:, None, :], np.sort(rng.integers(0, size, shape), axis=-1), axis=-1)
        spread, shift = _jackknife_error(drawn, n_max), drawn @ weights - estimate[:, None]
        shift[np.abs(shift) <= tolerance[:, None]] = 0.0  # rounding, as is a spread below the tolerance
        with np.errstate(divide="ignore", invalid="ignore"):
            studentised.append(np.where(spread > tolerance[:, None], shift / spread,
                                            np.where(shift == 0, 0.0, np.sign(shift) * np.inf)))
        gamma = np.cumsum(rng.standard_exponential(shape), axis=-1)
        bayes.append(_best_with_replacement(rows[:, None, :], gamma / gamma[..., -1:], n_max))
    tail = [(1 - confidence) / 2, (1 + confidence) / 2]
    t_low, t_high = np.quantile(np.concatenate(studentised, axis=1), tail, axis=1, method="inverted_cdf")
    b_low, b_high = np.quantile(np.concatenate(bayes, axis=1), tail, axis=1) + (estimate - plug_in)
    with np.errstate(invalid="ignore"):
        s_low, s_high = estimate - t_high * error, estimate - t_low * error
    s_low, s_high = (np.where(np.isfinite(s), s, np.nan) for s in (s_low, s_high))  # a resample without spread
    return np.fmin(s_low, b_low), np.fmax(s_high, b_high)


def _jackknife_error(rows: np.ndarray, n_max: int) -> np.ndarray:
    """Jackknife standard error of expected_best over the last axis of sorted `rows` (..., N): (..., n_max).
    Leaving out the (j+1)-th value instead of the j-th moves weight w_j (of N - 1 values) from the gap between
    them, so the estimates left out are 0, w_1 * gap_1, w_1 * gap_1 + w_2 * gap_2, ... from the first one's."""
    size = rows.shape[-1]
    moved = np.cumsum(np.diff(rows, axis=-1)[..., None] * _best_weights(size - 1, n_max), axis=-2)
    total, squares = moved.sum(axis=-2), np.einsum("...in,...in->...n", moved, moved)
    return np.sqrt(np.maximum((size - 1) / size * (squares - total ** 2 / size), 0.0))


def _best_with_replacement(rows: np.ndarray, cumulative: np.ndarray, n_max: int) -> np.ndarray:
    """E[max of n draws with replacement] from sorted `rows` (..., N) with cumulative weights (..., N) ending in 1:
    the best value less each gap between neighbours times the chance that all n draws fall below it, F_i ** n."""
    powers = np.cumprod(np.broadcast_to(cumulative[..., :-1, None], (*cumulative.shape[:-1], cumulative.shape[-1] - 1,
                                                                      n_max)), axis=-1)
    return rows[..., -1:] - np.einsum("...i,...in->...n", np.diff(rows, axis=-1), powers)


def _power(shift: np.ndarray, n: int, level: float) -> np.ndarray:
    """Power of the two-sided paired t-test with `n` pairs at `level`, for each noncentrality
    shift = |true difference| * sqrt(n) / (true std of the differences) (noncentral t)."""
    df, critical = n - 1, stats.t.ppf(1 - level / 2, n - 1)
    upper = stats.nct.sf(critical, df, shift)
    upper = np.where(np.isfinite(upper), upper, shift > critical)  # scipy's noncentral t gives NaN far in its tails
    return upper + np.nan_to_num(stats.nct.cdf(-critical, df, shift), nan=0.0)


def paired_power(effect: float, sd: float, n: int, level: float) -> float:
    """Power of the two-sided paired t-test at `level` with `n` pairs whose differences have the true std `sd`,
    against a true mean difference `effect`."""
    if n < 2 or not sd > 0:
        return np.nan
    return float(_power(np.asarray(abs(effect) * np.sqrt(n) / sd), n, level))


# Gauss-Legendre nodes and weights on (0, 1): the quantiles of the spread's sampling distribution at which
# `expected_power` averages. 32 agree with 256 to 4e-4 (1 to 99 degrees of freedom, 2 to 1000 pairs).
_QUANTILES, _WEIGHTS = special.roots_legendre(32)
_QUANTILES, _WEIGHTS = (_QUANTILES + 1) / 2, _WEIGHTS / 2


@functools.lru_cache(maxsize=None)
def _spread_ratios(sd_df: int) -> np.ndarray:
    """sd / sigma at each quadrature quantile: sqrt(V / sd_df), V ~ chi2(sd_df)."""
    return np.sqrt(stats.chi2.ppf(_QUANTILES, sd_df) / sd_df)


def expected_power(effect: float, sd: float, n: int, level: float, sd_df: int) -> float:
    """Power of the two-sided paired t-test at `level` with `n` pairs against a true difference `effect`, when the
    std of the differences is known only by an estimate `sd` with `sd_df` degrees of freedom (from sd_df + 1 pairs).

    It is `paired_power` averaged over the true spreads the estimate leaves possible, sigma = sd * sqrt(sd_df / V)
    with V ~ chi2(sd_df) (the spread's fiducial distribution). Taking `sd` for the true spread promises too much: a
    pilot underestimates it about half the time, and the power lost then exceeds what is gained otherwise
    (an MDE computed so from 5 seeds was detected 69% of the time, not 80%). By the same token the average is
    exact over repeated pilots where the effect is a multiple of the estimate (`minimum_detectable_effect`).
    """
    if n < 2 or sd_df < 1 or not sd > 0:
        return np.nan
    return float(_WEIGHTS @ _power(abs(effect) * np.sqrt(n) / sd * _spread_ratios(sd_df), n, level))


def minimum_detectable_effect(sd: float, n: int, level: float, power: float = 0.8) -> float:
    """The smallest true difference the paired t-test detects with probability `power`, from `sd`, the observed std
    of the paired differences of these `n` pairs: c * sd, with c such that over repeated experiments of n pairs a
    true difference of c times their own observed sd is detected with probability `power` (`expected_power`)."""
    if n < 2 or not np.isfinite(sd) or not sd > 0:
        return np.nan
    return sd * _mde_per_sd(n, level, power)


@functools.lru_cache(maxsize=None)
def _mde_per_sd(n: int, level: float, power: float) -> float:
    """`minimum_detectable_effect` for an observed sd of 1: the MDE is proportional to the observed sd."""
    detected = lambda d: expected_power(d, 1.0, n, level, n - 1) - power  # noqa: E731
    high = 1.0
    while detected(high) < 0:  # bracket the root: power rises with the effect
        high *= 2
    return float(optimize.brentq(detected, 0.0, high, xtol=1e-9))


def seeds_needed(effect: float, sd: float, level: float, power: float = 0.8, *, sd_df: int,
                 limit: int = 100_000) -> int | None:
    """The fewest paired seeds with which the paired t-test detects `effect` with probability `power`, the std of
    the differences being known by the estimate `sd` with `sd_df` degrees of freedom (`expected_power`); None when
    more than `limit` are needed."""
    if not sd > 0 or not effect:
        return None
    reaches = lambda n: expected_power(effect, sd, n, level, sd_df) >= power  # noqa: E731
    if not reaches(limit):
        return None
    low, high = 1, 2  # power rises with n: double until it reaches, then bisect between the last two
    while not reaches(high):
        low, high = high, min(2 * high, limit)
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (low, middle) if reaches(middle) else (middle, high)
    return high
