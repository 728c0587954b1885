"""The sweep spec's schema: typed settings, every default once with a one-line meaning (a YAML file becomes one
through `sweeps.spec.load_spec`). Plain pydantic, no torch: the registries' names are looked up only when a spec is
validated to be run.

Every default lives here, once, with a one-line meaning. Unknown keys fail and name the key.
A spec has four settings sections (`data`, `model`, `optim`, `train`) that fix what every trial
shares, named `arms` that each change some settings, and a `space` crossed with every arm.
In `arms` and `space` a setting is named by its dotted path (`optim.lr`) or, when unambiguous,
by its bare name (`lr`); a value is either fixed or a search domain such as `{loguniform: [1e-4, 1e-1]}`.
"""

from __future__ import annotations

import functools
import math
import os
import re
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from analysis.outcome import epoch_cap

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


# Validation context that looks names up in the trainables' registries (which import torch). Without it only the
# schema is checked: `sweep list`, and the default sections, whose names are the registries' own.
WITH_REGISTRIES = {"registries": True}


@functools.cache
def registries() -> dict[str, list[str]]:
    """The names in the trainables' registries, by kind. Imported when a spec is validated, not when it is only
    parsed: the registries import torch, which `sweep --help` and `sweep list` do not need."""
    from trainables.data import DATASETS
    from trainables.models import MODELS
    from trainables.optim import OPTIMIZERS

    return {"dataset": sorted(DATASETS), "model": sorted(MODELS), "optimizer": sorted(OPTIMIZERS)}


def _check_name(kind: str, name: str, info: ValidationInfo) -> None:
    """ValueError naming the registry's choices when `name` is not in it (checked under WITH_REGISTRIES only)."""
    if not (info.context or {}).get("registries"):
        return
    if name not in registries()[kind]:
        raise ValueError(f"{'name' if kind != 'optimizer' else kind}: unknown {kind} {name!r}; "
                         f"choose one of {registries()[kind]}")


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
    eval_subset: PositiveInt | None = None              # images of the validation and of the test split evaluated (stratified); all if unset
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
    def _check(self, info: ValidationInfo) -> DataSettings:
        _check_name("dataset", self.name, info)
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
    def _check(self, info: ValidationInfo) -> ModelSettings:
        _check_name("model", self.name, info)
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
    def _check(self, info: ValidationInfo) -> OptimSettings:
        _check_name("optimizer", self.optimizer, info)
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
    compile: bool = False                               # torch.compile the model; on CUDA as CUDA graphs (see README)

    @model_validator(mode="after")
    def _check(self) -> TrainSettings:
        if self.checkpoint_every % self.report_every:  # a checkpoint travels with a report
            raise ValueError(f"checkpoint_every: must be a multiple of report_every ({self.report_every}), "
                             f"got {self.checkpoint_every}")
        return self


# Data settings applied when the dataset is decoded, once per sweep: an arm or the space cannot change them.
LOADED_ONCE = {f"data.{k}" for k in ("name", "data_dir", "download", "val_split", "split_seed", "normalize",
                                     "eval_subset")}

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
            cls.model_validate(settings[section], context=WITH_REGISTRIES)
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
