"""The sweep spec: a YAML file validated into typed settings.

Every default lives here, once, with a one-line meaning. Unknown keys fail and name the key.
A spec has four settings sections (`data`, `model`, `optim`, `train`) that fix what every trial
shares, named `arms` that each change some settings, and a `space` crossed with every arm.
In `arms` and `space` a setting is named by its dotted path (`optim.lr`) or, when unambiguous,
by its bare name (`lr`); a value is either fixed or a search domain such as `{loguniform: [1e-4, 1e-1]}`.
"""

from __future__ import annotations

import copy
import functools
import itertools
import json
import math
import os
import re
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    ValidationError,
    field_validator,
    model_validator,
)

from analysis.outcome import epoch_cap
from trainables.data import DATASETS, SOURCES, split_sizes
from trainables.models import MODELS
from trainables.optim import OPTIMIZERS
from trainables.settings import apply_settings
from trainables.train import EPOCH_METRICS, FINAL_METRICS

MAX_TRIALS = 10_000  # a spec that expands past this is almost certainly a typo (e.g. a grid of grids)
Override = tuple[str, str]  # (the flag as the user gave it, e.g. "--name x"; its KEY=VALUE, e.g. "name=x")


class SpecError(Exception):
    """Bad user input. The message is one line naming the file (or flag) and the field."""


class SweepFailed(Exception):
    """The sweep ran but no trial produced a result; the message is one line saying where to look."""


class SweepInterrupted(Exception):
    """Ctrl-C stopped the sweep; the message is one line: how far it got and how to continue it."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --- the four settings sections -------------------------------------------------------------

class Augment(Strict):
    crop_padding: NonNegativeInt = 0                    # random crop with this much zero padding, pixels
    hflip: bool = False                                 # random horizontal flip, p = 0.5 per image
    rotation: float = Field(0.0, ge=0, le=180)          # random rotation in [-rotation, rotation] degrees


class DataSettings(Strict):
    name: str = "mnist5k"                               # dataset registry name (trainables.data.DATASETS)
    data_dir: str | None = None                         # torchvision files; default $SWEEP_DATA_DIR or ~/.cache/sweeps/data
    download: bool = False                              # let torchvision download missing files
    train_subset: PositiveInt | None = None             # images each trial trains on (stratified, after val_split)
    val_split: float | Literal["test"] = 0.1            # fraction of the source's train split held out, or "test": official test split
    split_seed: int = 0                                 # seeds the data splits; the same for every trial
    resize: PositiveInt | None = None                   # resize to resize x resize pixels, per batch on the device
    normalize: Literal["channel", "pixel", "none"] = "channel"  # per-channel mean/std or per-pixel standardisation, fit on train
    augment: Augment = Augment()                        # training-batch augmentation
    batch_size: PositiveInt = 64                        # training mini-batch, images
    eval_batch_size: PositiveInt = 1024                 # evaluation batch, images (large: no gradients kept)

    @field_validator("val_split", mode="before")
    @classmethod
    def _fraction_or_test(cls, value: Any) -> Any:
        if value != "test" and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ValueError(f"must be a fraction in (0, 1) or 'test', got {value!r}")
        return value

    @model_validator(mode="after")
    def _check(self) -> DataSettings:
        if self.name not in DATASETS:
            raise ValueError(f"name: unknown dataset {self.name!r}; choose one of {sorted(DATASETS)}")
        if self.val_split != "test" and not 0 < self.val_split < 1:
            raise ValueError(f"val_split: must be a fraction in (0, 1) or 'test', got {self.val_split}")
        return self


class ModelSettings(Strict):
    name: str = "mlp"                                   # model registry name (trainables.models.MODELS)
    hidden_sizes: list[PositiveInt] = [500, 250, 100]   # MLP hidden layer widths
    activation: Literal["relu", "leaky_relu", "tanh", "sigmoid"] = "relu"  # MLP activation
    negative_slope: float = 0.01                        # LeakyReLU slope
    dropout: float = Field(0.5, ge=0, lt=1)             # AlexNet classifier dropout
    init: Literal["default", "xavier"] = "default"      # framework default, or Xavier-uniform weights with zero biases

    @model_validator(mode="after")
    def _check(self) -> ModelSettings:
        if self.name not in MODELS:
            raise ValueError(f"name: unknown model {self.name!r}; choose one of {sorted(MODELS)}")
        return self


class OptimSettings(Strict):
    optimizer: str = "sgd"                              # sgd | rmsprop | adam | adamw
    lr: PositiveFloat = 0.01                            # learning rate at epoch 0
    weight_decay: NonNegativeFloat = 0.0                # the optimizer's own: coupled L2 for sgd/rmsprop/adam, decoupled for adamw
    l2_penalty: NonNegativeFloat = 0.0                  # lambda of loss + lambda*sum(w^2) over ALL parameters (gradient 2*lambda*w)
    momentum: float = Field(0.0, ge=0, lt=1)            # sgd/rmsprop momentum
    nesterov: bool = False                              # sgd Nesterov momentum (needs momentum > 0)
    betas: tuple[float, float] = (0.9, 0.999)           # adam/adamw moment decay rates
    eps: PositiveFloat = 1e-8                           # adam/adamw/rmsprop denominator guard
    alpha: float = Field(0.99, gt=0, lt=1)              # rmsprop squared-gradient decay
    schedule: Literal["none", "multistep", "step", "exponential", "cosine"] = "none"  # LR schedule, stepped per epoch
    milestones: list[PositiveInt] = []                  # multistep: epochs at which LR *= gamma
    gamma: PositiveFloat = 0.1                          # multistep/step/exponential decay factor
    step_size: PositiveInt = 30                         # step: epochs between decays

    @model_validator(mode="after")
    def _check(self) -> OptimSettings:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer: unknown optimizer {self.optimizer!r}; choose one of {sorted(OPTIMIZERS)}")
        if self.nesterov and self.momentum == 0:
            raise ValueError("nesterov: Nesterov momentum needs momentum > 0")
        if not all(0 <= beta < 1 for beta in self.betas):
            raise ValueError(f"betas: each must be in [0, 1), got {list(self.betas)}")
        if self.schedule == "multistep" and not self.milestones:
            raise ValueError("milestones: schedule multistep needs the epochs at which lr is multiplied by gamma, "
                             "e.g. milestones: [150, 200]")
        return self


class TrainSettings(Strict):
    epochs: PositiveInt = 10                            # full passes over the training split
    loss: Literal["cross_entropy", "mse"] = "cross_entropy"  # mse = MSE between softmax outputs and one-hot labels
    seed: int = 0                                       # seeds init, shuffling and augmentation of one trial
    report_every: PositiveInt = 1                       # epochs between reports: validation, curves, ASHA's rungs
    checkpoint_every: PositiveInt = 1                   # epochs between checkpoints, a multiple of report_every
    device: Literal["auto", "cpu", "cuda"] = "auto"     # auto = the GPU Ray assigned, else CPU
    amp: Literal["none", "bf16", "fp16"] = "none"       # mixed-precision autocast on CUDA (ignored on CPU)
    channels_last: bool = False                         # NHWC memory format for CNNs on CUDA
    cudnn_benchmark: bool = False                       # let cuDNN pick the fastest conv algorithms

    @model_validator(mode="after")
    def _check(self) -> TrainSettings:
        if self.checkpoint_every % self.report_every:  # a checkpoint travels with a report
            raise ValueError(f"checkpoint_every: must be a multiple of report_every ({self.report_every}), "
                             f"got {self.checkpoint_every}")
        return self


# Data settings applied when the dataset is decoded, once per sweep: an arm or the space cannot change them.
LOADED_ONCE = {f"data.{k}" for k in ("name", "data_dir", "download", "val_split", "split_seed", "normalize")}

SECTIONS: dict[str, type[Strict]] = {
    "data": DataSettings, "model": ModelSettings, "optim": OptimSettings, "train": TrainSettings}


def _bare_names() -> dict[str, str]:
    """Bare setting name -> dotted path, for names that exist in exactly one section."""
    seen: dict[str, list[str]] = {}
    for section, cls in SECTIONS.items():
        for field in cls.model_fields:
            seen.setdefault(field, []).append(f"{section}.{field}")
    return {name: paths[0] for name, paths in seen.items() if len(paths) == 1}


BARE_NAMES = _bare_names()


def resolve_key(key: str) -> str:
    """`lr` -> `optim.lr`; `optim.lr` stays; raises ValueError for unknown or ambiguous names."""
    if "." not in key:
        if key not in BARE_NAMES:
            raise ValueError(f"unknown setting {key!r}; use a dotted name such as optim.lr "
                             f"or one of {sorted(BARE_NAMES)}")
        return BARE_NAMES[key]
    section, *path = key.split(".")
    if section not in SECTIONS:
        raise ValueError(f"unknown setting {key!r}: the section must be one of {sorted(SECTIONS)}")
    return key


# --- search domains ---------------------------------------------------------------------------

DOMAIN_KINDS = ("grid", "choice", "uniform", "loguniform", "int")
_ATTR = {"int": "int_"}


class Domain(Strict):
    """Exactly one of: grid/choice (lists of values) or uniform/loguniform/int ([low, high], int inclusive)."""
    grid: list[Any] | None = None
    choice: list[Any] | None = None
    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None
    int_: tuple[int, int] | None = Field(None, alias="int")  # `int` in YAML; renamed so it does not shadow the builtin

    @model_validator(mode="before")
    @classmethod
    def _known_kinds(cls, raw: Any) -> Any:
        for key in raw if isinstance(raw, dict) else ():
            if key not in DOMAIN_KINDS:
                raise ValueError(f"unknown domain kind {key!r}; use one of {', '.join(DOMAIN_KINDS)}")
        return raw

    @model_validator(mode="after")
    def _one_kind(self) -> Domain:
        given = [k for k in DOMAIN_KINDS if getattr(self, _ATTR.get(k, k)) is not None]
        if len(given) != 1:
            raise ValueError(f"a search domain needs exactly one of {list(DOMAIN_KINDS)}, got {given or 'none'}")
        values = getattr(self, _ATTR.get(given[0], given[0]))
        if given[0] in ("grid", "choice") and not values:
            raise ValueError(f"{given[0]}: must list at least one value")
        if given[0] in ("uniform", "loguniform", "int") and not values[0] < values[1]:
            raise ValueError(f"{given[0]}: needs low < high, got {list(values)}")
        if given[0] == "loguniform" and values[0] <= 0:
            raise ValueError(f"loguniform: needs low > 0, got {values[0]}")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in DOMAIN_KINDS if getattr(self, _ATTR.get(k, k)) is not None)

    @property
    def values(self) -> Any:
        return getattr(self, _ATTR.get(self.kind, self.kind))

    def candidates(self) -> list[Any]:
        """The values worth type-checking: every listed value, or both ends of a range."""
        return list(self.values)


Value = Any  # a fixed setting value, or a Domain


def _parse_settings(raw: Any, where: str) -> dict[str, Value]:
    """An arm's or the space's mapping: resolve names, turn domain dicts into Domains."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: must be a mapping of setting -> value, got {type(raw).__name__}")
    out: dict[str, Value] = {}
    for key, value in raw.items():
        try:
            path = resolve_key(str(key))
            if path in out:
                raise ValueError(f"set twice (as {path})")
            out[path] = Domain.model_validate(value) if isinstance(value, dict) else value
        except ValidationError as err:
            field, msg = first_error(err)
            raise ValueError(f"{where}.{key}: {msg if field == TOP_LEVEL else f'{field}: {msg}'}") from None
        except ValueError as err:
            raise ValueError(f"{where}.{key}: {err}") from None
    return out


# --- the rest of the spec ---------------------------------------------------------------------

class Search(Strict):
    algorithm: Literal["grid", "random", "optuna"] = "grid"  # grid/random: Tune's variant generator; optuna: TPE
    num_samples: PositiveInt = 1                        # repeats of the grid (grid/random) or trials per arm (optuna)
    max_concurrent: PositiveInt | None = None           # cap on trials running at once (default: as many as fit)
    metric: str | list[str] = "val_acc"                 # what "best" means; several: a Pareto front (the first ranks)
    mode: Literal["max", "min"] | list[Literal["max", "min"]] = "max"  # one per metric
    seed: int = 0                                       # seeds random sampling / the Optuna samplers
    startup_trials: PositiveInt | None = None           # optuna: random trials per arm before TPE (default 10, <= half num_samples)
    warm_start: str | None = None                       # optuna: an earlier sweep's results directory to learn from first

    @field_validator("metric", mode="before")
    @classmethod
    def _metric_names(cls, value: Any) -> Any:
        if not (isinstance(value, str) or isinstance(value, list) and all(isinstance(m, str) for m in value)):
            raise ValueError(f"must be a metric's name or a list of them, got {value!r}")
        return value

    @field_validator("mode", mode="before")
    @classmethod
    def _max_or_min(cls, value: Any) -> Any:
        if not all(m in ("max", "min") for m in (value if isinstance(value, list) else [value])):
            raise ValueError(f"must be max or min, or a list of them (one per metric), got {value!r}")
        return value

    @property
    def metrics(self) -> list[str]:
        return [self.metric] if isinstance(self.metric, str) else list(self.metric)

    @property
    def modes(self) -> list[str]:
        return [self.mode] if isinstance(self.mode, str) else list(self.mode)

    def tpe_startup_trials(self) -> int:
        """Random trials each arm's TPE starts with: the spec's, else Optuna's 10, at most half the arm's budget."""
        return self.startup_trials or max(1, min(10, self.num_samples // 2))


class Scheduler(Strict):
    name: Literal["fifo", "asha", "hyperband", "median", "pbt"] = "fifo"  # fifo runs every trial to the end
    grace_period: PositiveInt = 1                       # asha, hyperband, median: epochs before a trial can be stopped
    reduction_factor: float = Field(3.0, gt=1)          # asha, hyperband: keep the top 1/reduction_factor at each rung
    max_t: PositiveInt | None = None                    # asha, hyperband: last rung, epochs (default: train.epochs)
    min_samples_required: PositiveInt = 3               # median: trials that reached an epoch before their median counts
    perturbation_interval: PositiveInt = 2              # pbt: epochs between a trial's exploit/explore steps
    quantile_fraction: float = Field(0.25, gt=0, le=0.5)  # pbt: the bottom fraction of an arm copies its top fraction
    resample_probability: float = Field(0.25, ge=0, le=1)  # pbt: chance a copied setting is drawn anew, not perturbed

    def epoch_cap(self) -> int | None:
        """The epoch at which the scheduler ends every trial, where it has one (its last rung)."""
        return epoch_cap({"name": self.name, "max_t": self.max_t})

    def brackets(self, max_t: int) -> int:
        """HyperBand's bracket count for trials of at most `max_t` epochs (Ray's arithmetic, async_hyperband)."""
        return int(math.log(max_t / self.grace_period) / math.log(self.reduction_factor) + 1e-9) + 1

    def plan(self, epochs: int) -> str:
        """What the scheduler will do, in epochs: for `sweep validate`."""
        max_t = self.max_t or epochs
        if self.name == "asha":
            rungs = [self.grace_period * self.reduction_factor ** k for k in range(64)
                     if self.grace_period * self.reduction_factor ** k < max_t]
            return (f"asha: a trial is judged at epochs {', '.join(f'{r:g}' for r in rungs)} and goes on only in the "
                    f"top 1/{self.reduction_factor:g} of its arm's rung; at most {max_t} epochs")
        if self.name == "hyperband":  # sweeps.schedulers.AsyncHyperBand: Ray's bracket arithmetic (async_hyperband._Bracket)
            count = self.brackets(max_t)
            judged = []
            for s in range(count):
                rungs = [self.grace_period * self.reduction_factor ** (k + s) for k in range(
                    int(math.log(max_t / self.grace_period) / math.log(self.reduction_factor) - s + 1))]
                rungs = [r for r in rungs if r < max_t]
                judged.append(f"at epochs {', '.join(f'{r:g}' for r in rungs)}" if rungs else f"never (runs to {max_t})")
            return (f"hyperband (asynchronous): {count} brackets, trials dealt to them in turn; bracket by bracket a "
                    f"trial is judged {' / '.join(judged)}, going on only in the top 1/{self.reduction_factor:g} "
                    f"of its arm's rung")
        if self.name == "median":
            return (f"median: from epoch {self.grace_period}, a trial whose best so far is below the median of the "
                    f"running averages of its arm's other trials at that epoch (once {self.min_samples_required} have "
                    "reached it) stops")
        if self.name == "pbt":
            return (f"pbt: every {self.perturbation_interval} epochs, a trial in the bottom {self.quantile_fraction:.0%} of "
                    f"its arm copies a top-{self.quantile_fraction:.0%} trial of the same arm (weights and settings), then "
                    f"perturbs its searched settings (x0.8 or x1.2, or redrawn with p={self.resample_probability:g}); "
                    "every checkpoint is kept, for the copies")
        return "fifo: every trial runs to the end"


# =1: pack trials that train on CPUs too, to develop and test packing without a GPU (slower: README, "Packed trials")
PACK_ON_CPU = "SWEEP_PACK_ON_CPU"


class Resources(Strict):
    cpu: float = Field(1.0, gt=0)                       # CPUs per trial (also the trial's torch threads)
    gpu: float = Field(0.0, ge=0)                       # GPUs per trial; fractions share one GPU
    pack: PositiveInt = 1                               # trials on a GPU trained as one vectorised model (1: off)

    def pack_size(self) -> int:
        """Trials per pack in this run: `pack` when trials ask for a GPU (`gpu` > 0), else 1 (off): on CPUs every
        packed sweep measured slower than unpacked (README, "Packed trials"), unless SWEEP_PACK_ON_CPU=1 in the
        process that drives the sweep."""
        return self.pack if self.gpu > 0 or os.environ.get(PACK_ON_CPU) == "1" else 1


class Run(Strict):
    max_failures: NonNegativeInt = 2                    # retries of a crashed trial, from its last checkpoint
    checkpoint_keep: PositiveInt = 1                    # checkpoints kept per trial (the latest ones; pbt keeps all)
    mlflow: str | None = None                           # MLflow tracking URI (http://host:5000 or a directory): a run per trial


class Protocol(Strict):
    """Tune each arm with an equal budget on validation, then confirm each arm's best over seeds on test."""
    confirm_seeds: int = Field(5, ge=2)                 # reruns of each arm's tuned configuration (train.seed 0..n-1)
    alpha: float = Field(0.05, gt=0, lt=1)              # family-wise error rate of the pairwise verdicts


class Reference(Strict):
    source: str                                         # where the published numbers come from
    rows: list[dict[str, Any]]                          # {arm: NAME, metric: value, ...} as published


class Spec(Strict):
    name: str                                           # also the results directory name
    description: str = ""
    reference: Reference | None = None
    data: DataSettings = DataSettings()
    model: ModelSettings = ModelSettings()
    optim: OptimSettings = OptimSettings()
    train: TrainSettings = TrainSettings()
    arms: dict[str, Any] = {}                           # arm name -> {setting: value or domain}
    space: dict[str, Any] = {}                          # {setting: value or domain}, crossed with every arm
    search: Search = Search()
    scheduler: Scheduler = Scheduler()
    resources: Resources = Resources()
    run: Run = Run()
    compare_by: list[str] = []                          # extra settings to group the comparison table by
    protocol: Protocol | None = None                    # two stages, tune then confirm (sweeps/protocol.py)
    smoke: bool = False                                 # set by `sweep run --smoke`
    notes: list[str] = []                               # what the runner changed or substituted, said to the user

    @field_validator("name")
    @classmethod
    def _directory_name(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", value):
            raise ValueError(f"names the results directory: letters, digits, '.', '_' and '-', starting with a letter "
                             f"or digit, got {value!r}")
        return value

    def arm_settings(self) -> dict[str, dict[str, Value]]:
        """Arm name -> {dotted setting: value or Domain}; one arm named `base` when none are given."""
        arms = {str(name): _parse_settings(raw, f"arms.{name}") for name, raw in self.arms.items()}
        return arms or {"base": {}}

    def space_settings(self) -> dict[str, Value]:
        return _parse_settings(self.space, "space")

    def base_settings(self) -> dict[str, dict[str, Any]]:
        """The four sections as plain dicts: what every trial starts from."""
        return {section: getattr(self, section).model_dump() for section in SECTIONS}


# --- checking arm/space values against the settings schema ------------------------------------

def _check_values(spec: Spec) -> None:
    """Type-check every fixed value and every domain candidate against its section's schema."""
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


def metric_range(metric: str) -> tuple[float, float]:
    """The values a metric can take: accuracies and ece are fractions, losses are not negative."""
    if "_acc" in metric or metric == "ece":
        return 0.0, 1.0
    if "_loss" in metric:
        return 0.0, math.inf
    return -math.inf, math.inf


def check_target(target: float, metric: str) -> None:
    """`sweep report --target`: a score `metric` can reach (SpecError otherwise)."""
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
    `resources.pack` is off for trials on CPUs (`Resources.pack_size`)."""
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
        with torch.device("meta"):
            net = create_model(model.pop("name"), in_channels=channels, num_classes=num_classes, image_size=size,
                               **model)
            net(torch.empty(2, channels, size, size))
    except (RuntimeError, ValueError) as err:
        return str(err).strip().splitlines()[0]
    return None


@functools.cache
def pack_problem(channels: int, size: int, num_classes: int, model_json: str) -> str | None:
    """Why the model section `model_json` cannot be trained packed, or None when it can: two of them as one
    `trainables.packed.PackedModel` on the meta device."""
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
                PackedModel(nets)(torch.empty(2, 2, channels, size, size))
            except (RuntimeError, ValueError) as err:
                problem = str(err).strip().splitlines()[0]
    return problem


TOP_LEVEL = "(top level)"  # the field of an error about a whole mapping


def first_error(err: ValidationError, prefix: tuple = ()) -> tuple[str, str]:
    """(dotted field, message) of a pydantic error, saying what was given; our own checks say `field: message`."""
    first = err.errors()[0]
    loc = [*prefix, *(str(p) for p in first["loc"])]
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        known = _keys_at(err.title, first["loc"][:-1])
        msg = "unknown key" + (f"; use one of {', '.join(known)}" if known else "")
    elif first["type"] == "value_error" and re.match(r"^[a-z_]+: ", msg):
        field, msg = msg.split(": ", 1)  # a model-level check naming its field
        loc.append(field)
    elif first["type"] not in ("value_error", "missing") and isinstance(first["input"], (str, int, float, bool)):
        msg = f"{msg}, got {first['input']!r}"
    return ".".join(loc) or TOP_LEVEL, msg


def _keys_at(model: str, loc: tuple) -> list[str]:
    """The keys the mapping at `loc` inside the model class named `model` takes, where it is one of ours."""
    cls = {c.__name__: c for c in (Spec, *SECTIONS.values(), Domain)}.get(model)
    for part in loc:
        field = cls.model_fields.get(str(part)) if cls else None
        kinds = [t for t in (field.annotation, *getattr(field.annotation, "__args__", ())) if isinstance(t, type)
                 and issubclass(t, BaseModel)] if field else []
        cls = kinds[0] if kinds else None
    return [f.alias or name for name, f in cls.model_fields.items()] if cls else []


def _validate_sections(settings: dict[str, dict[str, Any]], describe) -> None:
    """Validate each section; on failure raise ValueError(describe(dotted path of the bad field, message))."""
    for section, cls in SECTIONS.items():
        try:
            cls.model_validate(settings[section])
        except ValidationError as err:
            raise ValueError(describe(*first_error(err, (section,)))) from None


def _fixed(settings: dict[str, Value]) -> dict[str, Any]:
    return {k: v for k, v in settings.items() if not isinstance(v, Domain)}


def count_trials(spec: Spec) -> dict[str, int]:
    """Arm name -> number of trials the sweep will run for it (both stages of a protocol)."""
    def grid_points(values: dict[str, Value]) -> int:
        return math.prod(len(v.values) for v in values.values() if isinstance(v, Domain) and v.kind == "grid")

    shared = grid_points(spec.space_settings())
    confirm = spec.protocol.confirm_seeds if spec.protocol else 0
    if spec.search.algorithm == "optuna":
        return {arm: spec.search.num_samples + confirm for arm in spec.arm_settings()}
    return {arm: grid_points(s) * shared * spec.search.num_samples + confirm for arm, s in spec.arm_settings().items()}


# --- loading ----------------------------------------------------------------------------------

def bundled_specs() -> dict[str, Path]:
    """Bundled spec name -> path of its YAML file."""
    folder = resources.files("sweeps") / "specs"
    return {Path(str(p)).stem: Path(str(p)) for p in folder.iterdir() if str(p).endswith(".yaml")}


def find_spec(spec: str) -> Path:
    """A path to a YAML file, or the name of a bundled spec."""
    path = Path(spec)
    if path.is_file():
        return path
    bundled = bundled_specs()
    if spec in bundled:
        return bundled[spec]
    if path.is_dir():
        raise SpecError(f"{spec}: is a directory; give a spec's YAML file or a bundled spec's name (see `sweep list`)")
    if path.suffix in (".yaml", ".yml") or "/" in spec:
        raise SpecError(f"{spec}: no such file")
    raise SpecError(f"{spec}: not a file and not a bundled spec; bundled: {', '.join(sorted(bundled))}")


class DuplicateKey(yaml.MarkedYAMLError):
    """A key given twice in one YAML mapping, which PyYAML would settle silently by keeping the last."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing duplicate keys."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, yaml.Mark] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue  # a merge key (<<) may override what it merges, as YAML intends
            key = self.construct_object(key_node)
            if key in seen:
                raise DuplicateKey(problem=f"key {key!r} is given twice in one mapping; YAML would keep only the last: "
                                           "give it once", problem_mark=key_node.start_mark, context_mark=seen[key])
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep)


def read_yaml(text: str) -> Any:
    """YAML as `yaml.safe_load` reads it, except that a duplicate key raises DuplicateKey."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader subclass: as safe as yaml.safe_load


def flag_overrides(sets: list[str], name: str | None = None) -> list[Override]:
    """The --set values, and --name as `name=...`; one key given two values is a conflict, not last-wins."""
    given = [(f"--set {text}", text) for text in sets] + ([(f"--name {name}", f"name={name}")] if name else [])
    first: dict[str, Override] = {}
    for flag, text in given:
        key, _, value = text.partition("=")
        if key in first and first[key][1] != value:
            raise SpecError(f"{first[key][0]} and {flag} conflict: give {key} once")
        first.setdefault(key, (flag, value))
    return given


def parse_override(flag: str, text: str) -> tuple[list[str], Any]:
    """`train.epochs=3` -> (["train", "epochs"], 3); the value is read as YAML. Errors name `flag`."""
    key, sep, value = text.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise SpecError(f"{flag}: expected KEY=VALUE with a dotted key, e.g. --set train.epochs=3")
    try:
        return key.split("."), read_yaml(value)
    except DuplicateKey as err:
        raise SpecError(f"{flag}: {err.problem}") from None
    except yaml.YAMLError as err:
        raise SpecError(f"{flag}: the value is not valid YAML ({err.problem})") from None


def _override(raw: dict[str, Any], flag: str, text: str, path: Path) -> None:
    """Set one KEY=VALUE in the spec mapping `raw` (read from `path`). It changes what the spec has; a new arm
    needs its whole mapping (`--set arms.NAME={optimizer: adam}`), so that a misspelled arm is not a new one."""
    keys, value = parse_override(flag, text)
    arms = raw.get("arms") or {}
    if keys[0] == "arms" and len(keys) > 1 and keys[1] not in arms and (len(keys) > 2 or not isinstance(value, dict)):
        raise SpecError(f"{flag}: {path} has no arm {keys[1]!r} (its arms: {', '.join(map(str, arms)) or 'none'}); "
                        f"to add one, give all its settings: --set 'arms.{keys[1]}={{optimizer: adam, lr: 1.0e-3}}'")
    node = raw
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise SpecError(f"{flag}: {key} is not a mapping in {path}")
    node[keys[-1]] = value


def load_spec(spec: str, overrides: list[Override] = ()) -> tuple[Spec, Path]:
    """Read, override and validate a spec. Raises SpecError naming the file, or the flag, and the field."""
    path = find_spec(spec)
    try:
        raw = read_yaml(path.read_text())
    except DuplicateKey as err:
        raise SpecError(f"{path}: line {err.problem_mark.line + 1}: {err.problem} (first given on line "
                        f"{err.context_mark.line + 1})") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise SpecError(f"{path}:{where}: not valid YAML ({getattr(err, 'problem', err)})") from None
    except OSError as err:
        raise SpecError(f"{path}: cannot read ({err.strerror})") from None
    if raw is None:
        raise SpecError(f"{path}: the file is empty; a spec needs at least `name:` (see `sweep list` for examples)")
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: a spec is a YAML mapping (name:, data:, model:, ...), got {type(raw).__name__}")
    given = copy.deepcopy(raw)
    for flag, text in overrides:
        _override(given, flag, text, path)
    try:
        return _validated(given), path
    except ValueError as err:
        if not overrides or _problem(raw) == str(err):  # the file says it without the flags
            raise SpecError(f"{path}: {err}") from None
        raise SpecError(f"{_blamed(overrides, str(err))}: {err}") from None


def _problem(raw: dict[str, Any]) -> str | None:
    try:
        _validated(raw)
    except ValueError as err:
        return str(err)
    return None


def _blamed(overrides: list[Override], problem: str) -> str:
    """The flags behind `problem` ("field: message"): those that set its field or a mapping around it, else all."""
    field = _canonical(problem.split(": ", 1)[0])
    touching = [flag for flag, text in overrides if (key := _canonical(text.partition("=")[0])) == field
                or field.startswith(f"{key}.") or key.startswith(f"{field}.")]
    return " ".join(touching or [flag for flag, _ in overrides])


def _canonical(dotted: str) -> str:
    """A dotted field with an arm's or the space's setting resolved: `arms.a.lr` -> `arms.a.optim.lr`."""
    parts = dotted.split(".")
    head = 2 if parts[0] == "arms" else 1 if parts[0] == "space" else len(parts)
    if len(parts) <= head:
        return dotted
    try:
        return ".".join([*parts[:head], resolve_key(".".join(parts[head:]))])
    except ValueError:
        return dotted


def validate_spec(raw: dict[str, Any], source: str) -> Spec:
    """Validate a spec mapping; errors name `source` and the field."""
    try:
        return _validated(raw)
    except ValueError as err:
        raise SpecError(f"{source}: {err}") from None


def _validated(raw: dict[str, Any]) -> Spec:
    """The Spec of a mapping, or ValueError("field: message")."""
    try:
        spec = Spec.model_validate(raw)
        _check_values(spec)
    except ValidationError as err:
        raise ValueError(": ".join(first_error(err))) from None
    total = sum(count_trials(spec).values())
    if total > MAX_TRIALS:
        raise ValueError(f"space: expands to {total:,} trials (limit {MAX_TRIALS:,}); "
                         "shrink the grids or search.num_samples")
    return spec


def dump_spec(spec: Spec) -> str:
    """The spec as run, as YAML (what `spec.yaml` in a results directory holds)."""
    return yaml.safe_dump(spec.model_dump(mode="json", exclude_none=False), sort_keys=False)
