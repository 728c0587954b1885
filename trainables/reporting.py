"""What a trial sends to Tune each report: its metrics, a checkpoint, and the live Prometheus gauges.

Light on purpose (no torch): a packed trial (`trainables.member`) is a Tune actor that only reports what its
packed worker trained, and importing torch would cost each of those actors seconds and hundreds of MB.
"""

from __future__ import annotations

import functools
import os
import tempfile
from collections.abc import Callable
from typing import Any

import ray
from ray import tune
from ray.util.metrics import Gauge

CHECKPOINT_FILE = "state.pt"

# Exported live through Ray's Prometheus endpoint as ray_sweep_<name>, for the dashboard and Grafana.
LIVE_METRICS = {
    "epoch": "epochs finished",
    "val_acc": "validation accuracy (fraction)",
    "val_loss": "validation loss",
    "train_loss": "training loss, mean over the epoch",
    "samples_per_s": "training samples per second",
}


@functools.cache
def live_gauges() -> dict[str, Gauge]:
    """One gauge per live metric, created once per process (an actor Tune reuses runs several trials)."""
    return {name: Gauge(f"sweep_{name}", description=meaning, tag_keys=("sweep", "arm", "trial"))
            for name, meaning in LIVE_METRICS.items()}


def export_live_metrics(metrics: dict[str, Any], arm: str) -> None:
    """Set this trial's gauges, tagged by sweep, arm and trial id, to this epoch's values."""
    if not ray.is_initialized():  # outside Ray (unit tests, benchmarks): no metrics agent to export to
        return
    context = tune.get_context()
    tags = {"sweep": context.get_experiment_name(), "arm": arm, "trial": context.get_trial_id()}
    for name, gauge in live_gauges().items():
        gauge.set(float(metrics[name]), tags=tags)


def current_trial_id() -> str | None:
    """The Tune trial this process is running, or None outside a Tune trial."""
    if not ray.is_initialized():
        return None
    try:
        return tune.get_context().get_trial_id()
    except RuntimeError:  # a Ray process that is not a trial
        return None


def report(metrics: dict[str, Any], save: Callable[[str], None] | None, arm: str) -> None:
    """Send one report to Tune, with a checkpoint when `save` is given (it writes CHECKPOINT_FILE to the path it
    is handed), and set the live gauges."""
    if save is None:
        tune.report(metrics)
    else:
        with tempfile.TemporaryDirectory() as folder:
            save(os.path.join(folder, CHECKPOINT_FILE))
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))
    export_live_metrics(metrics, arm)
