"""How a trial ended, by one rule for everything that says it (the console, the Optuna journal, the searcher and the
report): the epochs it was planned to run, and whether it stopped short of them. Plain Python, no pandas: the driver's
callbacks use it as well as the analysis."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

EPOCH_CAPPING = ("asha", "hyperband")  # schedulers that end every trial at their last rung, `max_t`
GRACE_PERIOD, REDUCTION_FACTOR = 1, 3  # the spec's defaults (sweeps.schema.Scheduler); a spec as run states both


def epoch_cap(scheduler: Mapping[str, Any]) -> int | None:
    """The epoch at which the scheduler (the spec's `scheduler` section) ends every trial, where it has one."""
    return scheduler.get("max_t") if scheduler.get("name") in EPOCH_CAPPING else None


def planned_epochs(settings: Mapping[str, Any], default_epochs: int | None, cap: int | None) -> int | None:
    """The epochs a trial runs unless it is stopped: its own `train.epochs` (`settings`: its dotted settings), else
    the spec's `default_epochs`, at most the scheduler's `cap`."""
    epochs = settings.get("train.epochs", default_epochs)
    if epochs is None:
        return None
    return min(int(epochs), int(cap)) if cap else int(epochs)


def stopped_early(last_epoch: int, planned: int, diverged: bool) -> bool:
    """Whether a trial that ended after `last_epoch` was stopped by its scheduler: short of its planned epochs, and
    not because it diverged (a diverged trial is a result)."""
    return last_epoch < planned and not diverged


def asha_rungs(grace_period: float, reduction_factor: float, max_t: int, bracket: int = 0) -> list[float]:
    """The epochs below `max_t` at which ASHA (or HyperBand's bracket `bracket`) judges a trial, laid out as Ray's
    `async_hyperband._Bracket` lays them: grace_period * reduction_factor^(k + bracket)."""
    count = int(math.log(max_t / grace_period) / math.log(reduction_factor) - bracket + 1)
    epochs = (grace_period * reduction_factor ** (k + bracket) for k in range(count))
    return [epoch for epoch in epochs if epoch < max_t]
