"""Comparison science beyond the anchors: tuning curves, power, seed planning and time to target, checked against
exact expectations and against simulated confirm stages."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest

from analysis import load_results, write_report
from analysis.budget import default_target, plan_report, plan_seeds, time_to_target, tuning_curves
from analysis.protocol import pairwise, verdict
from analysis.stats import (expected_best, expected_best_band, minimum_detectable_effect, paired_power, paired_test,
                            seeds_needed)
from analysis.tables import compare
from results_fixtures import curve_rows, spec_for, write_spec, write_trial
from test_protocol import _protocol_dir, seeds


# --- tuning curves ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("sign", [1, -1])
def test_expected_best_is_the_mean_best_over_every_subset_of_n(sign):
    values = [0.3, 0.9, 0.5, 0.7, 0.5]  # a tie too
    pick = max if sign == 1 else min
    exact = [np.mean([pick(subset) for subset in itertools.combinations(values, n)]) for n in range(1, 6)]
    assert expected_best(values, 5, sign) == pytest.approx(exact)


def test_expected_best_is_unbiased_up_to_n_equal_to_the_trials_run():
    # For Uniform(0, 1) scores the best of n independent trials has expectation n / (n + 1), at every n <= N,
    # including n = N. Drawing with replacement instead (Dodge et al. 2019) gives 0.926 at n = N = 20, not 0.952.
    rng, size = np.random.default_rng(0), 20
    estimates = np.mean([expected_best(rng.uniform(size=size), size) for _ in range(4000)], axis=0)
    assert estimates == pytest.approx([n / (n + 1) for n in range(1, size + 1)], abs=0.003)


@pytest.mark.parametrize("scores", ["normal", "skewed"])
def test_the_band_covers_the_population_curve_near_its_nominal_rate(scores):
    # N = 40 trials; the truth for the best of n: Monte Carlo on the population. The band is drawn for n <= N/5,
    # where it covered 91-96% (nominal 95%) over these and other shapes and sizes.
    rng, n_values, size, repeats = np.random.default_rng(1), [1, 4, 8], 40, 600
    draw = (lambda shape: rng.normal(0.9, 0.02, shape)) if scores == "normal" else \
        (lambda shape: 0.95 - rng.exponential(0.02, shape))
    truth = np.array([np.mean(np.max(draw((200_000, n)), axis=1)) for n in n_values])
    covered = np.zeros(len(n_values))
    for _ in range(repeats):
        low, high = expected_best_band(draw(size), size)
        index = np.subtract(n_values, 1)
        covered += (low[index] <= truth) & (truth <= high[index])
        assert np.isnan(low[size // 5:]).all()  # no band where it could not keep its coverage
    rate = covered / repeats
    assert (rate >= 0.89).all() and rate.mean() >= 0.92 and (rate <= 0.98).all(), rate


def test_tuning_curves_use_each_configuration_once_with_its_mean_over_seeds(tmp_path):
    write_spec(tmp_path, spec_for(epochs=2, search={"algorithm": "random", "metric": "val_acc", "mode": "max"}))
    finals = {1e-3: [0.90, 0.92], 1e-2: [0.80, 0.82], 1e-1: [0.50, 0.50]}
    index = 0
    for lr, values in finals.items():
        for seed, value in enumerate(values):
            write_trial(tmp_path, index, {"arm": {"name": "a", "optim.lr": lr}, "train.seed": seed},
                        curve_rows(value, 2), done=True)
            index += 1
    curves = tuning_curves(load_results(tmp_path))
    assert curves["n"].tolist() == [1, 2, 3] and (curves["n_configs"] == 3).all()
    assert curves["expected_best_val_acc"].tolist() == pytest.approx([np.mean([0.91, 0.81, 0.5]),
                                                                        np.mean([0.91, 0.91, 0.81]), 0.91])
    assert curves["band_low"].isna().all()  # 3 configurations: too few for a band (n <= N/5)


# --- power and seeds --------------------------------------------------------------------------------------

@pytest.mark.parametrize("n, level", [(5, 0.05), (5, 0.005), (10, 0.0167)])
def test_the_minimum_detectable_effect_is_detected_at_the_stated_power(n, level):
    # Simulated confirm stages with the true difference set to the MDE: the paired t-test finds it 80% of the time.
    sd, repeats, rng = 0.01, 4000, np.random.default_rng(n)
    mde = minimum_detectable_effect(sd, n, level, 0.8)
    found = sum(paired_test(0.9 + mde + d, np.full(n, 0.9)).p_value < level
                for d in rng.normal(0, sd, (repeats, n)))
    assert abs(found / repeats - 0.8) <= 3 * math.sqrt(0.8 * 0.2 / repeats)


def test_confirm_stages_judged_by_the_protocol_detect_the_mde_at_the_stated_power():
    # The same, through what the protocol runs (ArmSeeds, pairwise, Holm over the one pair): seed effects shared by
    # both arms cancel in the pairs, and the arms' own noise makes the spread of the differences (sd * sqrt 2).
    n, sd, repeats, rng = 5, 0.01, 2000, np.random.default_rng(11)
    mde = minimum_detectable_effect(sd * math.sqrt(2), n, 0.05, 0.8)
    found = 0
    for _ in range(repeats):
        shared = rng.normal(0, 0.02, n)
        arms = {"a": seeds(0.9 + mde + shared + rng.normal(0, sd, n)), "b": seeds(0.9 + shared + rng.normal(0, sd, n))}
        [pair] = pairwise(arms, "max", 0.05)
        found += pair.significant and pair.better == "a"
    assert abs(found / repeats - 0.8) <= 3 * math.sqrt(0.8 * 0.2 / repeats)


def test_seeds_needed_is_the_fewest_that_reach_the_power():
    n = seeds_needed(0.005, 0.01, 0.005, 0.8)
    assert paired_power(0.005, 0.01, n, 0.005) >= 0.8 > paired_power(0.005, 0.01, n - 1, 0.005)
    assert seeds_needed(1e-6, 0.01, 0.005) is None  # far more than 100,000 seeds


def test_a_no_difference_verdict_says_what_it_could_have_missed():
    rng = np.random.default_rng(5)
    arms = {"a": seeds(0.95 + rng.normal(0, 0.01, 5)), "b": seeds(0.95 + rng.normal(0, 0.01, 5))}
    [pair] = pairwise(arms, "max", 0.05)
    assert not pair.significant and pair.mde == pytest.approx(minimum_detectable_effect(pair.sd_diff, 5, 0.05))
    assert f"with 5 seeds it could have missed a true difference of up to {pair.mde:.4f} (80% power" in verdict(
        pair, "test_acc", arms)


def test_the_protocol_report_writes_each_pairs_power_and_the_tuning_curves(tmp_path):
    rng = np.random.default_rng(6)
    root = _protocol_dir(tmp_path / "p", tune={"a": [("completed", 0.8), ("completed", 0.9), ("stopped", 0.5)],
                                                "b": [("completed", 0.85), ("completed", 0.7)]},
                         confirm={arm: [(0.9 + d, False) for d in rng.normal(0, 0.01, 5)] for arm in "ab"})
    write_report(root)
    power = pd.read_csv(root / "report" / "power.csv")
    assert power.columns.tolist() == ["better", "worse", "n_seeds", "mean_diff", "sd_diff", "level", "mde_power80",
                                      "significant"]
    assert power["mde_power80"].iloc[0] == pytest.approx(minimum_detectable_effect(power["sd_diff"].iloc[0], 5, 0.05))
    curves = pd.read_csv(root / "report" / "tuning_curves.csv").set_index(["arm", "n"])
    assert curves.loc[("a", 1), "expected_best_val_acc"] == pytest.approx(np.mean([0.8, 0.9, 0.5]))
    compute = pd.read_csv(root / "report" / "compute.csv")
    assert {"target", "epochs_to_target", "seconds_to_target"} <= set(compute.columns)
    page = (root / "report" / "report.html").read_text()
    assert "could have missed a true difference" in page and 'id="figure-tune-tuning_curves"' in page


def test_plan_needs_more_seeds_for_a_smaller_effect_and_says_how_it_counted(tmp_path):
    rng = np.random.default_rng(7)
    root = _protocol_dir(tmp_path / "p", tune={arm: [("completed", 0.9)] for arm in "abc"},
                         confirm={arm: [(0.9 + d, False) for d in rng.normal(0, 0.01, 5)] for arm in "abc"})
    small, large = plan_report(root, 0.002), plan_report(root, 0.02)
    assert "paired t-test at 0.0167: alpha 0.05 over 3 pairs, Holm's strictest step" in small
    need = lambda text: [int(line.split()[-1]) for line in text.splitlines()[2:]]  # noqa: E731
    assert len(need(small)) == 3 and all(s > l for s, l in zip(need(small), need(large)))
    arms = {a: pd.Series([0.9 + d for d in rng.normal(0, 0.01, 5)]) for a in "ab"}
    [plan] = plan_seeds(arms, 0.01, alpha=0.05)
    assert plan.seeds_needed == seeds_needed(0.01, plan.sd_diff, 0.05) and plan.n_now == 5
    # Differences constant up to rounding (0.93 - 0.92 on every seed) are no spread, as for the verdicts.
    [flat] = plan_seeds({"a": pd.Series([0.93, 0.94, 0.95]), "b": pd.Series([0.92, 0.93, 0.94])}, 0.01, alpha=0.05)
    assert (flat.sd_diff, flat.seeds_needed) == (0.0, None) and np.isnan(flat.power_now)


# --- time to target ---------------------------------------------------------------------------------------

def _timed_sweep(path, curves: dict[str, list[list[float]]]):
    """Arm -> one val_acc curve per seed (one epoch a second)."""
    write_spec(path, spec_for(epochs=4, arms={arm: {} for arm in curves}))
    index = 0
    for arm, per_seed in curves.items():
        for seed, curve in enumerate(per_seed):
            rows = curve_rows(curve[-1], len(curve))
            for row, value in zip(rows, curve):
                row.update(val_acc=value, epoch_time_s=1.0)
            write_trial(path, index, {"arm": {"name": arm}, "train.seed": seed}, rows, done=True)
            index += 1
    return load_results(path)


def test_time_to_target_is_the_median_over_seeds_with_a_miss_counting_as_never(tmp_path):
    results = _timed_sweep(tmp_path, {"fast": [[0.5, 0.9, 0.95, 0.96]] * 3,
                                      "slow": [[0.3, 0.5, 0.7, 0.91], [0.3, 0.5, 0.92, 0.93], [0.3, 0.4, 0.5, 0.6]],
                                      "never": [[0.3, 0.5, 0.95, 0.96], [0.3, 0.4, 0.5, 0.6], [0.3, 0.4, 0.5, 0.6]]})
    table = time_to_target(results, compare(results), target=0.9).set_index("arm")
    assert table.loc["fast", ["n_reached", "epochs_to_target", "seconds_to_target"]].tolist() == [3, 2, 2.0]
    assert table.loc["slow", ["n_reached", "epochs_to_target"]].tolist() == [2, 4]  # median of 3, 4 and never
    assert table.loc["never", "n_reached"] == 1 and np.isnan(table.loc["never", "epochs_to_target"])


def test_the_default_target_is_one_more_than_half_of_every_arms_seeds_reach(tmp_path):
    # With two seeds, "half" would allow a target only one reaches: its median time would be "never".
    results = _timed_sweep(tmp_path, {"good": [[0.5, 0.9, 0.95, 0.96]] * 3, "fair": [[0.3, 0.6, 0.8, 0.85]] * 3,
                                      "even": [[0.3, 0.6, 0.82, 0.82], [0.3, 0.6, 0.9, 0.95]]})
    comparison = compare(results)
    assert default_target(results, comparison) == pytest.approx(0.82)
    timed = time_to_target(results, comparison).set_index("arm")
    assert timed["n_reached"].to_dict() == {"good": 3, "fair": 3, "even": 2} and timed["epochs_to_target"].notna().all()
    write_report(tmp_path, target=0.9)
    compute = pd.read_csv(tmp_path / "report" / "compute.csv").set_index("arm")
    assert compute.loc["good", "target"] == 0.9 and compute.loc["good", "epochs_to_target"] == 2
    assert compute.loc["good", ["trials", "epochs"]].tolist() == [3, 12]
    assert np.isnan(compute.loc["fair", "epochs_to_target"])  # fair never reaches 0.9
