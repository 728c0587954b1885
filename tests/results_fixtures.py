"""Hand-built results directories laid out like `sweep run` writes them (Ray Tune's experiment
directory plus spec.yaml), for the analysis tests and benchmarks/bench_report.py.

`write_trial` writes one trial from given metric rows; `synthetic_sweep` writes a whole sweep with
realistic curves (arms, log-uniform LR, batch sizes, seeds, ASHA stops, a diverged and a failed trial).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import yaml

EXPERIMENT = "5f3a1"  # Ray's experiment-wide prefix of trial ids
CLASSES = [str(i) for i in range(10)]


def write_spec(results_dir: Path, spec: dict) -> Path:
    """Writes spec.yaml and the Ray bookkeeping files that analysis must ignore."""
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / "spec.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    (results_dir / "experiment_state-2026-11-23_18-00-00.json").write_text('{"trial_data": []}')
    (results_dir / "basic-variant-state-2026-11-23_18-00-00.json").write_text("{}")
    (results_dir / "tuner.pkl").write_bytes(b"\x80\x05N.")
    return results_dir


def write_trial(results_dir: Path, index: int, config: dict, rows: list[dict], *, done: bool = False,
                error: str | None = None, failures: int = 3, half_line: bool = False, startup_s: float = 0.0) -> Path:
    """Writes one trial directory. `rows` are the metrics of each epoch (epoch numbers are added when
    missing); Ray's own keys are added as Ray writes them. `done` marks the last row as Ray does when
    the trial ends normally or ASHA stops it; `error` writes Ray's error.txt with `failures` failures (by
    default one more than the default run.max_failures of 2: failed for good); `half_line` appends a
    half-written line; `startup_s` is what the trial waited before its first epoch, which Ray's clock
    (`time_total_s`) counts (analysis.budget.trial_startup_seconds)."""
    trial_id = f"{EXPERIMENT}_{index:05d}"
    arm = config.get("arm", {}).get("name", "default")
    seed = config.get("train.seed", 0)
    trial_dir = results_dir / f"train_{trial_id}_{index}_arm={arm},train.seed={seed}_2026-11-23_18-00-00"
    trial_dir.mkdir(parents=True)
    (trial_dir / "params.json").write_text(json.dumps(config, indent=2))
    lines, total = [], startup_s
    for i, metrics in enumerate(rows, start=1):
        total += metrics.get("epoch_time_s", 1.0) + metrics.get("eval_time_s", 0.0)  # as Ray times a report
        row = {"epoch": i, **metrics, "timestamp": 1795456800 + i, "checkpoint_dir_name": None,
               "done": done and i == len(rows), "training_iteration": i, "trial_id": trial_id,
               "date": "2026-11-23_18-00-00", "time_this_iter_s": metrics.get("epoch_time_s", 1.0),
               "time_total_s": total, "pid": 4242, "hostname": "node", "node_ip": "10.0.0.2",
               "config": config, "time_since_restore": total, "iterations_since_restore": i}
        lines.append(json.dumps(row))  # writes NaN/Infinity for non-finite numbers, as Ray does
    if half_line:
        lines.append(f'{{"epoch": {len(rows) + 1}, "val_acc": 0.5, "train_lo')
    (trial_dir / "result.json").write_text("".join(line + "\n" for line in lines))
    if error:  # as Ray's Trial.handle_error appends it, once per failure
        (trial_dir / "error.txt").write_text("".join(
            f"Failure # {k} (occurred at 2026-11-23_18-00-00)\nTraceback (most recent call last):\n{error}\n"
            for k in range(1, failures + 1)))
    return trial_dir


def spec_for(name: str = "fixture", *, epochs: int = 3, arms: dict | None = None, scheduler: dict | None = None,
             **extra) -> dict:
    """A resolved spec with the keys analysis reads."""
    return {"name": name, "description": f"{name}: hand-built results", "data": {"name": "digits"},
            "train": {"epochs": epochs}, "arms": arms or {"a": {}, "b": {}},
            "search": {"algorithm": "grid", "metric": "val_acc", "mode": "max"},
            "scheduler": scheduler or {"name": "fifo"}, **extra}


def curve_rows(final_val_acc: float, epochs: int, *, lr: float = 1e-3, rng: np.random.Generator | None = None,
               confusion: bool = True, test: bool = True) -> list[dict]:
    """Per-epoch metrics whose val_acc rises to exactly `final_val_acc` at the last epoch."""
    rng = rng or np.random.default_rng(0)
    rows = []
    for epoch in range(1, epochs + 1):
        progress = 1 - math.exp(-3 * epoch / epochs)
        val_acc = final_val_acc if epoch == epochs else final_val_acc * progress / (1 - math.exp(-3)) * 0.98
        train_acc = min(1.0, val_acc + 0.02 * progress + 0.005 * rng.random())
        rows.append({"train_loss": -math.log(max(train_acc, 1e-3)) + 0.05, "train_acc": train_acc,
                     "val_loss": -math.log(max(val_acc, 1e-3)) + 0.08, "val_acc": val_acc,
                     "gen_gap": train_acc - val_acc, "weight_l2": 10 + 2 * progress + rng.random(),
                     "ece": 0.1 * (1 - progress) + 0.01 * rng.random(),
                     "lr": lr * 0.5 * (1 + math.cos(math.pi * (epoch - 1) / epochs)),
                     "epoch_time_s": 2.0 + 0.1 * rng.random(), "samples_per_s": 1000 + 50 * rng.random()})
    if test:
        rows[-1].update(test_loss=rows[-1]["val_loss"] + 0.01, test_acc=final_val_acc - 0.005)
    if confusion:
        rows[-1].update(confusion_matrix=_confusion(final_val_acc, rng), classes=CLASSES)
    return rows


def _confusion(acc: float, rng: np.random.Generator, per_class: int = 100) -> list[list[int]]:
    # numpy gives the last slot the leftover mass (acc); rolling row i by i + 1 moves that slot to column i
    rows = rng.multinomial(per_class, [(1 - acc) / 9] * 9 + [0], size=10)
    return [np.roll(row, i + 1).tolist() for i, row in enumerate(rows)]


def synthetic_sweep(results_dir: Path, *, n_trials: int = 36, epochs: int = 10, seed: int = 0,
                    asha: bool = True) -> Path:
    """A sweep of three arms x log-uniform LR x batch size x 3 seeds with ASHA-like stops, one diverged
    and one failed trial, and the last trial still running (half-written last line)."""
    rng = np.random.default_rng(seed)
    arms = {"adam": {"optim.optimizer": "adam"}, "adamw": {"optim.optimizer": "adamw", "optim.weight_decay": 1e-4},
            "sgd": {"optim.optimizer": "sgd", "optim.momentum": 0.9}}
    scheduler = ({"name": "asha", "grace_period": 1, "reduction_factor": 3, "max_t": epochs} if asha
                 else {"name": "fifo"})
    reference = {"source": "synthetic", "rows": [{"arm": "adam", "val_acc": 0.95, "val_loss": 0.2},
                                                 {"arm": "sgd", "val_acc": 0.9}]}
    write_spec(results_dir, spec_for("synthetic", epochs=epochs, arms=arms, scheduler=scheduler,
                                     reference=reference, search={"algorithm": "random", "num_samples": n_trials,
                                                                  "metric": "val_acc", "mode": "max"}))
    n_configs = max(1, n_trials // 3)
    configs = [(name, float(10 ** rng.uniform(-4, -1)), int(rng.choice([32, 64, 128]))) for name in arms
               for _ in range(math.ceil(n_configs / len(arms)))]
    rungs = [r for r in (1, 3, 9, 27, 81) if r < epochs]
    for index in range(n_trials):
        arm, lr, batch_size = configs[(index // 3) % len(configs)]
        config = {"arm": {"name": arm, **arms[arm], "optim.lr": lr}, "data.batch_size": batch_size,
                  "train.seed": index % 3}
        quality = 0.97 - 0.04 * abs(math.log10(lr) + (3 if arm != "sgd" else 1.5)) - 0.0002 * batch_size
        final = float(np.clip(quality + 0.005 * rng.standard_normal() + {"adam": 0, "adamw": 0.004, "sgd": -0.01}[arm],
                              0.1, 0.995))
        rows = curve_rows(final, epochs, lr=lr, rng=rng)
        stop = rng.choice(rungs) if asha and rungs and quality < 0.9 and index % 4 else None
        if index == n_trials - 1 and n_trials > 1:  # still running
            write_trial(results_dir, index, config, rows[:max(1, epochs // 2)], half_line=True)
        elif index == 5:
            rows = rows[:3]
            rows[-1].update(train_loss=math.nan, val_loss=math.inf, val_acc=0.1, diverged=True)
            write_trial(results_dir, index, config, rows)
        elif index == 7:
            write_trial(results_dir, index, config, rows[:2], error="RuntimeError: CUDA error: out of memory")
        elif stop is not None:
            write_trial(results_dir, index, config, rows[:stop], done=True)
        else:
            write_trial(results_dir, index, config, rows, done=True)
    return results_dir


def report_sweep(results_dir: Path, *, smoke: bool = False) -> Path:
    """A sweep whose report has every kind of row (a configuration judged on some of its seeds, one chosen among
    several, a diverged and a repeated seed, long notes), arms ranked in another order than the spec lists them,
    and one arm (adamw) with 16 full-budget trials over two searched settings, enough for hyperparameter importance.
    Trials report `eval_time_s` as the trainable does."""
    arms = {"sgd": {"optim.optimizer": "sgd"}, "adam": {"optim.optimizer": "adam"},
            "rmsprop": {"optim.optimizer": "rmsprop"}, "adamw-with-a-long-name": {"optim.optimizer": "adamw"}}
    write_spec(results_dir, spec_for("layout", epochs=3, arms=arms, smoke=smoke,
                                     description="The full spec: 4 arms, 29 trials of 3 epochs.",
                                     search={"algorithm": "random", "metric": "val_acc", "mode": "max"}))
    rng = np.random.default_rng(3)
    runs = [("sgd", 0.1, 1e-4, seed, final) for seed, final in enumerate([0.50, 0.52, "diverged", 0.51])]
    runs[-1] = ("sgd", 0.1, 1e-4, 0, 0.5)  # seed 0 again: one replicate per seed
    runs += [("adam", 1e-3, 1e-4, seed, final) for seed, final in enumerate([0.90, 0.915, "stopped"])]
    runs += [("rmsprop", lr, 1e-4, seed, final) for lr, finals in ((1e-3, [0.91, 0.92, 0.93]), (1e-2, [0.8] * 3))
             for seed, final in enumerate(finals)]
    for _ in range(16):  # the learning rate decides the score; weight decay hardly matters
        lr, wd = float(10 ** rng.uniform(-4, -1)), float(10 ** rng.uniform(-6, -2))
        runs.append(("adamw-with-a-long-name", lr, wd, 0, 0.95 - 0.1 * abs(math.log10(lr) + 2.5)
                     + 0.002 * rng.random()))
    for index, (arm, lr, wd, seed, final) in enumerate(runs):
        config = {"arm": {"name": arm, **arms[arm], "optim.lr": lr, "optim.weight_decay": wd}, "train.seed": seed}
        rows = curve_rows(0.6 if isinstance(final, str) else final, 3, lr=lr, rng=rng)
        for row in rows:
            row["eval_time_s"] = 0.3
        if final == "diverged":
            rows = rows[:2]
            rows[-1].update(train_loss=math.nan, val_loss=math.inf, val_acc=0.1, diverged=True)
        write_trial(results_dir, index, config, rows[:1] if final == "stopped" else rows,
                    done=final != "diverged")
    return results_dir
