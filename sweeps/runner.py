"""Launch a validated spec as a Ray Tune sweep: data once into the object store, Tuner, results dir."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.fs
import yaml
from ray import tune
from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback
from ray.tune.schedulers import ASHAScheduler, AsyncHyperBandScheduler, FIFOScheduler, MedianStoppingRule, TrialScheduler
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.basic_variant import BasicVariantGenerator

from sweeps.cluster import check_shared_storage, token_hint, use_token_if_found
from sweeps.space import PerArmOptuna, param_space
from sweeps.spec import Spec, SpecError, SweepFailed, count_trials, dump_spec, run_notes, validate_spec
from trainables.data import DataError, Dataset, load_dataset

SPEC_FILE = "spec.yaml"


def say(message: str) -> None:
    print(f"[sweep] {message}", file=sys.stderr, flush=True)


# --- smoke --------------------------------------------------------------------------------------

def smoke_spec(spec: Spec) -> Spec:
    """The same sweep, small: a data subset, few epochs, small images, at most 2 values per grid, one seed."""
    raw = spec.model_dump(mode="json", by_alias=True)
    raw["smoke"] = True
    raw["data"]["train_subset"] = min(raw["data"]["train_subset"] or 600, 600)
    raw["data"]["batch_size"] = min(max(raw["data"]["batch_size"], 32), 64)  # tiny batches cost a step per few images
    if raw["data"]["resize"]:
        raw["data"]["resize"] = min(raw["data"]["resize"], 64)  # AlexNet's smallest comfortable input
    raw["train"]["epochs"] = min(raw["train"]["epochs"], 3)
    raw["train"]["report_every"] = 1  # every one of the few epochs
    raw["train"]["checkpoint_every"] = 3  # only the last epoch: a big model's checkpoint costs more than its epoch
    raw["search"]["num_samples"] = min(raw["search"]["num_samples"], 2)
    if raw["scheduler"]["max_t"]:
        raw["scheduler"]["max_t"] = min(raw["scheduler"]["max_t"], 3)
    raw["resources"] = {"cpu": min(raw["resources"]["cpu"], 1), "gpu": 0}  # what any laptop has
    if raw["train"]["device"] == "cuda":
        raw["train"]["device"] = "auto"
    caps = {"epochs": 3, "train_subset": raw["data"]["train_subset"], "report_every": 1}  # values an arm or the space sets

    def shrink(settings: dict[str, Any]) -> None:
        for key, value in settings.items():
            name = key.rsplit(".", 1)[-1]
            cap = caps.get(name)
            if isinstance(value, dict) and "grid" in value:
                kept = value["grid"][:1 if name == "seed" else 2]  # seeds repeat a trial; one shows it runs
                value["grid"] = [min(v, cap) if cap else v for v in kept]
            elif cap and isinstance(value, int):
                settings[key] = min(value, cap)

    shrink(raw["space"])
    for arm in raw["arms"].values():
        shrink(arm or {})
    raw["notes"] = [*raw["notes"], "smoke run: training subset <= 600 images, batches of 32-64, <= 3 epochs, "
                    "a checkpoint at the last epoch only, images <= 64 px, <= 2 values per grid, 1 seed, "
                    "<= 2 samples, 1 CPU and no GPU per trial"]
    return validate_spec(raw, f"{spec.name} (smoke)")


# --- storage ------------------------------------------------------------------------------------

def storage_uri(storage: str | None) -> str:
    """A local directory (made absolute) or a URI such as s3://bucket/sweeps."""
    storage = storage or os.environ.get("SWEEP_STORAGE") or "results"
    return storage.rstrip("/") if "://" in storage else str(Path(storage).expanduser().resolve())


def _fs(uri: str) -> tuple[pyarrow.fs.FileSystem, str]:
    if "://" not in uri:
        return pyarrow.fs.LocalFileSystem(), uri
    try:
        return pyarrow.fs.FileSystem.from_uri(uri)
    except (ValueError, OSError) as err:  # an unknown scheme, or a bucket that cannot be resolved
        raise SpecError(f"{uri}: cannot open this storage ({err})") from None


def exists(uri: str) -> bool:
    fs, path = _fs(uri)
    try:
        return fs.get_file_info(path).type != pyarrow.fs.FileType.NotFound
    except (OSError, ValueError) as err:  # ValueError: pyarrow's ArrowInvalid, e.g. an empty path component
        raise SpecError(f"{uri}: cannot read ({err})") from None


def check_writable(directory: str, flag: str = "--storage") -> None:
    """Exit 2 early if the local `directory` cannot be created or written; creates nothing that stays."""
    path = Path(directory).expanduser().resolve()
    existing = next(p for p in [path, *path.parents] if p.exists())
    if not existing.is_dir():
        raise SpecError(f"{flag} {directory}: {existing} is a file, not a directory")
    try:  # a real probe: os.access says yes to root even where the filesystem says no
        tempfile.TemporaryDirectory(dir=existing, prefix=".sweep-probe-").cleanup()
    except OSError as err:
        raise SpecError(f"{flag} {directory}: not writable (cannot create a directory in {existing}: "
                        f"{err.strerror})") from None


def write_text(uri: str, text: str) -> None:
    """Write then rename, so a crash never leaves a half-written file."""
    fs, path = _fs(uri)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(f"{path}.tmp") as out:
        out.write(text.encode())
    fs.move(f"{path}.tmp", path)


def read_spec(results_dir: str) -> Spec:
    """The spec a results directory was run with."""
    uri = f"{results_dir}/{SPEC_FILE}"
    if not exists(results_dir):
        raise SpecError(f"{results_dir}: no such directory")
    if not exists(uri):
        raise SpecError(f"{results_dir}: not a sweep results directory (no {SPEC_FILE}; "
                        "`sweep run` writes one into every results directory)")
    fs, path = _fs(uri)
    try:
        with fs.open_input_stream(path) as f:
            raw = yaml.safe_load(f.read().decode())
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise SpecError(f"{uri}: not valid YAML ({getattr(err, 'problem', None) or err})") from None
    if not isinstance(raw, dict):
        raise SpecError(f"{uri}: not a spec (a YAML mapping), got {type(raw).__name__}")
    return validate_spec(raw, uri)


# --- Ray ----------------------------------------------------------------------------------------

def check_address(address: str) -> None:
    """Fail fast (exit 2) on an address nobody answers, instead of Ray's long retry loop."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if address in ("auto", "local") or not host:
        return  # Ray resolves these itself and fails fast
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except (OSError, ValueError) as err:
        raise SpecError(f"--address {address}: cannot reach a Ray cluster there ({err})") from None


def start_ray(address: str | None, *, dashboard: bool = True, storage: str | None = None) -> None:
    """Start a local Ray instance, or connect to the cluster at `address` and check it sees `storage`."""
    import ray

    if address:
        check_address(address)
        use_token_if_found()
    try:
        # address="local" starts a fresh instance; never attach to a stale one by accident.
        # A runtime this process already started (a notebook, the test suite) is used as it is.
        context = ray.init(address=address or "local", include_dashboard=dashboard if not address else None,
                           configure_logging=False, ignore_reinit_error=True)
    except (ConnectionError, RuntimeError) as err:
        raise SpecError(f"--address {address}: cannot connect ({str(err).splitlines()[0]}); {token_hint()}") from None
    url = context.dashboard_url
    resources = ray.cluster_resources()
    say(f"Ray: {len(ray.nodes())} node(s), {resources.get('CPU', 0):g} CPU, {resources.get('GPU', 0):g} GPU"
        + (f"; dashboard http://{url}" if url else ""))
    if address and storage and "://" not in storage:
        check_shared_storage(storage)


def check_local_fit(spec: Spec) -> None:
    """A local Ray instance cannot grow: fail now instead of leaving trials waiting for CPUs or GPUs it lacks."""
    import ray

    for kind, asked in (("CPU", spec.resources.cpu), ("GPU", spec.resources.gpu)):
        have = ray.cluster_resources().get(kind, 0)
        if asked > have:
            raise SpecError(f"resources.{kind.lower()}: each trial asks for {asked:g} {kind} but the local Ray "
                            f"instance has {have:g}; lower it with --set resources.{kind.lower()}=..., use --smoke "
                            "(1 CPU, no GPU per trial) or run on a cluster with --address")


def build_tuner(spec: Spec, dataset: Dataset, *, storage: str, restore: str | None = None, verbose: bool = False,
                experiment: str | None = None, warm: dict | None = None):
    """The Tuner for this spec; `restore` continues the sweep in that results directory (with the callbacks
    and verbosity it was started with). `verbose`: Tune's own tables instead of our progress display.
    `experiment`: the MLflow experiment's name (default: the spec's). `warm`: earlier trials for the Optuna
    searcher (`sweeps.space.warm_start_trials`)."""
    # Tune snapshots its state after every checkpoint (what keeps `sweep resume` exact) and warns that
    # this is frequent; for epochs of seconds it is the intended cadence, not a problem.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    # TensorBoard cannot take the list-valued results (confusion matrix, classes); result.json keeps them.
    logging.getLogger("ray.tune.logger.tensorboardx").setLevel(logging.ERROR)
    trainable = trainable_for(spec, dataset)
    if restore:
        return tune.Tuner.restore(restore, trainable=trainable, resume_unfinished=True, resume_errored=True)

    metric, mode = spec.search.metrics[0], spec.search.modes[0]  # several: the searcher takes them all
    if spec.search.algorithm == "optuna":
        searcher = PerArmOptuna(spec, warm)
        if spec.search.max_concurrent:
            searcher = ConcurrencyLimiter(searcher, max_concurrent=spec.search.max_concurrent)
        space, num_samples = None, sum(count_trials(spec).values())
    else:  # every configuration is drawn in param_space; Tune only crosses them with the seeds
        searcher = BasicVariantGenerator(max_concurrent=spec.search.max_concurrent or 0)
        space, num_samples = param_space(spec), 1
    scheduler = SCHEDULERS[spec.scheduler.name](spec)
    return tune.Tuner(
        trainable,
        param_space=space,
        tune_config=tune.TuneConfig(
            metric=metric, mode=mode, search_alg=searcher, scheduler=scheduler, num_samples=num_samples,
            reuse_actors=True,  # 5x less per-trial overhead on small trials (DESIGN.md)
            trial_name_creator=trial_name, trial_dirname_creator=trial_name),
        run_config=tune.RunConfig(
            name=spec.name, storage_path=storage,
            checkpoint_config=tune.CheckpointConfig(num_to_keep=checkpoints_kept(spec)),
            failure_config=tune.FailureConfig(max_failures=spec.run.max_failures),
            callbacks=callbacks(spec, scheduler, storage=storage, verbose=verbose, experiment=experiment),
            verbose=1 if verbose else 0),
    )


def trainable_for(spec: Spec, dataset: Dataset):
    """Tune's trainable: each trial trains in its own actor, or, packed (`Resources.pack_size` K > 1), each is a light
    actor asking for 1/K of a trial's resources whose epochs a pack worker trains (`trainables.member`)."""
    r, pack = spec.resources, spec.resources.pack_size()
    if pack == 1:
        from trainables.train import train_trial

        train = tune.with_parameters(train_trial, base=spec.base_settings(), dataset=dataset)
    else:
        import ray

        from trainables.member import PackManager, train_member

        manager = PackManager.remote([ray.put(dataset)], base=spec.base_settings(), capacity=pack,
                                     threads=max(1, int(r.cpu)))
        train = tune.with_parameters(train_member, manager=manager)
    return trial_actor(tune.with_resources(train, {"cpu": r.cpu / pack, "gpu": r.gpu / pack}))


def checkpoints_kept(spec: Spec) -> int | None:
    """Checkpoints Tune keeps per trial: `run.checkpoint_keep`, but every one under PBT (None), where another trial
    may copy a checkpoint long after its trial went on: deleted, the copy would restore a later one instead."""
    return None if spec.scheduler.name == "pbt" else spec.run.checkpoint_keep


def callbacks(spec: Spec, scheduler, *, storage: str, verbose: bool, experiment: str | None) -> list:
    """The driver's Tune callbacks: the scheduler's state, the result files, the console, the Optuna journal,
    MLflow."""
    from sweeps.dashboard import JOURNAL, OptunaJournal
    from sweeps.progress import Progress

    chosen = [SchedulerState(scheduler), JsonLogger(), CSVLogger()]
    if not verbose:
        chosen.append(Progress(spec))
    if "://" not in storage:  # the journal is a file beside the results: local or shared file systems only
        chosen.append(OptunaJournal(spec, Path(storage) / spec.name / JOURNAL))
    if spec.run.mlflow:
        from ray.air.integrations.mlflow import MLflowLoggerCallback

        chosen.append(MLflowLoggerCallback(tracking_uri=spec.run.mlflow, experiment_name=experiment or spec.name,
                                           tags={"sweep": spec.name}))
    return chosen


def check_mlflow(uri: str) -> None:
    """Exit 2 before anything starts when run.mlflow cannot be used: MLflow missing, or nobody answers."""
    import urllib.request

    try:
        import mlflow  # noqa: F401
    except ImportError:
        raise SpecError(f"run.mlflow {uri}: MLflow is not installed; pip install -e '.[mlflow]'") from None
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=5) as answer:
                answer.read()
        except OSError as err:
            raise SpecError(f"run.mlflow {uri}: no MLflow tracking server answers there "
                            f"({getattr(err, 'reason', err)}); start one with `mlflow server`") from None
    elif "://" not in uri or uri.startswith("file:"):
        check_writable(uri.removeprefix("file://").removeprefix("file:"), "run.mlflow")


# --- schedulers: every setting in epochs ----------------------------------------------------------

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


def _pbt(spec: Spec):
    from sweeps.space import PerArmPBT

    return PerArmPBT(spec)


class PerArm(FIFOScheduler):
    """Early stopping that judges a trial only against its own arm: one scheduler of the same kind and settings
    per arm, each with its own rungs (ASHA, HyperBand) or history (the median rule).

    One scheduler over every arm ranks all arms' trials together: the arm whose trials reach a rung first sets
    the cutoff for the others, so arrival order decides who goes on, arms get very different budgets, and in the
    quickstart 3 of 5 arms never trained a trial to the end. Per arm, the same rules and the same budget hold for
    each arm, and ASHA lets every arm's first trial at each rung go on, so every arm ends with its best
    configurations trained to the full budget (PBT is per arm already: `sweeps.space.PerArmPBT`)."""

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


SCHEDULERS = {"fifo": lambda spec: FIFOScheduler(), "asha": lambda spec: PerArm(spec, _asha),
              "hyperband": lambda spec: PerArm(spec, AsyncHyperBand), "median": lambda spec: PerArm(spec, _median),
              "pbt": _pbt}


class SchedulerState(tune.Callback):
    """Saves the scheduler (ASHA's rungs and HyperBand's brackets, the median rule's history, PBT's population) with
    Tune's experiment state, and restores it on `sweep resume`.

    Ray 2.60 saves the searcher's state but not the scheduler's: without this, a resumed ASHA sweep
    judges every trial against empty rungs and lets through trials it would have stopped. Tune pickles
    this callback and the scheduler together in tuner.pkl, so after a restore both still share one object.
    The median rule and PBT key their state by Trial objects, which hash by identity: after a restore those
    are copies, so they are relinked to the restored trials (same trial id) before the first step.
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
    `sweep resume`, which starts a new driver."""

    def _restore_from_remote(self, file_name: str, trial) -> None:
        if not Path(trial.local_path, file_name).exists():
            super()._restore_from_remote(file_name, trial)


class JsonLogger(_DriverCopyFirst, JsonLoggerCallback):
    """result.json and params.json, as Tune writes them (see _DriverCopyFirst)."""


class CSVLogger(_DriverCopyFirst, CSVLoggerCallback):
    """progress.csv, as Tune writes it (see _DriverCopyFirst)."""


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


def trial_name(trial) -> str:
    """`{arm}_{trial id}`: the trial's directory, its name in Tune's progress table and its actor's in Ray's dashboard."""
    return f"{trial.config['arm']['name']}_{trial.trial_id}"


def trial_actor(train_fn) -> type:
    """Tune's actor class for the function trainable, named after its trial in Ray's dashboard.

    Ray shows an actor's repr in the dashboard (Actors page, "Repr" column) and as the prefix of its log
    lines. Ray reads it once, when the actor starts: an actor Tune reuses for later trials keeps the
    name of its first.
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


def max_epochs(spec: Spec) -> int:
    """The most epochs any trial can run (an arm or the space may change train.epochs)."""
    values = [spec.train.epochs]
    for settings in [spec.space_settings(), *spec.arm_settings().values()]:
        value = settings.get("train.epochs")
        if value is not None:
            values.extend(value.candidates() if hasattr(value, "candidates") else [value])
    return max(values)


def prepare_data(spec: Spec) -> Dataset:
    d = spec.data
    try:
        dataset = load_dataset(d.name, data_dir=d.data_dir, download=d.download, train_subset=d.train_subset,
                               val_split=d.val_split, split_seed=d.split_seed, normalize=d.normalize,
                               allow_standin=spec.smoke)
    except DataError as err:
        raise SpecError(f"data: {err}") from None
    if dataset.note:
        say(dataset.note)
    say(f"data {d.name}: {len(dataset.train_y)} train / {len(dataset.val_y)} val"
        + (f" / {len(dataset.test_y)} test" if dataset.test_y is not None else " (val is the official test split)")
        + f", {dataset.num_classes} classes, images {tuple(dataset.train_x.shape[1:])}")
    return dataset


def new_results_dir(storage: str, name: str) -> str:
    """`<storage>/<name>`, refused (SpecError) if it already exists or the storage is not writable."""
    results_dir = f"{storage.rstrip('/')}/{name}"
    check_object_store(storage)
    if exists(results_dir):
        raise SpecError(f"{results_dir}: already exists; continue it with `sweep resume {results_dir}` "
                        "or start over under another --name")
    if "://" not in storage:
        check_writable(storage)
    return results_dir


OBJECT_STORES = ("s3://", "gs://", "gcs://")


def check_object_store(uri: str, flag: str = "--storage") -> None:
    """Exit 2 before anything starts when object storage cannot take the results: the bucket does not exist, or
    the credentials (AWS_* or Google's variables, ~/.aws, an instance role) are refused. Writes a probe object,
    then deletes it (S3 may keep an empty marker for the prefix). Other storage is left to check_writable."""
    if not uri.startswith(OBJECT_STORES):
        return
    fs, path = _fs(uri)
    bucket = path.split("/", 1)[0]
    try:
        if fs.get_file_info(bucket).type == pyarrow.fs.FileType.NotFound:
            raise SpecError(f"{flag} {uri}: bucket {bucket} does not exist; create it first")
        probe = f"{path.rstrip('/')}/.sweep-probe-{os.getpid()}"
        with fs.open_output_stream(probe) as out:
            out.write(b"")
        fs.delete_file(probe)
    except OSError as err:  # pyarrow's S3 errors: AccessDenied, InvalidAccessKeyId, SignatureDoesNotMatch, ...
        raise SpecError(f"{flag} {uri}: the object store refused it ({str(err).strip().splitlines()[0]}); "
                        "check the credentials and the bucket's permissions") from None


def download_results(uri: str, local: Path) -> Path:
    """Copy a results directory from object storage to `local` (a new directory), leaving out the checkpoints:
    the report reads only the spec and each trial's params.json and result.json."""
    fs, path = _fs(uri)
    try:
        found = fs.get_file_info(pyarrow.fs.FileSelector(path, recursive=True))
    except OSError as err:
        raise SpecError(f"{uri}: cannot read ({str(err).strip().splitlines()[0]})") from None
    files = [f for f in found if f.type == pyarrow.fs.FileType.File
             and not any(part.startswith("checkpoint_") for part in f.path[len(path):].split("/"))]
    say(f"downloading {len(files)} files of {uri} (checkpoints left in place) to {local}")
    partial = local.with_name(f".{local.name}.partial")  # renamed when complete: no half copy under `local`
    shutil.rmtree(partial, ignore_errors=True)  # what an earlier, interrupted download left
    try:
        for info in files:
            target = partial / info.path[len(path):].lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            with fs.open_input_stream(info.path) as source:
                target.write_bytes(source.read())
    except OSError as err:
        raise SpecError(f"{uri}: download stopped ({str(err).strip().splitlines()[0]}); "
                        f"the files so far are in {partial}") from None
    partial.rename(local)
    return local


def run_sweep(spec: Spec, *, storage: str | None = None, address: str | None = None,
              dashboard: bool = True, verbose: bool = False) -> str:
    """Run a sweep to the end; returns the results directory. Raises SpecError before starting anything."""
    storage = storage_uri(storage)
    results_dir = new_results_dir(storage, spec.name)
    if spec.run.mlflow:
        check_mlflow(spec.run.mlflow)
    warm = warm_start(spec)
    dataset = prepare_data(spec)
    if spec.smoke and dataset.note:
        spec.notes = [*spec.notes, dataset.note]
    spec.notes = [*spec.notes, *notes_said(spec)]
    if spec.scheduler.name in ("asha", "hyperband") and not spec.scheduler.max_t:
        spec.scheduler.max_t = max_epochs(spec)  # the spec as run states the rung ladder in full
    start_ray(address, dashboard=dashboard, storage=storage)
    if not address:
        check_local_fit(spec)
    write_text(f"{results_dir}/{SPEC_FILE}", dump_spec(spec))
    trials = count_trials(spec)
    say(f"{spec.name}: {sum(trials.values())} trials ({', '.join(f'{a} {n}' for a, n in trials.items())}); "
        f"results in {results_dir}")
    tuner = build_tuner(spec, dataset, storage=storage, verbose=verbose, warm=warm)
    del dataset  # trials read the object store's copy; the driver's own would pay for the data twice
    check_failures(tuner.fit())
    return results_dir


def resume_sweep(results_dir: str, *, address: str | None = None, dashboard: bool = True) -> str:
    """Continue an interrupted sweep in `results_dir`: finished trials stay as they are, unfinished ones
    continue from their last checkpoint (errored ones get one more try), the rest start.
    Raises SpecError before starting anything."""
    results_dir = storage_uri(results_dir)
    check_object_store(results_dir, "resume")
    spec = read_spec(results_dir)
    if not work_left(results_dir, spec):
        say(f"{results_dir}: every trial has finished; nothing to resume")
        return results_dir
    if spec.run.mlflow:
        check_mlflow(spec.run.mlflow)
    dataset = prepare_data(spec)
    start_ray(address, dashboard=dashboard, storage=results_dir)
    if not address:
        check_local_fit(spec)
    say(f"resuming {spec.name} from {results_dir}")
    tuner = build_tuner(spec, dataset, storage=results_dir.rsplit("/", 1)[0], restore=results_dir)
    del dataset  # trials read the object store's copy; the driver's own would pay for the data twice
    check_failures(tuner.fit())
    return results_dir


def work_left(results_dir: str, spec: Spec) -> bool:
    """Whether the sweep in `results_dir` has trials left to run. Raises SpecError when there is no Tune
    state, or when a checkpoint that an unfinished trial would continue from cannot be read."""
    if not tune.Tuner.can_restore(results_dir):
        raise SpecError(f"{results_dir}: has a {SPEC_FILE} but no Ray Tune state to resume from (the sweep "
                        "stopped before Tune saved any); delete the directory and `sweep run` again")
    trials = tune.ExperimentAnalysis(results_dir).trials
    unfinished = [t for t in trials if t.status != "TERMINATED"]
    if "://" not in results_dir:  # on object storage, checking would download every checkpoint
        for trial in unfinished:
            if trial.checkpoint:
                check_checkpoint(Path(trial.checkpoint.path))
    return bool(unfinished) or len(trials) < sum(count_trials(spec).values())


def check_checkpoint(folder: Path) -> None:
    """A torch checkpoint is a zip archive: test every member's CRC, without unpickling anything."""
    from trainables.train import CHECKPOINT_FILE

    path = folder / CHECKPOINT_FILE
    if not path.exists():
        return  # deleted on purpose: the trial trains again from epoch 1 (trainables.train.load_checkpoint)
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
        problem = f"member {bad} fails its CRC check" if bad else None
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        problem = str(err)
    if problem:
        raise SpecError(f"{path}: corrupted checkpoint ({problem}); delete this file and resume again "
                        "to train that trial again from epoch 1")


def warm_start(spec: Spec) -> dict | None:
    """The earlier sweep's trials for search.warm_start, checked before anything starts (SpecError), and said."""
    if not spec.search.warm_start:
        return None
    from sweeps.space import warm_start_trials

    warm = warm_start_trials(spec)
    say(f"warm start from {spec.search.warm_start}: " + (", ".join(f"{arm} {len(trials)}" for arm, trials in
                                                                warm.items()) or "no finished trial") + " earlier trials")
    return warm


def notes_said(spec: Spec) -> list[str]:
    """Say what the user should know before this run (`sweeps.spec.run_notes`); returns the notes."""
    notes = run_notes(spec)
    for note in notes:
        say(f"note: {note}")
    return notes


def check_failures(results) -> None:
    """One line about trials that failed for good; SweepFailed when every trial did (nothing to report)."""
    failed = [r for r in results if r.error]
    if not failed:
        return
    where = f"{failed[0].path}/error.txt"
    if len(failed) == len(results):
        raise SweepFailed(f"all {len(failed)} trials failed; the first error is in {where}")
    say(f"{len(failed)} of {len(results)} trials failed after their retries; the first error is in {where}; "
        "`sweep resume` retries them")
