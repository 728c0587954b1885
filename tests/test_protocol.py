"""The fair-comparison protocol: its statistics against hand values and synthetic data, and a real two-stage sweep."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from conftest import run_cli, trial_results, write_spec
from results_fixtures import curve_rows, spec_for, write_trial
from results_fixtures import write_spec as write_results_spec
from scipy import stats

from analysis.protocol import ArmSeeds, pairwise, protocol_tables, verdict
from analysis.stats import holm, paired_test
from sweeps.protocol import tuned_settings


def test_paired_test_matches_the_textbook_formula():
    a, b = [0.91, 0.93, 0.92, 0.95, 0.94], [0.90, 0.91, 0.92, 0.92, 0.93]
    d = np.subtract(a, b)
    t = d.mean() / (d.std(ddof=1) / np.sqrt(len(d)))
    result = paired_test(a, b)
    assert result.statistic == pytest.approx(t) and result.df == 4
    assert result.p_value == pytest.approx(2 * stats.t.sf(abs(t), 4))
    assert np.isnan(paired_test([1, 2], [1, 2]).p_value)  # identical pairs: no spread, no test


def test_a_difference_constant_up_to_rounding_is_no_spread():
    # Every seed 0.01 apart, but in floating point the differences spread over 1e-16: exact equality let that
    # through to scipy, which called it p = 1.5e-58.
    a, b = np.array([0.931, 0.952, 0.913, 0.944, 0.925]), np.array([0.921, 0.942, 0.903, 0.934, 0.915])
    assert np.ptp(a - b) > 0
    assert np.isnan(paired_test(a, b).p_value)
    from analysis.stats import welch_test
    assert np.isnan(welch_test(np.full(5, 0.3) + [0, 1e-17, 0, 0, 0], np.full(5, 0.1)).p_value)


def test_holm_adjusts_step_down_and_keeps_order():
    # p sorted: 0.01 (x3 = 0.03), 0.02 (x2 = 0.04), 0.04 (x1 = 0.04, kept monotone)
    assert holm([0.04, 0.01, 0.02]) == pytest.approx([0.04, 0.03, 0.04])
    assert holm([0.5, np.nan]) == pytest.approx([0.5, np.nan], nan_ok=True)


def seeds(values, diverged=None) -> ArmSeeds:
    values = pd.Series(values, dtype=float)
    return ArmSeeds(values, pd.Series(diverged if diverged is not None else [False] * len(values)), len(values))


def _arms(rng, means: list[float], n: int = 5, noise: float = 0.01) -> dict[str, ArmSeeds]:
    shared = rng.normal(0, noise, n)  # seed effects common to every arm: what pairing removes
    return {f"arm{i}": seeds(m + shared + rng.normal(0, noise, n)) for i, m in enumerate(means)}


def test_a_planted_difference_is_detected_and_worded_as_such():
    rng = np.random.default_rng(0)
    detected = sum(pairwise(_arms(rng, [0.95, 0.91]), "max", 0.05)[0].significant for _ in range(200))
    assert detected >= 190  # 4 points at a paired-difference noise of 0.014 with 5 seeds: power about 0.99
    pair = pairwise({"adamw": seeds([0.95, 0.96, 0.95]), "adam": seeds([0.90, 0.92, 0.91])}, "max", 0.05)[0]
    assert pair.better == "adamw" and pair.significant and pair.n == 3
    assert verdict(pair, "test_acc").startswith("adamw is better than adam: test_acc +0.0433 on average "
                                                "(higher is better; paired t-test over 3 seeds")


def test_equal_arms_are_reported_as_no_detectable_difference():
    rng = np.random.default_rng(1)
    repeats = 2000
    two = sum(not pairwise(_arms(rng, [0.95, 0.95]), "max", 0.05)[0].significant for _ in range(repeats))
    # A level-0.05 test says "no difference" 95% of the time in expectation; allow 3 Monte Carlo standard errors.
    assert two / repeats >= 0.95 - 3 * np.sqrt(0.05 * 0.95 / repeats)
    five = sum(not any(p.significant for p in pairwise(_arms(rng, [0.95] * 5), "max", 0.05)) for _ in range(500))
    assert five / 500 >= 0.95  # Holm over all 10 pairs keeps the family-wise error at most 0.05
    pair = pairwise({"a": seeds([0.9, 0.91, 0.92]), "b": seeds([0.91, 0.9, 0.92])}, "max", 0.05)[0]
    assert "no detectable difference at this budget" in verdict(pair, "test_acc")


def test_survivors_of_a_diverging_arm_are_not_compared_alone():
    # lossy diverged on 2 of 5 seeds and its test_loss there is inf: judged on its 3 survivors it would look
    # better; instead it ranks below and the pair is not tested, saying why and how many seeds diverged.
    arms = {"steady": seeds([0.30, 0.31, 0.32, 0.30, 0.31]),
            "lossy": seeds([0.10, 0.11, 0.10, np.inf, np.nan], [False, False, False, True, True])}
    [pair] = pairwise(arms, "min", 0.05)
    assert (pair.better, pair.worse, pair.significant) == ("steady", "lossy", False) and np.isnan(pair.p_value)
    text = verdict(pair, "test_loss", arms)
    assert text.startswith("steady ranks above lossy, not tested: lossy has no finite score on some seeds")
    assert "lossy: 2 of 5 seeds diverged" in text


def test_the_better_arm_of_a_pair_is_the_one_ahead_on_the_seeds_both_finished():
    # steady's seeds 0 and 1 did not finish (failed): its own mean (0.91) is above lucky's (0.776), but on the
    # seeds both finished lucky is ahead by 0.05, and that is what the test compares.
    steady = ArmSeeds(pd.Series([0.90, 0.91, 0.92], index=[2, 3, 4]), pd.Series([False] * 3, index=[2, 3, 4]), 5)
    lucky = seeds([0.50, 0.50, 0.951, 0.962, 0.968])
    [pair] = pairwise({"steady": steady, "lucky": lucky}, "max", 0.05)
    assert (pair.better, pair.worse, pair.n, pair.significant) == ("lucky", "steady", 3, True)
    assert pair.mean_diff == pytest.approx(0.0503, abs=1e-4)
    assert verdict(pair, "test_acc").startswith("lucky is better than steady: test_acc +0.0503 on average")


def _protocol_dir(root, confirm: dict[str, list[tuple[float, bool]]], tune: dict[str, list[tuple[str, float]]]):
    """A protocol results directory: confirm[arm] = [(test_acc, diverged) per seed], tune[arm] = [(status, val_acc)]."""
    write_results_spec(root, {**spec_for("proto"), "protocol": {"confirm_seeds": 5, "alpha": 0.05}})
    write_results_spec(root / "tune", spec_for("tune", epochs=3,
                                               scheduler={"name": "asha", "grace_period": 1, "max_t": 3}))
    write_results_spec(root / "confirm", spec_for("confirm", epochs=3))
    index = 0
    for arm, trials in tune.items():
        for status, value in trials:
            rows = curve_rows(value, 3, test=False)[:1 if status == "stopped" else 3]
            rows[-1]["val_acc"] = value
            if status == "diverged":
                rows[-1].update(train_loss=np.nan, diverged=True)
            write_trial(root / "tune", index, {"arm": {"name": arm, "optim.lr": 0.001 * (index + 1)}}, rows,
                        done=status == "stopped")
            index += 1
    for arm, runs in confirm.items():
        for seed, (value, diverged) in enumerate(runs):
            rows = curve_rows(0.9, 3)
            rows[-1]["test_acc"] = value
            if diverged:
                rows = rows[:2]
                rows[-1].update(train_loss=np.nan, val_loss=np.nan, diverged=True,
                                **({"test_acc": value} if np.isfinite(value) else {}))
            write_trial(root / "confirm", index, {"arm": {"name": arm}, "train.seed": seed}, rows, done=True)
            index += 1
    return root


def test_diverged_confirm_seeds_are_results_and_an_arm_that_always_diverged_ranks_last(tmp_path):
    # flaky is better than steady on its 3 survivors, but it diverged on 2 seeds (scored as the model scores
    # there: 0.1); dead diverged on all 5. Judged on survivors flaky would be "better", and dead (mean NaN)
    # would sort to the top.
    good = [(0.95, False), (0.951, False), (0.949, False), (0.952, False), (0.950, False)]
    root = _protocol_dir(tmp_path / "p", tune={arm: [("completed", 0.9)] for arm in ("steady", "flaky", "dead")},
                         confirm={"steady": good,
                                  "flaky": [(0.97, False), (0.971, False), (0.969, False), (0.1, True), (0.1, True)],
                                  "dead": [(0.0, True)] * 5})
    t = protocol_tables(root)
    verdicts = t["verdicts"].set_index("arm")
    assert verdicts.index.tolist() == ["steady", "flaky", "dead"]
    assert verdicts["n_seeds"].tolist() == [5, 5, 5] and verdicts["n_diverged"].tolist() == [0, 2, 5]
    assert verdicts.loc["dead", "verdict_vs_top"] == "diverged on every seed"
    texts = [verdict(p, t["metric"], t["arms"]) for p in t["pairs"]]
    assert any(text.startswith("steady vs flaky") or text.startswith("steady is better than flaky") for text in texts)
    assert all("flaky: 2 of 5 seeds diverged" in text for text in texts if "flaky" in text)
    assert all("dead: 5 of 5 seeds diverged" in text for text in texts if "dead" in text)


def test_a_verdict_on_a_metric_to_minimise_prints_the_signed_difference_and_its_direction():
    # a's ECE is 0.01 lower than b's: the sentence used to read "ece +0.0100", as if a's were higher.
    a = np.array([0.010, 0.012, 0.011, 0.009, 0.010])
    [pair] = pairwise({"a": seeds(a), "b": seeds(a + [0.0101, 0.0099, 0.0100, 0.0102, 0.0098])}, "min", 0.05)
    assert (pair.better, pair.significant) == ("a", True) and pair.mean_diff == pytest.approx(-0.01)
    assert verdict(pair, "ece").startswith("a is better than b: ece \u22120.0100 on average (lower is better; ")


def test_an_arm_that_diverged_on_every_seed_is_never_called_better(tmp_path):
    # dead diverged on every seed, late, with a higher test_acc than steady on each: it ranks last, and the pair
    # sentence used to call it better than the top arm ("dead is better than steady").
    steady = [(0.90 + 0.002 * k, False) for k in range(5)]
    root = _protocol_dir(tmp_path / "p", tune={"steady": [("completed", 0.9)], "dead": [("completed", 0.9)]},
                         confirm={"steady": steady, "dead": [(0.95 + 0.001 * k, True) for k in range(5)]})
    t = protocol_tables(root)
    assert t["verdicts"]["arm"].tolist() == ["steady", "dead"]
    [pair] = t["pairs"]
    assert (pair.better, pair.significant) == ("steady", False)
    assert verdict(pair, t["metric"], t["arms"]).startswith("steady ranks above dead, not tested: dead diverged on "
                                                             "every seed")


def test_an_untested_pair_keeps_the_rankings_order():
    # b shares one seed with a, and is ahead on it; a ranks above b on its own seeds. The pair is not tested (one
    # paired seed): it used to read "b ranks above a", against the ranking.
    a = ArmSeeds(pd.Series([0.95, 0.95, 0.96], index=[0, 1, 2]), pd.Series([False] * 3, index=[0, 1, 2]), 3)
    b = ArmSeeds(pd.Series([0.97, 0.80, 0.80], index=[2, 3, 4]), pd.Series([False] * 3, index=[2, 3, 4]), 3)
    [pair] = pairwise({"a": a, "b": b}, "max", 0.05)
    assert (pair.better, pair.worse) == ("a", "b") and pair.why_not
    assert verdict(pair, "test_acc").startswith("a ranks above b, not tested")


def test_arms_with_the_same_score_on_every_seed_are_tied(tmp_path):
    [pair] = pairwise({"a": seeds([0.90, 0.91, 0.92]), "b": seeds([0.90, 0.91, 0.92])}, "max", 0.05)
    assert pair.tied and not pair.significant
    assert verdict(pair, "test_acc") == "a and b tied: the same test_acc on every seed"  # not "a ranks above b"
    same = [(0.95 + 0.001 * k, False) for k in range(5)]
    root = _protocol_dir(tmp_path / "p", tune={"a": [("completed", 0.9)], "b": [("completed", 0.9)]},
                         confirm={"a": same, "b": same})
    verdicts = protocol_tables(root)["verdicts"].set_index("arm")
    assert verdicts["verdict_vs_top"].iloc[1].startswith("tied with")


def test_the_verdict_tables_intervals_stay_within_the_metrics_range(tmp_path):
    # Accuracies near the ceiling: the Student-t interval reached above 1 (e.g. "0.9863 – 1.012").
    root = _protocol_dir(tmp_path / "p", tune={"a": [("completed", 0.9)], "b": [("completed", 0.9)]},
                         confirm={"a": [(v, False) for v in (0.999, 1.0, 0.997, 1.0, 0.9995)],
                                  "b": [(v, False) for v in (0.99, 0.995, 0.999, 0.98, 0.992)]})
    verdicts = protocol_tables(root)["verdicts"]
    assert (verdicts["test_acc_ci95_high"] <= 1).all() and (verdicts["test_acc_ci95_low"] >= 0).all()
    assert verdicts["test_acc_ci95_high"].iloc[0] == 1
    assert (verdicts["test_loss_ci95_low"].dropna() >= 0).all()


def test_diverged_seeds_without_a_test_score_rank_the_arm_below_and_are_not_tested(tmp_path):
    # Results written before diverged trials were tested have no test_acc for them: no score, not a good one.
    good = [(0.95 + 0.001 * k, False) for k in range(5)]
    root = _protocol_dir(tmp_path / "p", tune={"steady": [("completed", 0.9)], "old": [("completed", 0.9)]},
                         confirm={"steady": good, "old": [(0.99, False)] * 3 + [(np.nan, True)] * 2})
    t = protocol_tables(root)
    assert t["verdicts"]["arm"].tolist() == ["steady", "old"]
    [pair] = t["pairs"]
    assert not pair.significant and "old has no finite score on some seeds" in pair.why_not


def test_the_tune_stage_never_confirms_a_diverged_configuration_while_the_arm_has_another(tmp_path):
    # Arm a: no trial ran the full budget; the diverged one has the higher last val_acc, the stopped one a score
    # of its own: the stopped one goes on. Arm b diverged everywhere: its best diverged trial is all there is.
    root = _protocol_dir(tmp_path / "p", confirm={},
                         tune={"a": [("stopped", 0.30), ("diverged", 0.35)], "b": [("diverged", 0.2), ("diverged", 0.25)],
                               "c": [("completed", 0.5), ("diverged", 0.9), ("stopped", 0.95)]})
    tuned = tuned_settings(root / "tune", "val_acc", "max")
    assert tuned["a"]["optim.lr"] == pytest.approx(0.001) and tuned["b"]["optim.lr"] == pytest.approx(0.004)
    assert tuned["c"]["optim.lr"] == pytest.approx(0.005)  # the full-budget trial, over both partial ones


@pytest.mark.slow
def test_two_stage_protocol_tunes_on_validation_then_confirms_on_test(tmp_path, tiny_spec):
    tiny_spec.update(
        train={"epochs": 2},
        arms={"sgd": {"optimizer": "sgd", "lr": {"loguniform": [0.01, 0.5]}},
              "adam": {"optimizer": "adam", "lr": {"loguniform": [1e-4, 1e-2]}}},
        search={"algorithm": "optuna", "num_samples": 2, "max_concurrent": 2},
        protocol={"confirm_seeds": 2},
    )
    spec = write_spec(tmp_path, tiny_spec)
    done = run_cli("run", str(spec), "--storage", str(tmp_path), "--no-dashboard")
    assert done.returncode == 0, done.stderr[-3000:]
    root = tmp_path / "tiny"
    tune, confirm = trial_results(root / "tune"), trial_results(root / "confirm")
    tune_arms = [json.loads((root / "tune" / n / "params.json").read_text())["arm"]["name"] for n in tune]
    assert sorted(tune_arms) == ["adam"] * 2 + ["sgd"] * 2  # the same budget per arm
    assert not any("test_acc" in row for rows in tune.values() for row in rows), "stage 1 must never see the test split"
    assert len(confirm) == 4
    for name, rows in confirm.items():
        assert [("test_acc" in r) for r in rows] == [False, True]  # tested once, after the last epoch
    # Each confirm trial runs its arm's best tuning configuration (by final val_acc), seeds 0 and 1.
    best = {}
    for name, rows in tune.items():
        config = json.loads((root / "tune" / name / "params.json").read_text())
        arm = config["arm"]["name"]
        if arm not in best or rows[-1]["val_acc"] > best[arm][0]:
            best[arm] = (rows[-1]["val_acc"], config["arm"]["optim.lr"])
    for name in confirm:
        config = json.loads((root / "confirm" / name / "params.json").read_text())
        assert config["arm"]["optim.lr"] == best[config["arm"]["name"]][1]
    assert sorted(json.loads((root / "confirm" / n / "params.json").read_text())["train.seed"] for n in confirm) == [0, 0, 1, 1]
    verdicts = pd.read_csv(root / "report" / "verdicts.csv")
    assert sorted(verdicts["arm"]) == ["adam", "sgd"] and (verdicts["n_seeds"] == 2).all()
    assert verdicts["arm"].tolist() == [line.split()[1] for line in done.stdout.splitlines()
                                        if line.split()[:1] in (["1"], ["2"])]  # the console names the same ranking
    page = (root / "report" / "report.html").read_text()
    assert "the test split was not given to these trials" in page and "Holm" in page

    # Continuing a finished protocol redoes nothing: every result file stays byte for byte.
    before = {p: p.read_bytes() for p in root.glob("*/*/result.json")}
    again = run_cli("resume", str(root), "--no-dashboard")
    assert again.returncode == 0, again.stderr[-3000:]
    assert {p: p.read_bytes() for p in root.glob("*/*/result.json")} == before
