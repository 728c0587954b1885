"""End-to-end sweeps with the real CLI and a real local Ray runtime."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import ray
import torch
import yaml
from conftest import VOLATILE, run_cli, trial_results, write_spec

pytestmark = pytest.mark.slow

EPOCH_METRICS = {"epoch", "train_loss", "train_acc", "train_loss_running", "train_acc_running", "val_loss", "val_acc",
                 "gen_gap", "weight_l2", "ece", "lr", "epoch_time_s", "samples_per_s"}


def run_ok(*args: str) -> str:
    done = run_cli(*args, "--no-dashboard")
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout + done.stderr


def test_grid_sweep_reports_every_metric_every_epoch(tmp_path, tiny_spec):
    tiny_spec["space"] = {"seed": {"grid": [0, 1]}}
    tiny_spec["arms"]["adam"]["batch_size"] = 500  # more than the 400 training images: said, not silently clamped
    out = run_ok("run", str(write_spec(tmp_path, tiny_spec)), "--storage", str(tmp_path / "results"))
    assert "note: arms.adam: batch_size 500 is larger than the 400 training images, so each epoch is one batch" in out
    results_dir = tmp_path / "results" / "tiny"
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
    assert saved["name"] == "tiny" and saved["train"]["epochs"] == 2 and saved["space"] == tiny_spec["space"]
    made = json.loads((results_dir / "versions.json").read_text())  # and the report's "Made with"
    assert made["ray"] == ray.__version__ and torch.__version__.startswith(made["torch"]) and "sweeps" in made["code"]
    assert any("batch_size 500" in note for note in saved["notes"])  # and in the report
    assert "Comparison (as in report/comparison.md)" in out
    assert (results_dir / "report" / "report.html").is_file()


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


def test_existing_results_dir_is_refused_untouched(tmp_path, tiny_spec):
    spec = write_spec(tmp_path, tiny_spec)
    results_dir = tmp_path / "results" / "tiny"
    results_dir.mkdir(parents=True)
    (results_dir / "keep.txt").write_text("earlier work")
    done = run_cli("run", str(spec), "--storage", str(tmp_path / "results"), "--no-dashboard")
    assert done.returncode == 2 and "already exists" in done.stderr and "sweep resume" in done.stderr
    assert [p.name for p in results_dir.iterdir()] == ["keep.txt"]


def test_unreachable_address_exits_2_before_anything_starts(tmp_path, tiny_spec):
    spec = write_spec(tmp_path, tiny_spec)
    done = run_cli("run", str(spec), "--storage", str(tmp_path / "results"), "--address", "127.0.0.1:1")
    assert done.returncode == 2 and "--address 127.0.0.1:1: cannot reach" in done.stderr
    assert not (tmp_path / "results" / "tiny").exists()


def test_missing_data_dir_exits_2_naming_it(tmp_path, tiny_spec):
    tiny_spec["data"] = {"name": "cifar10", "data_dir": str(tmp_path / "nowhere")}
    done = run_cli("run", str(write_spec(tmp_path, tiny_spec)), "--storage", str(tmp_path / "results"))
    assert done.returncode == 2 and str(tmp_path / "nowhere") in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "results" / "tiny").exists()


def test_asha_stops_a_hopeless_configuration_within_its_arm_and_spares_a_lone_arm(tmp_path, tiny_spec):
    # One trial at a time in grid order (adam good s0, adam hopeless s0, sgd s0, adam good s1, ...), so whenever
    # the hopeless learning rate (1e-7: it cannot learn in 4 epochs) reaches a rung, a good result of its own arm
    # is already recorded there and ASHA cuts it, however loaded the machine is. The sgd arm is judged against
    # itself only: its first trial at each rung goes on, so it ends with a trial trained to the end.
    tiny_spec.update(
        train={"epochs": 4},
        arms={"adam": {"optimizer": "adam", "lr": {"grid": [0.003, 1.0e-7]}}, "sgd": {"optimizer": "sgd", "lr": 0.05}},
        space={"seed": {"grid": [0, 1, 2]}},
        search={"max_concurrent": 1},
        scheduler={"name": "asha", "grace_period": 1, "reduction_factor": 2},
    )
    out = run_ok("run", str(write_spec(tmp_path, tiny_spec)), "--storage", str(tmp_path / "results"))
    trials = trial_results(tmp_path / "results" / "tiny")
    epochs = {(rows[0]["config"]["arm"]["name"], rows[0]["config"]["arm"]["optim.lr"]): [] for rows in trials.values()}
    for rows in trials.values():
        epochs[rows[0]["config"]["arm"]["name"], rows[0]["config"]["arm"]["optim.lr"]].append(rows[-1]["epoch"])
    # The console names the winners comparison.md names, judged on trials that ran to the end, not on the
    # hopeless configuration's epoch-1 scores.
    comparison = pd.read_csv(tmp_path / "results" / "tiny" / "report" / "comparison.csv")
    printed = out[out.index("Comparison (as in report/comparison.md)"):].splitlines()[2:4]
    assert [line.split()[:2] for line in printed] == [[str(r), a] for r, a in zip(comparison["rank"], comparison["arm"])]
    assert sorted(comparison["arm"]) == ["adam", "sgd"]
    assert "optim.lr=0.003" in comparison.set_index("arm").at["adam", "best_config"]
    assert all(len(e) == 3 for e in epochs.values()), epochs
    assert max(epochs["adam", 1.0e-7]) < 4, f"ASHA should have stopped the hopeless configuration early: {epochs}"
    assert max(epochs["adam", 0.003]) == 4 and max(epochs["sgd", 0.05]) == 4, epochs


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


def test_same_spec_and_seed_give_identical_metrics(tmp_path, tiny_spec):
    tiny_spec["data"]["augment"] = {"crop_padding": 2, "hflip": True}  # randomness in the data path too
    spec = write_spec(tmp_path, tiny_spec)
    for name in ("first", "second"):
        run_ok("run", str(spec), "--storage", str(tmp_path / "results"), "--name", name)

    def metrics(name: str) -> dict:
        return {n.split("_")[0]: [{k: v for k, v in r.items() if k not in VOLATILE} for r in rows]
                for n, rows in trial_results(tmp_path / "results" / name).items()}

    assert metrics("first") == metrics("second")


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


def test_smoke_quickstart_runs_on_the_embedded_data(tmp_path):
    out = run_ok("run", "quickstart", "--smoke", "--storage", str(tmp_path))
    trials = trial_results(tmp_path / "quickstart")
    assert len(trials) == 10  # 5 arms x 2 samples under --smoke
    assert "Comparison (as in report/comparison.md)" in out
    saved = yaml.safe_load((tmp_path / "quickstart" / "spec.yaml").read_text())
    assert saved["smoke"] is True and saved["notes"]
