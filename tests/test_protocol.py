"""The fair-comparison protocol: its statistics against hand values and synthetic data, and a real two-stage sweep."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from analysis.protocol import pairwise, verdict
from analysis.stats import holm, paired_test
from conftest import run_cli, trial_results, write_spec


def test_paired_test_matches_the_textbook_formula():
    a, b = [0.91, 0.93, 0.92, 0.95, 0.94], [0.90, 0.91, 0.92, 0.92, 0.93]
    d = np.subtract(a, b)
    t = d.mean() / (d.std(ddof=1) / np.sqrt(len(d)))
    result = paired_test(a, b)
    assert result.statistic == pytest.approx(t) and result.df == 4
    assert result.p_value == pytest.approx(2 * stats.t.sf(abs(t), 4))
    assert np.isnan(paired_test([1, 2], [1, 2]).p_value)  # identical pairs: no spread, no test


def test_holm_adjusts_step_down_and_keeps_order():
    # p sorted: 0.01 (x3 = 0.03), 0.02 (x2 = 0.04), 0.04 (x1 = 0.04, kept monotone)
    assert holm([0.04, 0.01, 0.02]) == pytest.approx([0.04, 0.03, 0.04])
    assert holm([0.5, np.nan]) == pytest.approx([0.5, np.nan], nan_ok=True)


def _arms(rng, means: list[float], seeds: int = 5, noise: float = 0.01) -> dict[str, pd.Series]:
    shared = rng.normal(0, noise, seeds)  # seed effects common to every arm: what pairing removes
    return {f"arm{i}": pd.Series(m + shared + rng.normal(0, noise, seeds)) for i, m in enumerate(means)}


def test_a_planted_difference_is_detected_and_worded_as_such():
    rng = np.random.default_rng(0)
    detected = sum(pairwise(_arms(rng, [0.95, 0.91]), "max", 0.05)[0].significant for _ in range(200))
    assert detected >= 190  # 4 points at a paired-difference noise of 0.014 with 5 seeds: power about 0.99
    pair = pairwise({"adamw": pd.Series([0.95, 0.96, 0.95]), "adam": pd.Series([0.90, 0.92, 0.91])}, "max", 0.05)[0]
    assert pair.better == "adamw" and pair.significant
    assert verdict(pair, "test_acc", 3).startswith("adamw is better than adam: test_acc +0.0433")


def test_equal_arms_are_reported_as_no_detectable_difference():
    rng = np.random.default_rng(1)
    repeats = 2000
    two = sum(not pairwise(_arms(rng, [0.95, 0.95]), "max", 0.05)[0].significant for _ in range(repeats))
    # A level-0.05 test says "no difference" 95% of the time in expectation; allow 3 Monte Carlo standard errors.
    assert two / repeats >= 0.95 - 3 * np.sqrt(0.05 * 0.95 / repeats)
    five = sum(not any(p.significant for p in pairwise(_arms(rng, [0.95] * 5), "max", 0.05)) for _ in range(500))
    assert five / 500 >= 0.95  # Holm over all 10 pairs keeps the family-wise error at most 0.05
    pair = pairwise({"a": pd.Series([0.9, 0.91, 0.92]), "b": pd.Series([0.91, 0.9, 0.92])}, "max", 0.05)[0]
    assert "no detectable difference at this budget" in verdict(pair, "test_acc", 3)


@pytest.mark.slow
def test_two_stage_protocol_tunes_on_validation_then_confirms_on_test(tmp_path, tiny_spec):
    tiny_spec.update(
        train={"epochs": 2},
        arms={"sgd": {"optimizer": "sgd", "lr": {"loguniform": [0.01, 0.5]}},
              "adam": {"optimizer": "adam", "lr": {"loguniform": [1e-4, 1e-2]}}},
        search={"algorithm": "optuna", "num_samples": 3, "max_concurrent": 2},
        protocol={"confirm_seeds": 2},
    )
    spec = write_spec(tmp_path, tiny_spec)
    done = run_cli("run", str(spec), "--storage", str(tmp_path), "--no-dashboard")
    assert done.returncode == 0, done.stderr[-3000:]
    root = tmp_path / "tiny"
    tune, confirm = trial_results(root / "tune"), trial_results(root / "confirm")
    tune_arms = [json.loads((root / "tune" / n / "params.json").read_text())["arm"]["name"] for n in tune]
    assert sorted(tune_arms) == ["adam"] * 3 + ["sgd"] * 3  # the same budget per arm
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
    page = (root / "report" / "report.html").read_text()
    assert "the test split was not given to these trials" in page and "Holm" in page

    # Continuing a finished protocol redoes nothing: every result file stays byte for byte.
    before = {p: p.read_bytes() for p in root.glob("*/*/result.json")}
    again = run_cli("resume", str(root), "--no-dashboard")
    assert again.returncode == 0, again.stderr[-3000:]
    assert {p: p.read_bytes() for p in root.glob("*/*/result.json")} == before
