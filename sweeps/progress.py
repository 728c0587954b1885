"""What `sweep run` prints while trials run, instead of Tune's tables (`--verbose` brings those back).

On a terminal: a live table (rich) with the counts, epochs, elapsed time and ETA, and each arm's best trial so
far with the settings it searched. Elsewhere (a pipe, a log file, a Ray job): one status line every
`interval` seconds and one line per trial that ends. Everything is worked out from Tune's own trial list at
each step, so a resumed sweep counts the trials it restored.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import threading
import time
from typing import Any

from ray import tune

from analysis.outcome import planned_epochs, stopped_early
from sweeps.console import say
from sweeps.schema import Domain, Spec, count_trials
from sweeps.storage import TIMELINE_FILE, write_text

ENDED = ("TERMINATED", "ERROR")
INTERRUPTED = threading.Event()  # Ctrl-C (SIGINT) stopped the sweep: Tune saved its state and stops its trials


def tune_interrupt_words(record: logging.LogRecord) -> bool:
    """A filter for Tune's log (`ray.tune.tune`): its Ctrl-C notice sets INTERRUPTED and is said in our words; its
    `Tuner.restore(...)` hint and list of trials it stopped are not shown (the CLI says `sweep resume DIR`)."""
    message = record.getMessage()
    if message.startswith("Stop signal received"):
        INTERRUPTED.set()
        print("[sweep] interrupted: saving the sweep's state (Ctrl-C again skips this)", file=sys.stderr, flush=True)
        return False
    return not (INTERRUPTED.is_set() and message.startswith(("Experiment has been interrupted",
                                                               "Trials did not complete")))


class Timeline(tune.Callback):
    """When a sweep's phases ended, in seconds since its command began: `marks` brings those the runner saw (spec and
    data ready, Ray up), this adds the first trial started, the first epoch reported and all trials done, as Tune
    reports them. Written to timeline.json in the results directory at each mark; the report shows it. It is the
    first run's: `sweep resume` unpickles this callback with the Tuner, and the copy writes nothing."""

    def __init__(self, results_dir: str, started: float, marks: dict[str, float]):
        self.results_dir, self.started, self.marks, self.resumed = results_dir, started, dict(marks), False

    def __setstate__(self, state: dict) -> None:
        vars(self).update(state, resumed=True)

    def on_trial_start(self, iteration: int, trials: list, trial, **info) -> None:
        if "first trial started" not in self.marks:  # its actor is up in a worker
            self._mark("first trial started")

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info) -> None:
        if "first epoch reported" not in self.marks:
            self._mark("first epoch reported")

    def on_experiment_end(self, trials: list, **info) -> None:
        if not INTERRUPTED.is_set() and all(t.status in ENDED for t in trials):  # Tune ends here on a crash too
            self._mark("all trials done")

    def _mark(self, phase: str) -> None:
        if self.resumed:
            return
        self.marks[phase] = round(time.time() - self.started, 2)
        try:
            write_text(f"{self.results_dir}/{TIMELINE_FILE}", json.dumps(self.marks, indent=2) + "\n")
        except OSError as err:  # a record of the run, not the run: never what stops it
            say(f"note: could not write {TIMELINE_FILE} ({err})")


MARKS = {"*": "still running: its latest value", "†": "ended early (stopped, diverged or failed): its last value"}


class Progress(tune.Callback):
    def __init__(self, spec: Spec, *, interval: float = 10.0):
        self.name, self.metric, self.mode = spec.name, spec.search.metrics[0], spec.search.modes[0]
        self.total = sum(count_trials(spec).values())
        self.epochs = spec.train.epochs
        self.max_t = spec.scheduler.epoch_cap()
        shared = spec.space_settings()
        self.searched = {arm: [k for k, v in {**shared, **own}.items() if isinstance(v, Domain) and k != "train.seed"]
                         for arm, own in spec.arm_settings().items()}
        self.interval = interval
        self._live = None  # a rich Live display on a terminal; not pickled with the Tuner

    def __getstate__(self) -> dict:
        return {k: v for k, v in vars(self).items() if k != "_live"}

    def setup(self, **info) -> None:
        from rich.console import Console

        self._live, self._started, self._last_line = None, time.monotonic(), 0.0
        self._epochs_at_start: int | None = None
        console = Console(stderr=True)
        if console.is_terminal:
            from rich.live import Live

            self._live = Live(console=console, refresh_per_second=2, transient=False)
            self._live.start()

    # --- Tune's events ------------------------------------------------------------------------------

    def on_step_end(self, iteration: int, trials: list, **info) -> None:
        now = time.monotonic()
        if self._live is not None:
            self._live.update(self._table(trials), refresh=False)
        elif now - self._last_line >= self.interval:
            self._say(self._status(trials))
            self._last_line = now

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        result = trial.last_result or {}
        epoch, value = result.get("epoch"), result.get(self.metric)
        settings = self._settings(trial)
        if result.get("diverged"):
            how = f"diverged at epoch {epoch}"
        elif epoch is not None and stopped_early(epoch, self._planned(trial), False):
            how = f"stopped early after {_epochs(epoch)}"
        else:
            how = f"completed {_epochs(epoch)}"
        self._say(f"{trial}: {how}, {self.metric} {_number(value)}" + (f" ({settings})" if settings else ""))

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        self._say(f"{trial}: failed; traceback in {trial.path}/error.txt")

    def on_experiment_end(self, trials: list, **info) -> None:
        if INTERRUPTED.is_set():  # Tune has just stopped the running trials as if they had ended: not shown
            if self._live is not None:
                self._live.stop()
            return
        if self._live is not None:
            self._live.update(self._table(trials), refresh=True)
            self._live.stop()
        else:
            self._say(self._status(trials))

    # --- what is shown --------------------------------------------------------------------------------

    def _planned(self, trial) -> int:
        return planned_epochs(trial.config["arm"], self.epochs, self.max_t)

    def _settings(self, trial) -> str:
        searched = self.searched.get(trial.config["arm"]["name"], [])
        return ", ".join(f"{k}={_number(trial.config['arm'][k])}" for k in searched if k in trial.config["arm"])

    def _status(self, trials: list) -> str:
        """One line: trials by state, epochs trained of planned, elapsed time and an ETA."""
        states = [t.status for t in trials]
        done, failed = states.count("TERMINATED"), states.count("ERROR")
        stopped = sum(1 for t in trials if t.status == "TERMINATED" and stopped_early(
            (t.last_result or {}).get("epoch", 0), self._planned(t), bool((t.last_result or {}).get("diverged"))))
        trained = sum((t.last_result or {}).get("epoch", 0) for t in trials)
        not_started = (self.total - len(trials)) * planned_epochs({}, self.epochs, self.max_t)
        planned = sum(self._planned(t) for t in trials) + not_started
        if self._epochs_at_start is None:
            self._epochs_at_start = trained  # epochs restored by `sweep resume` are not this run's speed
        elapsed = time.monotonic() - self._started
        left = sum(self._planned(t) - (t.last_result or {}).get("epoch", 0) for t in trials if t.status not in ENDED)
        left += not_started
        rate = (trained - self._epochs_at_start) / elapsed if elapsed > 0 else 0
        eta = f", ETA {'≤ ' if self.max_t else ''}{_duration(left / rate)}" if rate > 0 and left > 0 else ""
        return (f"{self.name}: {done} of {self.total} trials done ({stopped} stopped early), "
                f"{states.count('RUNNING')} running, {failed} failed; {trained} of {planned} epochs; "
                f"{_duration(elapsed)} elapsed{eta}")

    def _best(self, trials: list) -> dict[str, Any]:
        """Arm -> (key, trial, value, mark): its best trial so far, among those that completed, else among all that
        reported, marked (MARKS) as still running or ended early."""
        sign = 1 if self.mode == "max" else -1
        best = {}
        for trial in trials:
            result, arm = trial.last_result or {}, trial.config["arm"]["name"]
            value = result.get(self.metric)
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                continue
            complete = trial.status == "TERMINATED" and result.get("epoch", 0) >= self._planned(trial)
            key = (complete, sign * value)
            if arm not in best or key > best[arm][0]:
                mark = "" if complete else "*" if trial.status not in ENDED else "†"
                best[arm] = (key, trial, value, mark)
        return best

    def _table(self, trials: list):
        from rich.table import Table

        table = Table(title=self._status(trials), title_justify="left", expand=False)
        for column in ("arm", "trials", f"best {self.metric}", "epoch", "settings"):
            table.add_column(column)
        per_arm: dict[str, list] = {}
        for trial in trials:
            per_arm.setdefault(trial.config["arm"]["name"], []).append(trial)
        best = self._best(trials)
        for arm, own in per_arm.items():
            ended = sum(t.status in ENDED for t in own)
            if arm in best:
                _, trial, value, mark = best[arm]
                cells = [f"{_number(value)} {mark}".rstrip(), str((trial.last_result or {}).get("epoch", "")),
                         self._settings(trial)]
            else:
                cells = ["—", "", ""]
            table.add_row(arm, f"{ended} ended, {sum(t.status == 'RUNNING' for t in own)} running", *cells)
        table.caption = "  ".join(f"{mark} {meaning}" for mark, meaning in MARKS.items())
        return table

    def _say(self, line: str) -> None:
        if self._live is not None:
            self._live.console.print(f"[sweep] {line}", markup=False, highlight=False)
        else:
            print(f"[sweep] {line}", file=sys.stderr, flush=True)


def _epochs(n: Any) -> str:
    return f"{n} epoch{'' if n == 1 else 's'}"


def _number(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"
