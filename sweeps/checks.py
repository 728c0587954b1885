"""Checks of a spec beyond its schema (`sweeps.spec`): they need the trainables' registries, datasets and models
(torch), so the schema stays light and these run when a spec is validated to be run, not when one is listed."""

from __future__ import annotations

import functools
import itertools
import json
import math
import re
import shutil
from typing import Any

from sweeps.schema import (
    LOADED_ONCE,
    PACK_ON_CPU,
    Domain,
    Spec,
    SpecError,
    Value,
    _fixed,
    _validate_sections,
    resolve_key,
)
from trainables.data import SOURCES, split_sizes
from trainables.optim import OPTIMIZERS
from trainables.settings import apply_settings
from trainables.train import EPOCH_METRICS, FINAL_METRICS


def check_spec(spec: Spec) -> None:
    """Every check beyond the schema, or ValueError("field: message"): each fixed value and domain candidate of
    the arms and the space against its section, the search, the scheduler, devices, subsets and each arm's model
    against its images."""
    for arm in spec.arms:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", str(arm)):
            raise ValueError(f"arms.{arm}: arm names use letters, digits, '_' and '-'")
    try:
        spec.compare_by = [resolve_key(k) for k in spec.compare_by]
    except ValueError as err:
        raise ValueError(f"compare_by: {err}") from None
    if spec.protocol and spec.data.val_split == "test":
        raise ValueError("data.val_split: the protocol tunes on a validation split carved from the training data; "
                         "'test' would tune on the test split")
    base = spec.base_settings()
    shared = spec.space_settings()
    arms = spec.arm_settings()
    for arm, settings in arms.items():
        for path in settings.keys() & shared.keys():
            raise ValueError(f"arms.{arm}.{path}: also set in space; set it in one place")
        for where, values in ((f"arms.{arm}", settings), ("space", shared)):
            for path in values.keys() & LOADED_ONCE:
                raise ValueError(f"{where}.{path}: the dataset is loaded once for the whole sweep, so this "
                                 f"cannot change per trial; set it in the data section (or run one sweep per value)")
        fixed = {**_fixed(shared), **_fixed(settings)}

        def where(path: str) -> str:
            return f"arms.{arm}" if path in settings else "space"

        _validate_sections(apply_settings(base, fixed), lambda path, msg: f"{where(path)}.{path}: {msg}")
        for path, value in {**shared, **settings}.items():
            if isinstance(value, Domain):
                for candidate in value.candidates():
                    _validate_sections(apply_settings(base, {**fixed, path: candidate}),
                                       lambda p, msg: f"{where(path)}.{path}: {candidate!r}: {msg}")
        optimizer = {**shared, **settings}.get("optim.optimizer", spec.optim.optimizer)
        if arm in OPTIMIZERS and optimizer != arm and not isinstance(optimizer, Domain):
            # the mistake this catches: `adam: {}` or `adam: {lr: ...}`, training the base optimizer under adam's name
            raise ValueError(f"arms.{arm}: named after optimizer {arm}, but trains {optimizer} "
                             f"({'its optim.optimizer' if 'optim.optimizer' in settings else 'the base optim.optimizer'}); "
                             f"give it optimizer: {arm}")
    _check_search(spec, shared, arms)
    _check_scheduler(spec, shared, arms)
    _check_devices(spec, base, shared, arms)
    _check_subsets(spec, shared, arms)
    _check_model_inputs(spec, base, shared, arms)


RANDOM_KINDS = ("choice", "uniform", "loguniform", "int")  # drawn anew for every sampled configuration


def check_target(target: float, metric: str) -> None:
    """`sweep report --target`: a score `metric` can reach (SpecError otherwise)."""
    from analysis.stats import metric_range

    low, high = metric_range(metric)
    if not low <= target <= high:
        span = f"[{low:g}, {high:g}]" if high < math.inf else f">= {low:g}"
        raise SpecError(f"--target {target:g}: {metric} is {span}, so no trial could reach {target:g}"
                        + (" (accuracies are fractions: 0.99, not 99)" if "_acc" in metric and target > 1 else ""))


def _direction(metric: str) -> str | None:
    """The mode a metric is naturally optimised in, where there is one."""
    if "_acc" in metric:
        return "max"
    if "_loss" in metric or metric == "ece":
        return "min"
    return None


def _check_search(spec: Spec, shared: dict[str, Value], arms: dict[str, dict[str, Value]]) -> None:
    """The metric trials are compared by, seeds as replicates, and repeats that would be identical trials."""
    metrics, modes = spec.search.metrics, spec.search.modes
    if len(metrics) != len(modes) or not metrics:
        raise ValueError(f"search.mode: give one mode per metric: {len(metrics)} metric(s), {len(modes)} mode(s)")
    if len(set(metrics)) != len(metrics):
        raise ValueError(f"search.metric: a metric is listed twice in {metrics}")
    for metric, mode in zip(metrics, modes):
        if metric in FINAL_METRICS:
            raise ValueError(f"search.metric: {metric} is reported once, after the last epoch, so neither the searcher "
                             "nor ASHA could compare trials by it while they run (and tuning on the test split would "
                             "leak it into the choice); use val_acc or val_loss")
        if metric not in EPOCH_METRICS or metric == "epoch":
            raise ValueError(f"search.metric: {metric!r} is not a metric every trial reports at every report; "
                             f"choose one of {[m for m in EPOCH_METRICS if m != 'epoch']}")
        if _direction(metric) and _direction(metric) != mode:
            raise ValueError(f"search.mode: {metric} is better when {'higher' if mode == 'min' else 'lower'}; "
                             f"use mode: {_direction(metric)}")
    if len(metrics) > 1:
        if spec.scheduler.name != "fifo":
            raise ValueError(f"scheduler.name: {spec.scheduler.name} ranks trials by one metric, and search.metric "
                             f"lists {len(metrics)} ({', '.join(metrics)}); with several use scheduler fifo")
        if spec.protocol:
            raise ValueError("search.metric: the protocol confirms each arm's best configuration, which takes one "
                             f"metric; it lists {len(metrics)}")
    if spec.search.warm_start and spec.search.algorithm != "optuna":
        raise ValueError("search.warm_start: only the optuna searcher learns from earlier trials; "
                         f"search.algorithm is {spec.search.algorithm}")
    places = [("space", shared)] + [(f"arms.{a}", s) for a, s in arms.items()]
    for where, values in places:
        seed = values.get("train.seed")
        if isinstance(seed, Domain) and spec.search.algorithm == "optuna":
            raise ValueError(f"{where}.train.seed: seeds are replicates, never searched, and under optuna each trial "
                             "runs one seed: fix it (seed: 0) and repeat the tuned configuration over seeds with "
                             "protocol: {confirm_seeds: 5}")
        if isinstance(seed, Domain) and seed.kind != "grid":
            raise ValueError(f"{where}.train.seed: seeds are replicates, never searched: list them as a grid, "
                             "e.g. seed: {grid: [0, 1, 2]}, and every configuration is trained with each")
        if spec.search.algorithm == "optuna":
            for path, value in values.items():
                if isinstance(value, Domain) and value.kind == "grid":
                    raise ValueError(f"{where}.{path}: grid domains need search.algorithm grid or random; "
                                     "with optuna use choice")
    if spec.search.algorithm != "optuna" and spec.search.num_samples > 1:
        for arm, own in arms.items():
            drawn = [p for p, v in {**shared, **own}.items() if isinstance(v, Domain) and v.kind in RANDOM_KINDS]
            if not drawn:
                n, which = spec.search.num_samples, f"arm {arm}" if spec.arms else "the spec (it has no arms)"
                raise ValueError(f"search.num_samples: {n} repeats of {which} would be {n} identical trials (none of "
                                 "its settings is drawn at random); repeat it over seeds instead, with "
                                 "space: {seed: {grid: [0, 1, 2]}} and num_samples: 1")


def _check_scheduler(spec: Spec, shared: dict[str, Value], arms: dict[str, dict[str, Value]]) -> None:
    """What each scheduler needs of the trials: reports where it judges them, checkpoints where it pauses them."""
    sched, train = spec.scheduler, spec.train
    if sched.name != "pbt":
        return
    if spec.search.algorithm == "optuna":
        raise ValueError("scheduler.name: pbt changes the settings of running trials, which a searcher could not "
                         "follow; use it with search.algorithm grid or random")
    if sched.perturbation_interval % train.checkpoint_every:
        raise ValueError(f"scheduler.perturbation_interval: pbt copies checkpoints at each perturbation: it must be "
                         f"a multiple of train.checkpoint_every ({train.checkpoint_every}), got "
                         f"{sched.perturbation_interval}")
    for arm, own in arms.items():
        where = f"arms.{arm}" if spec.arms else "space"  # a spec without arms searches its space
        searched = [p for p, v in {**shared, **own}.items() if isinstance(v, Domain) and p != "train.seed"]
        if not searched:
            raise ValueError(f"{where}: pbt explores the settings {'an arm' if spec.arms else 'a sweep'} searches, "
                             "and this one searches none; give it a domain, e.g. lr: {loguniform: [1.0e-4, 1.0e-1]}")
        schedule = {**_fixed(shared), **_fixed(own)}.get("optim.schedule", spec.optim.schedule)
        if "optim.lr" in searched and schedule != "none":
            raise ValueError(f"{where}: pbt sets optim.lr itself as it explores; a schedule ({schedule}) would "
                             "fight it: use optim.schedule none")


def _check_devices(spec: Spec, base: dict, shared: dict[str, Value], arms: dict[str, dict[str, Value]]) -> None:
    for arm, own in arms.items():
        if apply_settings(base, _fixed({**shared, **own}))["train"]["device"] == "cuda" and not spec.resources.gpu:
            where = f"arms.{arm}.train.device" if "train.device" in own else "train.device"
            raise ValueError(f"{where}: 'cuda' needs a GPU for each trial; set resources.gpu (a fraction shares one "
                             "GPU between trials) or use device: auto")
        amp = {**shared, **own}.get("train.amp", spec.train.amp)
        if spec.resources.pack > 1 and "fp16" in _candidates(amp):
            raise ValueError("resources.pack: fp16's loss scale would be one for the whole pack, so one member's "
                             "overflow would skip every member's step; use train.amp: bf16, or resources.pack: 1")


def _candidates(value: Value) -> list[Any]:
    return value.candidates() if isinstance(value, Domain) else [value]


def _check_subsets(spec: Spec, shared: dict[str, Value], arms: dict[str, dict[str, Value]]) -> None:
    """`train_subset` means the images a trial trains on, after the validation split, wherever it is set."""
    pool, _ = split_sizes(spec.data.name, val_split=spec.data.val_split)
    loaded = spec.data.train_subset or pool
    if loaded > pool:
        raise ValueError(f"data.train_subset: {spec.data.name} has {pool} training images after the validation "
                         f"split (val_split {spec.data.val_split}), fewer than {loaded}")
    for arm, own in arms.items():
        settings = {**shared, **own}
        for subset in _candidates(settings.get("data.train_subset")):
            if subset is not None and subset > loaded:
                where = f"arms.{arm}" if "data.train_subset" in own else "space"
                raise ValueError(f"{where}.data.train_subset: {subset} is more than the {loaded} training images the "
                                 f"sweep loads ({'data.train_subset' if spec.data.train_subset else spec.data.name + ' after val_split'})")


def run_notes(spec: Spec) -> list[str]:
    """What the user should know before the run: a batch larger than the training split is one batch per epoch;
    `resources.pack` is off for trials on CPUs (`Resources.pack_size`); `train.compile` where a pack or no C compiler
    would keep it from working."""
    pool, _ = split_sizes(spec.data.name, val_split=spec.data.val_split)
    shared, notes = spec.space_settings(), []
    for arm, own in spec.arm_settings().items():
        settings = {**shared, **own}
        subsets = [v for v in _candidates(settings.get("data.train_subset")) if v is not None]
        images = min(subsets) if subsets else spec.data.train_subset or pool
        where = f"arms.{arm}" if own.keys() & {"data.batch_size", "data.train_subset"} else \
            "space" if shared.keys() & {"data.batch_size", "data.train_subset"} else "data"
        for batch in _candidates(settings.get("data.batch_size", spec.data.batch_size)):
            note = (f"{where}: batch_size {batch} is larger than the {images} training images, so each epoch is one "
                    f"batch of {images}")
            if batch > images and note not in notes:
                notes.append(note)
    r = spec.resources
    if r.pack > 1 and not r.gpu:
        notes.append(f"resources.pack: {r.pack} is off: these trials train on CPUs, where packed sweeps measured slower "
                     f"than unpacked ones; it packs trials on GPUs (resources.gpu > 0)" if r.pack_size() == 1 else
                     f"resources.pack: {r.pack} on CPUs ({PACK_ON_CPU}=1): slower than unpacked here, for developing "
                     "and testing packing")
    arms = spec.arm_settings().values()
    if spec.train.compile or any(s.get("train.compile") not in (None, False) for s in [shared, *arms]):
        if r.pack_size() > 1:
            notes.append("train.compile: packed trials train their pack uncompiled")
        if not (shutil.which("cc") or shutil.which("gcc")):
            notes.append("train.compile: torch.compile needs a C compiler where trials train, and this machine has "
                         "none (install gcc)")
    return notes


MAX_SHAPE_CHECKS = 1024  # combinations of shape-changing domains tried at validation (each a meta-device pass)


def _check_model_inputs(spec: Spec, base: dict, shared: dict[str, Value], arms: dict[str, dict[str, Value]]) -> None:
    """Every arm's model must take its images: a forward pass on the meta device (no memory, no compute), for every
    combination of the domains that shape it (model settings and data.resize; the first MAX_SHAPE_CHECKS)."""
    source = SOURCES[spec.data.name]
    for arm, own in arms.items():
        settings = {**shared, **own}
        shaped = {path: v.candidates() for path, v in settings.items() if isinstance(v, Domain)
                  and (path.startswith("model.") or path == "data.resize")}
        where = lambda path: f"arms.{arm}.{path}" if path in own else f"space.{path}"  # noqa: E731
        for values in itertools.islice(itertools.product(*shaped.values()), MAX_SHAPE_CHECKS):
            combination = dict(zip(shaped, values))
            s = apply_settings(base, {**_fixed(settings), **combination})
            size, model_json = s["data"]["resize"] or source.shape[1], json.dumps(s["model"], sort_keys=True)
            try:
                problem = model_input_problem(source.shape[0], size, source.num_classes, model_json)
            except ImportError as err:  # the model cannot be built here at all
                raise ValueError(f"model.name: {err}") from None
            if not problem and spec.resources.pack > 1:
                problem = pack_problem(source.shape[0], size, source.num_classes, model_json)
                if problem:
                    raise ValueError(f"resources.pack: {spec.resources.pack} trains trials together, but model "
                                     f"{s['model']['name']} cannot be packed ({problem}); set resources.pack: 1")
            if not problem:
                continue
            # Name the domain values that make the mismatch (those off their first value), or else the fixed
            # field behind it: the arm's own setting before the shared one.
            chosen = [p for p, v in combination.items() if v != shaped[p][0]]
            if chosen:
                label = " with ".join(f"{where(p)}: {combination[p]!r}" for p in chosen)
            else:
                field = next((k for k in ("model.name", "data.resize", *own) if k in own and
                              (k.startswith("model.") or k == "data.resize")), None) \
                    or ("data.resize" if s["data"]["resize"] else "model.name")
                label = where(field) if field in settings else field
            raise ValueError(f"{label}: model {s['model']['name']} cannot take {source.shape[0]}x{size}x{size} "
                             f"images ({problem})")


@functools.cache
def model_input_problem(channels: int, size: int, num_classes: int, model_json: str) -> str | None:
    """Why the model section `model_json` cannot run on channels x size x size images, or None when it can
    (cached: `sweep list` checks every bundled spec)."""
    import torch

    from trainables.models import create_model

    model = json.loads(model_json)
    try:
        with torch.device("meta"):  # built without initialising its weights
            net = create_model(model.pop("name"), in_channels=channels, num_classes=num_classes, image_size=size,
                               **model)
        with torch.no_grad():
            net.eval()(torch.zeros(1, channels, size, size, device=check_device([net])))
    except (RuntimeError, ValueError) as err:
        return str(err).strip().splitlines()[0]
    return None


@functools.cache
def pack_problem(channels: int, size: int, num_classes: int, model_json: str) -> str | None:
    """Why the model section `model_json` cannot be trained packed, or None when it can: two of them as one
    `trainables.packed.PackedModel`, one forward pass (see `check_device`)."""
    import torch

    from trainables.models import create_model
    from trainables.packed import PackedModel, unpackable

    model = json.loads(model_json)
    name = model.pop("name")
    with torch.device("meta"):
        nets = [create_model(name, in_channels=channels, num_classes=num_classes, image_size=size, **model)
                for _ in range(2)]
    problem = unpackable(nets[0])
    if problem is None:
        try:
            device = check_device(nets)  # before stacking: the pack's stacked weights are made where its members are
            with torch.no_grad():
                PackedModel(nets).eval()(torch.zeros(2, 1, channels, size, size, device=device))
        except (RuntimeError, ValueError) as err:
            problem = str(err).strip().splitlines()[0]
    return problem


def check_device(nets: list) -> str:
    """Where to run a shape check of `nets` (built on the meta device, without initialising their weights): the CPU,
    on uninitialised weights, where they fit in 256 MB, since the meta device's first forward imports 1-2 s of torch's
    decompositions, which every `sweep validate` and `run` would wait for. Bigger models (meant for a cluster's GPUs)
    stay on the meta device: this machine need not hold them."""
    size = sum(t.numel() * t.element_size() for net in nets for t in [*net.parameters(), *net.buffers()])
    if size > 256 * 2**20:
        return "meta"
    for net in nets:
        net.to_empty(device="cpu")
    return "cpu"
