"""analysis.stats against numbers worked out by hand (Student's t and Welch-Satterthwaite formulas)."""

import math

import numpy as np
import pytest

from analysis.stats import summarize, welch_test

A = [0.90, 0.92, 0.94]  # mean 0.92, std 0.02
B = [0.80, 0.81, 0.79]  # mean 0.80, std 0.01
T_975_DF2 = 4.302652729911275  # Student's t quantile, 97.5%, 2 degrees of freedom


def test_summary_mean_std_and_student_t_interval():
    s = summarize(A)
    half = T_975_DF2 * 0.02 / math.sqrt(3)  # 0.04968
    assert s.n == 3
    assert s.mean == pytest.approx(0.92)
    assert s.std == pytest.approx(0.02)
    assert (s.ci_low, s.ci_high) == pytest.approx((0.92 - half, 0.92 + half))


def test_summary_drops_nan_and_inf_from_diverged_seeds():
    assert summarize([0.90, np.nan, 0.92, np.inf, 0.94, -np.inf]) == pytest.approx(summarize(A))


def test_summary_of_one_or_no_value_has_no_spread():
    one = summarize([0.7])
    assert one.n == 1 and one.mean == 0.7
    assert all(math.isnan(v) for v in (one.std, one.ci_low, one.ci_high))
    empty = summarize([np.nan])
    assert empty.n == 0 and math.isnan(empty.mean)


def test_summary_of_identical_values_has_a_zero_width_interval():
    s = summarize([0.5, 0.5, 0.5])
    assert (s.std, s.ci_low, s.ci_high) == (0.0, 0.5, 0.5)


def test_narrower_confidence_gives_narrower_interval():
    assert summarize(A, confidence=0.5).ci_high < summarize(A).ci_high


def test_welch_matches_the_textbook_formula():
    t = 0.12 / math.sqrt(0.02**2 / 3 + 0.01**2 / 3)  # 9.2952
    df = (0.02**2 / 3 + 0.01**2 / 3) ** 2 / ((0.02**2 / 3) ** 2 / 2 + (0.01**2 / 3) ** 2 / 2)  # 2.9412
    result = welch_test(A, B)
    assert result.statistic == pytest.approx(t)
    assert result.df == pytest.approx(df)
    assert result.p_value == pytest.approx(0.0028544, abs=1e-6)


def test_welch_is_symmetric_and_equal_means_give_p_one():
    forward, backward = welch_test(A, B), welch_test(B, A)
    assert backward.statistic == pytest.approx(-forward.statistic)
    assert backward.p_value == pytest.approx(forward.p_value)
    assert welch_test(A, [0.91, 0.92, 0.93]).p_value == pytest.approx(1.0)


def test_welch_is_undefined_without_two_values_or_without_variance():
    assert math.isnan(welch_test(A, [0.8]).p_value)
    assert math.isnan(welch_test(A, [0.8, np.nan]).p_value)  # one finite value left
    assert math.isnan(welch_test([0.9, 0.9], [0.8, 0.8]).p_value)


def test_welch_ignores_non_finite_values():
    assert welch_test([*A, np.nan], [*B, np.inf]).p_value == pytest.approx(welch_test(A, B).p_value)
