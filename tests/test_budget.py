"""Comparison science beyond the anchors: tuning curves, power, seed planning and time to target, checked against
exact expectations and against simulated confirm stages."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest
from results_fixtures import curve_rows, spec_for, write_spec, write_trial
from scipy import optimize, stats
from test_protocol import _protocol_dir, seeds

from analysis import load_results, write_report
from analysis.budget import default_target, plan_report, plan_seeds, time_to_target, tuning_curves
from analysis.protocol import pairwise, verdict
from analysis.stats import (  # the band's core, vectorised over samples
    BAND_FRACTION,
    _best_band,
    expected_best,
    expected_best_band,
    expected_power,
    minimum_detectable_effect,
    paired_power,
    paired_test,
    seeds_needed,
)
from analysis.tables import compare

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


_QUANTILE = {"normal": stats.norm(0.9, 0.02).ppf,  # validation accuracies of random configurations
             "skewed": lambda u: 0.85 - 0.02 * np.log1p(-u),  # 0.85 plus an exponential: a long tail above
             "heavy": lambda u: 0.8 + 0.02 * stats.lognorm(0.75).ppf(u),  # lognormal: a few configurations far better
             "diverged": lambda u: 0.97 + 0.015 * np.log(u)}  # 0.97 minus an exponential: a longer tail below
_DIVERGED = {"normal": 0.0, "skewed": 0.0, "heavy": 0.0, "diverged": 0.3}  # 30% of a learning-rate sweep diverge:
#                                                                            chance accuracy, 0.1
_PROMISED = {"normal": 0.93, "skewed": 0.93, "heavy": 0.90, "diverged": 0.93}  # README, budget.TUNING_ASSUMES


def _draw_scores(kind: str, rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    scores = _QUANTILE[kind](rng.uniform(size=shape))
    return np.where(rng.uniform(size=shape) < _DIVERGED[kind], 0.1, scores)


def _true_expected_best(kind: str, n_values: np.ndarray) -> np.ndarray:
    """E[best of n] = integral of Q(u) d(u^n) over [0, 1], Q the scores' quantile function, by quadrature."""
    from scipy import integrate
    quantile, diverged = _QUANTILE[kind], _DIVERGED[kind]

    def integrand(u, n):  # above the diverged fraction: Q(u) times the density of u^n
        return quantile((u - diverged) / (1 - diverged)) * n * u ** (n - 1)
    return np.array([diverged ** n * 0.1 + integrate.quad(integrand, diverged, 1, args=(n,), limit=200)[0]
                     for n in n_values])


@pytest.mark.parametrize("scores, size, repeats",
                         [(scores, size, repeats) for scores in ["normal", "skewed", "diverged"]
                          for size, repeats in [(10, 600), (20, 400), (40, 250)]] + [("heavy", 40, 250)])
def test_the_band_covers_the_population_curve_at_its_promised_rate(scores, size, repeats):
    # N scores drawn from the population, the band for n <= N/5, checked against the exact E[best of n]; vectorised
    # over the samples (_best_band is expected_best_band for many samples at once, each with its own resamples).
    # The promise, for each n, up to 3 Monte Carlo standard errors: 93% (nominal 95%), 90% with a heavy upper tail.
    # On these draws the jackknife band it replaced covers 87% at worst (skewed: fails at every N), 72% (diverged,
    # N = 20, n = 4: fails at every N) and 85% (heavy, N = 40, n = 8).
    rng, n_values = np.random.default_rng(size), np.arange(1, size // BAND_FRACTION + 1)
    low, high = _best_band(np.sort(_draw_scores(scores, rng, (repeats, size)), axis=1), len(n_values), 0.95, rng)
    truth = _true_expected_best(scores, n_values)
    rate = ((low <= truth) & (truth <= high)).mean(axis=0)
    promised = _PROMISED[scores]
    assert (rate >= promised - 3 * np.sqrt(promised * (1 - promised) / repeats)).all(), rate
    assert rate.mean() <= 0.99, rate  # not so wide as to say nothing


def test_the_band_is_the_published_one_for_one_sample_and_is_drawn_only_up_to_n_over_5():
    values = np.random.default_rng(3).normal(0.9, 0.02, 40)
    low, high = expected_best_band(values, 40)
    assert np.isfinite(low[:8]).all() and np.isnan(low[8:]).all() and np.isnan(high[8:]).all()
    assert (low[:8] < expected_best(values, 8)).all() and (expected_best(values, 8) < high[:8]).all()
    again = expected_best_band(values, 40)  # seeded: the same scores give the same band
    assert np.array_equal(low, again[0], equal_nan=True) and np.array_equal(high, again[1], equal_nan=True)
    flipped = expected_best_band(-values, 40, sign=-1)  # mode min is mode max mirrored
    assert flipped[0][:8] == pytest.approx(-high[:8]) and flipped[1][:8] == pytest.approx(-low[:8])


def test_the_band_stays_finite_when_scores_tie():
    # A resample of ten equal scores has no spread: the bootstrap-t leaves that end to the Bayesian bootstrap.
    low, high = expected_best_band([0.9] * 10 + [0.5] * 2, 12)
    assert np.isfinite(low[:2]).all() and np.isfinite(high[:2]).all() and (low[:2] < high[:2]).all()
    low, high = expected_best_band([0.9] * 12, 12)  # no spread at all: no uncertainty to show
    assert low[:2] == pytest.approx([0.9, 0.9]) and high[:2] == pytest.approx([0.9, 0.9])


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

def _paired_p(differences: np.ndarray) -> np.ndarray:
    """The paired t-test's two-sided p-value of each row of differences (paired_test, vectorised)."""
    n = differences.shape[1]
    t = differences.mean(1) / (differences.std(1, ddof=1) / np.sqrt(n))
    return 2 * stats.t.sf(np.abs(t), n - 1)


@pytest.mark.parametrize("level", [0.05, 0.05 / 3])
@pytest.mark.parametrize("n", [3, 5, 10])
def test_the_reported_mde_is_detected_at_the_promised_power_over_repeated_confirm_stages(n, level):
    # A confirm stage of n paired seeds reports an MDE from its own spread; a fresh confirm stage whose true
    # difference is that MDE detects it 80% of the time, over confirm stages (calibrated: not far above either).
    # Taking the observed spread for the true one, detection was 0.59 at 3 seeds, 0.69 at 5 and 0.73 at 10.
    rng, repeats = np.random.default_rng(n), 20_000
    sd = rng.normal(0, 1, (repeats, n)).std(1, ddof=1)  # the true spread of the differences is 1
    per_sd = minimum_detectable_effect(1.0, n, level)
    assert [minimum_detectable_effect(x, n, level) for x in sd[:3]] == pytest.approx(per_sd * sd[:3])  # scales
    mde = per_sd * sd
    fresh = mde[:, None] + rng.normal(0, 1, (repeats, n))
    assert paired_test(fresh[0], np.zeros(n)).p_value == pytest.approx(_paired_p(fresh[:1])[0])
    detected = (_paired_p(fresh) < level).mean()
    assert 0.8 - 3 * math.sqrt(0.8 * 0.2 / repeats) <= detected <= 0.86


def test_confirm_stages_judged_by_the_protocol_have_the_power_of_the_paired_t_test():
    # Through what the protocol runs (ArmSeeds, pairwise, Holm over the one pair), with the true spread known: seed
    # effects shared by both arms cancel in the pairs, and the arms' own noise makes the spread of the differences
    # (sd * sqrt 2). A difference the paired t-test detects with power 0.8 is found 80% of the time.
    n, sd, repeats, rng = 5, 0.01, 2000, np.random.default_rng(11)
    effect = optimize.brentq(lambda d: paired_power(d, sd * math.sqrt(2), n, 0.05) - 0.8, 0, 1)
    found = 0
    for _ in range(repeats):
        shared = rng.normal(0, 0.02, n)
        arms = {"a": seeds(0.9 + effect + shared + rng.normal(0, sd, n)),
                "b": seeds(0.9 + shared + rng.normal(0, sd, n))}
        [pair] = pairwise(arms, "max", 0.05)
        found += pair.significant and pair.better == "a"
    assert abs(found / repeats - 0.8) <= 3 * math.sqrt(0.8 * 0.2 / repeats)


def _rising(f, xs: np.ndarray) -> np.ndarray:
    """f at each of the sorted xs, for f nondecreasing: evaluated at the ends of a run, filled in where they agree."""
    out = np.empty(len(xs), dtype=int)

    def fill(i: int, j: int, fi: int, fj: int) -> None:
        if fi == fj or j - i <= 1:
            out[i:j + 1], out[j] = fi, fj
            return
        middle = (i + j) // 2
        fm = f(xs[middle])
        fill(i, middle, fi, fm)
        fill(middle, j, fm, fj)

    fill(0, len(xs) - 1, f(xs[0]), f(xs[-1]))
    return out


@pytest.mark.parametrize("effect", [0.5, 1, 2])
@pytest.mark.parametrize("pilot", [3, 5, 10])
def test_seeds_planned_from_a_pilot_reach_the_promised_power_over_pilots(pilot, effect):
    # Pilots of 3, 5 or 10 paired seeds (true spread 1) plan the seeds for a true difference `effect`; the true power
    # of the planned seeds, averaged over pilots, is at least 0.8. Planning from the pilot's spread as if true
    # gave 0.66 to 0.75.
    rng, pilots = np.random.default_rng(pilot * 10 + int(2 * effect)), 1000
    sd = np.sort(rng.normal(0, 1, (pilots, pilot)).std(1, ddof=1))
    planned = _rising(lambda x: seeds_needed(effect, x, 0.05, sd_df=pilot - 1), sd)  # more seeds for a wider spread
    true_power = np.array([paired_power(effect, 1.0, n, 0.05) for n in planned])
    assert true_power.mean() >= 0.8 - 3 * true_power.std() / math.sqrt(pilots), true_power.mean()


def _correlated_arms(rng, n: int, effect: float, seeds_from: int = 0) -> dict[str, pd.Series]:
    """Two arms' accuracies on seeds seeds_from.., per-seed sd 0.01, correlated 0.96 through what the seed does to
    both; a is `effect` better."""
    seed = rng.normal(0, 0.01 * math.sqrt(0.96), n)
    own = rng.normal(0, 0.01 * math.sqrt(0.04), (2, n))
    index = range(seeds_from, seeds_from + n)
    return {"a": pd.Series(0.9 + effect + seed + own[0], index=index), "b": pd.Series(0.9 + seed + own[1], index=index)}


def test_the_plan_promises_the_power_the_paired_test_of_the_table_achieves():
    # A pilot sweep of 2 seeds per arm (the fewest `sweep plan` plans from); its plan for a true difference of 0.005
    # (sd of the differences 0.0028); a fresh sweep with the seeds it prints, paired by seed: the paired t-test at the
    # plan's level rejects at least as often as promised (84%). Planned from the pilot's spread as if true, it
    # rejected 62% of the time for a promised 80% (75% from 3-seed pilots, 79% from 5).
    rng, pilots = np.random.default_rng(12), 600
    rejected = []
    for _ in range(pilots):
        [plan] = plan_seeds(_correlated_arms(rng, 2, 0.005), 0.005, alpha=0.05, power=0.8)
        fresh = _correlated_arms(rng, plan.seeds_needed, 0.005, seeds_from=100)
        rejected.append(paired_test(fresh["a"], fresh["b"]).p_value < plan.level)
        assert plan.level == 0.05 and not plan.why_not
    assert np.mean(rejected) >= 0.8 - 3 * math.sqrt(0.8 * 0.2 / pilots)


def test_a_pair_sharing_fewer_than_2_seeds_is_not_planned_for_the_paired_test():
    arms = {"a": pd.Series([0.90, 0.91, 0.92]), "b": pd.Series([0.89, 0.91, 0.90]),
            "c": pd.Series([0.80, 0.81, 0.82], index=[5, 6, 7])}  # c ran other seeds: the table runs Welch on it
    plans = {(p.better, p.worse): p for p in plan_seeds(arms, 0.01, alpha=0.05)}
    assert plans[("a", "b")].seeds_needed is not None and plans[("a", "b")].level == pytest.approx(0.05 / 3)
    for pair in [("a", "c"), ("b", "c")]:
        assert plans[pair].seeds_needed is None and "Welch's unpaired test" in plans[pair].why_not


def test_seeds_needed_is_the_fewest_that_reach_the_power():
    n = seeds_needed(0.005, 0.01, 0.005, 0.8, sd_df=4)
    assert expected_power(0.005, 0.01, n, 0.005, 4) >= 0.8 > expected_power(0.005, 0.01, n - 1, 0.005, 4)
    assert seeds_needed(1e-6, 0.01, 0.005, sd_df=4) is None  # far more than 100,000 seeds
    # A spread measured on many seeds is nearly the true one: the plan tends to the one from a known spread.
    n = seeds_needed(0.005, 0.01, 0.005, sd_df=100_000)
    assert paired_power(0.005, 0.01, n, 0.005) >= 0.8 > paired_power(0.005, 0.01, n - 1, 0.005)


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
    assert "at 0.0167: alpha 0.05 over 3 pairs, Holm's strictest step" in small
    assert "average the power over the true spreads those seeds leave possible" in small
    need = lambda text: [int(line.split()[-1]) for line in text.splitlines()[2:]]  # noqa: E731
    assert len(need(small)) == 3 and all(s > l for s, l in zip(need(small), need(large)))
    arms = {a: pd.Series([0.9 + d for d in rng.normal(0, 0.01, 5)]) for a in "ab"}
    [plan] = plan_seeds(arms, 0.01, alpha=0.05)
    assert plan.seeds_needed == seeds_needed(0.01, plan.sd_diff, 0.05, sd_df=4) and plan.n_now == 5
    assert plan.power_now == pytest.approx(expected_power(0.01, plan.sd_diff, 5, 0.05, 4))
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
