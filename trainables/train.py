"""The trainable: one function of a trial's config that trains and reports to Tune as it goes.

Contract (the same for every model and dataset):
- `config` is what Tune's searcher made: `{"arm": {"name": ..., <dotted setting>: value}, <dotted setting>: value}`;
- `base` is the spec's four settings sections, `dataset` the decoded dataset (both arrive once
  through the object store via `tune.with_parameters`);
- every `train.report_every` epochs (and at the last) it reports EPOCH_METRICS, with a checkpoint
  every `train.checkpoint_every` epochs; the last epoch adds `test_loss, test_acc` (when a test
  split exists), `confusion_matrix` and `classes`, and each class's `class_precision`,
  `class_recall`, `class_f1` and `class_support` (validation split);
- `train_*` and `val_*` are measured the same way (eval mode, the epoch's final weights; training on a
  fixed sample of training images), so `gen_gap` compares like with like; `train_*_running` are the
  averages over the epoch's mini-batches, as a training loop prints them;
- a non-finite training loss ends the trial with `diverged: True`: a result, not an error. It is
  evaluated like a finished trial (test split included), outputs that are not finite counting as wrong;
- `epoch_time_s` is the epoch's training alone (what `samples_per_s` divides by), `eval_time_s` the evaluation of
  this report (validation, the training sample, and at the last epoch the test split): together, the compute a
  trial spent, without the start-up of the process it ran in (which Ray's `time_total_s` charges to a worker's
  first trial).
"""

from __future__ import annotations

import functools
import logging
import os
import random
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any, NamedTuple

import numpy as np
import ray
import torch
from ray import tune

from trainables.data import Dataset, Loader, stratified_split
from trainables.metrics import (
    accuracy,
    confusion_matrix,
    expected_calibration_error,
    per_class_scores,
    predictions,
    weight_l2,
)
from trainables.models import create_model
from trainables.optim import add_l2_penalty_grad, create_loss, create_optimizer, create_schedule
from trainables.reporting import CHECKPOINT_FILE, current_trial_id, report
from trainables.settings import device_type, resolve_settings

# What every report holds: the only metrics a searcher or a scheduler can compare trials by.
EPOCH_METRICS = ("epoch", "train_loss", "train_acc", "train_loss_running", "train_acc_running", "val_loss",
                 "val_acc", "gen_gap", "weight_l2", "ece", "lr", "epoch_time_s", "eval_time_s", "samples_per_s")
FINAL_METRICS = ("test_loss", "test_acc")  # reported once, with the last epoch, where a test split exists


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def assigned_gpus() -> list | None:
    """The GPUs Ray gave this trial; None outside Ray (unit tests, benchmarks), where any visible GPU counts."""
    return ray.get_gpu_ids() if ray.is_initialized() else None


def pick_device(choice: str, gpu_ids: list | None, cuda_available: bool) -> torch.device:
    """The GPU Ray assigned this trial (cuda:0: Ray narrows CUDA_VISIBLE_DEVICES to it), else the CPU; see
    `trainables.settings.device_type`."""
    return torch.device(device_type(choice, gpu_ids, cuda_available))


def set_threads() -> None:
    """One torch thread per CPU Ray gave this trial, so trials sharing a node do not oversubscribe it."""
    # Checked first: get_runtime_context() outside Ray would start a whole local Ray instance.
    if not ray.is_initialized():  # outside Ray (unit tests, benchmarks): keep torch's default
        return
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
    if cpus is not None:  # None on a driver, which has no CPUs assigned
        torch.set_num_threads(max(1, int(cpus)))  # fractional CPUs (0.5) still get one thread


def training_split(dataset: Dataset, data: dict[str, Any], loaded_subset: int | None) -> tuple[np.ndarray, ...]:
    """The trial's training images: those loaded, or the stratified `data.train_subset` of them that its arm
    or the space asks for (validation and test stay the same for every trial)."""
    subset, loaded = data["train_subset"], len(dataset.train_y)
    if subset in (loaded_subset, loaded):  # the spec's own subset, which load_dataset already drew
        return dataset.train_x, dataset.train_y
    if subset is None or subset > loaded:
        raise ValueError(f"data.train_subset={subset}: an arm or the space can only ask for fewer than the {loaded} "
                         f"training images the sweep loaded (the data section's train_subset is {loaded_subset})")
    _, keep = stratified_split(dataset.train_y, subset, data["split_seed"], f"data.train_subset={subset}")
    return dataset.train_x[keep], dataset.train_y[keep]


def train_epoch(model: torch.nn.Module, batches, optimizer: torch.optim.Optimizer, loss_fn, *,
                scaler: torch.amp.GradScaler, autocast=nullcontext, l2_penalty: float = 0.0) -> tuple[float, float, int]:
    """One pass over `batches` of (inputs, labels); returns (mean training loss, accuracy, images seen)."""
    model.train()
    device = next(model.parameters()).device
    loss_sum = torch.zeros((), device=device)  # summed on the device: no host sync per batch
    correct = torch.zeros((), device=device)
    seen = 0
    for x, y in batches:
        with autocast():
            logits = model(x)
            loss = loss_fn(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if l2_penalty:
            scaler.unscale_(optimizer)  # under fp16 the penalty is added to true, not loss-scaled, gradients
            add_l2_penalty_grad(model.parameters(), l2_penalty)
        scaler.step(optimizer)
        scaler.update()
        loss_sum += loss.detach() * len(y)
        correct += (logits.argmax(dim=1) == y).sum()
        seen += len(y)
    return (loss_sum / seen).item(), (correct / seen).item(), seen


def load_checkpoint(checkpoint: tune.Checkpoint | None, device: torch.device) -> dict[str, Any] | None:
    """The state a retried or resumed trial continues from; None trains from epoch 1: there is no
    checkpoint yet, or its file was deleted because `sweep resume` found it corrupted."""
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as folder:
        path = os.path.join(folder, CHECKPOINT_FILE)
        if not os.path.exists(path):
            print(f"[sweep] {checkpoint.path} holds no {CHECKPOINT_FILE}: training this trial again from epoch 1",
                  file=sys.stderr)
            return None
        # weights_only: tensors and plain containers only, so whoever can write to the shared storage
        # cannot make a trial run code by planting a pickle there.
        return torch.load(path, map_location=device, weights_only=True)


def checkpoint_state(epoch: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, schedule,
                     scaler: torch.amp.GradScaler, loader: Loader, *, trial_id: str | None = None,
                     metrics: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything a trial needs to continue exactly: weights, optimizer, schedule, fp16 loss scale, RNGs; which
    trial wrote it (PBT hands one trial's checkpoint to another); and the metrics reported with it (see Trial)."""
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "schedule": schedule.state_dict() if schedule else None, "scaler": scaler.state_dict(),
            "loader_rng": loader.generator.get_state(), "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(loader.device) if loader.device.type == "cuda" else None,
            "epoch": epoch, "trial_id": trial_id, "metrics": metrics}


HYPERPARAMETERS = ("lr", "weight_decay", "momentum", "nesterov", "betas", "eps", "alpha")  # torch's param_group keys


def apply_hyperparameters(optimizer: torch.optim.Optimizer, optim_cfg: dict[str, Any]) -> None:
    """Put this trial's own settings into the optimizer after loading a state: `load_state_dict` brings back
    the saved param_groups' lr, weight decay, momentum, ... which after a PBT copy are another trial's."""
    for group in optimizer.param_groups:
        for key in HYPERPARAMETERS:
            if key in group and key in optim_cfg:
                group[key] = tuple(optim_cfg[key]) if key == "betas" else optim_cfg[key]


def restore_state(state: dict[str, Any], model: torch.nn.Module, optimizer: torch.optim.Optimizer, schedule,
                  scaler: torch.amp.GradScaler, loader: Loader) -> int:
    """Load `checkpoint_state`'s dict back; returns the epoch to continue from."""
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if schedule:
        schedule.load_state_dict(state["schedule"])
    if state.get("scaler"):  # an fp16 run's loss scale: without it a resumed trial skips steps to re-find it
        scaler.load_state_dict(state["scaler"])
    loader.generator.set_state(state["loader_rng"])
    torch.set_rng_state(state["torch_rng"])
    if loader.device.type == "cuda" and state.get("cuda_rng") is not None:  # dropout on the GPU draws from CUDA's
        torch.cuda.set_rng_state(state["cuda_rng"], loader.device)
    return state["epoch"] + 1


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: Loader, loss_fn, num_classes: int, autocast) -> dict[str, Any]:
    """Loss, accuracy, ECE and confusion matrix over a whole split, in large batches."""
    model.eval()
    logits = []
    labels = []
    for x, y in loader:
        with autocast():
            # a copy: a model compiled to CUDA graphs (train.compile) writes every batch's logits to one buffer
            logits.append(model(x).float().clone())
        labels.append(y)
    return scores(torch.cat(logits), torch.cat(labels), loss_fn, num_classes)


def scores(logits: torch.Tensor, labels: torch.Tensor, loss_fn, num_classes: int) -> dict[str, Any]:
    """`evaluate`'s measures of a split's logits (a pack evaluates its members together, then scores each)."""
    preds = predictions(logits)
    return {
        "loss": loss_fn(logits, labels).item(),
        "acc": accuracy(logits, labels),
        "ece": expected_calibration_error(logits.softmax(dim=1), labels),
        "confusion": confusion_matrix(preds[preds >= 0], labels[preds >= 0], num_classes),
    }


def train_sample(x: np.ndarray, y: np.ndarray, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A fixed sample of `size` training images (the same every epoch) to measure train_* as val_* is measured."""
    if size >= len(y):
        return x, y
    keep = np.sort(np.random.default_rng(seed).choice(len(y), size, replace=False))
    return x[keep], y[keep]


class Report(NamedTuple):
    """What a trial sends to Tune after an epoch: its metrics, a checkpoint writer (None: no checkpoint), and
    whether this was its last report."""
    metrics: dict[str, Any]
    save: Callable[[str], None] | None
    done: bool


class Trial:
    """One trial's model, optimizer, data and epoch bookkeeping, built from its resolved settings (and continued
    from a checkpoint's state). `train_trial` trains it alone; a pack worker (`trainables.member`) trains
    several at once and gives each its own share of the epoch; both then call `end_epoch`."""

    def __init__(self, settings: dict[str, dict[str, Any]], dataset: Dataset, device: torch.device, *,
                 loaded_subset: int | None, trial_id: str | None, state: dict[str, Any] | None = None):
        data, model_cfg, optim_cfg, train_cfg = (settings[k] for k in ("data", "model", "optim", "train"))
        self.data, self.optim_cfg, self.train_cfg, self.trial_id = data, optim_cfg, train_cfg, trial_id
        seed_everything(train_cfg["seed"])
        # On a CPU, Adam's moments of weights whose gradient stays zero decay into subnormal floats after ~700
        # steps, and every op on them gets slower (an MLP's epoch 1.5x, a pack's 2.5x, here). Zero is as good.
        torch.set_flush_denormal(True)
        on_cuda = device.type == "cuda"
        torch.backends.cudnn.benchmark = on_cuda and train_cfg["cudnn_benchmark"]
        amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(train_cfg["amp"])
        self.autocast = (lambda: torch.autocast("cuda", dtype=amp_dtype)) if on_cuda and amp_dtype else nullcontext
        channels_last = on_cuda and train_cfg["channels_last"]

        image_size = data["resize"] or dataset.train_x.shape[-1]
        self.model = create_model(model_cfg["name"], in_channels=dataset.train_x.shape[1],
                                  num_classes=dataset.num_classes, image_size=image_size,
                                  **{k: v for k, v in model_cfg.items() if k != "name"})
        self.model = self.model.to(device, memory_format=torch.channels_last if channels_last else torch.preserve_format)
        # What trains and evaluates: the model, or (train.compile) its compiled twin, which shares its weights. On
        # CUDA "reduce-overhead" replays each step's kernels as one CUDA graph: a small model's step is launch-bound.
        # Each trial compiles afresh: a reused worker then holds no earlier trial's graphs, and torch's limit of 8
        # recompilations per function never quietly turns compiling off (Inductor's disk cache keeps it short).
        self.net = self.model
        if train_cfg["compile"]:
            torch.compiler.reset()
            self.net = torch.compile(self.model, mode="reduce-overhead" if on_cuda else "default")
        self.optimizer = create_optimizer(self.model.parameters(), **optim_cfg)
        self.schedule = create_schedule(self.optimizer, schedule=optim_cfg["schedule"],
                                        milestones=optim_cfg["milestones"], gamma=optim_cfg["gamma"],
                                        step_size=optim_cfg["step_size"], epochs=train_cfg["epochs"])
        self.loss_fn = create_loss(train_cfg["loss"])
        self.scaler = torch.amp.GradScaler("cuda", enabled=on_cuda and amp_dtype is torch.float16)

        common = dict(device=device, mean=dataset.mean, std=dataset.std, resize=data["resize"],
                      channels_last=channels_last)
        train_x, train_y = training_split(dataset, data, loaded_subset)
        self.train_loader = Loader(train_x, train_y, batch_size=data["batch_size"], shuffle=True,
                                   seed=train_cfg["seed"], augment=data["augment"], **common)
        self.val_loader = Loader(dataset.val_x, dataset.val_y, batch_size=data["eval_batch_size"], **common)
        # As many training images as validation ones, so train_acc and val_acc are equally noisy in gen_gap.
        self.fit_loader = Loader(*train_sample(train_x, train_y, len(dataset.val_y), data["split_seed"]),
                                 batch_size=data["eval_batch_size"], **common)
        self.test_loader = (Loader(dataset.test_x, dataset.test_y, batch_size=data["eval_batch_size"], **common)
                            if dataset.test_x is not None else None)
        self.num_classes, self.classes = dataset.num_classes, list(dataset.classes)

        self.epoch, self.diverged, self.copied = 0, False, {}  # epochs trained so far
        if state:  # a retried or resumed trial continues where its last checkpoint left it; under PBT, another's
            self.epoch = restore_state(state, self.model, self.optimizer, self.schedule, self.scaler,
                                       self.train_loader) - 1
            if state.get("trial_id") not in (None, trial_id):  # PBT: another trial's state, this trial's settings
                apply_hyperparameters(self.optimizer, optim_cfg)
                self.copied = {"copied_from": state["trial_id"], "copied_epoch": state["epoch"]}  # said at next report
        # Restored from its own last checkpoint: the trial had finished, but the driver died before Tune recorded
        # that (on object storage a checkpoint lands before Tune's state and result.json do). Its last report,
        # said again, gives it its final row; without it the trial would end with none.
        self.last_report = state.get("metrics") if state and self.finished and not self.copied else None

    @property
    def finished(self) -> bool:
        return self.diverged or self.epoch >= self.train_cfg["epochs"]

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def train_epoch(self) -> tuple[float, float, int]:
        """One epoch of this trial alone: (mean training loss, accuracy, images seen)."""
        return train_epoch(self.net, self.train_loader, self.optimizer, self.loss_fn, scaler=self.scaler,
                           autocast=self.autocast, l2_penalty=self.optim_cfg["l2_penalty"])

    def reports_after(self, running_loss: float) -> tuple[bool, bool]:
        """For the epoch just trained, with this mean training loss, before `end_epoch` books it: (whether it ends
        in a report, whether it is the trial's last)."""
        epoch = self.epoch + 1
        last = not np.isfinite(running_loss) or epoch >= self.train_cfg["epochs"]
        return last or epoch % self.train_cfg["report_every"] == 0, last

    def loader(self, split: str) -> Loader | None:
        """The loader of a split: "val", "fit" (the training sample) or "test" (None without a test split)."""
        return {"val": self.val_loader, "fit": self.fit_loader, "test": self.test_loader}[split]

    def evaluate(self, split: str) -> dict[str, Any]:
        """`evaluate` of this trial's model on a split (see `loader`)."""
        return evaluate(self.net, self.loader(split), self.loss_fn, self.num_classes, self.autocast)

    def end_epoch(self, running_loss: float, running_acc: float, seen: int, epoch_time: float, lr: float,
                  evaluated: dict[str, dict[str, Any]] | None = None, eval_time: float = 0.0) -> Report | None:
        """Book an epoch just trained (at learning rate `lr`, taking `epoch_time` s): step the schedule, and on a
        report epoch measure it (`evaluated`: the splits' `scores` where a pack measured its members together, in
        `eval_time` s). Returns what to report, or None between reports."""
        report, last = self.reports_after(running_loss)
        self.epoch += 1
        epoch = self.epoch
        if self.schedule:
            self.schedule.step()
        self.diverged = not np.isfinite(running_loss)
        if not report:
            return None  # an epoch between reports: no validation, nothing sent to Tune
        started = time.perf_counter()
        evaluated = evaluated or {}
        val = evaluated.get("val") or self.evaluate("val")
        fit = evaluated.get("fit") or self.evaluate("fit")  # as val is
        metrics = {
            "epoch": epoch,
            "train_loss": fit["loss"],
            "train_acc": fit["acc"],
            "train_loss_running": running_loss,
            "train_acc_running": running_acc,
            "val_loss": val["loss"],
            "val_acc": val["acc"],
            "gen_gap": fit["acc"] - val["acc"],
            "weight_l2": weight_l2(self.model),
            "ece": val["ece"],
            "lr": lr,
            "epoch_time_s": epoch_time,
            "samples_per_s": seen / epoch_time,
            "diverged": self.diverged,
            **self.copied,
        }
        self.copied = {}
        if last:
            metrics["confusion_matrix"] = val["confusion"].tolist()
            metrics["classes"] = self.classes
            metrics.update({f"class_{k}": v for k, v in per_class_scores(val["confusion"]).items()})
            if self.test_loader is not None:  # a diverged trial too: its test score is a result
                test = evaluated.get("test") or self.evaluate("test")
                metrics["test_loss"], metrics["test_acc"] = test["loss"], test["acc"]
        metrics["eval_time_s"] = eval_time + time.perf_counter() - started
        save = None
        if not self.diverged and (last or epoch % self.train_cfg["checkpoint_every"] == 0):
            state = checkpoint_state(epoch, self.model, self.optimizer, self.schedule, self.scaler, self.train_loader,
                                     trial_id=self.trial_id, metrics=metrics)
            save = functools.partial(torch.save, state)
        return Report(metrics, save, last)


def train_trial(config: dict[str, Any], *, base: dict[str, dict[str, Any]], dataset: Dataset) -> None:
    """Ray Tune function trainable. See the module docstring for the contract."""
    settings = resolve_settings(base, config)
    logging.getLogger("ray.train").setLevel(logging.WARNING)  # not a "Checkpoint successfully created" per epoch
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # train.compile on a CPU: "No CUDA runtime"
    set_threads()
    device = pick_device(settings["train"]["device"], assigned_gpus(), torch.cuda.is_available())
    trial = Trial(settings, dataset, device, loaded_subset=base["data"]["train_subset"],
                  trial_id=current_trial_id(), state=load_checkpoint(tune.get_checkpoint(), device))
    if trial.last_report:
        report(trial.last_report, None, config["arm"]["name"])
    while not trial.finished:
        t0, lr = time.perf_counter(), trial.lr
        running_loss, running_acc, seen = trial.train_epoch()
        result = trial.end_epoch(running_loss, running_acc, seen, time.perf_counter() - t0, lr)
        if result:
            report(result.metrics, result.save, config["arm"]["name"])
