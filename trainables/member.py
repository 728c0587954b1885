"""The Tune trainable of a packed trial (`resources.pack` > 1): a light actor that trains nothing itself.

It finds its pack's worker through the sweep's PackManager (`trainables.pack_worker`), joins it with its config
and checkpoint, then asks for one epoch at a time and reports each to Tune as an unpacked trial would: the same
metrics, its own checkpoint. So Tune's schedulers, searchers, retries and `sweep resume` treat it as any trial.
No torch here: a pack of K trials is K of these actors, and each would pay seconds and hundreds of MB for it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import ray
from ray import tune

from trainables.reporting import report


def train_member(config: dict[str, Any], *, manager) -> None:
    """Ray Tune function trainable: train `config` in a pack, reporting as `trainables.train.train_trial` does."""
    logging.getLogger("ray.train").setLevel(logging.WARNING)  # not a "Checkpoint successfully created" per epoch
    trial_id = tune.get_context().get_trial_id()
    node = ray.get_runtime_context().get_node_id()
    worker, _ = ray.get(manager.assign.remote(trial_id, config, node, ray.get_gpu_ids()))
    try:
        ray.get(worker.join.remote(trial_id, config, tune.get_checkpoint()))
        done = False
        while not done:
            metrics, checkpoint, done = ray.get(worker.train.remote(trial_id))
            report(metrics, (lambda path: Path(path).write_bytes(checkpoint)) if checkpoint else None,
                   config["arm"]["name"])
    finally:  # also when Tune stops this trial (ASHA, a pause): its report raises in here
        worker.leave.remote(trial_id)
        manager.release.remote(trial_id)
