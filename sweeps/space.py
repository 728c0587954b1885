"""Turn a spec's arms and space into what Ray Tune searches.

Every trial's config has the same shape, whichever searcher made it:
    {"arm": {"name": "adam", "optim.optimizer": "adam", "optim.lr": 0.0012}, "train.seed": 0}
The `arm` dict holds the arm's name and every setting of this configuration (the arm's own and the
shared space's); `train.seed`, the replicate, sits beside it (or inside it, when the arm has its own
seeds). The trainable lays these dotted settings over the spec's sections
(`trainables.settings.resolve_settings`).

Seeds are replicates, never searched: a configuration is drawn once and trained with every seed of the
seed grid, so "mean over seeds" is the mean of one configuration, not the best of many.
"""

from __future__ import annotations

import itertools
import math
import pickle
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from ray import tune
from ray.tune.search import Searcher

from analysis.outcome import planned_epochs, stopped_early
from sweeps.schema import Domain, Spec

SEED = "train.seed"


def tune_domain(domain: Domain) -> Any:
    low_high = domain.values
    return {
        "grid": lambda: tune.grid_search(list(domain.values)),
        "choice": lambda: tune.choice(list(domain.values)),
        "uniform": lambda: tune.uniform(*low_high),
        "loguniform": lambda: tune.loguniform(*low_high),
        "int": lambda: tune.randint(low_high[0], low_high[1] + 1),  # randint excludes its upper bound
    }[domain.kind]()


def plain(value: Any) -> Any:
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
                        value = plain(tune_domain(value).sample(random_state=rng))
                    config[key] = value
                if arm_seed is not None:  # the arm's own seeds: Tune crosses them with this configuration only
                    config[SEED] = tune_domain(arm_seed) if isinstance(arm_seed, Domain) else arm_seed
                configs.append(config)
    space = {"arm": tune.grid_search(configs)}
    if shared_seed is not None:
        space[SEED] = tune_domain(shared_seed) if isinstance(shared_seed, Domain) else shared_seed
    return space


def distribution(domain: Domain) -> optuna.distributions.BaseDistribution:
    """The Optuna distribution `_suggest` samples a domain from (also how the journal and warm start record it)."""
    if domain.kind in ("grid", "choice"):
        return optuna.distributions.CategoricalDistribution([category(v) for v in domain.values])
    if domain.kind == "int":
        return optuna.distributions.IntDistribution(*domain.values)
    return optuna.distributions.FloatDistribution(*domain.values, log=domain.kind == "loguniform")


def category(value: Any) -> Any:
    """Optuna's categorical choices must be None, bool, int, float or str: lists become their text."""
    return value if value is None or isinstance(value, (bool, int, float, str)) else str(value)


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

    def __init__(self, spec: Spec, warm: dict[str, list[optuna.trial.FrozenTrial]] | None = None):
        super().__init__(metric=spec.search.metrics[0], mode=spec.search.modes[0])
        optuna.logging.set_verbosity(optuna.logging.WARNING)  # one log line per trial is Tune's job
        self.arms = {arm: {**spec.space_settings(), **own} for arm, own in spec.arm_settings().items()}
        self.metrics = spec.search.metrics  # several: TPE's multi-objective mode, and no pruning
        self.budget = spec.search.num_samples
        self.default_epochs = spec.train.epochs
        self.max_t = spec.scheduler.epoch_cap()
        directions = ["maximize" if mode == "max" else "minimize" for mode in spec.search.modes]
        self.studies = {
            arm: optuna.create_study(directions=directions, study_name=arm, sampler=optuna.samplers.TPESampler(
                seed=(spec.search.seed + zlib.crc32(arm.encode())) % 2**32, n_startup_trials=spec.search.tpe_startup_trials()))
            for arm in self.arms}
        for arm, trials in (warm or {}).items():  # an earlier sweep's trials: TPE models them from the start
            self.studies[arm].add_trials(trials)
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
        self.asked[arm] += 1
        self.live[trial_id] = _Live(arm, trial, planned_epochs(config, self.default_epochs, self.max_t))
        return {"arm": config}

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        live = self.live.get(trial_id)
        value, step = result.get(self.metric), result.get("epoch")
        if live and len(self.metrics) == 1 and step is not None and finite(value) and step not in live.steps:
            live.trial.report(float(value), int(step))  # a resumed trial may repeat an epoch: Optuna keeps the first
            live.steps.add(step)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        live = self.live.pop(trial_id, None)
        if live is None:
            return
        study, values = self.studies[live.arm], [(result or {}).get(m) for m in self.metrics]
        if error or not all(finite(v) for v in values):
            study.tell(live.trial, state=optuna.trial.TrialState.FAIL)
        elif stopped_early(result.get("epoch", live.planned), live.planned, bool(result.get("diverged"))):
            study.tell(live.trial, state=optuna.trial.TrialState.PRUNED)
        else:
            study.tell(live.trial, [float(v) for v in values] if len(values) > 1 else float(values[0]))

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.__dict__, f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            self.__dict__.update(pickle.load(f))


def finite(value: Any) -> bool:
    """A number Optuna can be told (NaN, inf and missing values are not)."""
    return isinstance(value, (int, float)) and math.isfinite(value)


# --- warm start: an earlier sweep's trials for the Optuna studies ---------------------------------------------

def warm_start_trials(spec: Spec) -> dict[str, list[optuna.trial.FrozenTrial]]:
    """Arm -> the earlier sweep's trials (search.warm_start) as Optuna trials: completed and diverged ones with
    their final scores, stopped ones as pruned with their per-epoch scores. That sweep must have the same arms,
    the same settings in each (domains and fixed values alike) and the same metrics; else SpecError names
    what differs."""
    from analysis import ResultsError, load_results
    from sweeps.schema import SpecError
    from sweeps.spec import validate_spec

    directory = spec.search.warm_start
    where = f"search.warm_start {directory}"
    root = Path(directory)
    if (root / "tune" / "spec.yaml").exists():
        root = root / "tune"  # a protocol: its tune stage is where it searched
    try:
        earlier = load_results(root)
    except ResultsError as err:
        raise SpecError(f"{where}: {err}") from None
    before = validate_spec(earlier.spec, str(root / "spec.yaml"))
    if before.search.metrics != spec.search.metrics:
        raise SpecError(f"{where}: it searched on {before.search.metrics}, this sweep on {spec.search.metrics}")
    mine, theirs = spec.arm_settings(), before.arm_settings()
    shared, their_shared = spec.space_settings(), before.space_settings()
    for arm, own in mine.items():
        if arm not in theirs:
            raise SpecError(f"{where}: arm {arm} is not in that sweep (it has {', '.join(theirs)})")
        now, then = {**shared, **own}, {**their_shared, **theirs[arm]}
        for key in sorted(now.keys() | then.keys()):
            if now.get(key) != then.get(key):
                raise SpecError(f"{where}: arms.{arm}.{key} is {_shown(then.get(key))} there and {_shown(now.get(key))} "
                                "here; warm start needs the same settings")
    trials = earlier.trials
    warm: dict[str, list[optuna.trial.FrozenTrial]] = {}
    for arm, own in mine.items():
        domains = {k: v for k, v in {**shared, **own}.items() if isinstance(v, Domain)}
        for _, row in trials[trials["arm"] == arm].iterrows():
            values = [row.get(f"final_{m}") for m in spec.search.metrics]
            params = {k: _warm_value(domains[k], row[k]) for k in domains if k in row and row[k] == row[k]}
            if len(params) != len(domains):
                continue
            dists = {k: distribution(domains[k]) for k in params}
            if row["status"] in ("completed", "diverged") and all(finite(v) for v in values):
                warm.setdefault(arm, []).append(optuna.trial.create_trial(
                    params=params, distributions=dists, values=[float(v) for v in values],
                    user_attrs={"warm_start": row["trial_id"]}))
            elif row["status"] == "stopped" and len(values) == 1:
                curve = earlier.epochs[earlier.epochs["trial_id"] == row["trial_id"]]
                warm.setdefault(arm, []).append(optuna.trial.create_trial(
                    params=params, distributions=dists, state=optuna.trial.TrialState.PRUNED,
                    intermediate_values={int(e): float(v) for e, v in zip(curve["epoch"], curve[spec.search.metrics[0]])
                                         if finite(v)}, user_attrs={"warm_start": row["trial_id"]}))
    return warm


def _warm_value(domain: Domain, value: Any) -> Any:
    """A setting read back from a results table, as its Optuna distribution holds it (pandas may have made an
    int column float, or a list its JSON text)."""
    if domain.kind in ("grid", "choice"):
        return category(value)
    return int(value) if domain.kind == "int" else float(value)


def _shown(value: Any) -> str:
    return "absent" if value is None else f"{value.kind}{list(value.values)}" if isinstance(value, Domain) else repr(value)
