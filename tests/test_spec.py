"""Spec validation and space expansion: pure, fast, no Ray."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from conftest import REPO, run_cli, write_spec
from sweeps.space import param_space
from sweeps.spec import SpecError, count_trials, load_spec, resolve_key, validate_spec
from ray.tune.search.variant_generator import generate_variants

BASE = {"name": "t", "data": {"name": "mnist5k"}, "model": {"name": "mlp"}}


def spec_with(**changes) -> dict:
    raw = yaml.safe_load(yaml.safe_dump(BASE))
    for dotted, value in changes.items():
        *parents, leaf = dotted.split("__")
        node = raw
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return raw


BAD = [  # (spec changes, text the one-line error must contain)
    ({"data__name": "imagenet"}, "data.name: unknown dataset 'imagenet'"),
    ({"model__name": "resnet"}, "model.name: unknown model 'resnet'"),
    ({"optim__optimizer": "lion"}, "optim.optimizer: unknown optimizer 'lion'"),
    ({"optim__lr": -0.1}, "optim.lr: Input should be greater than 0"),
    ({"optim__lrr": 0.1}, "optim.lrr: unknown key"),
    ({"surprise": 1}, "surprise: unknown key"),
    ({"arms": {"a": {"lr": -1}}}, "arms.a.optim.lr: Input should be greater than 0"),
    ({"arms": {"a": {"lr": {"grid": []}}}}, "arms.a.lr: grid: must list at least one value"),
    ({"arms": {"a": {"lr": {"loguniform": [0, 1]}}}}, "arms.a.lr: loguniform: needs low > 0"),
    ({"arms": {"a": {"lr": {"uniform": [-1, 1]}}}}, "arms.a.optim.lr: -1.0: Input should be greater than 0"),
    ({"arms": {"a": {"lr": {"grid": [1], "choice": [2]}}}}, "exactly one of"),
    ({"arms": {"a": {"optimizer": "lion"}}}, "arms.a.optim.optimizer: unknown optimizer 'lion'"),
    ({"arms": {"a": {"nesterov": True}}}, "arms.a.optim.nesterov: Nesterov momentum needs momentum > 0"),
    ({"arms": {"a": {"wat": 1}}}, "arms.a.wat: unknown setting 'wat'"),
    ({"arms": {"a b": {}}}, "arms.a b: arm names use letters"),
    ({"space": {"lr": {"grid": [0.1]}}, "arms": {"a": {"lr": 0.2}}}, "arms.a.optim.lr: also set in space"),
    ({"space": {"seed": {"grid": [0, 1]}}, "search": {"algorithm": "optuna"}}, "space.train.seed: grid domains need"),
    ({"space": {"seed": {"grid": list(range(200))}, "batch_size": {"grid": list(range(1, 101))}}}, "expands to 20,000 trials"),
    ({"data__val_split": 1.5}, "data.val_split: must be a fraction"),
    ({"name": "has space"}, "name: String should match pattern"),
    ({"scheduler": {"name": "hyperband"}}, "scheduler.name: Input should be 'fifo' or 'asha'"),
    ({"resources": {"gpu": -1}}, "resources.gpu: Input should be greater than or equal to 0"),
    ({"compare_by": ["nope"]}, "compare_by: unknown setting 'nope'"),
    ({"arms": {"a": {"normalize": "pixel"}}}, "arms.a.data.normalize: the dataset is loaded once"),
    ({"space": {"data.name": {"grid": ["mnist5k", "digits"]}}}, "space.data.name: the dataset is loaded once"),
    ({"train__report_every": 2}, "train.checkpoint_every: must be a multiple of report_every (2), got 1"),
    ({"arms": {"a": {"report_every": 2, "checkpoint_every": 3}}}, "arms.a.train.checkpoint_every: must be a multiple"),
]


@pytest.mark.parametrize("changes,message", BAD, ids=[m[:40] for _, m in BAD])
def test_bad_spec_names_the_field(changes, message):
    with pytest.raises(SpecError) as err:
        validate_spec(spec_with(**changes), "my.yaml")
    text = str(err.value)
    assert text.startswith("my.yaml: ") and message in text and "\n" not in text


def test_bare_names_resolve_to_their_section_and_are_unambiguous():
    assert resolve_key("lr") == "optim.lr"
    assert resolve_key("batch_size") == "data.batch_size"
    assert resolve_key("seed") == "train.seed"
    assert resolve_key("data.augment.hflip") == "data.augment.hflip"
    with pytest.raises(ValueError):
        resolve_key("name")  # in two sections: must be dotted


def test_trial_counts_cross_arm_grids_with_shared_space():
    raw = spec_with(arms={"a": {"lr": {"grid": [0.1, 0.01, 0.001]}, "momentum": {"grid": [0.0, 0.9]}},
                          "b": {"optimizer": "adam", "lr": {"loguniform": [1e-4, 1e-2]}}},
                    space={"seed": {"grid": [0, 1, 2]}}, search={"num_samples": 2})
    spec = validate_spec(raw, "x")
    assert count_trials(spec) == {"a": 3 * 2 * 3 * 2, "b": 1 * 3 * 2}
    variants = [v for _ in range(spec.search.num_samples) for _, v in generate_variants(param_space(spec))]
    assert len(variants) == sum(count_trials(spec).values())
    for v in variants:  # each arm keeps its own settings and sub-space
        assert v["train.seed"] in (0, 1, 2)
        if v["arm"]["name"] == "b":
            assert v["arm"]["optim.optimizer"] == "adam" and 1e-4 <= v["arm"]["optim.lr"] <= 1e-2
        else:
            assert v["arm"]["optim.lr"] in (0.1, 0.01, 0.001)


def test_no_arms_means_one_base_arm():
    spec = validate_spec(spec_with(space={"seed": {"grid": [0, 1]}}), "x")
    assert count_trials(spec) == {"base": 2}


def test_optuna_gives_every_arm_the_same_budget():
    spec = validate_spec(spec_with(arms={"a": {}, "b": {}, "c": {}}, search={"algorithm": "optuna", "num_samples": 4}), "x")
    assert count_trials(spec) == {"a": 4, "b": 4, "c": 4}


def test_overrides_and_bundled_names(tmp_path):
    spec, path = load_spec("quickstart", ["train.epochs=2", "arms.adam.lr=0.01"])
    assert path.name == "quickstart.yaml" and spec.train.epochs == 2 and spec.arm_settings()["adam"]["optim.lr"] == 0.01
    with pytest.raises(SpecError, match="not a file and not a bundled spec; bundled: .*quickstart"):
        load_spec("no-such-spec")
    with pytest.raises(SpecError, match="--set train.epochs: expected KEY=VALUE"):
        load_spec("quickstart", ["train.epochs"])


def test_malformed_yaml_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ndata: {name: mnist5k\nmodel: mlp\n")
    with pytest.raises(SpecError, match=r"bad.yaml: line \d+: not valid YAML"):
        load_spec(str(bad))


def test_cli_validate_prints_plan_and_bad_input_exits_2(tmp_path):
    ok = run_cli("validate", "quickstart")
    assert ok.returncode == 0 and "trials     20" in ok.stdout and "adamw" in ok.stdout
    path = write_spec(tmp_path, spec_with(optim__lr=-1))
    bad = run_cli("validate", str(path))
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [f"sweep: error: {path}: optim.lr: Input should be greater than 0"]


def test_cli_list_shows_bundled_specs():
    out = run_cli("list")
    assert out.returncode == 0
    assert any(line.split()[0] == "quickstart" and "20 trials" in line for line in out.stdout.splitlines())


def test_the_cli_leaves_the_dataset_decoders_unimported():
    # Every command imports the registries; torchvision and scikit-learn (about 1 s each) only decode and
    # split datasets, so `sweep list`, `validate` and `report` start without them.
    code = ("import sys, sweeps.cli; bad = [m for m in ('torchvision', 'sklearn') if m in sys.modules]; "
            "assert not bad, bad")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
