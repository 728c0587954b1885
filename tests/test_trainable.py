"""The trainable's contract beyond the metrics: which device a trial takes, what its checkpoint holds and how it
is loaded, and how train_* is measured (the same way as val_*)."""

from __future__ import annotations

import io
import os
import pickle
from contextlib import nullcontext

import numpy as np
import pytest
import ray
import torch
from conftest import run_cli, trial_results, trial_settings, write_spec
from ray import tune

from trainables.data import Loader, load_dataset
from trainables.models import create_model
from trainables.optim import create_loss, create_optimizer, create_schedule
from trainables.train import (
    CHECKPOINT_FILE,
    EPOCH_METRICS,
    Trial,
    assigned_gpus,
    checkpoint_state,
    evaluate,
    load_checkpoint,
    pick_device,
    restore_state,
    train_sample,
)


def test_a_gpu_is_used_only_when_ray_assigned_one():
    assert pick_device("auto", [], cuda_available=True).type == "cpu"  # a 0-GPU trial on a GPU node
    assert pick_device("auto", ["1"], cuda_available=True).type == "cuda"
    assert pick_device("auto", None, cuda_available=True).type == "cuda"  # outside Ray: any visible GPU
    assert pick_device("cpu", ["0"], cuda_available=True).type == "cpu"
    assert pick_device("auto", ["0"], cuda_available=False).type == "cpu"
    with pytest.raises(RuntimeError, match="Ray assigned this trial no GPU"):
        pick_device("cuda", [], cuda_available=True)


@pytest.mark.slow
def test_trials_that_ask_for_no_gpu_stay_off_the_gpus_of_their_node(tmp_path):
    # Ray's logical GPUs on a CPU machine: Ray 2.60 does not narrow CUDA_VISIBLE_DEVICES for an actor that asks
    # for none, so only ray.get_gpu_ids() tells a 0-GPU trial from a GPU one.
    def report_device(config):  # local, so Ray pickles it by value: workers cannot import test modules
        ids = assigned_gpus()
        tune.report({"gpus": len(ids), "device": pick_device("auto", ids, cuda_available=True).type,
                     "visible": os.environ.get("CUDA_VISIBLE_DEVICES", "unset")})

    ray.init(address="local", num_cpus=2, num_gpus=2, include_dashboard=False, configure_logging=False)
    try:
        trainable = tune.with_resources(report_device, lambda config: {"cpu": 1, "gpu": config["gpu"]})
        results = tune.Tuner(trainable, param_space={"gpu": tune.grid_search([0, 0.5, 1])},
                             tune_config=tune.TuneConfig(reuse_actors=True),
                             run_config=tune.RunConfig(storage_path=str(tmp_path), verbose=0)).fit()
    finally:
        ray.shutdown()
    seen = {r.config["gpu"]: (r.metrics["gpus"], r.metrics["device"]) for r in results}
    assert not results.errors and seen == {0: (0, "cpu"), 0.5: (1, "cuda"), 1: (1, "cuda")}


def _parts(device: str = "cpu"):
    data = load_dataset("digits", train_subset=200)
    model = create_model("mlp", in_channels=1, num_classes=10, image_size=8, hidden_sizes=[16])
    optimizer = create_optimizer(model.parameters(), optimizer="adam", lr=1e-3)
    schedule = create_schedule(optimizer, schedule="multistep", milestones=[2, 4])
    loader = Loader(data.train_x, data.train_y, batch_size=32, device=device, mean=data.mean, std=data.std,
                    shuffle=True, seed=3)
    return data, model, optimizer, schedule, loader


def test_a_checkpoint_holds_the_fp16_loss_scale(tmp_path):
    # A resumed fp16 trial that starts again from the default scale (65536) skips steps until it has found
    # its scale again: the resumed run would not continue identically.
    _, model, optimizer, schedule, loader = _parts()
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)  # a CPU scaler has the CUDA one's state
    scaler.scale(torch.ones(()))
    scaler.update(new_scale=256.0)
    (tmp_path / "ckpt").mkdir()
    torch.save(checkpoint_state(7, model, optimizer, schedule, scaler, loader), tmp_path / "ckpt" / CHECKPOINT_FILE)

    state = load_checkpoint(tune.Checkpoint.from_directory(str(tmp_path / "ckpt")), torch.device("cpu"))
    _, model2, optimizer2, schedule2, loader2 = _parts()
    fresh = torch.amp.GradScaler("cpu", init_scale=1024.0)
    assert restore_state(state, model2, optimizer2, schedule2, fresh, loader2) == 8
    assert fresh.get_scale() == 256.0
    assert next(iter(loader2))[1].tolist() == next(iter(loader))[1].tolist()  # the data order continues too


def test_a_restored_trial_goes_on_at_the_learning_rate_its_schedule_reached_and_a_copy_at_its_own(tiny_spec):
    settings = trial_settings(tiny_spec, {"optim.lr": 0.1, "optim.schedule": "multistep", "optim.milestones": [2],
                                          "train.epochs": 4})
    data = load_dataset("mnist5k", train_subset=400)
    first = Trial(settings, data, torch.device("cpu"), loaded_subset=400, trial_id="t1")
    for _ in range(3):
        lr = first.lr
        report = first.end_epoch(*first.train_epoch(), 1.0, lr)
    buffer = io.BytesIO()
    report.save(buffer)
    state = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
    assert first.lr == pytest.approx(0.01)
    retried = Trial(settings, data, torch.device("cpu"), loaded_subset=400, trial_id="t1", state=state)
    assert (retried.epoch, retried.lr, retried.copied) == (3, pytest.approx(0.01), {})  # not reset to 0.1
    copy = Trial(trial_settings(tiny_spec, {"optim.lr": 0.37}), data, torch.device("cpu"), loaded_subset=400,
                 trial_id="t2", state=state)  # PBT: another trial's state, this trial's settings
    assert copy.lr == 0.37 and copy.copied == {"copied_from": "t1", "copied_epoch": 3}


def test_a_trial_restored_from_its_last_checkpoint_says_its_last_report_again_and_trains_nothing(tiny_spec):
    # A driver that dies after a trial's last checkpoint but before Tune records it finished: `sweep resume`
    # restores that checkpoint, and the trial's final row (confusion matrix, test score) comes from it.
    settings = trial_settings(tiny_spec, {"train.epochs": 2})
    data = load_dataset("mnist5k", train_subset=400)
    trial = Trial(settings, data, torch.device("cpu"), loaded_subset=400, trial_id="t1")
    while not trial.finished:
        report = trial.end_epoch(*trial.train_epoch(), 1.0, trial.lr)
    assert report.done and "confusion_matrix" in report.metrics
    buffer = io.BytesIO()
    report.save(buffer)
    state = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)  # plain values: no pickled code
    restored = Trial(settings, data, torch.device("cpu"), loaded_subset=400, trial_id="t1", state=state)
    assert restored.finished and restored.last_report == report.metrics
    copy = Trial(settings, data, torch.device("cpu"), loaded_subset=400, trial_id="t2", state=state)
    assert copy.last_report is None  # PBT gave it another's state: that trial's report is not this one's
    midway = Trial(trial_settings(tiny_spec, {"train.epochs": 3}), data, torch.device("cpu"), loaded_subset=400,
                   trial_id="t1", state=state)
    assert not midway.finished and midway.last_report is None  # it goes on training and reports as it does


def test_a_checkpoint_cannot_run_code_when_loaded(tmp_path):
    marker = tmp_path / "ran"

    class Planted:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (tmp_path / "ckpt").mkdir()
    with open(tmp_path / "ckpt" / CHECKPOINT_FILE, "wb") as f:
        torch.save({"epoch": 1, "model": Planted()}, f, pickle_module=pickle)
    with pytest.raises(pickle.UnpicklingError):
        load_checkpoint(tune.Checkpoint.from_directory(str(tmp_path / "ckpt")), torch.device("cpu"))
    assert not marker.exists()


@pytest.mark.slow
def test_train_metrics_are_measured_as_validation_is(tmp_path, tiny_spec):
    # train_acc/train_loss: eval mode, the epoch's final weights, a fixed sample of training images (as many as
    # validation has); *_running: the averages over the epoch's mini-batches. Recomputed here from the last
    # checkpoint's weights, they must agree exactly.
    tiny_spec.update(arms={"sgd": {"optimizer": "sgd", "lr": 0.1}}, train={"epochs": 2})
    tiny_spec["data"]["train_subset"] = 1000  # more training images than the 400 of validation: a real sample
    done = run_cli("run", str(write_spec(tmp_path, tiny_spec)), "--storage", str(tmp_path), "--no-dashboard")
    assert done.returncode == 0, done.stderr[-3000:]
    [(name, rows)] = trial_results(tmp_path / "tiny").items()
    last = rows[-1]
    assert last["gen_gap"] == pytest.approx(last["train_acc"] - last["val_acc"])
    assert last["train_acc"] != last["train_acc_running"]

    data = load_dataset("mnist5k", train_subset=1000)
    model = create_model("mlp", in_channels=1, num_classes=10, image_size=28, hidden_sizes=[32])
    state = torch.load(tmp_path / "tiny" / name / last["checkpoint_dir_name"] / CHECKPOINT_FILE, weights_only=True)
    model.load_state_dict(state["model"])
    x, y = train_sample(data.train_x, data.train_y, len(data.val_y), seed=0)
    assert len(y) == 400
    fit = evaluate(model, Loader(x, y, batch_size=1024, device="cpu", mean=data.mean, std=data.std),
                   create_loss("cross_entropy"), 10, autocast=nullcontext)
    assert fit["acc"] == pytest.approx(last["train_acc"]) and fit["loss"] == pytest.approx(last["train_loss"])


def test_a_fixed_training_sample_is_the_same_every_time():
    x, y = np.arange(100)[:, None], np.arange(100)
    a, b = train_sample(x, y, 10, seed=0), train_sample(x, y, 10, seed=0)
    assert np.array_equal(a[1], b[1]) and len(set(a[1].tolist())) == 10
    assert train_sample(x, y, 500, seed=0)[1] is y  # asking for more than there are: all of them


def test_each_report_times_its_evaluation_apart_from_the_epochs_training(tiny_spec):
    # epoch_time_s is training alone (samples_per_s divides by it); the evaluation a report runs is eval_time_s,
    # so analysis counts training and evaluation without Ray's clock, which charges a worker's start-up to its
    # first trial.
    settings = trial_settings(tiny_spec, {"train.epochs": 2})
    trial = Trial(settings, load_dataset("mnist5k", train_subset=400), torch.device("cpu"), loaded_subset=400,
                  trial_id="t1")
    reports = [trial.end_epoch(*trial.train_epoch(), 1.0, trial.lr).metrics for _ in range(2)]
    assert [r["epoch_time_s"] for r in reports] == [1.0, 1.0]
    assert all(0 < r["eval_time_s"] < 30 for r in reports) and "eval_time_s" in EPOCH_METRICS


@pytest.mark.slow
def test_a_compiled_trial_trains_as_it_would_uncompiled_and_its_checkpoint_resumes_uncompiled(tiny_spec):
    # train.compile trains and evaluates through torch.compile's twin of the model (on CUDA, CUDA graphs): the same
    # weights, so the same numbers up to float sums in another order, and a checkpoint an uncompiled trial can take.
    data = load_dataset("mnist5k", train_subset=400)
    reports, trials, buffer = {}, {}, io.BytesIO()
    for compiled in (False, True):
        settings = trial_settings(tiny_spec, {"train.epochs": 2, "train.compile": compiled})
        trial = trials[compiled] = Trial(settings, data, torch.device("cpu"), loaded_subset=400, trial_id="t1")
        reports[compiled] = [trial.end_epoch(*trial.train_epoch(), 1.0, trial.lr)]
        if compiled:
            reports[True][0].save(buffer)  # a checkpoint is written as its report is made
        reports[compiled].append(trial.end_epoch(*trial.train_epoch(), 1.0, trial.lr))
    assert trials[True].net is not trials[True].model and trials[False].net is trials[False].model
    for eager, compiled in zip(reports[False], reports[True]):
        assert compiled.metrics.keys() == eager.metrics.keys()
        for key in ("train_loss_running", "train_loss", "val_loss", "val_acc", "weight_l2", "test_loss", "test_acc"):
            if key in eager.metrics:  # the test split at the last epoch
                assert compiled.metrics[key] == pytest.approx(eager.metrics[key], rel=1e-4), key
    assert "test_loss" in reports[True][-1].metrics
    state = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
    resumed = Trial(trial_settings(tiny_spec, {"train.epochs": 2}), data, torch.device("cpu"), loaded_subset=400,
                    trial_id="t1", state=state)
    assert resumed.epoch == 1
    again = resumed.end_epoch(*resumed.train_epoch(), 1.0, resumed.lr).metrics
    assert again["val_loss"] == pytest.approx(reports[False][1].metrics["val_loss"], rel=1e-4)
