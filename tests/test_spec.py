"""Spec validation and space expansion: pure, fast, no Ray."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import REPO, write_spec
from ray.tune.search.variant_generator import generate_variants

from sweeps.cli import main
from sweeps.schema import Scheduler, SpecError, count_trials, resolve_key
from sweeps.space import param_space
from sweeps.spec import flag_overrides, load_spec, validate_spec
from trainables.settings import apply_settings

BASE = {"name": "t", "data": {"name": "mnist5k"}, "model": {"name": "mlp"}}


def spec_with(**changes) -> dict:
    """BASE with `a__b=value` keyword changes set at a.b."""
    return apply_settings(BASE, {dotted.replace("__", "."): value for dotted, value in changes.items()})


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
    ({"space": {"seed": {"grid": [0, 1]}}, "search": {"algorithm": "optuna"}},
     "space.train.seed: seeds are replicates, never searched, and under optuna each trial runs one seed"),
    ({"space": {"seed": {"choice": [0, 1]}}, "search": {"algorithm": "optuna"}}, "space.train.seed: seeds are replicates"),
    ({"arms": {"a": {"seed": {"int": [0, 9]}}}, "search": {"algorithm": "random"}},
     "arms.a.train.seed: seeds are replicates, never searched: list them as a grid"),
    ({"space": {"batch_size": {"grid": [32, 64]}}, "search": {"algorithm": "optuna"}},
     "space.data.batch_size: grid domains need search.algorithm grid or random; with optuna use choice"),
    ({"search": {"num_samples": 3}}, "search.num_samples: 3 repeats of the spec (it has no arms) would be 3 identical"),
    ({"arms": {}, "scheduler": {"name": "pbt"}}, "space: pbt explores the settings a sweep searches, and this one"),
    ({"arms": {"adam": {}}}, "arms.adam: named after optimizer adam, but trains sgd (the base optim.optimizer)"),
    ({"arms": {"adam": None, "sgd": {}}}, "arms.adam: named after optimizer adam, but trains sgd"),
    ({"arms": {"adamw": {"optimizer": "adam"}}}, "arms.adamw: named after optimizer adamw, but trains adam (its optim"),
    ({"arms": {"adam": {"lr": {"logunifrom": [1e-4, 1e-2]}}}},
     "arms.adam.lr: unknown domain kind 'logunifrom'; use one of grid, choice, uniform, loguniform, int"),
    ({"arms": {"a": {"lr": {"grid": 0.1}}}}, "arms.a.lr: grid: Input should be a valid list, got 0.1"),
    ({"search": {"mode": "maximum"}}, "search.mode: must be max or min, or a list of them (one per metric), got 'maximum'"),
    ({"search": {"metric": 5}}, "search.metric: must be a metric's name or a list of them, got 5"),
    ({"data__val_split": "half"}, "data.val_split: must be a fraction in (0, 1) or 'test', got 'half'"),
    ({"train__epochs": "three"}, ("train.epochs: Input should be a valid integer, unable to parse string as an "
                                  "integer, got 'three'")),
    ({"train__epochz": 3}, "train.epochz: unknown key; use one of epochs, loss, seed, report_every"),
    ({"data": {"name": "mnist5k", "augment": {"flip": True}}}, "data.augment.flip: unknown key; use one of crop_padding"),
    ({"search": {"metric": "val_accuracy"}}, "search.metric: 'val_accuracy' is not a metric every trial reports"),
    ({"search": {"metric": "test_acc"}}, "search.metric: test_acc is reported once, after the last epoch"),
    ({"search": {"metric": "val_loss"}}, "search.mode: val_loss is better when lower; use mode: min"),
    ({"search": {"metric": "train_acc", "mode": "min"}}, "search.mode: train_acc is better when higher; use mode: max"),
    ({"data__resize": 16, "model__name": "alexnet"}, "data.resize: model alexnet cannot take 1x16x16 images"),
    ({"data__resize": 32, "arms": {"big": {"model.name": "alexnet"}, "small": {}}},
     "arms.big.model.name: model alexnet cannot take 1x32x32 images"),
    ({"model__name": "alexnet_cifar", "arms": {"a": {"resize": {"grid": [32, 40]}}}},
     "arms.a.data.resize: 40: model alexnet_cifar cannot take 1x40x40 images"),
    ({"space": {"model.name": {"choice": ["mlp", "alexnet"]}, "resize": {"choice": [64, 16]}}},  # each fine alone
     "space.model.name: 'alexnet' with space.data.resize: 16: model alexnet cannot take 1x16x16 images"),
    ({"data__train_subset": 3700}, "data.train_subset: mnist5k has 3600 training images after the validation split"),
    ({"data__train_subset": 1900, "arms": {"a": {"train_subset": 2000}}},
     "arms.a.data.train_subset: 2000 is more than the 1900 training images the sweep loads"),
    ({"arms": {"a": {"train_subset": {"grid": [100, 4000]}}}},
     "arms.a.data.train_subset: 4000 is more than the 3600 training images the sweep loads"),
    ({"train__device": "cuda"}, "train.device: 'cuda' needs a GPU for each trial; set resources.gpu"),
    ({"optim__schedule": "multistep"}, "optim.milestones: schedule multistep needs the epochs"),
    ({"arms": {"a": {"betas": [1.5, 0.9]}}}, "arms.a.optim.betas: each must be in [0, 1), got [1.5, 0.9]"),
    ({"space": {"seed": {"grid": list(range(200))}, "batch_size": {"grid": list(range(1, 101))}}}, "expands to 20,000 trials"),
    ({"data__val_split": 1.5}, "data.val_split: must be a fraction"),
    ({"name": "../x"}, ("name: names the results directory: letters, digits, '.', '_' and '-', starting with a "
                        "letter or digit, got '../x'")),
    ({"scheduler": {"name": "bohb"}}, "scheduler.name: Input should be 'fifo', 'asha', 'hyperband', 'median' or 'pbt'"),
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
    raw = spec_with(arms={"a": {"lr": {"grid": [0.1, 0.01, 0.001]}, "momentum": {"grid": [0.0, 0.9]},
                                "batch_size": {"choice": [32, 64]}},
                          "b": {"optimizer": "adam", "lr": {"loguniform": [1e-4, 1e-2]}}},
                    space={"seed": {"grid": [0, 1, 2]}}, search={"num_samples": 2})
    spec = validate_spec(raw, "x")
    assert count_trials(spec) == {"a": 3 * 2 * 3 * 2, "b": 1 * 3 * 2}
    variants = [v for _, v in generate_variants(param_space(spec))]
    assert len(variants) == sum(count_trials(spec).values())
    for v in variants:  # each arm keeps its own settings and sub-space
        assert v["train.seed"] in (0, 1, 2)
        if v["arm"]["name"] == "b":
            assert v["arm"]["optim.optimizer"] == "adam" and 1e-4 <= v["arm"]["optim.lr"] <= 1e-2
        else:
            assert v["arm"]["optim.lr"] in (0.1, 0.01, 0.001) and v["arm"]["data.batch_size"] in (32, 64)


def test_no_arms_means_one_base_arm():
    spec = validate_spec(spec_with(space={"seed": {"grid": [0, 1]}}), "x")
    assert count_trials(spec) == {"base": 2}


def test_optuna_gives_every_arm_the_same_budget():
    spec = validate_spec(spec_with(arms={"a": {}, "b": {}, "c": {}}, search={"algorithm": "optuna", "num_samples": 4}), "x")
    assert count_trials(spec) == {"a": 4, "b": 4, "c": 4}


def test_the_spec_as_run_is_a_copy_and_the_callers_spec_stays_as_it_was():
    from sweeps.runner import spec_as_run

    spec, _ = load_spec("quickstart")
    before = spec.model_dump()
    as_run = spec_as_run(spec, "a note about the data")
    assert spec.model_dump() == before
    assert as_run.scheduler.max_t == spec.train.epochs and "a note about the data" in as_run.notes
    assert as_run.model_copy(update={"notes": spec.notes, "scheduler": spec.scheduler}).model_dump() == before


def test_overrides_and_bundled_names(tmp_path):
    spec, path = load_spec("quickstart", flag_overrides(["train.epochs=2", "arms.adam.weight_decay=0.01"]))
    assert path.name == "quickstart.yaml" and spec.train.epochs == 2
    assert spec.arm_settings()["adam"]["optim.weight_decay"] == 0.01
    with pytest.raises(SpecError, match="not a file and not a bundled spec; bundled: .*quickstart"):
        load_spec("no-such-spec")
    with pytest.raises(SpecError, match="--set train.epochs: expected KEY=VALUE"):
        load_spec("quickstart", flag_overrides(["train.epochs"]))


def test_malformed_yaml_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ndata: {name: mnist5k\nmodel: mlp\n")
    with pytest.raises(SpecError, match=r"bad.yaml: line \d+: not valid YAML"):
        load_spec(str(bad))


def test_cli_validate_prints_plan_and_bad_input_exits_2(tmp_path, capsys):
    # The `sweep` entry point in this process; tests/test_bad_inputs.py checks a real process's exit status.
    assert main(["validate", "quickstart"]) == 0
    ok = capsys.readouterr().out
    assert "trials     20" in ok and "adamw" in ok
    assert main(["validate", "fair-optimizers-mnist", "--set", "data.batch_size=4000"]) == 0
    ok = capsys.readouterr().out
    assert "num_samples 8 per arm, one TPE study each (4 start-up trials)" in ok
    assert ok.count("batch_size 4000 is larger") == 1  # the data section's setting, said once
    assert "note       data: batch_size 4000 is larger than the 3400 training images" in ok
    path = write_spec(tmp_path, spec_with(optim__lr=-1))
    assert main(["validate", str(path)]) == 2
    bad = capsys.readouterr()
    assert bad.err.strip().splitlines() == [f"sweep: error: {path}: optim.lr: Input should be greater than 0, got -1"]
    assert bad.out == ""


def test_cli_list_shows_bundled_specs(capsys):
    assert main(["list"]) == 0
    assert any(line.split()[0] == "quickstart" and "20 trials" in line for line in capsys.readouterr().out.splitlines())


def test_the_cli_leaves_the_dataset_decoders_unimported():
    # Every command imports the registries; torchvision and scikit-learn (about 1 s each) only decode and
    # split datasets, so `sweep list`, `validate` and `report` start without them.
    code = ("import sys, sweeps.cli; bad = [m for m in ('torchvision', 'sklearn') if m in sys.modules]; "
            "assert not bad, bad")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_a_key_given_twice_is_refused_with_its_line_in_the_file_and_in_a_set_value(tmp_path):
    spec = tmp_path / "twice.yaml"
    spec.write_text("name: t\narms:\n  sgd: {optimizer: sgd}\n  adam: {optimizer: adam}\n  sgd: {lr: 0.1}\n")
    with pytest.raises(SpecError) as err:
        load_spec(str(spec))
    assert str(err.value) == (f"{spec}: line 5: key 'sgd' is given twice in one mapping; YAML would keep only the "
                              "last: give it once (first given on line 3)")
    with pytest.raises(SpecError, match=r"^--set space=\{lr: 1, lr: 2\}: key 'lr' is given twice in one mapping"):
        load_spec("quickstart", flag_overrides(["space={lr: 1, lr: 2}"]))


def test_set_changes_arms_that_exist_and_adds_one_only_from_a_whole_mapping():
    with pytest.raises(SpecError) as err:
        load_spec("quickstart", flag_overrides(["arms.adamm.lr=0.01"]))
    assert str(err.value).startswith("--set arms.adamm.lr=0.01: ") and "has no arm 'adamm' (its arms: " in str(err.value)
    assert "adam, " in str(err.value) and "--set 'arms.adamm={optimizer: adam, lr: 1.0e-3}'" in str(err.value)
    with pytest.raises(SpecError, match="has no arm 'lion'"):
        load_spec("quickstart", flag_overrides(["arms.lion=adam"]))
    spec, _ = load_spec("quickstart", flag_overrides(["arms.rms={optimizer: rmsprop, lr: {uniform: [0.001, 0.01]}}"]))
    assert spec.arm_settings()["rms"]["optim.optimizer"] == "rmsprop"


def test_an_error_a_flag_brings_names_the_flag_and_one_the_file_has_names_the_file(tmp_path):
    def error(spec: str, *sets: str, name: str | None = None) -> str:
        with pytest.raises(SpecError) as err:
            load_spec(spec, flag_overrides(list(sets), name))
        return str(err.value)

    assert error("quickstart", "train.epochs=three", "train.report_every=1").startswith(
        "--set train.epochs=three: train.epochs: Input should be a valid integer")
    assert error("quickstart", "arms.sgd.optimizer=lion").startswith(
        "--set arms.sgd.optimizer=lion: arms.sgd.optim.optimizer: unknown optimizer 'lion'")
    assert error("quickstart", name="../x").startswith("--name ../x: name: names the results directory")
    bad = write_spec(tmp_path, spec_with(optim__lr=-1))
    assert error(str(bad), "train.epochs=2").startswith(f"{bad}: optim.lr: Input should be greater than 0")
    assert error(str(tmp_path)) == (f"{tmp_path}: is a directory; give a spec's YAML file or a bundled spec's name "
                                    "(see `sweep list`)")


@pytest.mark.parametrize("scheduler", Scheduler.model_fields["name"].annotation.__args__)
def test_smoke_keeps_every_valid_spec_valid(scheduler):
    from sweeps.smoke import smoke_spec
    from sweeps.spec import bundled_specs

    for name in sorted(bundled_specs()):
        raw = load_spec(name)[0].model_dump(mode="json", by_alias=True)
        raw["scheduler"]["name"] = scheduler
        try:
            spec = validate_spec(raw, name)
        except SpecError:
            continue  # not a valid spec with this scheduler: nothing for smoke to keep
        smoke_spec(spec)  # raises SpecError where smoke broke it


def test_the_command_line_answers_help_and_list_without_importing_torch_ray_or_pandas():
    # `sweep --help` and `sweep list` answer at once: torch alone takes seconds to import (the schema looks names up
    # in the trainables' registries only when a spec is validated to run).
    probe = ("import sys\nfrom sweeps.cli import main\n"
             "try:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
             "print(sorted(m for m in ('torch', 'ray', 'pandas', 'plotly') if m in sys.modules), file=sys.stderr)")
    for args in (["--help"], ["list"]):
        done = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True, timeout=120)
        assert done.stderr.strip().splitlines()[-1] == "[]", (args, done.stderr)
        assert done.stdout.strip(), args
