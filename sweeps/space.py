"""Turn a spec's arms and space into what Ray Tune searches.

Every trial's config has the same shape, whichever searcher made it:
    {"arm": {"name": "adam", "optim.optimizer": "adam", "optim.lr": 0.0012}, "train.seed": 0}
The `arm` dict holds the arm's name and every setting of this configuration (the arm's own and the
shared space's); `train.seed`, the replicate, sits beside it (or inside it, when the arm has its own
seeds). The trainable lays these dotted settings over the spec's sections
(`trainables.train.resolve_settings`).

Seeds are replicates, never searched: a configuration is drawn once and trained with every seed of the
seed grid, so "mean over seeds" is the mean of one configuration, not the best of many.
"""

from __future__ import annotations

import itertools
import math
import pickle
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import optuna
from ray import tune
from ray.tune.search import Searcher

from sweeps.spec import Domain, Spec

SEED = "train.seed"


def _tune_domain(domain: Domain) -> Any:
    low_high = domain.values
    return {
        "grid": lambda: tune.grid_search(list(domain.values)),
        "choice": lambda: tune.choice(list(domain.values)),
        "uniform": lambda: tune.uniform(*low_high),
        "loguniform": lambda: tune.loguniform(*low_high),
        "int": lambda: tune.randint(low_high[0], low_high[1] + 1),  # randint excludes its upper bound
    }[domain.kind]()


def _plain(value: Any) -> Any:
    """numpy scalars (what Tune's samplers return) as Python numbers, for params.json and spec files."""
    return value.item() if isinstance(value, np.generic) else value


def param_space(spec: Spec) -> dict[str, Any]:
    """Tune's param_space for grid and random search: one grid over every configuration, crossed with the seeds.

    Configurations are drawn here, with `search.seed`: for each of `num_samples` repeats, each arm and each
    point of its grids (the arm's and the shared space's), random domains are sampled once. Tune is left
    only the seed grids to expand, so every seed of a configuration trains the same hyperparameters.
    """
    rng = np.random.default_rng(spec.search.seed)
    shared = spec.space_settings()
    shared_seed = shared.pop(SEED, None)
    configs = []
    for _ in range(spec.search.num_samples):
        for arm, own in spec.arm_settings().items():
            settings = {**shared, **own}
            arm_seed = settings.pop(SEED, None)
            grids = [k for k, v in settings.items() if isinstance(v, Domain) and v.kind == "grid"]
            for point in itertools.product(*(settings[k].values for k in grids)):
                config = {"name": arm}
                for key, value in settings.items():
                    if key in grids:
                        value = point[grids.index(key)]
                    elif isinstance(value, Domain):
                        value = _plain(_tune_domain(value).sample(random_state=rng))
                    config[key] = value
                if arm_seed is not None:  # the arm's own seeds: Tune crosses them with this configuration only
                    config[SEED] = _tune_domain(arm_seed) if isinstance(arm_seed, Domain) else arm_seed
                configs.append(config)
    space = {"arm": tune.grid_search(configs)}
    if shared_seed is not None:
        space[SEED] = _tune_domain(shared_seed) if isinstance(shared_seed, Domain) else shared_seed
    return space


def _suggest(trial: optuna.Trial, name: str, domain: Domain) -> Any:
    """Ask an Optuna trial for one value of `domain` under `name`."""
    if domain.kind == "choice":
        return trial.suggest_categorical(name, list(domain.values))
    if domain.kind == "int":
        return trial.suggest_int(name, *domain.values)
    return trial.suggest_float(name, *domain.values, log=domain.kind == "loguniform")


@dataclass
class _Live:
    """A Tune trial in flight, as PerArmOptuna tracks it."""
    arm: str
    trial: optuna.Trial
    planned: int  # epochs it runs unless the scheduler stops it
    steps: set[int] = field(default_factory=set)  # epochs already told to Optuna


class PerArmOptuna(Searcher):
    """Optuna's TPE with one study per arm, so each arm is modelled on its own trials only.

    One study over every arm would rank all finished trials together: an arm that trails the others never
    has a trial in TPE's "good" set and is in effect searched at random, and the start-up trials are counted
    study-wide (two per arm for five arms). Here each arm has its own sampler (seeded by the arm's name, so
    an arm searched beside others gets the very suggestions it would get alone), its own start-up trials and
    `num_samples` trials; arms take turns, so their budgets never differ by more than one in flight.
    A trial the scheduler stopped early is told to Optuna as pruned, not as complete with a partial score.
    """

    def __init__(self, spec: Spec):
        super().__init__(metric=spec.search.metric, mode=spec.search.mode)
        optuna.logging.set_verbosity(optuna.logging.WARNING)  # one log line per trial is Tune's job
        self.arms = {arm: {**spec.space_settings(), **own} for arm, own in spec.arm_settings().items()}
        self.budget = spec.search.num_samples
        self.default_epochs = spec.train.epochs
        self.max_t = spec.scheduler.max_t if spec.scheduler.name == "asha" else None
        direction = "maximize" if spec.search.mode == "max" else "minimize"
        self.studies = {
            arm: optuna.create_study(direction=direction, study_name=arm, sampler=optuna.samplers.TPESampler(
                seed=(spec.search.seed + zlib.crc32(arm.encode())) % 2**32, n_startup_trials=spec.search.tpe_startup_trials()))
            for arm in self.arms}
        self.asked = dict.fromkeys(self.arms, 0)
        self.live: dict[str, _Live] = {}  # by Tune trial id

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        open_arms = [arm for arm in self.arms if self.asked[arm] < self.budget]
        if not open_arms:
            return Searcher.FINISHED
        arm = min(open_arms, key=self.asked.__getitem__)  # the arm with the fewest trials; ties in spec order
        trial = self.studies[arm].ask()
        config = {"name": arm}
        for key, value in self.arms[arm].items():
            config[key] = _suggest(trial, key, value) if isinstance(value, Domain) else value
        planned = int(config.get("train.epochs", self.default_epochs))
        self.asked[arm] += 1
        self.live[trial_id] = _Live(arm, trial, min(planned, self.max_t or planned))
        return {"arm": config}

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        live = self.live.get(trial_id)
        value, step = result.get(self.metric), result.get("epoch")
        if live and step is not None and _finite(value) and step not in live.steps:  # a resumed trial may repeat one
            live.trial.report(float(value), int(step))
            live.steps.add(step)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        live = self.live.pop(trial_id, None)
        if live is None:
            return
        study, value = self.studies[live.arm], (result or {}).get(self.metric)
        if error or not _finite(value):
            study.tell(live.trial, state=optuna.trial.TrialState.FAIL)
        elif result.get("epoch", live.planned) < live.planned and not result.get("diverged"):
            study.tell(live.trial, state=optuna.trial.TrialState.PRUNED)  # stopped early by the scheduler
        else:
            study.tell(live.trial, float(value))

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.__dict__, f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            self.__dict__.update(pickle.load(f))


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)
