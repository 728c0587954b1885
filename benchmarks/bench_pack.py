"""Packed trials against unpacked ones: the same sweep under several settings (by default `resources.pack` K = 1,
i.e. off, then 2, 4, 8, 16), each a real `sweep run` in its own process (Ray start included), all in this
invocation on this machine; prints one table. Ratios against the first variant are the claims; absolute times
depend on the machine.

The sweep: --trials trials (half SGD with momentum, half Adam, learning rates spread over two decades) of a model
(--nets: `mlp` is the quickstart's 784-256-128-10, `cnn` is lenet_cifar's two convolutions and three linear
layers) on the embedded mnist5k (3,600 training images, batch 64), --epochs epochs each, FIFO, a report and a
checkpoint every epoch (the defaults). A variant sets `pack`, `cpu` and `gpu` (per trial: a pack's members ask
for 1/K each), `amp` (none, bf16, fp16), `channels_last` and `compile` (true/false). Columns:
- wall: `sweep run` from start to exit, the number a user waits for (wall ratio: the first variant's over this);
- start: until the first epoch was reported (Ray, the trial actors, the data);
- train: from the first epoch reported until all trials were done (both from the sweep's timeline.json);
- epochs/s: trial-epochs per second of `train`; ratio: against the first variant of the same net.

Trials without a GPU pack here although `sweep run` would not pack them (sweeps.schema.PACK_ON_CPU): measuring that
is why it does not.

    python benchmarks/bench_pack.py [--variants "pack=1;pack=4"] [--trials 16] [--epochs 20] [--nets mlp,cnn]
    benchmarks/gpu_check.sh     # the GPU variants, on a GPU node
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from sweeps.schema import PACK_ON_CPU

REPO = Path(__file__).resolve().parents[1]
MODELS = {"mlp": {"name": "mlp", "hidden_sizes": [256, 128]}, "cnn": {"name": "lenet_cifar"}}
DEFAULTS = {"pack": 1, "cpu": 1.0, "gpu": 0.0, "amp": "none", "channels_last": False, "compile": False}


def parse_variant(text: str) -> dict:
    variant = dict(DEFAULTS)
    for item in filter(None, text.split(",")):
        key, value = item.split("=")
        variant[key.strip()] = yaml.safe_load(value)
    return variant


def label(variant: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in variant.items() if v != DEFAULTS[k]) or "unpacked"


def sweep_spec(net: str, variant: dict, args) -> dict:
    lrs = [round(10 ** (-3 + 2 * i / max(1, args.trials // 2 - 1)), 6) for i in range(args.trials // 2)]
    return {
        "name": "bench",
        "data": {"name": "mnist5k", "batch_size": 64},
        "model": MODELS[net],
        "train": {"epochs": args.epochs, "amp": variant["amp"], "channels_last": variant["channels_last"],
                  "compile": variant["compile"]},
        "arms": {"sgd": {"optimizer": "sgd", "momentum": 0.9, "lr": {"grid": [x * 10 for x in lrs]}},
                 "adam": {"optimizer": "adam", "lr": {"grid": lrs}}},
        "search": {"algorithm": "grid"},
        "resources": {"cpu": variant["cpu"], "gpu": variant["gpu"], "pack": variant["pack"]},
    }


def run(net: str, variant: dict, args, folder: Path) -> dict:
    """One `sweep run`: its wall time, and from its timeline.json (seconds since the command began) when its first
    epoch was reported and when all trials were done."""
    spec = folder / "spec.yaml"
    spec.write_text(yaml.safe_dump(sweep_spec(net, variant, args), sort_keys=False))
    start = time.time()
    done = subprocess.run([sys.executable, "-m", "sweeps.cli", "run", str(spec), "--storage", str(folder),
                           "--no-dashboard"], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True, env={**os.environ, PACK_ON_CPU: "1"}, check=False)
    wall = time.time() - start
    if done.returncode:
        sys.exit(f"{net} {label(variant)}: sweep run failed\n{done.stderr[-3000:]}")
    marks = json.loads((folder / "bench" / "timeline.json").read_text())
    first, last = marks["first epoch reported"], marks["all trials done"]
    epochs = sum(len(result.read_text().splitlines()) for result in (folder / "bench").glob("*/result.json"))
    return {"net": net, "variant": label(variant), "wall_s": wall, "start_s": first, "train_s": last - first,
            "epochs_per_s": epochs / (last - first)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default="pack=1;pack=2;pack=4;pack=8;pack=16",
                        help="semicolon-separated; each a comma-separated key=value list (pack, cpu, gpu, amp, "
                             "channels_last, compile); the first is the baseline")
    parser.add_argument("--nets", default="mlp", help="comma-separated: mlp, cnn")
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=20)
    args = parser.parse_args()
    variants = [parse_variant(v) for v in args.variants.split(";")]
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()};"
          f" {args.trials} trials x {args.epochs} epochs on mnist5k, batch 64", flush=True)
    results = []
    for net in args.nets.split(","):
        for variant in variants:
            with tempfile.TemporaryDirectory() as tmp:
                results.append(run(net, variant, args, Path(tmp)))
            print(f"# {net} {results[-1]['variant']}: {results[-1]['wall_s']:.1f} s", flush=True)
    print(f"{'net':<4} {'variant':<40} {'wall s':>7} {'start s':>8} {'train s':>8} {'epochs/s':>9} {'ratio':>6} "
          f"{'wall ratio':>10}")
    for r in results:
        base = next(b for b in results if b["net"] == r["net"])
        print(f"{r['net']:<4} {r['variant']:<40} {r['wall_s']:>7.1f} {r['start_s']:>8.1f} {r['train_s']:>8.1f} "
              f"{r['epochs_per_s']:>9.2f} {r['epochs_per_s'] / base['epochs_per_s']:>5.2f}x "
              f"{base['wall_s'] / r['wall_s']:>9.2f}x")


if __name__ == "__main__":
    main()
