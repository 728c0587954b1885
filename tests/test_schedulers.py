"""Search and scheduling breadth: HyperBand, the median rule and PBT through the spec on real Ray sweeps (and across
`sweep resume`), multi-objective Optuna with a Pareto front, warm starts, and each scheduler's plan."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import optuna
import pandas as pd
import pytest
import torch
from conftest import run_cli, trial_results, write_spec
from results_fixtures import curve_rows, spec_for, write_trial
from results_fixtures import write_spec as write_results_spec
from test_search import LR, decades_from_optimum, drive, objective, optuna_spec

from sweeps.cli import main
from sweeps.schedulers import SCHEDULERS, ArmExplorer
from sweeps.schema import PACK_ON_CPU, SpecError
from sweeps.space import PerArmOptuna, warm_start_trials
from sweeps.spec import validate_spec
from trainables.models import create_model
from trainables.optim import create_optimizer
from trainables.train import apply_hyperparameters

# --- the spec: what each scheduler needs, and its plan ------------------------------------------------------

BASE = {"name": "s", "arms": {"a": {"lr": LR}}, "search": {"algorithm": "random", "num_samples": 4}}


@pytest.mark.parametrize("changes, message", [
    ({"scheduler": {"name": "pbt"}, "search": {"algorithm": "optuna", "num_samples": 4}},
     "scheduler.name: pbt changes the settings of running trials"),
    ({"scheduler": {"name": "pbt", "perturbation_interval": 3}, "train": {"checkpoint_every": 2, "report_every": 2}},
     "scheduler.perturbation_interval: pbt copies checkpoints at each perturbation: it must be a multiple of "
     "train.checkpoint_every (2), got 3"),
    ({"scheduler": {"name": "pbt"}, "search": {"algorithm": "grid"},
      "arms": {"a": {"lr": {"grid": [0.1, 0.01]}}, "b": {"optimizer": "adam"}}},
     "arms.b: pbt explores the settings an arm searches, and this one searches none"),
    ({"scheduler": {"name": "pbt"}, "optim": {"schedule": "cosine"}}, "arms.a: pbt sets optim.lr itself"),
    ({"search": {"algorithm": "optuna", "num_samples": 4, "metric": ["val_acc", "ece"], "mode": ["max", "min"]},
      "scheduler": {"name": "asha"}}, "scheduler.name: asha ranks trials by one metric, and search.metric lists 2"),
    ({"search": {"algorithm": "optuna", "num_samples": 4, "metric": ["val_acc", "ece"], "mode": "max"}},
     "search.mode: give one mode per metric: 2 metric(s), 1 mode(s)"),
    ({"search": {"algorithm": "optuna", "num_samples": 4, "metric": ["val_acc", "ece"], "mode": ["max", "max"]}},
     "search.mode: ece is better when lower; use mode: min"),
    ({"search": {"algorithm": "random", "num_samples": 4, "warm_start": "/somewhere"}},
     "search.warm_start: only the optuna searcher learns from earlier trials"),
])
def test_a_scheduler_the_trials_cannot_serve_is_refused(changes, message):
    with pytest.raises(SpecError) as err:
        validate_spec({**BASE, **changes}, "spec.yaml")
    assert message in str(err.value) and "\n" not in str(err.value)


def test_validate_shows_each_schedulers_plan(capsys):
    plans = {}
    for name in ("asha", "hyperband", "median", "pbt"):  # in this process: tests/test_bad_inputs.py runs a real one
        status = main(["validate", "quickstart", "--set", f"scheduler.name={name}", "--set", "train.epochs=9",
                       "--set", "scheduler.max_t=9"])
        out = capsys.readouterr()
        assert status == 0, out.err
        plans[name] = next(line for line in out.out.splitlines() if line.startswith("  scheduler"))
    assert "judged at epochs 1, 3 and goes on only in the top 1/3 of its arm's rung; at most 9 epochs" in plans["asha"]
    assert "hyperband (asynchronous): 3 brackets, trials dealt to them in turn; bracket by bracket a trial is judged " \
        "at epochs 1, 3 / at epochs 3 / never (runs to 9)" in plans["hyperband"]
    assert "median: from epoch 1" in plans["median"] and "once 3 have reached it" in plans["median"]
    assert "pbt: every 2 epochs, a trial in the bottom 25% of its arm copies" in plans["pbt"]


# --- early stopping judges a trial against its own arm only (fake trials, as Ray's own scheduler tests) ---------

def _drive_scheduler(name: str, arms: dict[str, list[list[float]]], order: list[str], epochs: int = 9,
                     **settings) -> dict[str, list[int]]:
    """Run the spec's scheduler `name` over fake trials: arm -> one score curve per trial. Trials run one after
    another in `order` (arm names, each taking that arm's next trial), the worst case for a scheduler shared by
    arms whose trials arrive in turn. Returns arm -> epochs each of its trials trained."""
    from ray.tune.experiment import Trial
    from ray.tune.schedulers import TrialScheduler

    spec = validate_spec({"name": "s", "train": {"epochs": epochs}, "arms": {a: {"lr": 0.1} for a in arms},
                          "scheduler": {"name": name, "grace_period": 1, **settings}}, "spec.yaml")
    scheduler = SCHEDULERS[name](spec)
    scheduler.set_search_properties("val_acc", "max")
    controller = SimpleNamespace(get_live_trials=list)  # no trial waiting: the median rule never pauses one
    next_trial, trained = dict.fromkeys(arms, 0), {a: [] for a in arms}
    for arm in order:
        curve = arms[arm][next_trial[arm]]
        next_trial[arm] += 1
        trial = Trial("__fake", config={"arm": {"name": arm}}, stub=True)
        scheduler.on_trial_add(controller, trial)
        for epoch, score in enumerate(curve, start=1):
            result = {"epoch": epoch, "val_acc": score}
            if epoch == len(curve) or scheduler.on_trial_result(controller, trial, result) == TrialScheduler.STOP:
                scheduler.on_trial_complete(controller, trial, result)
                break
        trained[arm].append(epoch)
    return trained


CURVES = [[0.5 + 0.04 * e + 0.01 * ((7 * t) % 5) for e in range(9)] for t in range(9)]  # nine trials, mixed quality


@pytest.mark.parametrize("name", ["asha", "hyperband", "median"])
def test_identical_arms_get_the_same_budget_whichever_arm_reports_first(name):
    # Arm a's trials all run before arm b's: one scheduler over both would fill every rung with a's results first.
    for order in (["a"] * 9 + ["b"] * 9, [*np.random.default_rng(0).permutation(["a"] * 9 + ["b"] * 9)]):
        trained = _drive_scheduler(name, {"a": CURVES, "b": CURVES}, order, reduction_factor=3)
        assert trained["a"] == trained["b"], (order, trained)
        assert sum(trained["a"]) < 81, f"{name} stopped nothing: {trained}"


@pytest.mark.parametrize("name", ["asha", "hyperband", "median"])
def test_a_weak_arm_still_trains_a_trial_to_the_end(name):
    strong = [[0.9 + 0.005 * e for e in range(9)]] * 6
    weak = [[0.3 + 0.005 * e + 0.001 * t for e in range(9)] for t in range(6)]
    order = ["strong"] * 3 + [arm for pair in zip(["weak"] * 6, ["strong"] * 3 + [None] * 3) for arm in pair if arm]
    trained = _drive_scheduler(name, {"strong": strong, "weak": weak}, order, reduction_factor=3)
    assert max(trained["weak"]) == 9 and max(trained["strong"]) == 9, trained


# --- PBT: the copied trial trains with its new settings ------------------------------------------------------

def test_pbt_explores_within_each_arms_domains():
    spec = validate_spec({**BASE, "arms": {"a": {"lr": {"loguniform": [1.0e-3, 1.0e-1]}, "batch_size": {"choice": [16, 32, 64]},
                                                 "seed": {"grid": [0, 1]}},
                                           "b": {"lr": {"loguniform": [1.0e-5, 1.0e-4]}}},
                          "scheduler": {"name": "pbt", "resample_probability": 0.3}}, "spec.yaml")
    explore = ArmExplorer(spec)
    seen_batches = set()
    for arm, lr, low, high in (("a", 0.09, 1.0e-3, 1.0e-1), ("b", 1.1e-5, 1.0e-5, 1.0e-4)):
        config = {"arm": {"name": arm, "optim.lr": lr, "data.batch_size": 32, "train.seed": 1}}
        for _ in range(200):
            config = explore(config)
            assert low <= config["arm"]["optim.lr"] <= high  # never outside the arm's own domain
            assert config["arm"]["train.seed"] == 1  # a replicate, never explored
            if arm == "a":
                seen_batches.add(config["arm"]["data.batch_size"])
                assert config["arm"]["data.batch_size"] in (16, 32, 64)
            else:
                assert "data.batch_size" not in config["arm"] or config["arm"]["data.batch_size"] == 32
    assert seen_batches == {16, 32, 64}  # a choice moves to its neighbours (or is drawn anew)


def test_a_loaded_optimizer_takes_this_trials_settings_not_the_saved_ones():
    # After a PBT copy the optimizer state is another trial's: load_state_dict would bring back its lr.
    model = create_model("mlp", in_channels=1, num_classes=10, image_size=8, hidden_sizes=[4])
    saved = create_optimizer(model.parameters(), optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=1e-4)
    model(torch.randn(2, 1, 8, 8)).sum().backward()
    saved.step()
    mine = {"optimizer": "sgd", "lr": 0.37, "momentum": 0.5, "weight_decay": 3e-3}
    loaded = create_optimizer(model.parameters(), **mine)
    loaded.load_state_dict(saved.state_dict())
    assert loaded.param_groups[0]["lr"] == 0.1  # what torch does
    apply_hyperparameters(loaded, mine)
    group = loaded.param_groups[0]
    assert (group["lr"], group["momentum"], group["weight_decay"]) == (0.37, 0.5, 3e-3)
    assert loaded.state_dict()["state"], "the momentum buffers came along"


@pytest.mark.slow
@pytest.mark.parametrize("pack", [1, 4])  # packed: a member leaves its pack and joins again with the copied state
def test_pbt_copies_within_an_arm_and_the_copy_trains_with_its_explored_lr(tmp_path, tiny_spec, pack, monkeypatch):
    monkeypatch.setenv(PACK_ON_CPU, "1")  # packed on this CPU, as on a GPU
    tiny_spec.update(train={"epochs": 6},
                     arms={"sgd": {"optimizer": "sgd", "lr": {"loguniform": [1.0e-4, 1.0]}},
                           "adam": {"optimizer": "adam", "lr": {"loguniform": [1.0e-5, 1.0e-1]}}},
                     search={"algorithm": "random", "num_samples": 2},
                     scheduler={"name": "pbt", "perturbation_interval": 1, "quantile_fraction": 0.5},
                     resources={"cpu": 1, "pack": pack})
    done = run_cli("run", str(write_spec(tmp_path, tiny_spec)), "--storage", str(tmp_path), "--no-dashboard")
    assert done.returncode == 0, done.stderr[-3000:]
    root = tmp_path / "tiny"
    if pack > 1:
        from test_packing import assert_packed

        assert_packed(root)
    named = trial_results(root)  # directories are named {arm}_{trial id}
    rows = {name.split("_", 1)[1]: r for name, r in named.items()}
    arm_of = {name.split("_", 1)[1]: name.split("_", 1)[0] for name in named}
    copies = pd.read_csv(root / "report" / "pbt.csv")
    assert len(copies) >= 2, "PBT should have copied in 6 epochs with half of each arm at the bottom"
    for name, trial_rows in rows.items():
        epochs = [r["epoch"] for r in trial_rows]
        # Every report is kept (a copy goes on from the source's epoch, so an epoch may repeat or be skipped), and
        # every trial trains to the end: nobody copies a trial that has nothing left to train.
        assert epochs[0] == 1 and epochs[-1] == 6 and "test_acc" in trial_rows[-1], (name, epochs)
        assert all(b == a + 1 or "copied_from" in r for a, b, r in zip(epochs, epochs[1:], trial_rows[1:])), epochs
    # Every checkpoint is kept: a copy restores the very checkpoint PBT chose, never a later one in its place.
    assert "is gone, superseded by" not in done.stdout + done.stderr
    # Ray's own log of each exploit: (the copied trial's settings, the explored settings the copy goes on with).
    logged = [json.loads(line) for line in (root / "pbt_global.txt").read_text().splitlines()]
    explored = [entry[5]["arm"]["optim.lr"] for entry in logged]
    bounds = {1.0e-4, 1.0, 1.0e-5, 1.0e-1}
    for copy in copies.itertuples():
        assert arm_of[copy.copied_from] == arm_of[copy.trial_id] == copy.arm  # never across arms
        source = {r["epoch"]: r for r in rows[copy.copied_from]}
        assert copy.epoch == copy.copied_epoch + 1 and copy.copied_epoch in source  # it goes on from that epoch
        # It trains with the lr PBT explored, not the source's lr that came back with the optimizer's state.
        assert any(copy.lr_after == pytest.approx(lr) for lr in explored), (copy, explored)
        low, high = {"sgd": (1.0e-4, 1.0), "adam": (1.0e-5, 1.0e-1)}[copy.arm]
        assert low <= copy.lr_after <= high  # explored within the arm's own domain
        assert copy.lr_after != pytest.approx(source[copy.copied_epoch]["lr"]) or copy.lr_after in bounds
    page = (root / "report" / "report.html").read_text()
    assert 'id="figure-pbt"' in page


# --- several objectives ----------------------------------------------------------------------------------------

def test_several_objectives_make_each_arm_a_multi_objective_study():
    spec = optuna_spec(["good_a", "bad"], num_samples=12, metric=["val_acc", "ece"], mode=["max", "min"])
    searcher = PerArmOptuna(spec)
    for i in range(24):
        config = searcher.suggest(f"t{i}")
        arm, lr = config["arm"]["name"], config["arm"]["optim.lr"]
        result = {"val_acc": objective(arm, lr), "ece": abs(math.log10(lr) + 2.5) / 10, "epoch": 3}
        searcher.on_trial_result(f"t{i}", result)  # no intermediate values: Optuna cannot prune several objectives
        searcher.on_trial_complete(f"t{i}", result)
    for study in searcher.studies.values():
        assert len(study.directions) == 2 and len(study.trials) == 12
        assert all(len(t.values) == 2 and not t.intermediate_values for t in study.trials)
        assert 1 <= len(study.best_trials) < 12  # a Pareto front, not one best


@pytest.mark.slow
def test_a_multi_objective_sweep_reports_its_pareto_front_and_a_follow_up_sweep_starts_from_its_trials(
        tmp_path, tiny_spec, capsys):
    tiny_spec.update(train={"epochs": 1},
                     arms={"sgd": {"optimizer": "sgd", "lr": {"loguniform": [1.0e-3, 1.0]}},
                           "adam": {"optimizer": "adam", "lr": {"loguniform": [1.0e-5, 1.0e-1]}}},
                     search={"algorithm": "optuna", "num_samples": 3, "metric": ["val_acc", "ece"],
                             "mode": ["max", "min"]})
    done = run_cli("run", str(write_spec(tmp_path, tiny_spec)), "--storage", str(tmp_path), "--no-dashboard")
    assert done.returncode == 0, done.stderr[-3000:]
    pareto = pd.read_csv(tmp_path / "tiny" / "report" / "pareto.csv")
    assert len(pareto) == 6
    points = pareto[["final_val_acc", "final_ece"]].to_numpy() * [1, -1]  # both "higher is better"
    for i, point in enumerate(points):
        dominated = ((points >= point).all(axis=1) & (points > point).any(axis=1)).any()
        assert pareto["on_front"].iloc[i] == (not dominated)
    assert 'id="figure-pareto"' in (tmp_path / "tiny" / "report" / "report.html").read_text()

    # A follow-up sweep (search.warm_start) gives each arm's study the first sweep's trials before its own.
    tiny_spec["search"].update(warm_start=str(tmp_path / "tiny"), num_samples=1)
    second = run_cli("run", str(write_spec(tmp_path, tiny_spec)), "--storage", str(tmp_path), "--name", "again",
                     "--no-dashboard")
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"warm start from {tmp_path / 'tiny'}: sgd 3, adam 3 earlier trials" in second.stderr
    assert len(trial_results(tmp_path / "again")) == 2
    # A warm start from nowhere is refused before anything starts (in this process: no sweep starts).
    tiny_spec["search"]["warm_start"] = str(tmp_path / "nowhere")
    nowhere = write_spec(tmp_path, tiny_spec)
    assert main(["run", str(nowhere), "--storage", str(tmp_path), "--name", "x"]) == 2
    assert f"search.warm_start {tmp_path / 'nowhere'}: " in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


# --- warm start ------------------------------------------------------------------------------------------------

def _earlier_sweep(path: Path, arms: dict, lrs: list[float], **search) -> Path:
    """A finished optuna sweep on the synthetic objective: one trial per lr for each arm."""
    write_results_spec(path, {**spec_for("earlier", epochs=3, arms=arms),
                              "search": {"algorithm": "optuna", "num_samples": len(lrs), "metric": "val_acc",
                                         "mode": "max", **search}})
    index = 0
    for arm in arms:
        for lr in lrs:
            rows = curve_rows(objective(arm, lr), 3)
            write_trial(path, index, {"arm": {"name": arm, "optim.optimizer": "sgd", "optim.lr": lr}}, rows, done=True)
            index += 1
    return path


def test_a_warm_started_arm_searches_near_what_the_earlier_sweep_found(tmp_path):
    lrs = list(10 ** np.random.default_rng(0).uniform(-5, -1, 20))
    earlier = _earlier_sweep(tmp_path / "earlier", {"bad": {"optimizer": "sgd", "lr": LR}}, lrs)
    spec = optuna_spec(["bad"], num_samples=10, warm_start=str(earlier))
    warm = warm_start_trials(spec)
    assert len(warm["bad"]) == 20 and all(t.state == optuna.trial.TrialState.COMPLETE for t in warm["bad"])
    assert warm["bad"][0].params["optim.lr"] == pytest.approx(lrs[0])
    cold = drive(PerArmOptuna(optuna_spec(["bad"], num_samples=10)), 10)["bad"]
    warmed = drive(PerArmOptuna(spec, warm), 10)["bad"]
    # Cold, the first 10 trials are TPE's random start-up (a median ~1 decade from the optimum); warm, TPE has 20
    # trials to model from the first suggestion on.
    assert decades_from_optimum("bad", warmed) < 0.5 < decades_from_optimum("bad", cold)


@pytest.mark.parametrize("changes, message", [
    ({"arms": {"bad": {"optimizer": "sgd", "lr": LR}, "new": {"optimizer": "sgd", "lr": LR}}},
     "arm new is not in that sweep (it has bad)"),
    ({"arms": {"bad": {"optimizer": "sgd", "lr": {"loguniform": [1.0e-4, 1.0e-1]}}}},
     "arms.bad.optim.lr is loguniform[1e-05, 0.1] there and loguniform[0.0001, 0.1] here"),
    ({"arms": {"bad": {"optimizer": "adam", "lr": LR}}}, "arms.bad.optim.optimizer is 'sgd' there and 'adam' here"),
    ({"search": {"algorithm": "optuna", "num_samples": 2, "metric": "val_loss", "mode": "min"}},
     "it searched on ['val_acc'], this sweep on ['val_loss']"),
])
def test_a_warm_start_from_a_different_sweep_names_what_differs(tmp_path, changes, message):
    earlier = _earlier_sweep(tmp_path / "earlier", {"bad": {"optimizer": "sgd", "lr": LR}}, [1e-3, 1e-2])
    raw = {"name": "s", "arms": {"bad": {"optimizer": "sgd", "lr": LR}}, **changes}
    raw["search"] = {"algorithm": "optuna", "num_samples": 2, **raw.get("search", {}), "warm_start": str(earlier)}
    with pytest.raises(SpecError, match="search.warm_start") as err:
        warm_start_trials(validate_spec(raw, "spec.yaml"))
    assert message in str(err.value)


@pytest.mark.parametrize("grace, factor, max_t", [(1, 3, 9), (1, 2, 4), (2, 3, 30), (1, 4, 100), (3, 2, 7)])
def test_the_rungs_the_plan_and_report_show_are_the_ones_ray_judges_at(grace, factor, max_t):
    from ray.tune.schedulers.async_hyperband import _Bracket

    from analysis.outcome import asha_rungs

    for bracket in range(3):
        ray_rungs = [milestone for milestone, _ in reversed(_Bracket(grace, max_t, factor, bracket)._rungs)]
        assert asha_rungs(grace, factor, max_t, bracket) == [m for m in ray_rungs if m < max_t]
