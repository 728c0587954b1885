"""Packed trials against unpacked ones: the same sweep with `resources.pack` K = 1 (off), 2, 4, 8, 16, each a
real `sweep run` in its own process (Ray start included), all in this invocation on this machine; prints one
table. Ratios against the unpacked sweep are the claims; absolute times depend on the machine.

The sweep: --trials trials of an MLP (--model, default the quickstart's 784-256-128-10) on the embedded mnist5k
(3,600 training images, batch 64), --epochs epochs each, FIFO, 1 CPU per trial, a report and a checkpoint every
epoch (the defaults). Columns:
- wall: `sweep run` from start to exit, the number a user waits for (wall ratio: pack 1's over this one's);
- start: until the first epoch was reported (Ray, the trial actors, the data; each actor a pack adds costs about
  a second of CPU on a small machine);
- train: from the first epoch reported to the last, watched from here every 0.1 s;
- epochs/s: trial-epochs per second of `train`; ratio: against pack 1.

    python benchmarks/bench_pack.py [--packs 1,2,4,8,16] [--trials 16] [--epochs 20] [--model 256,128]
    python benchmarks/bench_pack.py --device cuda --gpu 1 --packs 1,8,32,64   # on a GPU node (gpu_check.sh)
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

REPO = Path(__file__).resolve().parents[1]


def sweep_spec(pack: int, args) -> dict:
    lrs = [round(10 ** (-3 + 2 * i / max(1, args.trials // 2 - 1)), 6) for i in range(args.trials // 2)]
    return {
        "name": f"pack{pack}",
        "data": {"name": "mnist5k", "batch_size": args.batch_size},
        "model": {"name": "mlp", "hidden_sizes": args.model},
        "train": {"epochs": args.epochs, "device": args.device, "amp": args.amp},
        "arms": {"sgd": {"optimizer": "sgd", "momentum": 0.9, "lr": {"grid": [x * 10 for x in lrs]}},
                 "adam": {"optimizer": "adam", "lr": {"grid": lrs}}},
        "search": {"algorithm": "grid"},
        "resources": {"cpu": args.cpu, "gpu": args.gpu if args.device == "cuda" else 0, "pack": pack},
    }


def reported(results: Path) -> list[dict]:
    rows = []
    for result in results.glob("*/result.json"):
        for line in result.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:  # a line still being written
                pass
    return rows


def run(pack: int, args, folder: Path) -> dict:
    """One `sweep run`, watched from here: its wall time, and when its first and last epochs were reported."""
    spec = folder / f"pack{pack}.yaml"
    spec.write_text(yaml.safe_dump(sweep_spec(pack, args), sort_keys=False))
    start = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "sweeps.cli", "run", str(spec), "--storage", str(folder),
                                "--no-dashboard"], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True)
    first = last = None
    total = args.trials * args.epochs
    while process.poll() is None:
        count = len(reported(folder / f"pack{pack}"))
        now = time.perf_counter()
        if count and first is None:
            first = now
        if count >= total and last is None:
            last = now
        time.sleep(0.1)
    wall = time.perf_counter() - start
    if process.returncode:
        sys.exit(f"pack {pack}: sweep run failed\n{process.stderr.read()[-3000:]}")
    rows = reported(folder / f"pack{pack}")
    train = (last or wall + start) - first
    return {"pack": pack, "wall_s": wall, "start_s": first - start, "train_s": train,
            "epochs_per_s": (len(rows) - 1) / train,
            "best_val_acc": max(r["val_acc"] for r in rows if r["epoch"] == args.epochs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--packs", default="1,2,4,8,16")
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--model", default="256,128", help="the MLP's hidden sizes")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--amp", default="none", choices=["none", "bf16"])
    parser.add_argument("--cpu", type=float, default=1.0, help="resources.cpu per trial (a pack's share)")
    parser.add_argument("--gpu", type=float, default=1.0, help="resources.gpu per trial with --device cuda")
    args = parser.parse_args()
    args.model = [int(x) for x in args.model.split(",")]
    packs = [int(k) for k in args.packs.split(",")]
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}")
    print(f"# {args.trials} trials x {args.epochs} epochs, MLP {args.model}, mnist5k, batch {args.batch_size}, "
          f"device {args.device}, {args.cpu:g} CPU per trial")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for pack in packs:
            results.append(run(pack, args, Path(tmp)))
            print(f"# pack {pack}: {results[-1]['wall_s']:.1f} s", flush=True)
    base = next((r for r in results if r["pack"] == 1), results[0])
    print(f"{'pack':>5} {'wall s':>8} {'start s':>8} {'train s':>8} {'epochs/s':>9} {'ratio':>6} {'wall ratio':>10} "
          f"{'best val_acc':>12}")
    for r in results:
        print(f"{r['pack']:>5} {r['wall_s']:>8.1f} {r['start_s']:>8.1f} {r['train_s']:>8.1f} {r['epochs_per_s']:>9.2f} "
              f"{r['epochs_per_s'] / base['epochs_per_s']:>5.2f}x {base['wall_s'] / r['wall_s']:>9.2f}x "
              f"{r['best_val_acc']:>12.4f}")


if __name__ == "__main__":
    main()
