"""The sweep service against what its users do today, both sides measured in this invocation on this
machine; prints one table. Ratios are the claims, absolute times depend on the machine.

1. Epoch throughput: the trainable's training epoch (uint8 arrays, the on-device `Loader`,
   `trainables.train.train_epoch`) against torchvision's MNIST with ToTensor/Normalize behind a
   DataLoader (num_workers 0 or 2, whichever is faster), feeding the same `train_epoch`: same model,
   batch size, optimizer and torch threads (1, as a trial with `resources.cpu: 1` runs, and all cores).
   Aim: >= 3x for the MLP on CPU. The model step itself caps the ratio: a "ceiling" row times the
   same epoch on batches built before the clock starts, the ratio a free data path would reach.
2. Sweep overhead: a 16-trial sweep through `sweeps.runner.run_sweep` (Ray start included; 1 CPU per
   trial, a report and a checkpoint every epoch: the defaults) against a plain loop in one process
   calling `train_trial` on the same 16 configs with all cores (evaluating every epoch, saving only at
   the last). Aim: <= 1.15x. A second row sets the cadence to every 5 epochs. Trials must be long
   enough for this to mean anything: --overhead-epochs sets it (the loop takes ~40 s on 2 idle cores
   at the default).
3. Early stopping: the bundled quickstart sweep (ASHA) against the same 20 trials run to the end (FIFO):
   epochs spent, wall time, best final val_acc. Aim: <= 40% of the epochs, best within 0.5 points.
4. Memory: peak USS (private) and PSS (proportional) memory of the trial processes with 1, 2 and 4
   concurrent trials on one node, on mnist5k's training images tiled to --memory-images. A trial
   process that imported torch holds ~0.5 GB of its own whatever the data (measured: one trial on the
   3,600-image mnist5k); what each added trial adds beyond that, for the dataset, is the claim.
   Aim: far below the dataset's size (the usual way, a copy per trial, is 1x).

Other work on the machine disturbs timings: lines 1 and 2 alternate the two sides and report the
median of --repeats runs.

    python benchmarks/bench_performance.py [--lines 1,2,3,4] [--repeats 3] [--memory-images 1500000]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torchvision
from torch.utils.data import DataLoader
from torchvision import transforms

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from mnist_files import write_mnist  # noqa: E402  (the tests' torchvision-layout writer)

from analysis import load_results  # noqa: E402
from sweeps.runner import build_tuner, prepare_data, run_sweep, start_ray  # noqa: E402
from sweeps.space import param_space  # noqa: E402
from sweeps.spec import flag_overrides, load_spec, validate_spec  # noqa: E402
from trainables.data import Dataset, Loader, load_dataset  # noqa: E402
from trainables.models import create_model  # noqa: E402
from trainables.optim import create_loss, create_optimizer  # noqa: E402
from trainables.train import train_epoch, train_trial  # noqa: E402

CORES = os.cpu_count() or 1
ROWS: list[tuple[str, str, str, str, str, str]] = []  # line, what, ours, baseline, ratio, aim


def row(line: str, what: str, ours: str, baseline: str, ratio: float | str, aim: str = "") -> None:
    ROWS.append((line, what, ours, baseline, f"{ratio:.2f}x" if isinstance(ratio, float) else ratio, aim))
    print(f"[bench] {' | '.join(ROWS[-1])}", flush=True)


def timed(fn, *args, **kwargs) -> tuple[object, float]:
    start = time.perf_counter()
    value = fn(*args, **kwargs)
    return value, time.perf_counter() - start


# --- 1. epoch throughput -----------------------------------------------------------------------------

EPOCH_MODELS = {  # label -> (model settings, training images per timed epoch, torch thread counts)
    "mlp 784-500-250-100-10 (model default)": ({"name": "mlp", "hidden_sizes": [500, 250, 100]}, None, (1, CORES)),
    "mlp 784-256-128-10 (quickstart)": ({"name": "mlp", "hidden_sizes": [256, 128]}, None, (1, CORES)),
    "overparam_cnn (60M parameters)": ({"name": "overparam_cnn"}, 640, (CORES,)),  # ~1 GFLOP/image: a subset
}


def epoch_throughput(repeats: int, batch_size: int = 64) -> None:
    data = load_dataset("mnist5k")  # 3,600 training images, channel normalisation fitted on them
    root = write_mnist(Path(tempfile.mkdtemp(prefix="bench-mnist-")), train=(data.train_x, data.train_y),
                       test=(data.val_x, data.val_y))
    usual_dataset = torchvision.datasets.MNIST(str(root), train=True, download=False, transform=transforms.Compose(
        [transforms.ToTensor(), transforms.Normalize(data.mean.ravel().tolist(), data.std.ravel().tolist())]))
    loss_fn = create_loss("cross_entropy")
    scaler = torch.amp.GradScaler("cuda", enabled=False)

    def fast_batches(count: int) -> Loader:
        return Loader(data.train_x[:count], data.train_y[:count], batch_size=batch_size, device="cpu",
                      mean=data.mean, std=data.std, shuffle=True)

    sides = {
        "ours": fast_batches,
        "ready": lambda count: list(fast_batches(count)),  # batches built before the clock starts: the model step alone
        **{f"DataLoader num_workers={w}": lambda count, w=w: DataLoader(
            torch.utils.data.Subset(usual_dataset, range(count)), batch_size=batch_size, shuffle=True, num_workers=w)
           for w in (0, 2)},
    }

    for label, (model_settings, subset, thread_counts) in EPOCH_MODELS.items():
        for threads in dict.fromkeys(thread_counts):  # 1 and CORES, once each when they are equal
            torch.set_num_threads(threads)
            rates: dict[str, list[float]] = {side: [] for side in sides}
            for repeat in range(repeats + 1):
                for side, make_batches in sides.items():  # alternated, so load from elsewhere hits every side
                    torch.manual_seed(0)
                    model = create_model(in_channels=1, num_classes=10, image_size=28, **model_settings)
                    optimizer = create_optimizer(model.parameters(), optimizer="sgd", lr=0.01)
                    count = 4 * batch_size if repeat == 0 else subset or len(data.train_y)  # run 0 warms up, untimed
                    (_, _, seen), seconds = timed(train_epoch, model, make_batches(count), optimizer, loss_fn,
                                                  scaler=scaler)
                    if repeat:
                        rates[side].append(seen / seconds)
            medians = {side: statistics.median(r) for side, r in rates.items()}
            ours, ready = medians.pop("ours"), medians.pop("ready")
            usual = max(medians, key=medians.get)  # the usual pipeline at its best: the faster worker setting
            row("1", f"epoch of {len(data.train_y) if subset is None else subset:,} images, {label}, batch {batch_size}, "
                     f"{threads} thread(s); usual: {usual}",
                f"{ours:,.0f} img/s", f"{medians[usual]:,.0f} img/s", ours / medians[usual],
                ">= 3x" if label.startswith("mlp") else "")
            row("1", "  ceiling: the model step alone, on batches built before the clock starts (a free data path)",
                f"{ready:,.0f} img/s", f"{medians[usual]:,.0f} img/s", ready / medians[usual], "")
    torch.set_num_threads(CORES)


# --- 2. sweep overhead -------------------------------------------------------------------------------

def overhead_spec(epochs: int, report_every: int = 1, checkpoint_every: int = 1) -> dict:
    """16 trials: four optimizers x four seeds, the quickstart MLP on the embedded MNIST subset, 1 CPU each."""
    return {
        "name": "bench-overhead",
        "data": {"name": "mnist5k", "batch_size": 64},
        "model": {"name": "mlp", "hidden_sizes": [256, 128]},
        "train": {"epochs": epochs, "report_every": report_every, "checkpoint_every": checkpoint_every},
        "arms": {"sgd": {"optimizer": "sgd", "lr": 0.1}, "momentum": {"optimizer": "sgd", "momentum": 0.9, "lr": 0.01},
                 "adam": {"optimizer": "adam", "lr": 1e-3}, "adamw": {"optimizer": "adamw", "lr": 1e-3}},
        "space": {"seed": {"grid": [0, 1, 2, 3]}},
    }


def plain_loop(spec) -> None:
    """What a user without the service writes: load the data, train and evaluate each config in turn, all cores."""
    from ray.tune.search.variant_generator import generate_variants

    torch.set_num_threads(CORES)
    dataset = prepare_data(spec)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*meant to only be called inside")  # tune.report: a no-op here
        for _, config in generate_variants(param_space(spec)):
            train_trial(config, base=spec.base_settings(), dataset=dataset)


def ray_start_seconds() -> float:
    import ray

    _, seconds = timed(start_ray, None, dashboard=False)
    ray.shutdown()
    return seconds


def sweep_seconds(spec, storage: Path) -> float:
    """Wall time of `run_sweep` (data, Ray start, all trials), the dashboard off."""
    import ray

    _, seconds = timed(run_sweep, spec, storage=str(storage), dashboard=False)
    ray.shutdown()
    return seconds


def sweep_overhead(repeats: int, epochs: int, every: int = 5) -> None:
    storage = Path(tempfile.mkdtemp(prefix="bench-overhead-"))
    spec = validate_spec(overhead_spec(epochs), "bench")  # the defaults: a report and a checkpoint every epoch
    sparse = validate_spec(overhead_spec(epochs, every, every), "bench")
    plain = validate_spec(overhead_spec(epochs, checkpoint_every=epochs), "bench")  # evaluates every epoch, saves once
    slots = int(CORES // spec.resources.cpu)  # trials running at once
    loop, sweep, sparse_sweep, starts, idle = [], [], [], [], []
    for repeat in range(repeats):
        loop.append(timed(plain_loop, plain)[1])
        named = spec.model_copy(update={"name": f"{spec.name}-{repeat}"})
        sweep.append(sweep_seconds(named, storage))
        sparse_sweep.append(sweep_seconds(sparse.model_copy(update={"name": f"{spec.name}-every-{repeat}"}), storage))
        starts.append(ray_start_seconds())
        in_trials = load_results(storage / named.name).trials["wall_time_s"].sum()
        idle.append(((sweep[-1] - starts[-1]) * slots - in_trials) / 16)
    loop_s, sweep_s, sparse_s, start_s = (statistics.median(v) for v in (loop, sweep, sparse_sweep, starts))
    row("2", f"16 trials x {epochs} epochs: sweep ({slots} at a time x 1 CPU) vs a plain loop (all cores)",
        f"{sweep_s:.1f} s", f"{loop_s:.1f} s", sweep_s / loop_s, "<= 1.15x")
    row("2", f"  the same without starting Ray ({start_s:.1f} s, once per sweep)", f"{sweep_s - start_s:.1f} s",
        f"{loop_s:.1f} s", (sweep_s - start_s) / loop_s, "")
    row("2", "  per trial: time a CPU slot ran no trial (worker start, scheduling, tail); loop's time per trial",
        f"{statistics.median(idle):.2f} s", f"{loop_s / 16:.2f} s", statistics.median(idle) / (loop_s / 16), "")
    row("2", f"  the same sweep, reporting and checkpointing every {every} epochs (train.report_every, checkpoint_every)",
        f"{sparse_s:.1f} s", f"{loop_s:.1f} s", sparse_s / loop_s, "")


# --- 3. early stopping -------------------------------------------------------------------------------

def early_stopping() -> None:
    storage = Path(tempfile.mkdtemp(prefix="bench-asha-"))
    outcome = {}
    for scheduler in ("asha", "fifo"):
        spec, _ = load_spec("quickstart", flag_overrides([f"scheduler.name={scheduler}", f"name=quickstart-{scheduler}"]))
        seconds = sweep_seconds(spec, storage)
        trials = load_results(storage / spec.name).trials
        outcome[scheduler] = (int(trials["epochs_run"].sum()), seconds, trials["final_val_acc"].max(), len(trials))
    (asha_epochs, asha_s, asha_best, n), (fifo_epochs, fifo_s, fifo_best, _) = outcome["asha"], outcome["fifo"]
    row("3", f"quickstart, {n} trials: epochs trained, ASHA vs FIFO", str(asha_epochs), str(fifo_epochs),
        f"{asha_epochs / fifo_epochs:.0%}", "<= 40%")
    row("3", "  wall time", f"{asha_s:.1f} s", f"{fifo_s:.1f} s", asha_s / fifo_s, "")
    row("3", "  best final val_acc", f"{asha_best:.2%}", f"{fifo_best:.2%}",
        f"{(asha_best - fifo_best) * 100:+.2f} points", ">= -0.5 points")


# --- 4. memory ---------------------------------------------------------------------------------------

def tiled_mnist(images: int) -> Dataset:
    """mnist5k's training split repeated to `images` images: big enough that a copy per trial would show."""
    data = load_dataset("mnist5k")
    repeat = -(-images // len(data.train_y))
    return dataclasses.replace(data, train_x=np.tile(data.train_x, (repeat, 1, 1, 1))[:images],
                               train_y=np.tile(data.train_y, repeat)[:images])


RAY_SERVICES = ("ray::IDLE", "ray::DashboardAgent", "ray::RuntimeEnvAgent")  # Ray's workers that are not trials


def trial_processes():
    """This driver's Ray trial actors, titled `ray::<trainable class>` (other Ray sessions are not its descendants)."""
    import psutil  # vendored by Ray (ray/thirdparty_files)

    for process in psutil.Process().children(recursive=True):
        try:
            title = (process.cmdline() or [""])[0]
        except psutil.Error:  # ended between listing and reading
            continue
        if title.startswith("ray::") and not title.startswith(RAY_SERVICES):
            yield process


def sample_peaks(stop: threading.Event, peaks: dict) -> None:
    import psutil

    while not stop.wait(0.2):
        uss = pss = count = 0
        for process in trial_processes():
            try:
                info = process.memory_full_info()  # USS: pages only this process maps; PSS: shared ones split
            except psutil.Error:
                continue
            uss, pss, count = uss + info.uss, pss + info.pss, count + 1
        if count == peaks["concurrent"]:  # only while all of them run, so the sums compare across rows
            peaks.update(uss=max(peaks["uss"], uss), pss=max(peaks["pss"], pss))


def peak_memory(dataset: Dataset, concurrent: int, storage: Path, epochs: int = 1) -> dict:
    """Peak summed USS/PSS of `concurrent` trials while all of them run at once on `dataset` (Ray started)."""
    deadline = time.monotonic() + 30
    while any(True for _ in trial_processes()) and time.monotonic() < deadline:  # the last sweep's, stopping
        time.sleep(0.2)
    spec = validate_spec({
        "name": f"bench-memory-{len(dataset.train_y)}-{concurrent}",
        "data": {"name": "mnist5k", "batch_size": 1024},
        "model": {"name": "mlp", "hidden_sizes": [32]},  # cheap: the trials mostly walk the data
        "train": {"epochs": epochs},
        "space": {"seed": {"grid": list(range(concurrent))}},
        "resources": {"cpu": CORES / concurrent},
    }, "bench")
    peaks = dict(concurrent=concurrent, uss=0, pss=0)
    stop = threading.Event()
    sampler = threading.Thread(target=sample_peaks, args=(stop, peaks))
    sampler.start()
    build_tuner(spec, dataset, storage=str(storage)).fit()
    stop.set()
    sampler.join()
    return peaks


def memory(images: int) -> None:
    import ray

    mb = 1e6
    dataset = tiled_mnist(images)
    size = dataset.train_x.nbytes + dataset.train_y.nbytes
    storage = Path(tempfile.mkdtemp(prefix="bench-memory-"))
    start_ray(None, dashboard=False)
    try:
        peaks = {k: peak_memory(dataset, k, storage) for k in (1, 2, 4)}
        bare = peak_memory(load_dataset("mnist5k"), 1, storage, epochs=30)["uss"]  # next to no data, a few s
    finally:
        ray.shutdown()
    for k, peak in peaks.items():
        row("4", f"{k} concurrent trial(s) on {images:,} images ({size / mb:,.0f} MB): summed USS (PSS)",
            f"{peak['uss'] / mb:,.0f} ({peak['pss'] / mb:,.0f}) MB", "", "")
    growth = (peaks[4]["uss"] - peaks[1]["uss"]) / 3
    row("4", "USS growth per added trial; baseline: one trial on the 3,600-image mnist5k",
        f"{growth / mb:,.0f} MB", f"{bare / mb:,.0f} MB", "", "")
    row("4", "  of it due to the dataset, against the dataset's size (a copy per trial: 1x)",
        f"{(growth - bare) / mb:+,.0f} MB", f"{size / mb:,.0f} MB", (growth - bare) / size, "far below 1x")


# --- the table ---------------------------------------------------------------------------------------

def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", default="1,2,3,4", help="which lines to run, e.g. 1,3")
    parser.add_argument("--repeats", type=int, default=3, help="runs of lines 1 and 2; the median is reported")
    parser.add_argument("--overhead-epochs", type=int, default=40, help="epochs per trial in line 2")
    parser.add_argument("--memory-images", type=int, default=1_500_000, help="dataset size in line 4, images")
    args = parser.parse_args()
    lines = set(args.lines.split(","))

    started, load_before = time.perf_counter(), os.getloadavg()[0]
    if "1" in lines:
        epoch_throughput(args.repeats)
    if "2" in lines:
        sweep_overhead(args.repeats, args.overhead_epochs)
    if "3" in lines:
        early_stopping()
    if "4" in lines:
        memory(args.memory_images)

    print(f"\nmachine: {CORES} cores, {cpu_model()}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"Python {platform.python_version()}; medians of {args.repeats} runs; {time.perf_counter() - started:.0f} s; "
          f"load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after (other work on the machine)\n")
    header = ("line", "what", "ours", "baseline", "ratio", "aim")
    widths = [max(len(r[i]) for r in [header, *ROWS]) for i in range(len(header))]
    for r in [header, tuple("-" * w for w in widths), *ROWS]:
        print("| " + " | ".join(cell.ljust(w) for cell, w in zip(r, widths)) + " |")


if __name__ == "__main__":
    main()
