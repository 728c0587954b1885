"""Checkpoint overhead: what a checkpoint every epoch (`train.checkpoint_every: 1`, the default) costs
against one at the last epoch only, for the MLP and the CNN, through real Tune trials on a local Ray
instance; prints one table.

An epoch's wall time (Tune's `time_this_iter_s`) is the training loop (`epoch_time_s`) plus the rest:
evaluation, the report and, when it checkpoints, the checkpoint. The checkpoint's cost is the difference
of the rest between the two settings; comparing the rest rather than whole epochs keeps the noise of
the training loop (other work on the machine) out of it. Medians over the middle epochs (the first warms
up, the last checkpoints in both settings and adds the test split) and over --repeats alternating runs.
The checkpoint holds the model, the optimizer (SGD with momentum: one buffer per weight), the LR
schedule and the RNG states; Tune copies it from the trial's temporary folder into the results directory
and, with `run.checkpoint_keep: 1`, deletes the one before.

    python benchmarks/bench_checkpoint.py [--epochs 5] [--repeats 2] [--cnn-images 640]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import ray

from sweeps.runner import build_tuner, prepare_data, start_ray
from sweeps.spec import validate_spec
from trainables.train import CHECKPOINT_FILE

MODELS = {  # label -> (model section, data section)
    "mlp 784-500-250-100-10": ({"name": "mlp"}, {"name": "mnist5k"}),
    "overparam_cnn (60M parameters)": ({"name": "overparam_cnn"}, {"name": "mnist5k"}),
}


def epoch_seconds(model: dict, data: dict, *, every: int, epochs: int, storage: Path) -> tuple[float, float, float]:
    """(median epoch wall time s, median of its part outside the training loop s, checkpoint MB) of one trial."""
    spec = validate_spec({"name": f"bench-{model['name']}-every{every}", "model": model, "data": data,
                          "optim": {"optimizer": "sgd", "lr": 0.01, "momentum": 0.9},
                          "train": {"epochs": epochs, "checkpoint_every": every}}, "bench")
    result = build_tuner(spec, prepare_data(spec), storage=str(storage)).fit()[0]
    middle = result.metrics_dataframe.iloc[1:-1]
    size = (Path(result.checkpoint.path) / CHECKPOINT_FILE).stat().st_size / 2**20
    rest = middle["time_this_iter_s"] - middle["epoch_time_s"]
    return statistics.median(middle["time_this_iter_s"]), statistics.median(rest), size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--cnn-images", type=int, default=640, help="training images per CNN epoch (~1 GFLOP each)")
    args = parser.parse_args()
    start_ray(None, dashboard=False)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-checkpoint-") as storage:  # the CNN's checkpoints take GBs
        for label, (model, data) in MODELS.items():
            if model["name"] == "overparam_cnn":
                data = {**data, "train_subset": args.cnn_images}
            wall, rest = {1: [], args.epochs: []}, {1: [], args.epochs: []}
            for repeat in range(args.repeats):
                for every in wall:
                    seconds, outside, size = epoch_seconds(model, data, every=every, epochs=args.epochs,
                                                           storage=Path(storage, f"r{repeat}"))
                    wall[every].append(seconds)
                    rest[every].append(outside)
            epoch = statistics.median(wall[args.epochs])
            checkpoint = statistics.median(rest[1]) - statistics.median(rest[args.epochs])
            rows.append((label, f"{size:.1f}", f"{epoch:.3f}", f"{checkpoint:.3f}", f"{checkpoint / epoch:+.1%}"))
    ray.shutdown()
    header = ("model", "checkpoint MB", "s/epoch without", "s per checkpoint", "overhead per epoch")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)))


if __name__ == "__main__":
    main()
