"""Bad input, tried on purpose: every case exits with status 2 and one line naming what is wrong,
starts no Ray, and leaves every file as it was.

The table runs through `sweeps.cli.main` in this process (the `sweep` entry point minus the process
boundary: one import of torch/Ray instead of one per case); one case at the end runs as a real
process to pin the exit status and the single stderr line. A corrupted checkpoint needs a real
interrupted sweep: that case is in tests/test_reliability.py.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_cli, sweep, write_spec


pytestmark = pytest.mark.usefixtures("ray_must_not_start")  # every case is refused before Ray starts

# (id, argv with {ws} for the workspace folder, text the one-line error must contain, with {ws} too)
CASES = [
    # the spec file
    ("malformed YAML", ["run", "{ws}/malformed.yaml"], "malformed.yaml: line 3: not valid YAML"),
    ("YAML list, not a mapping", ["run", "{ws}/list.yaml"], "list.yaml: a spec is a YAML mapping"),
    ("empty file", ["validate", "{ws}/empty.yaml"], "empty.yaml: the file is empty; a spec needs at least `name:`"),
    ("wrong type in the file", ["run", "{ws}/wrong-type.yaml"], "train.epochs: Input should be a valid integer"),
    ("spec file missing", ["run", "{ws}/nowhere.yaml"], "{ws}/nowhere.yaml: no such file"),
    ("spec path is a directory", ["run", "{ws}/earlier"], "{ws}/earlier: is a directory; give a spec's YAML file"),
    ("a key twice in the file", ["run", "{ws}/twice.yaml"],
     ("twice.yaml: line 5: key 'sgd' is given twice in one mapping; YAML would keep only the last: give it once "
      "(first given on line 3)")),
    ("an arm without its optimizer", ["run", "{ws}/empty-arm.yaml"],
     "empty-arm.yaml: arms.adam: named after optimizer adam, but trains sgd (the base optim.optimizer)"),
    ("unknown bundled spec", ["run", "no-such-spec"], "no-such-spec: not a file and not a bundled spec"),
    # --set: wrong types, unknown names, impossible values
    ("wrong type by --set", ["run", "{ws}/good.yaml", "--set", "train.epochs=three"],
     "--set train.epochs=three: train.epochs: Input should be a valid integer"),
    ("a key twice in a --set value", ["run", "{ws}/good.yaml", "--set", "arms={a: {lr: 1}, a: {lr: 2}}"],
     "--set arms={a: {lr: 1}, a: {lr: 2}}: key 'a' is given twice in one mapping"),
    ("--set of an arm's misspelled name", ["run", "{ws}/good.yaml", "--set", "arms.adamm.lr=0.01"],
     ("--set arms.adamm.lr=0.01: {ws}/good.yaml has no arm 'adamm' (its arms: sgd, adam); to add one, give all its "
      "settings")),
    ("a misspelled domain kind", ["run", "{ws}/good.yaml", "--set", "arms.adam.lr={logunifrom: [1.0e-4, 1.0e-2]}"],
     "arms.adam.lr: unknown domain kind 'logunifrom'; use one of grid, choice, uniform, loguniform, int"),
    ("a mode that is neither", ["run", "{ws}/good.yaml", "--set", "search.mode=maximum"],
     "--set search.mode=maximum: search.mode: must be max or min, or a list of them (one per metric), got 'maximum'"),
    ("more CPUs per trial than the machine has", ["run", "{ws}/good.yaml", "--set", "resources.cpu=4096"],
     "resources.cpu: each trial asks for 4096 CPU but the local Ray instance has"),
    ("a GPU the machine lacks", ["run", "{ws}/good.yaml", "--set", "resources.gpu=64"],
     "resources.gpu: each trial asks for 64 GPU but the local Ray instance has"),
    ("unknown key", ["run", "{ws}/good.yaml", "--set", "train.epochz=3"],
     "train.epochz: unknown key; use one of epochs, loss, seed"),
    ("unknown dataset", ["run", "{ws}/good.yaml", "--set", "data.name=imagenet"],
     "data.name: unknown dataset 'imagenet'"),
    ("unknown optimizer in an arm", ["run", "{ws}/good.yaml", "--set", "arms.sgd.optimizer=lion"],
     "arms.sgd.optim.optimizer: unknown optimizer 'lion'"),
    ("unknown scheduler", ["run", "{ws}/good.yaml", "--set", "scheduler.name=bohb"],
     "scheduler.name: Input should be 'fifo', 'asha', 'hyperband', 'median' or 'pbt'"),
    ("zero learning rate", ["run", "{ws}/good.yaml", "--set", "optim.lr=0"], "optim.lr: Input should be greater than 0"),
    ("validation fraction > 1", ["run", "{ws}/good.yaml", "--set", "data.val_split=1.5"],
     "data.val_split: must be a fraction in (0, 1)"),
    ("ASHA that never reduces", ["run", "{ws}/good.yaml", "--set", "scheduler.reduction_factor=1"],
     "scheduler.reduction_factor: Input should be greater than 1"),
    ("negative retry budget", ["run", "{ws}/good.yaml", "--set", "run.max_failures=-1"],
     "run.max_failures: Input should be greater than or equal to 0"),
    ("keep no checkpoints", ["run", "{ws}/good.yaml", "--set", "run.checkpoint_keep=0"],
     "run.checkpoint_keep: Input should be greater than 0"),
    ("zero trials: an empty grid", ["run", "{ws}/good.yaml", "--set", "space={seed: {grid: []}}"],
     "space.seed: grid: must list at least one value"),
    ("zero trials: no samples", ["run", "{ws}/good.yaml", "--set", "search.num_samples=0"],
     "search.num_samples: Input should be greater than 0"),
    ("millions of trials", ["run", "{ws}/good.yaml", "--set", "search.num_samples=1000000",
                            "--set", "space={batch_size: {choice: [25, 50]}}"], "expands to 2,000,000 trials (limit 10,000)"),
    ("identical repeats", ["run", "{ws}/good.yaml", "--set", "search.num_samples=3"],
     "search.num_samples: 3 repeats of arm sgd would be 3 identical trials"),
    ("a metric trials do not report", ["run", "{ws}/good.yaml", "--set", "search.metric=val_accuracy"],
     "search.metric: 'val_accuracy' is not a metric every trial reports at every report"),
    ("a metric reported only at the end", ["run", "{ws}/good.yaml", "--set", "search.metric=test_acc"],
     "search.metric: test_acc is reported once, after the last epoch"),
    ("a model too big for its input", ["run", "{ws}/good.yaml", "--set", "model.name=alexnet", "--set", "data.resize=16"],
     "data.resize: model alexnet cannot take 1x16x16 images"),
    ("an arm's subset larger than the section's", ["run", "{ws}/good.yaml", "--set", "arms.sgd.train_subset=401"],
     "arms.sgd.data.train_subset: 401 is more than the 400 training images the sweep loads"),
    ("a searched seed", ["run", "{ws}/good.yaml", "--set", "space={seed: {choice: [0, 1]}}", "--set",
                         "search.algorithm=optuna"], "space.train.seed: seeds are replicates, never searched"),
    ("--set without =", ["run", "{ws}/good.yaml", "--set", "train.epochs"], "--set train.epochs: expected KEY=VALUE"),
    ("--set value not YAML", ["run", "{ws}/good.yaml", "--set", "train.epochs=[1"],
     "--set train.epochs=[1: the value is not valid YAML"),
    ("--set through a number", ["run", "{ws}/good.yaml", "--set", "train.epochs.x=1"],
     "--set train.epochs.x=1: epochs is not a mapping"),
    ("--name not a directory name", ["run", "{ws}/good.yaml", "--name", "../x"],
     "--name ../x: name: names the results directory: letters, digits"),
    # conflicting flags
    ("--name against --set name=", ["run", "{ws}/good.yaml", "--set", "name=a", "--name", "b"],
     "--set name=a and --name b conflict: give name once"),
    ("one key set twice", ["validate", "{ws}/good.yaml", "--set", "train.epochs=2", "--set", "train.epochs=3"],
     "--set train.epochs=2 and --set train.epochs=3 conflict: give train.epochs once"),
    # where results go
    ("results dir already there", ["run", "{ws}/good.yaml", "--storage", "{ws}/earlier"],
     "{ws}/earlier/tiny: already exists; continue it with `sweep resume {ws}/earlier/tiny`"),
    ("--storage is a file", ["run", "{ws}/good.yaml", "--storage", "{ws}/a-file"],
     "--storage {ws}/a-file: {ws}/a-file is a file, not a directory"),
    ("--storage below a file", ["run", "{ws}/good.yaml", "--storage", "{ws}/a-file/results"],
     "{ws}/a-file is a file, not a directory"),
    ("--storage not writable", ["run", "{ws}/good.yaml", "--storage", "/proc/sweep-results"],
     "--storage /proc/sweep-results: not writable (cannot create a directory in /proc"),
    ("--storage of an unknown kind", ["run", "{ws}/good.yaml", "--storage", "nfs://host/sweeps"],
     "nfs://host/sweeps/tiny: cannot open this storage"),
    ("data directory missing", ["run", "{ws}/good.yaml", "--set", "data.name=cifar10",
                                "--set", "data.data_dir={ws}/no-data"], "{ws}/no-data"),
    ("cluster nobody answers", ["run", "{ws}/good.yaml", "--address", "127.0.0.1:1"],
     "--address 127.0.0.1:1: cannot reach a Ray cluster there"),
    # the command line itself (argparse)
    ("unknown command", ["start", "{ws}/good.yaml"], "invalid choice: 'start'"),
    ("run without a spec", ["run"], "the following arguments are required: spec"),
    ("unknown flag", ["run", "{ws}/good.yaml", "--epochs", "3"], "unrecognized arguments: --epochs 3"),
    # resume and report of directories that are not a sweep's
    ("resume: no such directory", ["resume", "{ws}/nowhere"], "{ws}/nowhere: no such directory"),
    ("resume: another tool's directory", ["resume", "{ws}/other-tool"],
     "{ws}/other-tool: not a sweep results directory (no spec.yaml"),
    ("resume: no Tune state", ["resume", "{ws}/spec-only"],
     "{ws}/spec-only: has a spec.yaml but no Ray Tune state to resume from"),
    ("resume: spec.yaml not YAML", ["resume", "{ws}/broken-spec"], "{ws}/broken-spec/spec.yaml: not valid YAML"),
    ("resume: spec.yaml edited wrong", ["resume", "{ws}/edited-spec"],
     "{ws}/edited-spec/spec.yaml: optim.lr: Input should be greater than 0"),
    ("an MLflow server nobody runs", ["run", "{ws}/good.yaml", "--set", "run.mlflow=http://127.0.0.1:1"],
     "run.mlflow http://127.0.0.1:1: no MLflow tracking server answers there"),
    ("dashboard: another tool's directory", ["dashboard", "{ws}/other-tool"],
     "{ws}/other-tool: not a sweep results directory (no spec.yaml"),
    ("dashboard: a sweep without a journal", ["dashboard", "{ws}/spec-only"], "{ws}/spec-only: no optuna.log"),
    ("plan: an effect of zero", ["plan", "{ws}/spec-only", "--effect", "0"], "argument --effect: must be greater than 0"),
    ("plan: power above 1", ["plan", "{ws}/spec-only", "--effect", "0.01", "--power", "1.5"],
     "argument --power: must be between 0 and 1"),
    ("plan: not a sweep", ["plan", "{ws}/other-tool", "--effect", "0.01"],
     "{ws}/other-tool: not a sweep results directory"),
    ("plan: a sweep with no seeds to pair yet", ["plan", "{ws}/spec-only", "--effect", "0.01"],
     "{ws}/spec-only: no two arms have 2 or more finished seeds to pair yet"),
    ("report: no such directory", ["report", "{ws}/nowhere"], "{ws}/nowhere: no such directory"),
    ("report: another tool's directory", ["report", "{ws}/other-tool"], "{ws}/other-tool: not a sweep results directory"),
    ("report: a target no accuracy reaches", ["report", "{ws}/spec-only", "--target", "1.5"],
     "--target 1.5: val_acc is [0, 1], so no trial could reach 1.5"),
    ("report: a negative loss target", ["report", "{ws}/loss-spec", "--target", "-0.1"],
     "--target -0.1: val_loss is >= 0, so no trial could reach -0.1"),
    ("report: --out is a file", ["report", "{ws}/earlier/tiny", "--out", "{ws}/a-file"],
     "--out {ws}/a-file: {ws}/a-file is a file, not a directory"),
]


@pytest.fixture
def workspace(tmp_path, tiny_spec, monkeypatch) -> Path:
    """Specs and directories for the cases; the working directory too, so a default ./results lands here."""
    write_spec(tmp_path, tiny_spec, "good.yaml")
    (tmp_path / "malformed.yaml").write_text("name: x\ndata: {name: mnist5k\nmodel: mlp\n")
    (tmp_path / "list.yaml").write_text("- name: x\n- data: {}\n")
    (tmp_path / "empty.yaml").write_text("")
    write_spec(tmp_path, {**tiny_spec, "train": {"epochs": "three"}}, "wrong-type.yaml")
    (tmp_path / "twice.yaml").write_text("name: t\narms:\n  sgd: {optimizer: sgd}\n  adam: {optimizer: adam}\n"
                                         "  sgd: {optimizer: sgd, lr: 0.1}\n")
    write_spec(tmp_path, {**tiny_spec, "arms": {"sgd": {"lr": 0.1}, "adam": {}}}, "empty-arm.yaml")
    (tmp_path / "loss-spec").mkdir()
    write_spec(tmp_path / "loss-spec", {**tiny_spec, "search": {"metric": "val_loss", "mode": "min"}})
    (tmp_path / "a-file").write_text("not a directory")
    (tmp_path / "earlier" / "tiny").mkdir(parents=True)
    (tmp_path / "earlier" / "tiny" / "result.json").write_text('{"epoch": 1}\n')
    (tmp_path / "other-tool").mkdir()
    (tmp_path / "other-tool" / "events.out.tfevents.1").write_bytes(b"\x00\x01")
    (tmp_path / "other-tool" / "experiment_state-2024.json").write_text("{}")
    (tmp_path / "spec-only").mkdir()
    write_spec(tmp_path / "spec-only", tiny_spec)
    (tmp_path / "broken-spec").mkdir()
    (tmp_path / "broken-spec" / "spec.yaml").write_text("name: [unclosed\n")
    (tmp_path / "edited-spec").mkdir()
    write_spec(tmp_path / "edited-spec", {**tiny_spec, "optim": {"lr": -1}})
    monkeypatch.chdir(tmp_path)
    return tmp_path


def snapshot(folder: Path) -> dict[str, str]:
    """Every file and directory under `folder`, with a hash of each file's bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize("argv,message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_exits_2_with_one_line_and_no_side_effects(argv, message, workspace, capsys):
    if argv[-1].startswith("/proc") and not Path("/proc").is_dir():
        pytest.skip("needs Linux's /proc for a directory nobody can write")
    fill = lambda text: text.replace("{ws}", str(workspace))  # noqa: E731
    before = snapshot(workspace)
    status, err = sweep([fill(a) for a in argv], capsys)
    errors = [line for line in err.splitlines() if ": error: " in line]
    assert status == 2, err
    assert len(errors) == 1 and fill(message) in errors[0], err
    assert snapshot(workspace) == before, "a bad input must not create or change any file"


def test_the_table_is_big_enough():
    assert len(CASES) >= 25


def test_a_real_process_exits_2_with_one_stderr_line(workspace):
    done = run_cli("run", str(workspace / "good.yaml"), "--set", "optim.lr=0", "--storage", str(workspace / "out"))
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "sweep: error: --set optim.lr=0: optim.lr: Input should be greater than 0, got 0"]
    assert not (workspace / "out").exists()


def test_a_model_whose_library_does_not_import_names_model_name_and_list_still_lists_every_spec():
    # As in an image whose torchvision was built for another torch: `import torchvision` fails.
    without = ("import sys; sys.modules['torchvision'] = None\n"
               "from sweeps.cli import main; sys.exit(main(sys.argv[1:]))")
    run = lambda *args: subprocess.run([sys.executable, "-c", without, *args], capture_output=True, text=True,
                                       timeout=300)
    refused = run("validate", "alexnet-mnist-adam-vs-adamw")
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert ("alexnet-mnist-adam-vs-adamw.yaml: model.name: alexnet is torchvision's model, and torchvision does "
            "not import here") in refused.stderr
    # `sweep list` reads specs with their schema alone (no torch, so it answers at once): it lists them all, and
    # `sweep validate` says which cannot run here
    listed = run("list")
    assert listed.returncode == 0, listed.stderr
    lines = {line.split()[0]: line for line in listed.stdout.splitlines()}
    assert " 6 trials  " in lines["alexnet-mnist-adam-vs-adamw"] and " 20 trials  " in lines["quickstart"]
    assert max(map(len, listed.stdout.splitlines())) <= 100
