"""End-to-end sweeps with the real CLI and a real local Ray runtime."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pandas as pd
import pytest
import ray
import torch
import yaml
from conftest import TRIAL_LINE, VOLATILE, run_cli, tiny, trial_results, write_spec

pytestmark = pytest.mark.slow

EPOCH_METRICS = {"epoch", "train_loss", "train_acc", "train_loss_running", "train_acc_running", "val_loss", "val_acc",
                 "gen_gap", "weight_l2", "ece", "lr", "epoch_time_s", "samples_per_s"}


def run_ok(*args: str) -> str:
    done = run_cli(*args, "--no-dashboard")
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout + done.stderr


@pytest.fixture(scope="module")
def grid_twice(tmp_path_factory) -> tuple[Path, dict, dict]:
    """One grid spec run twice with the same seeds, the second time as `second` with --verbose: the results folder,
    the spec, and each run's finished process."""
    folder, spec = tmp_path_factory.mktemp("grid"), tiny()
    spec["space"] = {"seed": {"grid": [0, 1]}}
    spec["arms"]["adam"]["batch_size"] = 500  # more than the 400 training images: said, not silently clamped
    spec["data"]["augment"] = {"crop_padding": 2, "hflip": True}  # randomness in the data path too
    path, storage = write_spec(folder, spec), str(folder / "results")
    done = {"first": run_cli("run", str(path), "--storage", storage, "--no-dashboard"),
            "second": run_cli("run", str(path), "--storage", storage, "--no-dashboard", "--name", "second", "--verbose")}
    return folder / "results", spec, done


def test_grid_sweep_reports_every_metric_every_epoch(grid_twice):
    results, spec, done = grid_twice
    assert done["first"].returncode == 0, done["first"].stderr[-3000:]
    out = done["first"].stdout + done["first"].stderr
    assert "note: arms.adam: batch_size 500 is larger than the 400 training images, so each epoch is one batch" in out
    results_dir = results / "tiny"
    trials = trial_results(results_dir)
    assert len(trials) == 4  # 2 arms x 2 seeds
    for name, rows in trials.items():
        assert [r["epoch"] for r in rows] == [1, 2]
        for row in rows:
            assert EPOCH_METRICS <= row.keys(), name
            assert 0 <= row["val_acc"] <= 1 and 0 <= row["train_acc"] <= 1 and 0 <= row["ece"] <= 1
            assert row["gen_gap"] == pytest.approx(row["train_acc"] - row["val_acc"])
            assert row["diverged"] is False
        last = rows[-1]
        assert {"test_loss", "test_acc", "confusion_matrix", "classes"} <= last.keys()
        matrix = last["confusion_matrix"]
        assert len(matrix) == 10 and sum(map(sum, matrix)) == 400  # 10% of mnist5k's 4,000 training images
        assert sum(matrix[i][i] for i in range(10)) / 400 == pytest.approx(last["val_acc"])
        assert list(results_dir.joinpath(name).glob("checkpoint_*")), "the last epoch is checkpointed"
    saved = yaml.safe_load((results_dir / "spec.yaml").read_text())
    assert saved["name"] == "tiny" and saved["train"]["epochs"] == 2 and saved["space"] == spec["space"]
    made = json.loads((results_dir / "versions.json").read_text())  # and the report's "Made with"
    assert made["ray"] == ray.__version__ and torch.__version__.startswith(made["torch"]) and "sweeps" in made["code"]
    assert any("batch_size 500" in note for note in saved["notes"])  # and in the report
    assert "Comparison (as in report/comparison.md)" in out
    assert (results_dir / "report" / "report.html").is_file()


def test_same_spec_and_seed_give_identical_metrics(grid_twice):
    results, _, done = grid_twice  # the second run with --verbose: how much it prints changes nothing it learns
    assert done["first"].returncode == 0 and done["second"].returncode == 0, done["second"].stderr[-3000:]

    def metrics(name: str) -> dict:  # (arm, seed) -> its rows
        return {(rows[0]["config"]["arm"]["name"], rows[0]["config"]["train.seed"]):
                [{k: v for k, v in r.items() if k not in VOLATILE} for r in rows]
                for rows in trial_results(results / name).values()}

    assert len(metrics("tiny")) == 4 and metrics("tiny") == metrics("second")


def test_verbose_brings_back_tunes_tables(grid_twice):
    _, _, done = grid_twice
    second = done["second"]
    assert second.returncode == 0, second.stderr[-3000:]
    assert "Trial status:" in second.stdout
    assert not any(TRIAL_LINE.match(line) for line in second.stderr.splitlines())


def test_random_search_trains_each_drawn_configuration_with_every_seed(tmp_path, tiny_spec):
    tiny_spec.update(train={"epochs": 1}, space={"seed": {"grid": [0, 1]}},
                     arms={"sgd": {"optimizer": "sgd", "lr": {"loguniform": [0.01, 0.5]}},
                           "adam": {"optimizer": "adam", "lr": {"loguniform": [1e-4, 1e-2]}}},
                     search={"algorithm": "random", "num_samples": 2})
    run_ok("run", str(write_spec(tmp_path, tiny_spec)), "--storage", str(tmp_path))
    configs = [json.loads(p.read_text()) for p in (tmp_path / "tiny").glob("*/params.json")]
    seeds = {}
    for c in configs:
        seeds.setdefault((c["arm"]["name"], c["arm"]["optim.lr"]), []).append(c["train.seed"])
    assert len(configs) == 8 and len(seeds) == 4 and all(sorted(s) == [0, 1] for s in seeds.values())
    comparison = pd.read_csv(tmp_path / "tiny" / "report" / "comparison.csv").set_index("arm")
    assert (comparison["n_seeds"] == 2).all() and (comparison["n_configs"] == 2).all()


@pytest.fixture(scope="module")
def asha_run(tmp_path_factory) -> tuple[Path, str]:
    """An ASHA sweep of two arms, one trial at a time: its results folder and its console output."""
    # One trial at a time in grid order (adam good s0, adam hopeless s0, sgd s0, adam good s1, ...), so whenever
    # the hopeless learning rate (1e-7: it cannot learn in 4 epochs) reaches a rung, a good result of its own arm
    # is already recorded there and ASHA cuts it, however loaded the machine is. The sgd arm is judged against
    # itself only: its first trial at each rung goes on, so it ends with a trial trained to the end.
    folder, spec = tmp_path_factory.mktemp("asha"), tiny()
    spec.update(
        train={"epochs": 4},
        arms={"adam": {"optimizer": "adam", "lr": {"grid": [0.003, 1.0e-7]}}, "sgd": {"optimizer": "sgd", "lr": 0.05}},
        space={"seed": {"grid": [0, 1, 2]}},
        search={"max_concurrent": 1},
        scheduler={"name": "asha", "grace_period": 1, "reduction_factor": 2},
    )
    out = run_ok("run", str(write_spec(folder, spec)), "--storage", str(folder / "results"))
    return folder / "results" / "tiny", out


def test_asha_stops_a_hopeless_configuration_within_its_arm_and_spares_a_lone_arm(asha_run):
    results_dir, out = asha_run
    trials = trial_results(results_dir)
    epochs = {(rows[0]["config"]["arm"]["name"], rows[0]["config"]["arm"]["optim.lr"]): [] for rows in trials.values()}
    for rows in trials.values():
        epochs[rows[0]["config"]["arm"]["name"], rows[0]["config"]["arm"]["optim.lr"]].append(rows[-1]["epoch"])
    # The console names the winners comparison.md names, judged on trials that ran to the end, not on the
    # hopeless configuration's epoch-1 scores.
    comparison = pd.read_csv(results_dir / "report" / "comparison.csv")
    printed = out[out.index("Comparison (as in report/comparison.md)"):].splitlines()[2:4]
    assert [line.split()[:2] for line in printed] == [[str(r), a] for r, a in zip(comparison["rank"], comparison["arm"])]
    assert sorted(comparison["arm"]) == ["adam", "sgd"]
    assert "optim.lr=0.003" in comparison.set_index("arm").at["adam", "best_config"]
    assert all(len(e) == 3 for e in epochs.values()), epochs
    assert max(epochs["adam", 1.0e-7]) < 4, f"ASHA should have stopped the hopeless configuration early: {epochs}"
    assert max(epochs["adam", 0.003]) == 4 and max(epochs["sgd", 0.05]) == 4, epochs


def journal_trials(results_dir: Path) -> dict[str, list[optuna.trial.FrozenTrial]]:
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(results_dir / "optuna.log")))
    return {s.study_name: storage.get_all_trials(storage.get_study_id_from_name(s.study_name))
            for s in storage.get_all_studies()}


def test_the_journal_holds_every_trial_of_every_arm_as_it_ran(asha_run):
    # ASHA stopped the hopeless learning rate of the adam arm: pruned in Optuna's words. (A failed trial is failed
    # in Optuna's words: see test_a_sweep_whose_every_trial_fails_exits_1_saying_where_to_look.)
    results_dir, _ = asha_run
    studies, rows = journal_trials(results_dir), trial_results(results_dir)
    assert sorted(studies) == ["adam", "sgd"] and len(studies["adam"]) == 6 and len(studies["sgd"]) == 3
    for arm, trials in studies.items():
        for trial in trials:
            tune_rows = next(r for name, r in rows.items() if name.endswith(trial.user_attrs["tune_trial_id"]))
            assert trial.intermediate_values == {r["epoch"]: r["val_acc"] for r in tune_rows}
            assert set(trial.params) == ({"optim.lr", "train.seed"} if arm == "adam" else {"train.seed"})
            if tune_rows[-1]["epoch"] == 4:  # ran to the end
                assert trial.state == optuna.trial.TrialState.COMPLETE and trial.value == tune_rows[-1]["val_acc"]
            else:  # ASHA stopped it
                assert trial.state == optuna.trial.TrialState.PRUNED and trial.value is None
    states = {lr: {t.state for t in studies["adam"] if t.params["optim.lr"] == lr} for lr in (0.003, 1.0e-7)}
    assert optuna.trial.TrialState.COMPLETE in states[0.003] and states[1.0e-7] == {optuna.trial.TrialState.PRUNED}
    first_sgd = min(studies["sgd"], key=lambda t: t.number)  # the first at each rung of its arm: nothing to stop it
    assert first_sgd.state == optuna.trial.TrialState.COMPLETE


def test_optuna_sweep_gives_each_arm_its_budget_within_its_range(tmp_path, tiny_spec):
    tiny_spec.update(
        train={"epochs": 1},
        arms={"sgd": {"optimizer": "sgd", "lr": {"loguniform": [0.01, 0.5]}},
              "adam": {"optimizer": "adam", "lr": {"loguniform": [1e-4, 1e-2]}}},
        search={"algorithm": "optuna", "num_samples": 3, "max_concurrent": 2},
    )
    run_ok("run", str(write_spec(tmp_path, tiny_spec)), "--storage", str(tmp_path / "results"))
    configs = [json.loads(p.read_text()) for p in (tmp_path / "results" / "tiny").glob("*/params.json")]
    arms = [c["arm"]["name"] for c in configs]
    assert sorted(arms) == ["adam"] * 3 + ["sgd"] * 3
    for c in configs:
        low, high = (0.01, 0.5) if c["arm"]["name"] == "sgd" else (1e-4, 1e-2)
        assert low <= c["arm"]["optim.lr"] <= high and c["arm"]["optim.optimizer"] == c["arm"]["name"]


def test_a_sweep_whose_every_trial_fails_exits_1_saying_where_to_look(tmp_path, tiny_spec):
    # A 10^12-unit hidden layer passes validation (a shape check on the meta device allocates nothing) and
    # fails in every trial when its 4 TB of weights are allocated: a real out-of-memory, as users meet it.
    tiny_spec.update(model={"name": "mlp", "hidden_sizes": [1, 10**12]}, run={"max_failures": 0})
    done = run_cli("run", str(write_spec(tmp_path, tiny_spec)), "--storage", str(tmp_path), "--no-dashboard")
    assert done.returncode == 1, done.stderr[-3000:]
    [line] = [line for line in done.stderr.splitlines() if line.startswith("sweep: error:")]
    assert line.startswith("sweep: error: all 2 trials failed; the first error is in ")
    error_file = Path(line.split(" is in ")[1])
    assert error_file.name == "error.txt" and error_file.is_file() and "allocate" in error_file.read_text()
    # The short console leaves Tune's error reports alone: the traceback prints in full.
    assert "Traceback (most recent call last):" in done.stderr and "can't allocate memory" in done.stderr
    # The Optuna journal records each as failed, with no intermediate values.
    trials = [t for study in journal_trials(tmp_path / "tiny").values() for t in study]
    assert len(trials) == 2 and all(t.state == optuna.trial.TrialState.FAIL and not t.intermediate_values for t in trials)


def test_report_cadence_skips_rows_not_results(tmp_path, tiny_spec):
    # Two arms that differ only in cadence train the same model: reporting and checkpointing less
    # often must not change what the trial learns, only which epochs get a row and a checkpoint.
    tiny_spec["train"]["epochs"] = 5
    tiny_spec["arms"] = {"every": {"optimizer": "sgd", "lr": 0.1},
                         "sparse": {"optimizer": "sgd", "lr": 0.1, "report_every": 2, "checkpoint_every": 4}}
    run_ok("run", str(write_spec(tmp_path, tiny_spec)), "--storage", str(tmp_path / "results"))
    results_dir = tmp_path / "results" / "tiny"
    rows = {name.split("_")[0]: rows for name, rows in trial_results(results_dir).items()}
    assert [r["epoch"] for r in rows["every"]] == [1, 2, 3, 4, 5]
    assert [r["epoch"] for r in rows["sparse"]] == [2, 4, 5]  # every 2nd epoch, and the last
    every = {r["epoch"]: r for r in rows["every"]}
    for row in rows["sparse"]:
        for metric in ("train_loss", "val_acc", "val_loss", "weight_l2", "lr"):
            assert row[metric] == every[row["epoch"]][metric], (row["epoch"], metric)
    assert "confusion_matrix" in rows["sparse"][-1]
    sparse_dir = next(results_dir.glob("sparse_*"))
    saved = [json.loads(line)["epoch"] for line in sparse_dir.joinpath("result.json").read_text().splitlines()
             if json.loads(line).get("checkpoint_dir_name")]
    assert saved == [4, 5]  # checkpoint_every 4, and the last epoch
    trials = pd.read_csv(results_dir / "report" / "trials.csv").set_index("arm")
    assert trials.loc["sparse", "epochs_run"] == 5 and trials.loc["sparse", "status"] == "completed"
