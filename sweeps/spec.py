"""The sweep spec: a YAML file validated into typed settings.

Every default lives here, once, with a one-line meaning. Unknown keys fail and name the key.
A spec has four settings sections (`data`, `model`, `optim`, `train`) that fix what every trial
shares, named `arms` that each change some settings, and a `space` crossed with every arm.
In `arms` and `space` a setting is named by its dotted path (`optim.lr`) or, when unambiguous,
by its bare name (`lr`); a value is either fixed or a search domain such as `{loguniform: [1e-4, 1e-1]}`.
"""

from __future__ import annotations

import math
import re
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (BaseModel, ConfigDict, Field, NonNegativeFloat, NonNegativeInt,
                      PositiveFloat, PositiveInt, ValidationError, model_validator)

from trainables.data import DATASETS
from trainables.models import MODELS
from trainables.optim import OPTIMIZERS
from trainables.train import apply_settings

MAX_TRIALS = 10_000  # a spec that expands past this is almost certainly a typo (e.g. a grid of grids)


class SpecError(Exception):
    """Bad user input. The message is one line naming the file (or flag) and the field."""


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
    train_subset: PositiveInt | None = None             # stratified subset of the training split, images
    val_split: float | Literal["test"] = 0.1            # validation fraction carved from train, or "test": official test split
    split_seed: int = 0                                 # seeds the data splits; the same for every trial
    resize: PositiveInt | None = None                   # resize to resize x resize pixels, per batch on the device
    normalize: Literal["channel", "pixel", "none"] = "channel"  # per-channel mean/std or per-pixel standardisation, fit on train
    augment: Augment = Augment()                        # training-batch augmentation
    batch_size: PositiveInt = 64                        # training mini-batch, images
    eval_batch_size: PositiveInt = 1024                 # evaluation batch, images (large: no gradients kept)

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
            raise ValueError(f"{where}.{key}: {err.errors()[0]['msg'].removeprefix('Value error, ')}") from None
        except ValueError as err:
            raise ValueError(f"{where}.{key}: {err}") from None
    return out


# --- the rest of the spec ---------------------------------------------------------------------

class Search(Strict):
    algorithm: Literal["grid", "random", "optuna"] = "grid"  # grid/random: Tune's variant generator; optuna: TPE
    num_samples: PositiveInt = 1                        # repeats of the grid (grid/random) or trials per arm (optuna)
    max_concurrent: PositiveInt | None = None           # cap on trials running at once (default: as many as fit)
    metric: str = "val_acc"                             # what "best" means, for the searcher, ASHA and the report
    mode: Literal["max", "min"] = "max"
    seed: int = 0                                       # seeds random sampling / the Optuna sampler


class Scheduler(Strict):
    name: Literal["fifo", "asha"] = "fifo"              # fifo runs every trial to the end; asha stops poor ones early
    grace_period: PositiveInt = 1                       # asha: epochs before a trial can be stopped
    reduction_factor: float = Field(3.0, gt=1)          # asha: keep the top 1/reduction_factor at each rung
    max_t: PositiveInt | None = None                    # asha: last rung, epochs (default: train.epochs)


class Resources(Strict):
    cpu: float = Field(1.0, gt=0)                       # CPUs per trial (also the trial's torch threads)
    gpu: float = Field(0.0, ge=0)                       # GPUs per trial; fractions share one GPU


class Run(Strict):
    max_failures: NonNegativeInt = 2                    # retries of a crashed trial, from its last checkpoint
    checkpoint_keep: PositiveInt = 1                    # checkpoints kept per trial (the latest ones)


class Protocol(Strict):
    """Tune each arm with an equal budget on validation, then confirm each arm's best over seeds on test."""
    confirm_seeds: int = Field(5, ge=2)                 # reruns of each arm's tuned configuration (train.seed 0..n-1)
    alpha: float = Field(0.05, gt=0, lt=1)              # family-wise error rate of the pairwise verdicts


class Reference(Strict):
    source: str                                         # where the published numbers come from
    rows: list[dict[str, Any]]                          # {arm: NAME, metric: value, ...} as published


class Spec(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")  # also the results directory name
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
    if spec.search.algorithm == "optuna":
        for where, values in [("space", shared)] + [(f"arms.{a}", s) for a, s in arms.items()]:
            for path, value in values.items():
                if isinstance(value, Domain) and value.kind == "grid":
                    raise ValueError(f"{where}.{path}: grid domains need search.algorithm grid or random; "
                                     "with optuna use choice")


def first_error(err: ValidationError, prefix: tuple = ()) -> tuple[str, str]:
    """(dotted field, message) of a pydantic error; our own checks say `field: message`."""
    first = err.errors()[0]
    loc = [*prefix, *(str(p) for p in first["loc"])]
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    elif first["type"] == "value_error" and re.match(r"^[a-z_]+: ", msg):
        field, msg = msg.split(": ", 1)  # a model-level check naming its field
        loc.append(field)
    return ".".join(loc) or "(top level)", msg


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
    if path.suffix in (".yaml", ".yml") or "/" in spec:
        raise SpecError(f"{spec}: no such file")
    raise SpecError(f"{spec}: not a file and not a bundled spec; bundled: {', '.join(sorted(bundled))}")


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.epochs=3` -> (["train", "epochs"], 3); the value is read as YAML."""
    key, sep, value = text.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise SpecError(f"--set {text}: expected KEY=VALUE with a dotted key, e.g. --set train.epochs=3")
    try:
        return key.split("."), yaml.safe_load(value)
    except yaml.YAMLError as err:
        raise SpecError(f"--set {text}: the value is not valid YAML ({err.problem})") from None


def load_spec(spec: str, overrides: list[str] = ()) -> tuple[Spec, Path]:
    """Read, override and validate a spec. Raises SpecError naming the file and the field."""
    path = find_spec(spec)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise SpecError(f"{path}:{where}: not valid YAML ({getattr(err, 'problem', err)})") from None
    except OSError as err:
        raise SpecError(f"{path}: cannot read ({err.strerror})") from None
    if raw is None:
        raise SpecError(f"{path}: the file is empty; a spec needs at least `name:` (see `sweep list` for examples)")
    if raw is None:
        raise SpecError(f"{path}: the file is empty; a spec needs at least `name:` (see `sweep list` for examples)")
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: a spec is a YAML mapping (name:, data:, model:, ...), got {type(raw).__name__}")
    for text in overrides:
        keys, value = parse_override(text)
        node = raw
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise SpecError(f"--set {text}: {key} is not a mapping in {path}")
        node[keys[-1]] = value
    return validate_spec(raw, str(path)), path


def validate_spec(raw: dict[str, Any], source: str) -> Spec:
    """Validate a spec mapping; errors name `source` and the field."""
    try:
        spec = Spec.model_validate(raw)
        _check_values(spec)
    except ValidationError as err:
        field, msg = first_error(err)
        more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
        raise SpecError(f"{source}: {field}: {msg}{more}") from None
    except ValueError as err:
        raise SpecError(f"{source}: {err}") from None
    total = sum(count_trials(spec).values())
    if total > MAX_TRIALS:
        raise SpecError(f"{source}: space: expands to {total:,} trials (limit {MAX_TRIALS:,}); "
                        "shrink the grids or search.num_samples")
    return spec


def dump_spec(spec: Spec) -> str:
    """The spec as run, as YAML (what `spec.yaml` in a results directory holds)."""
    return yaml.safe_dump(spec.model_dump(mode="json", exclude_none=False), sort_keys=False)
