"""Launch a validated spec as a Ray Tune sweep: data once into the object store, Tuner, results dir."""

from __future__ import annotations

import logging
import math
import os
import socket
import time
import zipfile
from pathlib import Path

from ray import tune
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.basic_variant import BasicVariantGenerator

from sweeps.cluster import check_shared_storage, token_hint, use_token_if_found
from sweeps.console import say
from sweeps.progress import INTERRUPTED, Progress, Timeline, tune_interrupt_words
from sweeps.schedulers import create_scheduler, max_epochs
from sweeps.schema import Spec, SpecError, SweepFailed, SweepInterrupted, count_trials
from sweeps.space import PerArmOptuna, param_space
from sweeps.storage import (
    SPEC_FILE,
    check_object_store,
    check_writable,
    new_results_dir,
    read_spec,
    storage_uri,
    write_spec,
)
from sweeps.tune_patches import CSVLogger, JsonLogger, SchedulerState, snapshot_race, trial_actor
from trainables.data import DataError, Dataset, load_dataset

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


def _not_token_notice(record: logging.LogRecord) -> bool:
    """Ray says at every start that it turned token authentication on, as it does by default: nothing for the user
    to do, so not said (that it is disabled, or failed, still is)."""
    return not record.getMessage().startswith("Token authentication is enabled for this Ray cluster")


def start_ray(address: str | None, *, dashboard: bool = True, storage: str | None = None) -> None:
    """Start a local Ray instance, or connect to the cluster at `address` and check it sees `storage`."""
    import ray

    if address:
        check_address(address)
        use_token_if_found()
    try:
        # address="local" starts a fresh instance; never attach to a stale one by accident.
        # A runtime this process already started (a notebook, the test suite) is used as it is.
        logging.getLogger("ray._private.authentication.authentication_token_setup").addFilter(_not_token_notice)
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
    """A local Ray instance cannot grow: fail before it starts instead of leaving trials waiting for CPUs or GPUs
    it would lack."""
    for kind, asked in (("CPU", spec.resources.cpu), ("GPU", spec.resources.gpu)):
        have = local_resources().get(kind, 0)
        if asked > have:
            raise SpecError(f"resources.{kind.lower()}: each trial asks for {asked:g} {kind} but the local Ray "
                            f"instance has {have:g}; lower it with --set resources.{kind.lower()}=..., use --smoke "
                            "(1 CPU, no GPU per trial) or run on a cluster with --address")


def local_resources() -> dict[str, float]:
    """What the local Ray instance has, or will have once `start_ray` starts it: Ray's own CPU count (which heeds
    cgroup limits) and the GPUs torch sees."""
    import ray

    if ray.is_initialized():  # a runtime this process already started is used as it is (start_ray)
        return ray.cluster_resources()
    import torch
    from ray._private.utils import get_num_cpus

    return {"CPU": get_num_cpus(), "GPU": torch.cuda.device_count()}


def build_tuner(spec: Spec, dataset: Dataset, *, storage: str, restore: str | None = None, verbose: bool = False,
                experiment: str | None = None, warm: dict | None = None, timeline: Timeline | None = None):
    """The Tuner for this spec; `restore` continues the sweep in that results directory (with the callbacks
    and verbosity it was started with). `verbose`: Tune's own tables instead of our progress display.
    `experiment`: the MLflow experiment's name (default: the spec's). `warm`: earlier trials for the Optuna
    searcher (`sweeps.space.warm_start_trials`). `timeline`: the callback that records the run's phases."""
    # Tune snapshots its state after every checkpoint (what keeps `sweep resume` exact) and warns that
    # this is frequent; for epochs of seconds it is the intended cadence, not a problem.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    # TensorBoard cannot take the list-valued results (confusion matrix, classes); result.json keeps them.
    logging.getLogger("ray.tune.logger.tensorboardx").setLevel(logging.ERROR)
    # Tune's new output engine prints a configuration box and a TensorBoard command into Ray's temporary session
    # folder at every start, whatever the verbosity; its old engine prints nothing at verbosity 0, and `--verbose`
    # keeps the new one's tables. (`sweep resume` continues with the verbosity the sweep was started with.)
    os.environ["RAY_AIR_NEW_OUTPUT"] = "1" if verbose else "0"
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
    scheduler = create_scheduler(spec)
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
            callbacks=callbacks(spec, scheduler, storage=storage, verbose=verbose, experiment=experiment)
            + ([timeline] if timeline else []),
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
                                     threads=max(1, int(r.cpu)), trial_cpu=r.cpu, trial_gpu=r.gpu,
                                     node_id=ray.get_runtime_context().get_node_id(),
                                     prestart=math.ceil(min(sum(count_trials(spec).values()),
                                                            spec.search.max_concurrent or math.inf) / pack))
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


def trial_name(trial) -> str:
    """`{arm}_{trial id}`: the trial's directory, its name in Tune's progress table and its actor's in Ray's dashboard."""
    return f"{trial.config['arm']['name']}_{trial.trial_id}"


def prepare_data(spec: Spec) -> Dataset:
    d = spec.data
    try:
        dataset = load_dataset(d.name, data_dir=d.data_dir, download=d.download, train_subset=d.train_subset,
                               val_split=d.val_split, split_seed=d.split_seed, normalize=d.normalize,
                               eval_subset=d.eval_subset, allow_standin=spec.smoke)
    except DataError as err:
        raise SpecError(f"data: {err}") from None
    if dataset.note:
        say(dataset.note)
    say(f"data {d.name}: {len(dataset.train_y)} train / {len(dataset.val_y)} val"
        + (f" / {len(dataset.test_y)} test" if dataset.test_y is not None else " (val is the official test split)")
        + f", {dataset.num_classes} classes, images {tuple(dataset.train_x.shape[1:])}")
    return dataset


def spec_as_run(spec: Spec, data_note: str | None = None) -> Spec:
    """A copy of `spec` as its results directory records it: with the notes said to the user (and `data_note`)
    and, for ASHA and HyperBand, the rung ladder's top stated in full. The caller's spec stays as it was."""
    notes = [*spec.notes, *([data_note] if data_note else []), *notes_said(spec)]
    scheduler = spec.scheduler
    if scheduler.name in ("asha", "hyperband") and not scheduler.max_t:
        scheduler = scheduler.model_copy(update={"max_t": max_epochs(spec)})
    return spec.model_copy(update={"notes": notes, "scheduler": scheduler})


def run_sweep(spec: Spec, *, storage: str | None = None, address: str | None = None,
              dashboard: bool = True, verbose: bool = False, started: float | None = None) -> str:
    """Run a sweep to the end; returns the results directory. Raises SpecError before starting anything.
    `started`: when the command began (`time.time()`), from which timeline.json counts; default: now."""
    started = started or time.time()
    storage = storage_uri(storage)
    results_dir = new_results_dir(storage, spec.name)
    if not address:
        check_local_fit(spec)
    if spec.run.mlflow:
        check_mlflow(spec.run.mlflow)
    warm = warm_start(spec)
    dataset = prepare_data(spec)
    spec = spec_as_run(spec, dataset.note if spec.smoke else None)
    marks = {"spec and data ready": round(time.time() - started, 2)}
    start_ray(address, dashboard=dashboard, storage=storage)
    marks["Ray up"] = round(time.time() - started, 2)
    write_spec(results_dir, spec)
    trials = count_trials(spec)
    say(f"{spec.name}: {sum(trials.values())} trials ({', '.join(f'{a} {n}' for a, n in trials.items())}); "
        f"results in {results_dir}")
    tuner = build_tuner(spec, dataset, storage=storage, verbose=verbose, warm=warm,
                        timeline=Timeline(results_dir, started, marks))
    del dataset  # trials read the object store's copy; the driver's own would pay for the data twice
    fit(tuner, spec, results_dir)
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
    if not address:
        check_local_fit(spec)
    dataset = prepare_data(spec)
    start_ray(address, dashboard=dashboard, storage=results_dir)
    say(f"resuming {spec.name} from {results_dir}")
    tuner = build_tuner(spec, dataset, storage=results_dir.rsplit("/", 1)[0], restore=results_dir)
    del dataset  # trials read the object store's copy; the driver's own would pay for the data twice
    fit(tuner, spec, results_dir)
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
    """Say what the user should know before this run (`sweeps.checks.run_notes`); returns the notes."""
    from sweeps.checks import run_notes

    notes = run_notes(spec)
    for note in notes:
        say(f"note: {note}")
    return notes


def fit(tuner, spec: Spec, experiment_dir: str, resume_dir: str | None = None) -> None:
    """Run the Tuner of `spec`, whose Tune experiment is `experiment_dir`. SweepInterrupted when Ctrl-C stopped it,
    naming `sweep resume` of `resume_dir` (default: the experiment's); else one line about trials that failed."""
    INTERRUPTED.clear()
    logging.getLogger("ray.tune.tune").addFilter(tune_interrupt_words)  # added once, however often called
    logging.getLogger("ray.tune.execution.experiment_state").addFilter(snapshot_race)
    results = tuner.fit()
    if INTERRUPTED.is_set():
        raise SweepInterrupted(interrupted_summary(spec, experiment_dir, resume_dir or experiment_dir))
    check_failures(results)


def interrupted_summary(spec: Spec, experiment_dir: str, resume_dir: str) -> str:
    """How far an interrupted sweep got, by the state Tune saved as it stopped (its trials still running there)."""
    statuses = [t.status for t in tune.ExperimentAnalysis(experiment_dir).trials]
    total, done, failed = sum(count_trials(spec).values()), statuses.count("TERMINATED"), statuses.count("ERROR")
    return (f"interrupted: {done} of {total} trials done, {len(statuses) - done - failed} interrupted, "
            f"{total - len(statuses)} not started" + (f", {failed} failed" if failed else "")
            + f"; continue with `sweep resume {resume_dir}`")


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
