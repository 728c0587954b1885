"""Reading a spec: a YAML file (or a bundled spec's name) with the command line's overrides, validated against the
schema (`sweeps.schema`) and the checks that need the trainables (`sweeps.checks`). Errors are one line naming the
file, or the flag, and the field."""

from __future__ import annotations

import copy
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from sweeps.schema import MAX_TRIALS, WITH_REGISTRIES, Override, Spec, SpecError, count_trials, first_error, resolve_key


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


def parse_spec(path: Path) -> Spec:
    """A spec file read with its schema alone (types, keys, domains), without the registries and the other checks
    that need torch (`sweeps.checks`): enough to count its trials (`sweep list`), not to run it."""
    return Spec.model_validate(read_yaml(path.read_text()))


def validate_spec(raw: dict[str, Any], source: str) -> Spec:
    """Validate a spec mapping; errors name `source` and the field."""
    try:
        return _validated(raw)
    except ValueError as err:
        raise SpecError(f"{source}: {err}") from None


def _validated(raw: dict[str, Any]) -> Spec:
    """The Spec of a mapping, or ValueError("field: message")."""
    from sweeps.checks import check_spec  # the trainables' registries, datasets and models: torch

    try:
        spec = Spec.model_validate(raw, context=WITH_REGISTRIES)
        check_spec(spec)
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
