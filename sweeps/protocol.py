"""Fair optimizer comparisons: tune every arm with the same budget, then confirm the winners over seeds.

One results directory holds both stages, each an ordinary sweep with its own spec.yaml and Ray
experiment (so `sweep report` and `Tuner.restore` work on each):

    <storage>/<name>/spec.yaml   the protocol spec as run
    <storage>/<name>/tune/       stage 1: each arm searches its own space, same trial and epoch budget,
                                 judged on validation only; the test split is never shipped to these trials
    <storage>/<name>/confirm/    stage 2: each arm's best configuration rerun with `protocol.confirm_seeds`
                                 seeds to the full budget, no early stopping; the test split is evaluated once,
                                 after each trial's last epoch
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from sweeps.console import say
from sweeps.runner import (
    build_tuner,
    check_local_fit,
    check_mlflow,
    fit,
    notes_said,
    prepare_data,
    start_ray,
    warm_start,
)
from sweeps.schema import Spec, SpecError, count_trials
from sweeps.spec import validate_spec
from sweeps.storage import (
    new_results_dir,
    read_spec,
    storage_uri,
    write_spec,
)

TUNE, CONFIRM = "tune", "confirm"


def tune_spec(spec: Spec) -> Spec:
    """Stage 1: the spec's own arms, space, search and scheduler, without the protocol."""
    raw = spec.model_dump(mode="json", by_alias=True)
    raw.update(name=TUNE, protocol=None, reference=None,
               notes=[*spec.notes, f"stage 1 of {spec.name}: tuning on the validation split; "
                                   "the test split is not given to these trials"])
    return validate_spec(raw, f"{spec.name}/{TUNE}")


def confirm_spec(spec: Spec, tuned: dict[str, dict[str, Any]]) -> Spec:
    """Stage 2: each arm fixed at its tuned settings, crossed with seeds 0..n-1, run to the end."""
    raw = spec.model_dump(mode="json", by_alias=True)
    raw.update(name=CONFIRM, protocol=None, arms=tuned,
               space={"train.seed": {"grid": list(range(spec.protocol.confirm_seeds))}},
               search={**raw["search"], "algorithm": "grid", "num_samples": 1, "max_concurrent": None,
                       "warm_start": None},
               scheduler={"name": "fifo"},
               notes=[*spec.notes, f"stage 2 of {spec.name}: each arm's tuned configuration over "
                                   f"{spec.protocol.confirm_seeds} seeds; test split evaluated once per trial"])
    return validate_spec(raw, f"{spec.name}/{CONFIRM}")


# Which stage-1 trials may name an arm's tuned configuration, in order of preference: those that ran the
# full budget; else those stopped early (or cut short by a failure); a diverged trial only when the arm has
# nothing else with a finite score (it is then confirmed, and the verdict says it diverged).
TUNED_FROM = (("completed",), ("stopped", "error", "running"), ("diverged",))


def tuned_settings(tune_dir: Path, metric: str, mode: str) -> dict[str, dict[str, Any]]:
    """Arm -> the settings of its best stage-1 trial (final value of `metric`), seed left out."""
    import numpy as np

    from analysis import load_results

    trials = load_results(tune_dir).trials
    sign = 1 if mode == "max" else -1
    tuned = {}
    for arm, group in trials.groupby("arm", sort=False):
        score = sign * group[f"final_{metric}"].astype(float)
        for statuses in TUNED_FROM:
            pool = score[group["status"].isin(statuses) & np.isfinite(score)]
            if len(pool):
                break
        else:
            raise SpecError(f"{tune_dir}: arm {arm} has no trial with a finite {metric}; nothing to confirm")
        config = json.loads((tune_dir / group.loc[pool.idxmax(), "trial_dir"] / "params.json").read_text())
        settings = {k: v for k, v in config["arm"].items() if k != "name"}
        settings.update({k: v for k, v in config.items() if k != "arm"})
        settings.pop("train.seed", None)  # the confirm stage sets the seeds
        tuned[arm] = settings
    return tuned


def run_protocol(spec: Spec, *, storage: str | None = None, address: str | None = None,
                 dashboard: bool = True, resume: bool = False, verbose: bool = False) -> str:
    """Run (or continue) both stages; returns the results directory. A finished stage is not redone."""
    storage = storage_uri(storage)
    if "://" in storage:
        raise SpecError(f"--storage {storage}: the protocol reads stage 1's results to set up stage 2, "
                        "so it needs a local or shared file system path")
    results_dir = Path(storage) / spec.name if resume else Path(new_results_dir(storage, spec.name))
    if not address:
        check_local_fit(spec)
    if spec.run.mlflow:
        check_mlflow(spec.run.mlflow)
    warm = None if resume else warm_start(spec)
    dataset = prepare_data(spec)
    if not resume:
        spec = spec.model_copy(update={"notes": [*spec.notes, *notes_said(spec)]})
    start_ray(address, dashboard=dashboard, storage=str(results_dir))
    if not resume:
        write_spec(str(results_dir), spec)
    counts = count_trials(spec)
    say(f"{spec.name}: protocol, {sum(counts.values())} trials: per arm {spec.search.num_samples} to tune "
        f"+ {spec.protocol.confirm_seeds} to confirm; results in {results_dir}")

    # The tune stage's trials receive no test split at all: it cannot leak into the choice of settings.
    validation_only = dataclasses.replace(dataset, test_x=None, test_y=None)
    _run_stage(results_dir, TUNE, lambda: tune_spec(spec), validation_only, verbose, warm)
    tuned = tuned_settings(results_dir / TUNE, spec.search.metrics[0], spec.search.modes[0])
    for arm, settings in tuned.items():
        say(f"tuned {arm}: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                         for k, v in settings.items()))
    _run_stage(results_dir, CONFIRM, lambda: confirm_spec(spec, tuned), dataset, verbose)
    return str(results_dir)


def _run_stage(results_dir: Path, stage: str, make_spec, dataset, verbose: bool, warm: dict | None = None) -> None:
    from ray import tune

    stage_dir = results_dir / stage
    if tune.Tuner.can_restore(str(stage_dir)):  # started before: continue it (a finished stage returns at once)
        say(f"stage {stage}: continuing {stage_dir}")
        stage_spec = read_spec(str(stage_dir))
        tuner = build_tuner(stage_spec, dataset, storage=str(results_dir), restore=str(stage_dir))
    else:
        stage_spec = make_spec()
        say(f"stage {stage}: {sum(count_trials(stage_spec).values())} trials")
        write_spec(str(stage_dir), stage_spec)
        tuner = build_tuner(stage_spec, dataset, storage=str(results_dir), verbose=verbose,
                            experiment=f"{results_dir.name}/{stage}", warm=warm)
    fit(tuner, stage_spec, str(stage_dir), str(results_dir))
