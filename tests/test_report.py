"""report.html and its figures from hand-built results directories: a smoke run says so, one colour per arm in
every figure, the confirm stage's seeds with their intervals, every trial in a table, hyperparameter importance,
and seconds of compute that do not depend on where a trial ran."""

from __future__ import annotations

import base64
import json
import re

import numpy as np
import pandas as pd
import pytest
from results_fixtures import curve_rows, report_sweep, spec_for, write_spec, write_trial
from test_protocol import _protocol_dir

from analysis import load_results, write_report
from analysis.budget import compute_seconds, time_to_target
from analysis.figures import make_figure
from analysis.hyperparameter_figures import MIN_IMPORTANCE_TRIALS, _importance_info
from analysis.plotting import NotApplicable, arm_colours, report_colours
from analysis.protocol import confirm_info, protocol_tables
from analysis.report import trial_table
from analysis.tables import compare


def figures_in(page: str) -> dict[str, list[dict]]:
    """Figure div id -> its Plotly traces, as the page hands them to Plotly.newPlot."""
    return {m.group(1): json.JSONDecoder().raw_decode(page, m.end())[0]
            for m in re.finditer(r'Plotly\.newPlot\(\s*"([^"]+)",\s*', page)}


def values(array) -> list:
    """A trace's numbers as Plotly 6 writes them into a page: a list, or base64 of a typed array."""
    if isinstance(array, dict):
        return np.frombuffer(base64.b64decode(array["bdata"]), dtype=array["dtype"]).tolist()
    return list(array)


def arm_colour_of(trace: dict, arms: set[str]) -> tuple[str, str] | None:
    """(arm, colour) of a trace drawn for one arm, or None for a trace of no arm (a Pareto front, a band)."""
    arm = trace.get("legendgroup") or trace.get("name")
    colour = (trace.get("marker") or {}).get("color") or (trace.get("line") or {}).get("color")
    return (arm, colour) if arm in arms and isinstance(colour, str) and trace.get("mode") != "none" else None


# -- one colour per arm -------------------------------------------------------------------------------------

def test_every_figure_gives_an_arm_the_colour_of_its_place_in_the_spec(tmp_path):
    # The spec lists sgd, adam, rmsprop, adamw...; they rank adamw..., rmsprop, sgd, adam. Colours follow the
    # spec, so an arm keeps its colour whatever the ranking or the figure (before: red was one arm in one figure
    # and another in the next).
    page = write_report(report_sweep(tmp_path / "sweep")).read_text()
    arms = ["sgd", "adam", "rmsprop", "adamw-with-a-long-name"]
    expected = arm_colours(arms)
    seen: dict[str, set[str]] = {}
    for traces in figures_in(page).values():
        for arm, colour in filter(None, (arm_colour_of(t, set(arms)) for t in traces)):
            seen.setdefault(arm, set()).add(colour)
    assert seen == {arm: {expected[arm]} for arm in arms}


def test_a_protocol_page_draws_its_arms_in_the_same_colours_in_every_stage(tmp_path):
    root = _protocol_dir(tmp_path / "p", tune={arm: [("completed", 0.9), ("completed", 0.8)] for arm in "abc"},
                         confirm={"a": [(0.90, False)] * 3, "b": [(0.95, False)] * 3, "c": [(0.93, False)] * 3})
    page = write_report(root).read_text()
    expected = arm_colours(["a", "b"])  # the protocol's spec lists a and b; c is only in the results
    expected["c"] = arm_colours(["a", "b", "c"])["c"]
    seen: dict[str, set[str]] = {}
    for traces in figures_in(page).values():
        for arm, colour in filter(None, (arm_colour_of(t, set("abc")) for t in traces)):
            seen.setdefault(arm, set()).add(colour)
    assert seen == {arm: {expected[arm]} for arm in "abc"}


def test_std_bands_are_filled_areas_without_markers_or_outlines(tmp_path):
    # The bands' corners were drawn as markers that looked like seeds.
    results = load_results(report_sweep(tmp_path / "sweep"))
    comparison = compare(results)
    for name in ("learning_curves", "tuning_curves"):
        bands = [t for t in make_figure(name, results, comparison).data if t.fill == "toself"]
        assert bands and all(t.mode == "none" for t in bands), name


# -- a smoke run says so ------------------------------------------------------------------------------------

def test_a_smoke_run_says_so_at_the_top_and_beside_its_verdicts(tmp_path):
    page = write_report(report_sweep(tmp_path / "smoke", smoke=True)).read_text()
    assert page.index("id='smoke'") < page.index("<h2>Comparison")
    assert re.search(r"<h2>Comparison <span class='smoke'>smoke run: not a result</span></h2>", page)
    assert "The full spec: 4 arms, 29 trials" not in page  # the full spec's promise, beside a smoke run's trials
    full = write_report(report_sweep(tmp_path / "full")).read_text()
    assert "id='smoke'" not in full and "smoke run" not in full and "The full spec: 4 arms, 29 trials" in full


def test_a_smoke_protocol_says_so_beside_its_verdicts(tmp_path):
    root = _protocol_dir(tmp_path / "p", tune={arm: [("completed", 0.9)] for arm in "ab"},
                         confirm={"a": [(0.90, False)] * 3, "b": [(0.95, False)] * 3})
    spec = (root / "spec.yaml").read_text()
    (root / "spec.yaml").write_text(spec + "smoke: true\n")
    page = write_report(root).read_text()
    assert "id='smoke'" in page and "proto: hand-built results" not in page
    assert "<h2>Verdict <span class='smoke'>smoke run: not a result</span></h2>" in page


def test_the_report_says_which_code_and_libraries_made_the_results(tmp_path):
    made = {"code": "sweeps 0.1.0 (git abc1234)", "python": "3.11.7", "torch": "2.14.1", "ray": "2.60.0",
            "optuna": "5.1.0"}
    results = report_sweep(tmp_path / "sweep")
    assert "Made with" not in write_report(results).read_text()  # results of a version that did not record them
    (results / "versions.json").write_text(json.dumps(made))
    page = write_report(results).read_text()
    assert "<dt>Made with</dt><dd>sweeps 0.1.0 (git abc1234), python 3.11.7, torch 2.14.1, ray 2.60.0, optuna " \
           "5.1.0</dd>" in page


# -- the confirm stage's seeds and intervals ----------------------------------------------------------------

def test_the_confirm_figure_shows_each_seed_and_the_tables_interval_kept_in_the_metrics_range(tmp_path):
    # b's seeds sit near 1: Student's t interval would reach past 1, the figure's stops at 1, as the table's does.
    root = _protocol_dir(tmp_path / "p", tune={arm: [("completed", 0.9)] for arm in "ab"},
                         confirm={"a": [(0.90, False), (0.92, False), (0.91, False)],
                                  "b": [(0.99, False), (1.0, False), (0.97, False)]})
    t = protocol_tables(root)
    info = confirm_info(t)
    assert info.labels == ["b", "a"] and info.metric == "test_acc"
    assert info.seeds[0].tolist() == [0.99, 1.0, 0.97] and info.seeds[1].tolist() == [0.90, 0.92, 0.91]
    assert info.mean == pytest.approx([0.9867, 0.91], abs=1e-4)
    assert info.ci_high[0] == 1.0 and 0 <= info.ci_low[0] < info.mean[0]
    page = write_report(root).read_text()
    [points, mean, *_] = figures_in(page)["figure-confirm-seeds"]
    assert values(points["x"]) == [0.99, 1.0, 0.97]
    assert values(mean["error_x"]["array"]) == pytest.approx([1.0 - info.mean[0]])


# -- every trial, and hyperparameter importance ---------------------------------------------------------------

def test_every_trial_is_a_row_of_a_sortable_table_with_its_settings_and_final_metrics(tmp_path):
    results_dir = report_sweep(tmp_path / "sweep")
    page = write_report(results_dir).read_text()
    table = page[page.index("<table class='data trials sortable'>"):]
    table = table[:table.index("</table>")]
    headers = re.findall(r"<th[^>]*>([^<]*)</th>", table)
    assert headers == ["trial_id", "arm", "status", "epochs", "optim.optimizer", "optim.lr", "optim.weight_decay",
                       "train.seed", "final_val_acc", "final_val_loss", "final_test_acc", "start-up s"]
    assert table.count("<tr>") == 1 + len(load_results(results_dir).trials)
    assert "table.sortable th" in page and "aria-sort" in page  # the few lines of script that sort it


def test_importance_ranks_the_setting_that_decides_the_score_and_says_why_other_arms_have_none(tmp_path):
    results = load_results(report_sweep(tmp_path / "sweep"))
    info = _importance_info(results)
    shares = info.importance.set_index("setting")["importance"]
    assert info.importance["arm"].unique().tolist() == ["adamw-with-a-long-name"]
    assert shares["optim.lr"] > 0.6 > shares["optim.weight_decay"] and shares.sum() == pytest.approx(1)
    assert info.not_shown == {"sgd": "no settings varied (2 needed)", "adam": "no settings varied (2 needed)",
                              "rmsprop": "1 setting varied (2 needed)"}


def test_importance_needs_enough_full_budget_trials(tmp_path):
    write_spec(tmp_path, spec_for(epochs=3, arms={"a": {}}))
    rng = np.random.default_rng(0)
    for index in range(MIN_IMPORTANCE_TRIALS - 1):
        config = {"arm": {"name": "a", "optim.lr": float(rng.uniform(0.001, 0.1)),
                          "optim.momentum": float(rng.uniform(0.5, 0.99))}}
        write_trial(tmp_path, index, config, curve_rows(float(rng.uniform(0.5, 0.9)), 3), done=True)
    with pytest.raises(NotApplicable, match=f"a: {MIN_IMPORTANCE_TRIALS - 1} full-budget trials "
                                            f"\\({MIN_IMPORTANCE_TRIALS} needed\\)"):
        _importance_info(load_results(tmp_path))


# -- seconds that count training and evaluation only ----------------------------------------------------------

def _two_timed_arms(path, epochs: int, startups: tuple[float, float]) -> None:
    """Arms "first" and "second", one trial each: epochs of 0.74 s and evaluations of 0.1 s, after `startups`."""
    write_spec(path, spec_for(epochs=epochs, arms={"first": {}, "second": {}}))
    for index, (arm, startup) in enumerate(zip(["first", "second"], startups)):
        rows = curve_rows(0.9, epochs)
        for row in rows:
            row.update(epoch_time_s=0.74, eval_time_s=0.1)
        write_trial(path, index, {"arm": {"name": arm}}, rows, done=True, startup_s=startup)


def test_time_to_target_counts_training_and_evaluation_not_the_workers_start_up(tmp_path):
    # Two equal arms; Ray's clock charged the first trial the start-up of its worker (7.1 s at epoch 1 for a
    # 0.74 s epoch, on quickstart). Timed by Ray's clock the first arm took 8.4 s to its target against 1.2 s.
    _two_timed_arms(tmp_path, 3, (7.1, 0))
    results = load_results(tmp_path)
    assert results.epochs["time_total_s"].iloc[0] == pytest.approx(7.94)  # what Ray's clock says
    timed = time_to_target(results, compare(results), target=0.8).set_index("arm")
    assert timed["seconds_to_target"].tolist() == pytest.approx([0.84 * 2] * 2)  # reached at epoch 2 by both
    write_report(tmp_path)
    compute = (tmp_path / "report" / "compute.csv").read_text().splitlines()
    assert [line.split(",")[3] for line in compute[1:]] == ["2.52", "2.52"]  # seconds: 3 epochs of 0.84 s each


def test_the_report_shows_each_trials_start_up_and_when_the_first_epoch_came(tmp_path):
    _two_timed_arms(tmp_path, 2, (7.1, 0.25))
    write_report(tmp_path)
    assert "<dt>Start-up</dt>" not in (tmp_path / "report" / "report.html").read_text()  # it recorded no timeline
    (tmp_path / "timeline.json").write_text('{"spec and data ready": 3.3, "Ray up": 7.0, "first epoch reported": 11.8, '
                                            '"all trials done": 18.6}')
    write_report(tmp_path)
    trials = pd.read_csv(tmp_path / "report" / "trials.csv")
    assert trials["startup_s"].tolist() == pytest.approx([7.1, 0.25])  # Ray's clock at epoch 1 less 0.84 s of work
    page = (tmp_path / "report" / "report.html").read_text()
    assert ("spec and data ready at 3.3 s, Ray up at 7.0 s, first epoch reported at 11.8 s, all trials done at "
            "18.6 s after the command began; the trials waited 3.7 s (median) before their first report, 7.1 s the "
            "longest") in page
    table = trial_table(load_results(tmp_path))  # the report's "Every trial" table
    assert table.columns[-1] == "start-up s" and table["start-up s"].tolist() == pytest.approx([7.1, 0.25])
    assert ">start-up s</th>" in page


def test_epochs_between_reports_count_at_the_reported_epochs_training_time(tmp_path):
    # Reported every 2 epochs: each report stands for two epochs of training and one evaluation.
    write_spec(tmp_path, spec_for(epochs=4))
    rows = curve_rows(0.9, 4)
    for row in rows:
        row.update(epoch_time_s=1.0, eval_time_s=0.25)
    write_trial(tmp_path, 0, {"arm": {"name": "a"}}, rows, done=True)
    epochs = load_results(tmp_path).epochs
    every_other = epochs[epochs["epoch"] % 2 == 0]
    assert compute_seconds(every_other).tolist() == [2.25, 4.5]
    older = epochs.drop(columns="eval_time_s")  # results from before trials reported their evaluation
    assert compute_seconds(older).tolist() == [1.0, 2.0, 3.0, 4.0]


def test_report_colours_list_the_spec_arms_first_then_arms_and_labels_of_the_results(tmp_path):
    results = load_results(report_sweep(tmp_path / "sweep"))
    assert list(report_colours(results, compare(results))) == ["sgd", "adam", "rmsprop", "adamw-with-a-long-name"]
