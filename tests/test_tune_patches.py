"""sweeps/tune_patches.py: each override of a Ray Tune internal, and the Ray behaviour that makes it needed. A test
here that fails after a Ray upgrade says which override to revisit (see also
test_reliability::test_a_trial_restarted_with_a_checkpoint_keeps_the_rows_the_driver_logged_since_the_last_sync,
which pins Tune's own loggers)."""

from __future__ import annotations

import inspect
import logging
import sys
from types import SimpleNamespace

import ray
from ray.tune.execution import experiment_state
from ray.tune.execution.tune_controller import TuneController
from ray.tune.experiment import Trial
from ray.tune.logger.logger import LoggerCallback
from ray.tune.search.basic_variant import BasicVariantGenerator
from ray.tune.utils.util import _atomic_save

from sweeps.schedulers import create_scheduler
from sweeps.spec import validate_spec
from sweeps.tune_patches import JsonLogger, SchedulerState, relink, snapshot_race, trial_actor


def test_ray_is_the_version_the_overrides_were_checked_on():
    assert ray.__version__.startswith("2.60."), "re-check every override in sweeps/tune_patches.py, then the pin"


def test_tune_saves_the_searcher_but_not_the_scheduler():
    # Why SchedulerState exists: Tune leaves its scheduler out of its own experiment state.
    saved = inspect.getsource(TuneController.save_to_dir) + inspect.getsource(TuneController.__getstate__)
    assert "_search_alg" in saved and '"_scheduler_alg"' in saved


def test_tune_loggers_copy_a_restarted_trials_file_back_from_storage():
    # Why JsonLogger and CSVLogger keep the driver's copy: Tune's loggers download the file on every restart.
    assert "copy_files" in inspect.getsource(LoggerCallback._restore_from_remote)
    assert JsonLogger._restore_from_remote is not LoggerCallback._restore_from_remote


def test_a_snapshot_upload_racing_the_searchers_temporary_file_is_not_printed():
    # Why snapshot_race exists: the searcher saves through a temporary file beside the state Tune uploads in the
    # background, and Tune logs a failed upload, traceback and all, under this message.
    assert "tmp_file_name" in inspect.getsource(BasicVariantGenerator.save_to_dir)
    assert 'f".{str(uuid.uuid4())}-{tmp_file_name}"' in inspect.getsource(_atomic_save)  # tune_patches.TEMPORARY_FILE
    assert experiment_state.logger.name == "ray.tune.execution.experiment_state"
    message = "Saving experiment state to storage at '/results/sweep' failed with exception: "
    saving = inspect.getsource(experiment_state._ExperimentCheckpointManager.sync_up_experiment_state)
    assert '"Saving experiment state to storage at "' in saving

    def record(error: Exception, text: str = message) -> logging.LogRecord:
        try:
            raise error
        except OSError:
            return logging.LogRecord("ray.tune.execution.experiment_state", logging.ERROR, __file__, 1, text, None,
                                     sys.exc_info())
    vanished = ("Failed to open local file '/tmp/ray/session_1/driver_artifacts/"
                ".104292f4-b1fd-4cf8-be61-b5441dbf7a23-tmp-basic-variant-state-1.json'")
    assert not snapshot_race(record(FileNotFoundError(2, f"{vanished}. Detail: [errno 2] No such file or directory")))
    assert snapshot_race(record(PermissionError(13, "Permission denied: '/results/sweep/experiment_state-1.json'")))
    assert snapshot_race(record(FileNotFoundError(2, "No such file or directory: '/results/sweep'")))
    assert snapshot_race(record(FileNotFoundError(2, "No such file or directory: '/results/a-tmp-sweep/state.json'")))
    assert snapshot_race(record(FileNotFoundError(2, f"{vanished}: No such file"), text="Trial task failed"))


def _median_spec():
    return validate_spec({"name": "s", "arms": {"a": {"lr": 0.1}, "b": {"lr": 0.2}},
                          "scheduler": {"name": "median", "grace_period": 1, "min_samples_required": 1}}, "spec.yaml")


def test_a_restored_scheduler_keeps_each_arms_history_keyed_by_the_live_trials():
    # The median rule keys its history by Trial objects, which hash by identity: a restored copy must be relinked.
    controller = SimpleNamespace(get_live_trials=list)
    before = create_scheduler(_median_spec())
    before.set_search_properties("val_acc", "max")
    trials = [Trial("__fake", config={"arm": {"name": arm}}, stub=True) for arm in ("a", "a", "b")]
    for trial, score in zip(trials, (0.9, 0.8, 0.1)):
        before.on_trial_add(controller, trial)
        before.on_trial_result(controller, trial, {"epoch": 1, "val_acc": score})
    state = SchedulerState(before).get_state()
    # A resumed sweep's Trials are new objects with the old ids, as Tune restores them from its experiment state.
    restored = [Trial("__fake", config=t.config, stub=True, trial_id=t.trial_id) for t in trials]
    after = create_scheduler(_median_spec())
    callback = SchedulerState(after)
    callback.set_state(state)
    callback.on_step_begin(0, restored)
    history = after.by_arm["a"]._results
    assert [id(t) for t in history] == [id(t) for t in restored[:2]]
    assert [id(t) for t in after.by_arm["b"]._results] == [id(restored[2])]
    assert history[restored[0]][0]["val_acc"] == 0.9


def test_relink_swaps_trial_copies_inside_containers_and_scheduler_objects():
    copy = Trial("__fake", config={"arm": {"name": "a"}}, stub=True)
    live = Trial("__fake", config={"arm": {"name": "a"}}, stub=True, trial_id=copy.trial_id)
    nested = {"by": {copy: [copy, (copy, 1)]}}
    relink(nested, {live.trial_id: live})
    [(key, value)] = nested["by"].items()
    assert key is live and value[0] is live and value[1][0] is live


def test_a_trial_actor_is_named_after_its_trial():
    # Ray's dashboard shows an actor's repr; Tune's own function-trainable actor shows a generic name.
    def train(config):
        pass

    actor_class = trial_actor(train)
    assert actor_class.__qualname__ == "SweepTrial" and "__repr__" in vars(actor_class)
