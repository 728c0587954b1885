"""Read a sweep's results directory into tidy pandas frames.

The directory is Ray Tune's experiment directory plus the `spec.yaml` that `sweep run` writes: one
directory per trial holding `params.json` (its config) and `result.json` (one JSON line per epoch).
Files only, no Ray: this runs on a laptop against copied results and on a sweep still running.
"""

from __future__ import annotations

import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from analysis import ResultsError
from analysis.outcome import epoch_cap, planned_epochs

# Keys Ray Tune adds to every result row; any other number in a row is a metric the trainable reported.
RAY_KEYS = frozenset({
    "trial_id", "training_iteration", "time_total_s", "time_this_iter_s", "time_since_restore",
    "iterations_since_restore", "timestamp", "date", "done", "hostname", "node_ip", "pid", "config",
    "experiment_tag", "experiment_id", "checkpoint_dir_name", "should_checkpoint", "timesteps_total",
    "episodes_total", "timesteps_since_restore", "timesteps_this_iter", "episodes_this_iter",
})
# Columns of the epochs table that are not metrics: who, when, and (PBT) whose checkpoint an epoch went on from.
EPOCH_KEYS = ("trial_id", "arm", "epoch", "time_total_s", "copied_from", "copied_epoch")
BASE_KEYS = ("trial_id", "arm", "epoch", "time_total_s")  # in every epochs table, even an empty one
# How a trial ended. "stopped": the scheduler (ASHA) ended it early; "running": not ended yet.
STATUSES = ("completed", "stopped", "diverged", "error", "running")
# Trials whose final metric is a result: trained to the end, or diverged (a result, not an error).
FINISHED = ("completed", "diverged")


@dataclass(frozen=True)
class Results:
    directory: Path
    spec: dict
    trials: pd.DataFrame  # one row per trial: config, status, epochs, wall time, final_* and best_* metrics
    epochs: pd.DataFrame  # one row per trial and epoch: trial_id, arm, epoch, time_total_s, every reported metric
    partial: bool  # some trial has not ended yet, or none has started
    hyperparameters: list[str]  # dotted config keys, columns of `trials`
    metrics: list[str]  # per-epoch metrics, columns of `epochs`
    confusion: dict[str, tuple[list[str], list[list[float]]]]  # trial_id -> (classes, [true][pred] counts)

    @property
    def search_metrics(self) -> list[str]:
        """The search metrics: one, or several (a Pareto front; the first ranks the comparison)."""
        return _search_lists(self.spec)[0]

    @property
    def search_modes(self) -> list[str]:
        return _search_lists(self.spec)[1]

    @property
    def metric(self) -> str:
        return self.search_metrics[0]

    @property
    def mode(self) -> str:
        return self.search_modes[0]


def load_results(results_dir: str | Path) -> Results:
    """Reads spec.yaml and every trial directory under `results_dir` (see the module docstring)."""
    directory = Path(results_dir)
    spec = _read_spec(directory)
    trial_dirs = sorted(p for p in directory.iterdir()
                        if p.is_dir() and ((p / "params.json").exists() or (p / "result.json").exists()))
    print(f"report: reading {len(trial_dirs)} trials in {directory}", file=sys.stderr)

    trial_rows, epoch_rows, confusion, unreadable = [], [], {}, 0
    for trial_dir in trial_dirs:
        trial = _read_trial(trial_dir, spec)
        if trial is None:
            unreadable += 1
            continue
        row, epochs, matrix = trial
        trial_rows.append(row)
        epoch_rows.extend(epochs)
        if matrix is not None:
            confusion[row["trial_id"]] = matrix
    if unreadable:
        print(f"report: skipped {unreadable} trial directories without a readable params.json "
              f"(trials just starting?)", file=sys.stderr)

    hyperparameters = list(dict.fromkeys(k for row in trial_rows for k in row["config"]))
    epochs = pd.DataFrame(epoch_rows)
    metrics = [c for c in epochs.columns if c not in EPOCH_KEYS]
    epochs = epochs.reindex(columns=[*(k for k in EPOCH_KEYS if k in epochs or k in BASE_KEYS), *metrics])
    trials = _trials_frame(trial_rows, hyperparameters, epochs, metrics, _search_metric(spec))
    partial = trials.empty or unreadable > 0 or bool((trials["status"] == "running").any())
    return Results(directory, spec, trials, epochs, partial, hyperparameters, metrics, confusion)


def _read_spec(directory: Path) -> dict:
    if not directory.is_dir():
        raise ResultsError(f"{directory}: no such directory")
    spec_path = directory / "spec.yaml"
    if not spec_path.exists():
        what = "is empty" if not any(directory.iterdir()) else "has no spec.yaml"
        raise ResultsError(f"{directory}: not a sweep results directory: it {what} "
                           f"(expected the <storage>/<name>/ directory that `sweep run` writes)")
    try:
        spec = yaml.safe_load(spec_path.read_text())
    except (yaml.YAMLError, OSError, UnicodeDecodeError) as e:
        raise ResultsError(f"{spec_path}: cannot read the spec: {e}") from e
    if not isinstance(spec, dict):
        raise ResultsError(f"{spec_path}: expected a mapping of spec keys, got {type(spec).__name__}")
    return spec


def _search_lists(spec: dict) -> tuple[list[str], list[str]]:
    """The spec's search metrics and their modes, as lists (a spec may give one of each, or several)."""
    search = spec.get("search") or {}
    metric, mode = search.get("metric", "val_acc"), search.get("mode", "max")
    return (list(metric) if isinstance(metric, list) else [metric]), (list(mode) if isinstance(mode, list) else [mode])


def _search_metric(spec: dict) -> tuple[str, str]:
    """The (first) search metric and its mode."""
    metrics, modes = _search_lists(spec)
    return metrics[0], modes[0]


def _read_trial(trial_dir: Path, spec: dict):
    """Returns (trial row, epoch rows, confusion matrix or None), or None if the config is unreadable."""
    rows = _read_json_lines(trial_dir / "result.json")
    try:
        config = json.loads((trial_dir / "params.json").read_text())
    except (OSError, ValueError):
        config = rows[0].get("config") if rows else None  # Ray repeats the config in every result row
    if not isinstance(config, dict):
        return None
    flat = _flatten(config)
    arm = str(flat.pop("arm", "default"))
    trial_id = str(rows[0].get("trial_id", trial_dir.name)) if rows else trial_dir.name

    by_epoch = {}  # epoch -> metrics; a resumed trial may repeat epochs, the later row wins
    for row in rows:
        epoch = row.get("epoch", row.get("training_iteration"))
        by_epoch[epoch] = {"time_total_s": row.get("time_total_s", math.nan),  # Ray's clock: since the trial began
                           **{k: v for k, v in row.items() if k not in RAY_KEYS and (type(v) is float or type(v) is int)}}
        if "copied_from" in row:  # PBT: this epoch trained on from another trial's checkpoint
            by_epoch[epoch]["copied_from"] = str(row["copied_from"])
    epochs = [{"trial_id": trial_id, "arm": arm, "epoch": epoch, **metrics}
              for epoch, metrics in sorted(by_epoch.items())]

    last = rows[-1] if rows else {}
    planned = planned_epochs(flat, (spec.get("train") or {}).get("epochs"), epoch_cap(spec.get("scheduler") or {}))
    epochs_run = int(epochs[-1]["epoch"]) if epochs else 0  # with train.report_every > 1 not every epoch has a row
    if any(row.get("diverged") for row in rows):
        status = "diverged"
    elif (planned is not None and epochs_run >= planned) or "confusion_matrix" in last:
        status = "completed"
    elif _failed_for_good(trial_dir, last, spec):
        status = "error"
    elif last.get("done"):
        status = "stopped" if planned is not None else "completed"  # short of its planned epochs (checked above)
    else:
        status = "running"
    wall = last.get("time_total_s", sum(e.get("epoch_time_s", 0.0) for e in epochs) if epochs else math.nan)
    matrix = (last.get("classes") or [str(i) for i in range(len(last["confusion_matrix"]))],
              last["confusion_matrix"]) if "confusion_matrix" in last else None
    row = {"trial_id": trial_id, "arm": arm, "config": flat, "status": status, "epochs_run": epochs_run,
           "epochs_planned": planned, "wall_time_s": wall, "trial_dir": trial_dir.name}
    return row, epochs, matrix


def _failed_for_good(trial_dir: Path, last: dict, spec: dict) -> bool:
    """Whether the trial's latest attempt failed and Tune will not retry it.

    Ray appends "Failure # N (occurred at DATE)" to error.txt at each failure and retries while
    N <= run.max_failures, so an earlier failure says nothing about a trial that is running again, or that
    ASHA stopped after its retry. (Ray copies error.txt and result.json to storage from the driver, so their
    modification times do not order the events.) Past the budget it failed for good, unless `sweep resume`
    retried it since: then it reported after the failure.
    """
    try:
        failures = re.findall(r"Failure # (\d+) \(occurred at ([^)]+)\)", (trial_dir / "error.txt").read_text())
    except OSError:
        return False
    if not failures:
        return True  # an error file we cannot read the count from: believe it
    count, when = int(failures[-1][0]), failures[-1][1]
    retried = count <= (spec.get("run") or {}).get("max_failures", 2) or str(last.get("date", "")) > when
    return not retried


def _read_json_lines(path: Path) -> list[dict]:
    try:
        text = path.read_text()
    except OSError:
        return []  # the trial has not reported yet
    rows = []
    for line in text.splitlines():
        try:
            row = json.loads(line)  # Python's json reads the NaN/Infinity that Ray writes for diverged losses
        except ValueError:
            continue  # a sweep still running may leave its last line half-written
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _flatten(config: dict, prefix: str = "") -> dict:
    """{"arm": {"name": "adam", "optim.lr": 1e-3}, "train.seed": 0}
    -> {"arm": "adam", "optim.lr": 1e-3, "train.seed": 0}; nested dicts join their keys with dots."""
    flat = {}
    for key, value in config.items():
        if key == "arm" and not prefix and isinstance(value, dict):
            flat["arm"] = value.get("name", "default")
            flat.update(_flatten({k: v for k, v in value.items() if k != "name"}))
        elif isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        elif isinstance(value, (list, tuple)):
            flat[prefix + key] = json.dumps(value)  # one table cell; lists do not mix with scalars in Parquet
        else:
            flat[prefix + key] = value
    return flat


def _trials_frame(rows: list[dict], hyperparameters: list[str], epochs: pd.DataFrame,
                  metrics: list[str], search: tuple[str, str]) -> pd.DataFrame:
    base = pd.DataFrame([{"trial_id": r["trial_id"], "arm": r["arm"], **r["config"],
                          **{k: v for k, v in r.items() if k not in ("trial_id", "arm", "config")}}
                         for r in rows],
                        columns=["trial_id", "arm", *hyperparameters, "status", "epochs_run",
                                 "epochs_planned", "wall_time_s", "trial_dir"])
    for column in hyperparameters:  # a key that is a number in one arm and a string in another
        kinds = {type(v) for v in base[column].dropna()}
        if len(kinds) > 1 and not kinds <= {int, float}:
            base[column] = base[column].map(lambda v: v if pd.isna(v) else str(v))
    base["epochs_planned"] = base["epochs_planned"].astype("Int64")
    base["stopped_early"] = base["status"] == "stopped"
    base["diverged"] = base["status"] == "diverged"
    base["errored"] = base["status"] == "error"
    base = base.set_index("trial_id")

    metric, mode = search
    final = epochs.groupby("trial_id", sort=False).tail(1).set_index("trial_id")[metrics]
    best = pd.DataFrame(index=pd.Index([], name="trial_id"), columns=["epoch", *metrics])
    if metric in epochs:
        finite = epochs[np.isfinite(epochs[metric])]
        grouped = finite.groupby("trial_id", sort=False)[metric]
        best_rows = grouped.idxmax() if mode == "max" else grouped.idxmin()
        best = epochs.loc[best_rows.to_numpy()].set_index("trial_id")[["epoch", *metrics]]
    trials = base.join(best.add_prefix("best_")).join(final.add_prefix("final_"))
    return trials.sort_index().reset_index()
