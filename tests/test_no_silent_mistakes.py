"""Mistakes that must not pass silently (issue "No silent mistakes"): the dashboard cannot change a sweep's record,
and an interrupted sweep says so and how to continue it. Bad spec and flag inputs are in tests/test_bad_inputs.py."""

from __future__ import annotations

import json
import os
import signal
import threading
import urllib.error
import urllib.request
from pathlib import Path
from wsgiref.simple_server import WSGIRequestHandler, make_server

import optuna
import pytest
from conftest import run_cli, trial_results, write_spec
from test_reliability import kill_group, start_sweep, wait_for

from sweeps.dashboard import _storage, dashboard_app


class _Quiet(WSGIRequestHandler):
    def log_message(self, *args) -> None:  # no line per request in the test output
        pass


def _serve(app) -> tuple[str, callable]:
    """`app` on a free local port in a thread; returns (its URL, a function that stops it)."""
    server = make_server("127.0.0.1", 0, app, handler_class=_Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return f"http://127.0.0.1:{server.server_port}", lambda: (server.shutdown(), server.server_close())


def _ask(url: str, method: str = "GET", body: dict | None = None) -> tuple[int, bytes]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


@pytest.fixture
def journal(tmp_path) -> Path:
    """A sweep's Optuna journal: one arm's study with one finished trial."""
    path = tmp_path / "optuna.log"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(storage=_storage(path), study_name="adam", direction="maximize")
    study.add_trial(optuna.trial.create_trial(params={"optim.lr": 0.01}, value=0.9, distributions={
        "optim.lr": optuna.distributions.FloatDistribution(1e-4, 1e-1, log=True)}))
    return path


def test_the_dashboard_serves_the_journal_but_its_deletes_and_edits_change_nothing(journal):
    before = journal.read_bytes()
    url, stop = _serve(dashboard_app(journal))
    try:
        status, body = _ask(f"{url}/api/studies")
        assert status == 200 and [s["study_name"] for s in json.loads(body)["study_summaries"]] == ["adam"]
        study_id = json.loads(body)["study_summaries"][0]["study_id"]
        for method, path, payload in (("DELETE", f"/api/studies/{study_id}", {}),
                                      ("POST", f"/api/studies/{study_id}/rename", {"study_name": "x"}),
                                      ("POST", "/api/studies", {"study_name": "new", "directions": ["maximize"]}),
                                      ("PUT", f"/api/studies/{study_id}/note", {"version": 1, "body": "x"})):
            status, body = _ask(url + path, method, payload)
            assert status == 405 and b"read-only" in body, (method, path, body)
    finally:
        stop()
    assert journal.read_bytes() == before


def test_without_the_guard_the_same_delete_would_erase_the_study(journal):
    # What the test above guards against: optuna-dashboard's own app deletes from the journal.
    from optuna_dashboard import wsgi

    url, stop = _serve(wsgi(_storage(journal)))
    try:
        study_id = json.loads(_ask(f"{url}/api/studies")[1])["study_summaries"][0]["study_id"]
        assert _ask(f"{url}/api/studies/{study_id}", "DELETE", {})[0] == 204
    finally:
        stop()
    assert _storage(journal).get_all_studies() == []


@pytest.mark.slow
def test_ctrl_c_exits_130_counts_the_interrupted_trial_and_says_how_to_resume(tmp_path):
    # One trial at a time, 6 epochs of about a second each: Ctrl-C lands while the first trial trains.
    spec = write_spec(tmp_path, {"name": "stopped", "data": {"name": "mnist5k", "train_subset": 400, "batch_size": 50},
                                 "model": {"name": "mlp", "hidden_sizes": [256, 256]}, "train": {"epochs": 6},
                                 "search": {"max_concurrent": 1}, "space": {"seed": {"grid": [0, 1]}}})
    results, log = tmp_path / "results" / "stopped", tmp_path / "run.log"
    sweep = start_sweep(log, "run", str(spec), "--storage", str(tmp_path / "results"))
    try:
        wait_for(lambda: any(trial_results(results).values()))
        os.killpg(sweep.pid, signal.SIGINT)  # as a terminal's Ctrl-C: the driver's whole process group
        assert sweep.wait(timeout=300) == 130, log.read_text()[-3000:]
    finally:
        kill_group(sweep)
    output = log.read_text()
    assert output.strip().splitlines()[-1] == (f"sweep: interrupted: 0 of 2 trials done, 1 interrupted, 1 not started; "
                                               f"continue with `sweep resume {results}`")
    assert "Tuner.restore" not in output and "Traceback" not in output and "1 of 2 trials done" not in output
    assert not (results / "report").exists()  # no report that would rank a half-trained trial

    resumed = run_cli("resume", str(results), "--no-dashboard")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # (an epoch reported after the last checkpoint is trained and reported again: the report counts it once)
    assert [sorted({row["epoch"] for row in rows}) for rows in trial_results(results).values()] == [[1, 2, 3, 4, 5, 6]] * 2
