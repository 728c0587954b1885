"""Turn a spec's arms and space into what Ray Tune searches.

Every trial's config has the same shape, whichever searcher made it:
    {"arm": {"name": "adam", "optim.optimizer": "adam", "optim.lr": 0.0012}, "train.seed": 0}
The `arm` dict holds the arm's name and its own settings; the other keys are the shared space.
The trainable lays these dotted settings over the spec's sections (`trainables.train.resolve_settings`).
"""

from __future__ import annotations

from typing import Any

from ray import tune

from sweeps.spec import Domain, Spec


def _tune_domain(domain: Domain) -> Any:
    low_high = domain.values
    return {
        "grid": lambda: tune.grid_search(list(domain.values)),
        "choice": lambda: tune.choice(list(domain.values)),
        "uniform": lambda: tune.uniform(*low_high),
        "loguniform": lambda: tune.loguniform(*low_high),
        "int": lambda: tune.randint(low_high[0], low_high[1] + 1),  # randint excludes its upper bound
    }[domain.kind]()


def _to_tune(settings: dict[str, Any]) -> dict[str, Any]:
    return {k: _tune_domain(v) if isinstance(v, Domain) else v for k, v in settings.items()}


def param_space(spec: Spec) -> dict[str, Any]:
    """Tune's param_space for grid/random search: a grid over arms, each with its own sub-space."""
    arms = [{"name": arm, **_to_tune(settings)} for arm, settings in spec.arm_settings().items()]
    return {"arm": tune.grid_search(arms), **_to_tune(spec.space_settings())}


def _suggest(trial: Any, name: str, domain: Domain) -> Any:
    """Ask an Optuna trial for one value of `domain` under `name`."""
    if domain.kind == "choice":
        return trial.suggest_categorical(name, list(domain.values))
    if domain.kind == "int":
        return trial.suggest_int(name, *domain.values)
    return trial.suggest_float(name, *domain.values, log=domain.kind == "loguniform")


class OptunaSpace:
    """A define-by-run search space for OptunaSearch (a class, not a closure: Tune pickles it with the searcher).

    Arms take turns (trial k gets arm k mod n), so every arm gets the same budget. Each arm's
    parameters have their own Optuna names (`adam:optim.lr`), so TPE models each arm separately.
    """

    def __init__(self, spec: Spec):
        self.arms = spec.arm_settings()
        self.shared = spec.space_settings()

    def __call__(self, captor: Any) -> dict[str, Any]:
        trial = captor.ot_trial  # suggest on the raw Optuna trial: the config we return is the whole config
        names = list(self.arms)
        arm = names[trial.number % len(names)]
        trial.set_user_attr("arm", arm)
        config: dict[str, Any] = {"arm": {"name": arm}}
        for key, value in self.arms[arm].items():
            config["arm"][key] = _suggest(trial, f"{arm}:{key}", value) if isinstance(value, Domain) else value
        for key, value in self.shared.items():
            config[key] = _suggest(trial, key, value) if isinstance(value, Domain) else value
        return config
