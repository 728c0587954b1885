"""The schedulers a spec names (`scheduler.name`), every setting in epochs: FIFO, ASHA, asynchronous HyperBand, the
median stopping rule and Population Based Training. Each one that compares trials compares a trial only with trials
of its own arm: early stopping through one Ray scheduler per arm (`PerArm`), PBT through its own per-arm quantiles
(`PerArmPBT`). Their state survives `sweep resume` through `sweeps.tune_patches.SchedulerState`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from ray.tune.schedulers import (
    ASHAScheduler,
    AsyncHyperBandScheduler,
    FIFOScheduler,
    MedianStoppingRule,
    PopulationBasedTraining,
    TrialScheduler,
)

from sweeps.schema import Domain, Spec
from sweeps.space import SEED, plain, tune_domain
from trainables.settings import resolve_settings


def create_scheduler(spec: Spec) -> TrialScheduler:
    """The scheduler `spec.scheduler.name` names (the spec's validation has refused any other name)."""
    return SCHEDULERS[spec.scheduler.name](spec)


def max_epochs(spec: Spec) -> int:
    """The most epochs any trial can run (an arm or the space may change train.epochs)."""
    values = [spec.train.epochs]
    for settings in [spec.space_settings(), *spec.arm_settings().values()]:
        value = settings.get("train.epochs")
        if value is not None:
            values.extend(value.candidates() if hasattr(value, "candidates") else [value])
    return max(values)



def _asha(spec: Spec):
    s = spec.scheduler
    return ASHAScheduler(time_attr="epoch", max_t=s.max_t or max_epochs(spec), grace_period=s.grace_period,
                         reduction_factor=s.reduction_factor)


class AsyncHyperBand(AsyncHyperBandScheduler):
    """Asynchronous HyperBand (Li et al. 2020, "A System for Massively Parallel Hyperparameter Tuning"): ASHA in
    several brackets, bracket s judging trials from epoch grace_period * reduction_factor^s, the last one never,
    so a trial that starts slowly can still get the whole budget.

    Not Ray's synchronous HyperBandScheduler: it pauses trials between halvings, and on Ray 2.60 a 4-trial sweep
    here hung in 3 of 19 runs with a paused trial that never resumed (Tune's loop spinning; ray#37605). Ray draws
    each trial's bracket at random; here trials are dealt to the brackets in turn, in Ray's proportions, so two
    runs of one spec stop the same trials.
    """

    def __init__(self, spec: Spec):
        s = spec.scheduler
        max_t = s.max_t or max_epochs(spec)
        brackets = s.brackets(max_t)
        super().__init__(time_attr="epoch", max_t=max_t, grace_period=s.grace_period,
                         reduction_factor=s.reduction_factor, brackets=brackets)
        self._dealt = [0] * brackets
        self._seen: set[str] = set()  # every trial ever dealt (ASHA forgets a trial's bracket once it ends)

    def on_trial_add(self, tune_controller, trial) -> None:
        if trial.trial_id in self._seen:
            return  # after `sweep resume` Tune adds every restored trial again, finished ones included
        sizes = np.array([len(bracket._rungs) for bracket in self._brackets])
        shares = np.e ** (sizes - sizes.max())  # Ray's weights: more trials where more rungs can stop them
        index = int(np.argmin((np.array(self._dealt) + 1) / shares))
        self._dealt[index] += 1
        self._seen.add(trial.trial_id)
        self._trial_info[trial.trial_id] = self._brackets[index]


def _median(spec: Spec):
    s = spec.scheduler
    return MedianStoppingRule(time_attr="epoch", grace_period=s.grace_period, min_samples_required=s.min_samples_required)


class PerArm(FIFOScheduler):
    """Early stopping that judges a trial only against its own arm: one scheduler of the same kind and settings
    per arm, each with its own rungs (ASHA, HyperBand) or history (the median rule).

    One scheduler over every arm ranks all arms' trials together: the arm whose trials reach a rung first sets
    the cutoff for the others, so arrival order decides who goes on, arms get very different budgets, and in the
    quickstart 3 of 5 arms never trained a trial to the end. Per arm, the same rules and the same budget hold for
    each arm, and ASHA lets every arm's first trial at each rung go on, so every arm ends with its best
    configurations trained to the full budget (PBT is per arm through `PerArmPBT`)."""

    def __init__(self, spec: Spec, make: Callable[[Spec], TrialScheduler]):
        super().__init__()
        self.by_arm = {arm: make(spec) for arm in spec.arm_settings()}

    @property
    def metric(self) -> str | None:
        return next(iter(self.by_arm.values())).metric

    def set_search_properties(self, metric: str | None, mode: str | None, **spec) -> bool:
        return all([s.set_search_properties(metric, mode, **spec) for s in self.by_arm.values()])

    def _of(self, trial) -> TrialScheduler:
        return self.by_arm[trial.config["arm"]["name"]]

    def on_trial_add(self, tune_controller, trial) -> None:
        self._of(trial).on_trial_add(tune_controller, trial)

    def on_trial_error(self, tune_controller, trial) -> None:
        self._of(trial).on_trial_error(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        return self._of(trial).on_trial_result(tune_controller, trial, result)

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        self._of(trial).on_trial_complete(tune_controller, trial, result)

    def on_trial_remove(self, tune_controller, trial) -> None:
        self._of(trial).on_trial_remove(tune_controller, trial)

    def debug_string(self) -> str:
        return "\n".join(f"{arm}: {scheduler.debug_string()}" for arm, scheduler in self.by_arm.items())


class ArmExplorer:
    """PBT's explore step, per arm: each setting the arm searches is redrawn from its domain with probability
    `resample_probability`, else perturbed as Ray's PBT does (a list value moves to a neighbour, a number is
    scaled by 0.8 or 1.2, an integer moves by one), always inside the arm's own domain. The seed is not touched."""

    def __init__(self, spec: Spec):
        shared = spec.space_settings()
        self.domains = {arm: {k: v for k, v in {**shared, **own}.items() if isinstance(v, Domain) and k != SEED}
                        for arm, own in spec.arm_settings().items()}
        self.resample_probability = spec.scheduler.resample_probability
        self.rng = np.random.default_rng(spec.search.seed)

    def __call__(self, config: dict[str, Any]) -> dict[str, Any]:
        arm = config["arm"]
        for key, domain in self.domains[arm["name"]].items():
            if self.rng.random() < self.resample_probability:
                arm[key] = plain(tune_domain(domain).sample(random_state=self.rng))
            else:
                arm[key] = self._perturb(domain, arm[key])
        return config

    def _perturb(self, domain: Domain, value: Any) -> Any:
        up = bool(self.rng.random() < 0.5)
        if domain.kind in ("grid", "choice"):
            values = list(domain.values)
            index = values.index(value) if value in values else 0
            return values[min(max(index + (1 if up else -1), 0), len(values) - 1)]
        low, high = domain.values
        if domain.kind == "int":
            return int(min(max(value + (1 if up else -1), low), high))
        return float(min(max(value * (1.2 if up else 0.8), low), high))


class PerArmPBT(PopulationBasedTraining):
    """Ray's Population Based Training, with each arm a population of its own: a trial in the bottom quantile of
    its arm copies (weights, optimizer state and settings) a trial from the top quantile of the same arm, then
    explores from there (ArmExplorer). Across arms a copy could not even load: another arm may train another
    model or optimizer. Ray's own quantile logic runs unchanged, on the arm of the trial that reported."""

    def __init__(self, spec: Spec):
        s = spec.scheduler
        super().__init__(time_attr="epoch", perturbation_interval=s.perturbation_interval,
                         quantile_fraction=s.quantile_fraction, resample_probability=s.resample_probability,
                         custom_explore_fn=ArmExplorer(spec), log_config=True)
        self._arm: str | None = None
        self._base = spec.base_settings()

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        epochs = resolve_settings(self._base, trial.config)["train"]["epochs"]
        if result.get("diverged") or result.get("epoch", 0) >= epochs:
            # The trial's last report: its result stands. Copied into now, it would train its last epochs again
            # from another's state (and be copied again, and again); its state here stays at its last perturbation,
            # with epochs left to train, for any trial that copies it before it ends.
            return TrialScheduler.CONTINUE
        self._arm = trial.config["arm"]["name"]
        return super().on_trial_result(tune_controller, trial, result)

    def _quantiles(self):
        everyone = self._trial_state
        self._trial_state = {t: s for t, s in everyone.items() if t.config["arm"]["name"] == self._arm}
        try:
            return super()._quantiles()
        finally:
            self._trial_state = everyone


SCHEDULERS: dict[str, Callable[[Spec], TrialScheduler]] = {
    "fifo": lambda spec: FIFOScheduler(),
    "asha": lambda spec: PerArm(spec, _asha),
    "hyperband": lambda spec: PerArm(spec, AsyncHyperBand),
    "median": lambda spec: PerArm(spec, _median),
    "pbt": PerArmPBT,
}
