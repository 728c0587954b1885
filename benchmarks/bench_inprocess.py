"""Packed against unpacked training in one process, without Ray: member-epochs per second.

For each model and pack size K: K trials of one model whose learning rates spread over a decade (each its own
seed), on the embedded mnist5k (3,600 training images), one epoch each with its evaluation and checkpoint bytes,
as a trial or a pack worker runs them:
- unpacked: `Trial.train_epoch`, `end_epoch` and the checkpoint's bytes, one trial after another;
- packed: `trainables.packed.train_round`, the K trials as one model.
One epoch of each warms up (not timed); the rate is member-epochs per second over --epochs timed epochs, and the
ratio is packed over unpacked at the same K. Both run on the same device (a GPU when there is one), in this process,
with torch's default threads.

    python benchmarks/bench_inprocess.py [--models mlp,mlp_adam,mlp_big,lenet,lenet_bf16,alexnet_b4] [--packs 8,32]
    python benchmarks/bench_inprocess.py --alexnet224   # AlexNet at 224 px, batch 64: training images/s by precision

`--alexnet224` times torchvision's AlexNet on mnist5k resized to 224 px, batch 64, one epoch per variant after a
warm-up (fp32, bf16, bf16 + channels_last, fp16 + channels_last): the precision table of issue 25 (a GPU's).
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import time

import torch

from sweeps.spec import validate_spec
from trainables.data import load_dataset
from trainables.packed import train_round
from trainables.settings import apply_settings
from trainables.train import Trial

# name -> (model, optimizer and its base lr, data settings, train settings)
SETUPS = {
    "mlp": ({"name": "mlp", "hidden_sizes": [256, 128]}, {"optimizer": "sgd", "momentum": 0.9, "lr": 0.01}, {}, {}),
    "mlp_adam": ({"name": "mlp", "hidden_sizes": [256, 128]}, {"optimizer": "adam", "lr": 1e-4}, {}, {}),
    "mlp_big": ({"name": "mlp", "hidden_sizes": [500, 250, 100]}, {"optimizer": "sgd", "momentum": 0.9, "lr": 0.01},
                {}, {}),
    "lenet": ({"name": "lenet_cifar"}, {"optimizer": "sgd", "momentum": 0.9, "lr": 0.01}, {}, {}),
    "lenet_bf16": ({"name": "lenet_cifar"}, {"optimizer": "sgd", "momentum": 0.9, "lr": 0.01}, {}, {"amp": "bf16"}),
    "alexnet_b4": ({"name": "alexnet_cifar"}, {"optimizer": "sgd", "momentum": 0.9, "lr": 0.001},  # seed 001's batch
                   {"batch_size": 4, "resize": 32, "train_subset": 400}, {}),
}


def trials(name: str, k: int, data, device: torch.device, **train) -> list[Trial]:
    model, optim, data_settings, train_settings = SETUPS[name]
    spec = validate_spec({"name": "bench", "data": {"name": "mnist5k", "batch_size": 64, **data_settings},
                          "model": model, "optim": optim, "train": {"epochs": 100, **train_settings, **train},
                          "arms": {"a": {}}}, "bench")
    base = spec.base_settings()
    return [Trial(apply_settings(base, {"optim.lr": optim["lr"] * 10 ** (i / max(1, k - 1)), "train.seed": i}), data,
                  device, loaded_subset=None, trial_id=f"t{i}") for i in range(k)]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def unpacked_epoch(members: list[Trial]) -> None:
    for trial in members:
        lr, start = trial.lr, time.perf_counter()
        stats = trial.train_epoch()
        report = trial.end_epoch(*stats, time.perf_counter() - start, lr)
        if report is not None and report.save is not None:
            report.save(io.BytesIO())


def rate(name: str, k: int, packed: bool, data, device: torch.device, epochs: int) -> float:
    members = trials(name, k, data, device)
    run = (lambda: train_round({t.trial_id: t for t in members})) if packed else (lambda: unpacked_epoch(members))
    run()  # warm-up: first calls, allocations, cuDNN's choices
    sync(device)
    start = time.perf_counter()
    for _ in range(epochs):
        run()
    sync(device)
    return k * epochs / (time.perf_counter() - start)


def alexnet224(data, device: torch.device, images: int) -> None:
    print(f"{'AlexNet 224 px, batch 64':<32} {'images/s':>9}")
    for label, train in (("fp32", {}), ("bf16", {"amp": "bf16"}), ("bf16 + channels_last", {"amp": "bf16",
                         "channels_last": True}), ("fp16 + channels_last", {"amp": "fp16", "channels_last": True})):
        spec = validate_spec({"name": "bench", "data": {"name": "mnist5k", "batch_size": 64, "resize": 224,
                                                        "train_subset": images},
                              "model": {"name": "alexnet"}, "train": {"epochs": 10, **train}, "arms": {"a": {}}},
                             "bench")
        try:
            trial = Trial(spec.base_settings(), data, device, loaded_subset=None, trial_id="a")
        except ImportError as err:  # torchvision's model
            print(f"# no AlexNet-224 table: {err}")
            return
        trial.train_epoch()  # warm-up
        sync(device)
        start = time.perf_counter()
        _, _, seen = trial.train_epoch()
        sync(device)
        print(f"{label:<32} {seen / (time.perf_counter() - start):>9,.0f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="mlp,mlp_adam,mlp_big,lenet,lenet_bf16,alexnet_b4")
    parser.add_argument("--packs", default="8,32", help="comma-separated pack sizes K")
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs per row, after one warm-up epoch")
    parser.add_argument("--alexnet224", action="store_true", help="the AlexNet-224 precision table instead")
    parser.add_argument("--alexnet-images", type=int, default=2000, help="training images per AlexNet-224 epoch")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else f"{platform.machine()}, {os.cpu_count()} cores"
    print(f"# {name}, torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    data = load_dataset("mnist5k")
    if args.alexnet224:
        alexnet224(data, device, args.alexnet_images)
        return
    print(f"{'model':<12} {'K':>4} {'unpacked':>10} {'packed':>10} {'ratio':>7}   (member-epochs/s)")
    for model in args.models.split(","):
        for k in map(int, args.packs.split(",")):
            alone, together = (rate(model, k, packed, data, device, args.epochs) for packed in (False, True))
            print(f"{model:<12} {k:>4} {alone:>10.1f} {together:>10.1f} {together / alone:>6.2f}x", flush=True)


if __name__ == "__main__":
    main()
