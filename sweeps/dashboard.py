"""A live web view of a sweep: an Optuna journal in the results directory, served by optuna-dashboard.

The driver writes the journal (`<results dir>/optuna.log`) through a Tune callback, so it is resumed,
submitted and copied with the rest of the results. It holds one Optuna study per arm, as `PerArmOptuna`
searches them (each arm has its own search space, so the dashboard's per-study plots, importances and slices
make sense within an arm). Every Tune trial is an Optuna trial: its searched settings and seed as parameters,
its per-epoch search metric as intermediate values, and its state: running, complete, pruned (stopped early
by ASHA) or failed. `sweep dashboard RESULTS_DIR` serves it, read-only; a running sweep's new epochs appear on
reload.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterable
from pathlib import Path

import optuna
from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState, create_trial
from ray import tune

from analysis.outcome import planned_epochs, stopped_early
from sweeps.schema import Domain, Spec, SpecError
from sweeps.space import category, distribution, finite

JOURNAL = "optuna.log"
SEED = "train.seed"


def _storage(path: Path) -> optuna.storages.JournalStorage:
    return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))


class OptunaJournal(tune.Callback):
    """Mirrors every trial of the sweep into an Optuna journal at `path` (see the module docstring)."""

    def __init__(self, spec: Spec, path: Path):
        self.path, self.metrics = Path(path), spec.search.metrics
        self.directions = ["maximize" if mode == "max" else "minimize" for mode in spec.search.modes]
        shared = spec.space_settings()
        self.domains = {arm: {k: v for k, v in {**shared, **own}.items() if isinstance(v, Domain)}
                        for arm, own in spec.arm_settings().items()}
        self.epochs = spec.train.epochs
        self.max_t = spec.scheduler.epoch_cap()
        self._storage = None  # opened in setup: a journal storage is not pickled with the Tuner

    def __getstate__(self) -> dict:
        return {k: v for k, v in vars(self).items() if k not in ("_storage", "_ids")}

    def setup(self, **info) -> None:
        optuna.logging.set_verbosity(optuna.logging.WARNING)  # not a log line per study opened
        storage = self._storage = _storage(self.path)
        self._ids: dict[str, int] = {}  # Tune trial id -> Optuna trial id, from the journal (a resumed sweep's too)
        for summary in storage.get_all_studies():
            study_id = storage.get_study_id_from_name(summary.study_name)
            for trial in storage.get_all_trials(study_id, deepcopy=False):
                if "tune_trial_id" in trial.user_attrs and not trial.state.is_finished():
                    self._ids[trial.user_attrs["tune_trial_id"]] = \
                        storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)

    def _study_id(self, arm: str) -> int:
        optuna.create_study(storage=self._storage, study_name=arm, directions=self.directions, load_if_exists=True)
        return self._storage.get_study_id_from_name(arm)

    def on_trial_start(self, iteration: int, trials: list, trial, **info) -> None:
        if trial.trial_id in self._ids:
            return  # a resumed or retried trial goes on as the same Optuna trial
        arm = trial.config["arm"]
        settings = {**arm, **{k: v for k, v in trial.config.items() if k != "arm"}}
        domains = self.domains.get(arm["name"], {})
        params = {k: category(settings[k]) if domains[k].kind in ("grid", "choice") else settings[k]
                  for k in domains if k in settings}
        distributions = {k: distribution(domains[k]) for k in params}
        if SEED in settings and SEED not in params:  # the replicate, shown beside the searched settings
            params[SEED], distributions[SEED] = settings[SEED], CategoricalDistribution([settings[SEED]])
        frozen = create_trial(state=TrialState.RUNNING, params=params, distributions=distributions,
                              user_attrs={"tune_trial_id": trial.trial_id, "trial": str(trial)})
        self._ids[trial.trial_id] = self._storage.create_new_trial(self._study_id(arm["name"]), template_trial=frozen)

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info) -> None:
        value, epoch = result.get(self.metrics[0]), result.get("epoch")
        if (trial.trial_id in self._ids and len(self.metrics) == 1 and finite(value) and epoch is not None):
            self._storage.set_trial_intermediate_value(self._ids[trial.trial_id], int(epoch), float(value))

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        result = trial.last_result or {}
        values, epoch = [result.get(m) for m in self.metrics], result.get("epoch", 0)
        planned = planned_epochs(trial.config["arm"], self.epochs, self.max_t)
        if not all(finite(v) for v in values):
            self._finish(trial, TrialState.FAIL)
        elif stopped_early(epoch, planned, bool(result.get("diverged"))):
            self._finish(trial, TrialState.PRUNED)  # stopped early by the scheduler
        else:
            self._finish(trial, TrialState.COMPLETE, [float(v) for v in values])

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        self._finish(trial, TrialState.FAIL)

    def _finish(self, trial, state: TrialState, values: list[float] | None = None) -> None:
        trial_id = self._ids.pop(trial.trial_id, None)
        if trial_id is not None:
            self._storage.set_trial_state_values(trial_id, state, values)


def serve(results_dir: str, *, host: str = "127.0.0.1", port: int = 8080) -> None:
    """`sweep dashboard`: check everything first (exit 2 on bad input), then serve until interrupted."""
    from sweeps.storage import read_spec, storage_uri

    directory = Path(storage_uri(results_dir))
    if "://" in str(directory):
        raise SpecError(f"{results_dir}: sweep dashboard reads a local directory; copy the results here first")
    spec = read_spec(str(directory))
    if spec.protocol:
        directory = directory / "tune"  # where the search happens; the confirm stage has a journal of its own
    journal = directory / JOURNAL
    if not journal.is_file():
        raise SpecError(f"{directory}: no {JOURNAL} (the Optuna journal `sweep run` writes beside the results); "
                        "it is written for sweeps on a local or shared file system, since this version")
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind((host, port))
    except OSError as err:
        raise SpecError(f"--port {port}: cannot listen on {host}:{port} ({err.strerror}); "
                        "choose another with --port") from None
    from bottle import run

    print(f"[sweep] dashboard of {directory} at http://{host}:{port}/dashboard, read-only (Ctrl-C stops it)",
          flush=True)
    run(dashboard_app(journal), host=host, port=port)


READS = ("GET", "HEAD")  # the methods of optuna-dashboard's pages and queries; every other request writes


def dashboard_app(journal: Path) -> Callable:
    """optuna-dashboard over `journal` as a WSGI app that refuses every write: its pages can delete, rename and
    tell studies and trials, and the journal is the sweep's record (optuna-dashboard has no read-only mode)."""
    from optuna_dashboard import wsgi

    app = wsgi(_storage(journal))

    def read_only(environ: dict, start_response: Callable) -> Iterable[bytes]:
        if environ["REQUEST_METHOD"] in READS:
            return app(environ, start_response)
        body = b'{"reason": "sweep dashboard is read-only: the journal is the sweep\'s record"}'
        start_response("405 Method Not Allowed", [("Content-Type", "application/json"), ("Allow", ", ".join(READS)),
                                                  ("Content-Length", str(len(body)))])
        return [body]

    return read_only
