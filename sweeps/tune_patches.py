"""Every place the sweep overrides a Ray Tune internal, checked on Ray 2.60 (pyproject pins it): each says why, and
when it can go. tests/test_tune_patches.py fails if Ray's own behaviour changes under them."""

from __future__ import annotations

import logging
import re
import sys
from pathlib import Path

import pyarrow.fs
from ray import tune
from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback


class SchedulerState(tune.Callback):
    """Saves the scheduler (ASHA's rungs and HyperBand's brackets, the median rule's history, PBT's population) with
    Tune's experiment state, and restores it on `sweep resume`.

    Ray 2.60 saves the searcher's state but not the scheduler's: without this, a resumed ASHA sweep
    judges every trial against empty rungs and lets through trials it would have stopped. Tune pickles
    this callback and the scheduler together in tuner.pkl, so after a restore both still share one object.
    The median rule and PBT key their state by Trial objects, which hash by identity: after a restore those
    are copies, so they are relinked to the restored trials (same trial id) before the first step.
    Can go when Tune saves its scheduler with its experiment state (tests/test_tune_patches.py notices).
    """

    def __init__(self, scheduler) -> None:
        self.scheduler = scheduler
        self._restored = False

    def get_state(self) -> dict:
        return {"scheduler": dict(vars(self.scheduler))}

    def set_state(self, state: dict) -> None:
        vars(self.scheduler).update(state["scheduler"])
        self._restored = True

    def on_step_begin(self, iteration: int, trials: list, **info) -> None:
        if self._restored:
            relink(self.scheduler, {trial.trial_id: trial for trial in trials})
            self._restored = False


class _DriverCopyFirst:
    """Tune's result-file loggers, keeping the driver's own copy of a trial's file when the trial restarts.

    Tune's loggers copy a trial's file back from storage whenever the trial starts again with a checkpoint (a
    retry, a PBT exploit on a new actor), for the case of a new driver. But the copy on storage lags the
    driver's by up to a sync period, so within one driver that copy threw away the rows reported since the last
    sync (a PBT trial's result.json began at epoch 4). Storage is read only when the driver has no copy: after
    `sweep resume`, which starts a new driver. Can go when Tune's loggers prefer the driver's copy."""

    def _restore_from_remote(self, file_name: str, trial) -> None:
        if not Path(trial.local_path, file_name).exists():
            super()._restore_from_remote(file_name, trial)


class JsonLogger(_DriverCopyFirst, JsonLoggerCallback):
    """result.json and params.json, as Tune writes them (see _DriverCopyFirst)."""


class CSVLogger(_DriverCopyFirst, CSVLoggerCallback):
    """progress.csv, as Tune writes it (see _DriverCopyFirst)."""


def snapshot_race(record: logging.LogRecord) -> bool:
    """A filter for Tune's experiment-state log (`ray.tune.execution.experiment_state`): drops its error when a
    temporary file vanished under the upload of a state snapshot, and keeps every other record.

    Tune uploads the driver's copy of its state in a background thread while the searcher writes its next state
    there through a temporary file (`.<uuid>-tmp-basic-variant-state-*.json`) that it renames at once; an upload
    that lists the file just before the rename fails on it and Tune prints the traceback, with a path in Ray's
    session folder. Nothing is lost: the next snapshot uploads the renamed file, and the last one is forced. Can go
    when Tune skips temporary files in that upload (tests/test_tune_patches.py notices the message changing)."""
    error = record.exc_info[1] if record.exc_info else None
    return not (record.getMessage().startswith("Saving experiment state to storage") and error is not None
                and TEMPORARY_FILE.search(str(error)) is not None and "No such file" in str(error))


TEMPORARY_FILE = re.compile(r"/\.[0-9a-f]{8}(-[0-9a-f]{4}){3}-[0-9a-f]{12}-tmp-")  # Tune's `_atomic_save`: .<uuid4>-tmp-


def relink(obj, live: dict, seen: set | None = None):
    """`obj` with every Trial in it (dict keys and values, lists, sets, tuples, the attributes of Tune's own
    scheduler classes) replaced by the live Trial of the same id; containers and objects are updated in place."""
    from ray.tune.experiment import Trial

    seen = set() if seen is None else seen
    if isinstance(obj, Trial):
        return live.get(obj.trial_id, obj)
    if id(obj) in seen:
        return obj
    seen.add(id(obj))
    if isinstance(obj, dict):
        items = [(relink(k, live, seen), relink(v, live, seen)) for k, v in obj.items()]
        obj.clear()
        obj.update(items)
    elif isinstance(obj, list):
        obj[:] = [relink(v, live, seen) for v in obj]
    elif isinstance(obj, set):
        items = {relink(v, live, seen) for v in obj}
        obj.clear()
        obj.update(items)
    elif isinstance(obj, tuple):
        return type(obj)(relink(v, live, seen) for v in obj) if not hasattr(obj, "_fields") else \
            type(obj)(*(relink(v, live, seen) for v in obj))
    elif type(obj).__module__.startswith(("ray.tune.schedulers", "sweeps.")):
        for name, value in vars(obj).items():
            setattr(obj, name, relink(value, live, seen))
    return obj


def trial_actor(train_fn) -> type:
    """Tune's actor class for the function trainable, named after its trial in Ray's dashboard.

    Ray shows an actor's repr in the dashboard (Actors page, "Repr" column) and as the prefix of its log
    lines. Ray reads it once, when the actor starts: an actor Tune reuses for later trials keeps the
    name of its first. Can go when Tune names trial actors after their trials; `restore` (below) when Tune uploads
    its experiment state and deletes old checkpoints in one step on object storage.
    """
    from ray.tune.trainable import wrap_function

    class SweepTrial(wrap_function(train_fn)):
        __qualname__ = "SweepTrial"  # the dashboard's Class column shows the qualified name

        def __repr__(self) -> str:
            return self.trial_name

        def restore(self, checkpoint_path):
            """Tune's restore; when the checkpoint Tune recorded is gone, first copy the trial's newest one there.

            On object storage Tune uploads its experiment state a while after a trial checkpoints, and deletes
            checkpoints beyond `checkpoint_keep` at once. A driver killed in between leaves a state that names a
            deleted checkpoint, superseded by a newer one of the same trial. Copying that one to the recorded
            path keeps Tune's own records true (its next checkpoint index, what it deletes later). Tune's
            counters (training_iteration, time_total_s) go on from the older record; the epoch, which the
            schedulers and the analysis use, comes from the checkpoint itself."""
            from ray.train._internal.session import _TrainingResult

            recorded = checkpoint_path.checkpoint if isinstance(checkpoint_path, _TrainingResult) else None
            fs = recorded.filesystem if recorded is not None else None
            if recorded is not None and fs.get_file_info(recorded.path).type == pyarrow.fs.FileType.NotFound:
                parent, name = recorded.path.rsplit("/", 1)
                newer = sorted(info.path for info in fs.get_file_info(pyarrow.fs.FileSelector(parent))
                               if info.type == pyarrow.fs.FileType.Directory and info.base_name.startswith("checkpoint_")
                               and info.base_name > name)
                if newer:  # printed here, not with `say`: this class must not import the runner (and torch)
                    print(f"[sweep] {self.trial_name}: {name} is gone, superseded by {newer[-1].rsplit('/', 1)[1]}; "
                          f"resuming from that (copied to {name})", file=sys.stderr, flush=True)
                    fs.create_dir(recorded.path)  # a local copy needs its folder
                    pyarrow.fs.copy_files(newer[-1], recorded.path, source_filesystem=fs, destination_filesystem=fs)
            return super().restore(checkpoint_path)

    return SweepTrial
