"""Launch a validated spec as a Ray Tune sweep: data once into the object store, Tuner, results dir."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path
from typing import Any

import pyarrow.fs
import yaml

from sweeps.space import OptunaSpace, param_space
from sweeps.spec import Spec, SpecError, count_trials, dump_spec, validate_spec
from trainables.data import DataError, Dataset, load_dataset

SPEC_FILE = "spec.yaml"


def say(message: str) -> None:
    print(f"[sweep] {message}", file=sys.stderr, flush=True)


# --- smoke --------------------------------------------------------------------------------------

def smoke_spec(spec: Spec) -> Spec:
    """The same sweep, small: a data subset, few epochs, small images, at most 2 values per grid."""
    raw = spec.model_dump(mode="json", by_alias=True)
    raw["smoke"] = True
    raw["data"]["train_subset"] = min(raw["data"]["train_subset"] or 600, 600)
    raw["data"]["batch_size"] = min(raw["data"]["batch_size"], 64)
    if raw["data"]["resize"]:
        raw["data"]["resize"] = min(raw["data"]["resize"], 64)  # AlexNet's smallest comfortable input
    raw["train"]["epochs"] = min(raw["train"]["epochs"], 3)
    raw["search"]["num_samples"] = min(raw["search"]["num_samples"], 2)
    if raw["scheduler"]["max_t"]:
        raw["scheduler"]["max_t"] = min(raw["scheduler"]["max_t"], 3)

    def shrink(settings: dict[str, Any]) -> None:
        for key, value in settings.items():
            if isinstance(value, dict) and "grid" in value:
                value["grid"] = value["grid"][:2]
            elif key in ("epochs", "train.epochs") and isinstance(value, int):
                settings[key] = min(value, 3)

    shrink(raw["space"])
    for arm in raw["arms"].values():
        shrink(arm or {})
    raw["notes"] = [*raw["notes"], "smoke run: training subset <= 600 images, <= 3 epochs, "
                    "images <= 64 px, <= 2 values per grid, <= 2 samples"]
    return validate_spec(raw, f"{spec.name} (smoke)")


# --- storage ------------------------------------------------------------------------------------

def storage_uri(storage: str | None) -> str:
    """A local directory (made absolute) or a URI such as s3://bucket/sweeps."""
    storage = storage or os.environ.get("SWEEP_STORAGE") or "results"
    return storage if "://" in storage else str(Path(storage).expanduser().resolve())


def _fs(uri: str) -> tuple[pyarrow.fs.FileSystem, str]:
    return pyarrow.fs.FileSystem.from_uri(uri) if "://" in uri else (pyarrow.fs.LocalFileSystem(), uri)


def exists(uri: str) -> bool:
    fs, path = _fs(uri)
    return fs.get_file_info(path).type != pyarrow.fs.FileType.NotFound


def write_text(uri: str, text: str) -> None:
    fs, path = _fs(uri)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as out:
        out.write(text.encode())


def read_spec(results_dir: str) -> Spec:
    """The spec a results directory was run with."""
    uri = f"{results_dir}/{SPEC_FILE}"
    if not exists(uri):
        raise SpecError(f"{results_dir}: not a sweep results directory (no {SPEC_FILE})")
    fs, path = _fs(uri)
    with fs.open_input_stream(path) as f:
        raw = yaml.safe_load(f.read().decode())
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


def start_ray(address: str | None, *, dashboard: bool = True) -> None:
    import ray

    if address:
        check_address(address)
    try:
        # address="local" starts a fresh instance; never attach to a stale one by accident.
        context = ray.init(address=address or "local", include_dashboard=dashboard if not address else None,
                           configure_logging=False)
    except (ConnectionError, RuntimeError) as err:
        raise SpecError(f"--address {address}: cannot connect ({str(err).splitlines()[0]})") from None
    url = context.dashboard_url
    resources = ray.cluster_resources()
    say(f"Ray: {len(ray.nodes())} node(s), {resources.get('CPU', 0):g} CPU, {resources.get('GPU', 0):g} GPU"
        + (f"; dashboard http://{url}" if url else ""))


def build_tuner(spec: Spec, dataset: Dataset, *, storage: str, restore: str | None = None):
    """The Tuner for this spec; `restore` continues the sweep in that results directory."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.basic_variant import BasicVariantGenerator
    from ray.tune.search.optuna import OptunaSearch

    from trainables.train import train_trial

    trainable = tune.with_resources(
        tune.with_parameters(train_trial, base=spec.base_settings(), dataset=dataset),
        {"cpu": spec.resources.cpu, "gpu": spec.resources.gpu})
    if restore:
        return tune.Tuner.restore(restore, trainable=trainable, resume_unfinished=True, resume_errored=True)

    metric, mode = spec.search.metric, spec.search.mode
    if spec.search.algorithm == "optuna":
        import optuna
        searcher = OptunaSearch(space=OptunaSpace(spec), metric=metric, mode=mode,
                                sampler=optuna.samplers.TPESampler(seed=spec.search.seed))
        if spec.search.max_concurrent:
            searcher = ConcurrencyLimiter(searcher, max_concurrent=spec.search.max_concurrent)
        space, num_samples = None, sum(count_trials(spec).values())
    else:
        searcher = BasicVariantGenerator(random_state=spec.search.seed,
                                         max_concurrent=spec.search.max_concurrent or 0)
        space, num_samples = param_space(spec), spec.search.num_samples
    if spec.scheduler.name == "asha":
        max_t = spec.scheduler.max_t or max_epochs(spec)
        scheduler = ASHAScheduler(time_attr="epoch", max_t=max_t, grace_period=spec.scheduler.grace_period,
                                  reduction_factor=spec.scheduler.reduction_factor)
    else:
        scheduler = FIFOScheduler()
    return tune.Tuner(
        trainable,
        param_space=space,
        tune_config=tune.TuneConfig(
            metric=metric, mode=mode, search_alg=searcher, scheduler=scheduler, num_samples=num_samples,
            reuse_actors=True,  # 5x less per-trial overhead on small trials (DESIGN.md)
            trial_dirname_creator=lambda trial: f"{trial.config['arm']['name']}_{trial.trial_id}"),
        run_config=tune.RunConfig(
            name=spec.name, storage_path=storage,
            checkpoint_config=tune.CheckpointConfig(num_to_keep=spec.run.checkpoint_keep),
            failure_config=tune.FailureConfig(max_failures=spec.run.max_failures),
            verbose=1),
    )


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


def run_sweep(spec: Spec, *, storage: str | None = None, address: str | None = None,
              dashboard: bool = True) -> str:
    """Run a sweep to the end; returns the results directory. Raises SpecError before starting anything."""
    storage = storage_uri(storage)
    results_dir = f"{storage.rstrip('/')}/{spec.name}"
    if exists(results_dir):
        raise SpecError(f"{results_dir}: already exists; continue it with `sweep resume {results_dir}` "
                        "or start over under another --name")
    if "://" not in storage:
        Path(storage).mkdir(parents=True, exist_ok=True)
        if not os.access(storage, os.W_OK):
            raise SpecError(f"--storage {storage}: not writable")
    dataset = prepare_data(spec)
    if spec.smoke and dataset.note:
        spec.notes = [*spec.notes, dataset.note]
    if spec.scheduler.name == "asha" and not spec.scheduler.max_t:
        spec.scheduler.max_t = max_epochs(spec)  # the spec as run states the rung ladder in full
    start_ray(address, dashboard=dashboard)
    write_text(f"{results_dir}/{SPEC_FILE}", dump_spec(spec))
    trials = count_trials(spec)
    say(f"{spec.name}: {sum(trials.values())} trials ({', '.join(f'{a} {n}' for a, n in trials.items())}); "
        f"results in {results_dir}")
    tuner = build_tuner(spec, dataset, storage=storage)
    print_best_per_arm(tuner.fit(), spec)
    return results_dir


def resume_sweep(results_dir: str, *, address: str | None = None, dashboard: bool = True) -> str:
    """Continue an interrupted sweep in `results_dir`: finished trials stay, the rest carry on."""
    results_dir = storage_uri(results_dir)
    spec = read_spec(results_dir)
    dataset = prepare_data(spec)
    start_ray(address, dashboard=dashboard)
    from ray import tune
    if not tune.Tuner.can_restore(results_dir):
        raise SpecError(f"{results_dir}: has a spec but no Ray Tune state to resume from")
    say(f"resuming {spec.name} from {results_dir}")
    tuner = build_tuner(spec, dataset, storage=results_dir.rsplit("/", 1)[0], restore=results_dir)
    print_best_per_arm(tuner.fit(), spec)
    return results_dir


def print_best_per_arm(results, spec: Spec) -> None:
    """One line per arm: its best trial by the spec's metric (last reported value) and what it used."""
    metric, mode = spec.search.metric, spec.search.mode
    frame = results.get_dataframe()
    if frame.empty or metric not in frame:
        say("no trial reported a result")
        return
    frame = frame.rename(columns=lambda c: c.removeprefix("config/arm/").removeprefix("config/"))
    best = frame.sort_values(metric, ascending=mode == "min").groupby("name", sort=False).head(1)
    searched = [c for c in frame.columns if "." in c and c != "train.seed" and frame[c].nunique() > 1]
    columns = ["name", metric, "epoch", *searched]
    table = best[[c for c in columns if c in best]].rename(columns={"name": "arm"})
    errors = sum(1 for r in results if r.error)
    print(f"\nBest trial per arm by {metric} ({mode}), {len(frame)} trials"
          + (f", {errors} errored" if errors else "") + ":")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
