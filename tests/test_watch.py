"""Watching a sweep: the console in a pipe and on a terminal, optuna-dashboard on the Optuna journal in a real
browser while the sweep runs, and MLflow against a real tracking server. (What the journal holds, and Tune's
tables under --verbose, are checked on runs of tests/test_sweep_run.py.)"""

from __future__ import annotations

import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
from conftest import CHROMIUM, REPO, TRIAL_LINE, free_port, run_cli, trial_results, write_spec

from sweeps.cli import main

pytestmark = pytest.mark.slow


def wait_for(condition, timeout: float = 300, every: float = 0.1):
    start = time.monotonic()
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() - start < timeout, "timed out"
        time.sleep(every)


def stop(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(process.pid, signal.SIGKILL)


# --- the console -------------------------------------------------------------------------------------------

def test_the_quickstart_in_a_pipe_is_short_and_says_how_each_trial_ended(tmp_path):
    done = run_cli("run", "quickstart", "--storage", str(tmp_path), "--no-dashboard",
                   env={"COLUMNS": ""})  # a pipe: no terminal to take the width from
    assert done.returncode == 0, done.stderr[-3000:]
    said = done.stdout + done.stderr
    lines = said.splitlines()
    assert len(lines) < 150, "\n".join(lines)
    # Every run printed Ray's token-auth notice, Tune's configuration box and a TensorBoard command into a
    # temporary /tmp/ray/session_... folder; the comparison at the end was 230 characters wide.
    for notice in ("Token authentication is enabled", "Configuration for experiment", "View detailed results here",
                   "tensorboard --logdir", "/tmp/ray/session_"):
        assert notice not in said, notice
    summary = done.stdout[done.stdout.index("Comparison (as in report/comparison.md):"):].splitlines()
    assert max(map(len, summary)) <= 100, "\n".join(summary)
    plan = [line for line in done.stderr.splitlines() if line.startswith("[sweep] quickstart: 20 trials (")]
    assert len(plan) == 1 and f"results in {tmp_path / 'quickstart'}" in plan[0]  # the plan, one line
    ended = [line for line in done.stderr.splitlines() if TRIAL_LINE.match(line)]
    assert len(ended) == 20  # one line per trial, and only one
    assert any(re.search(r"quickstart: 20 of 20 trials done \(\d+ stopped early\), 0 running, 0 failed; "
                         r"\d+ of 180 epochs", line) for line in lines)
    assert "Trial status:" not in done.stdout and "started with configuration" not in done.stdout
    assert "Comparison (as in report/comparison.md)" in done.stdout
    # Early stopping judged each arm on its own: every arm trained a trial to the end, so no row is provisional.
    comparison = pd.read_csv(tmp_path / "quickstart" / "report" / "comparison.csv", keep_default_na=False)
    assert len(comparison) == 5 and not comparison["note"].str.contains("stopped early").any(), comparison
    assert (comparison["n_seeds"] == 1).all() and (comparison["epochs_trained"] >= 9).all()
    # The first run says in one sentence what it can and cannot conclude, and which command would.
    assert "Conclusion: one seed per configuration cannot separate the arms" in done.stdout
    # When each phase ended, from the command's start, and what each trial waited before it trained.
    marks = json.loads((tmp_path / "quickstart" / "timeline.json").read_text())
    phases = ["spec and data ready", "Ray up", "first trial started", "first epoch reported", "all trials done"]
    assert list(marks) == phases and 0 < marks[phases[0]] and [marks[p] for p in phases] == sorted(marks.values())
    waited = pd.read_csv(tmp_path / "quickstart" / "report" / "trials.csv")["startup_s"]
    assert waited.notna().all() and (waited > -0.01).all()
    assert waited.max() > waited.median()  # a trial that started a worker process waited for it; most reuse one
    report = (tmp_path / "quickstart" / "report" / "report.html").read_text()
    assert f"first epoch reported at {marks['first epoch reported']:.1f} s, all trials done at " in report


def test_a_terminal_gets_a_live_table(tmp_path, tiny_spec):
    tiny_spec["train"]["epochs"] = 1
    spec = write_spec(tmp_path, tiny_spec)
    leader, follower = pty.openpty()
    process = subprocess.Popen([sys.executable, "-m", "sweeps.cli", "run", str(spec), "--storage", str(tmp_path),
                                "--no-dashboard"], cwd=REPO, stdin=follower, stdout=follower, stderr=follower,
                               env={**os.environ, "COLUMNS": "150", "TERM": "xterm-256color"})
    os.close(follower)
    shown = b""
    while process.poll() is None or select.select([leader], [], [], 0)[0]:
        if select.select([leader], [], [], 0.5)[0]:
            try:
                shown += os.read(leader, 65536)
            except OSError:  # the terminal closed with the process
                break
    assert process.wait(timeout=60) == 0
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", shown.decode(errors="replace"))
    assert "┃ arm" in text and "best val_acc" in text and "tiny: 2 of 2 trials done" in text


# --- the dashboard on the Optuna journal ------------------------------------------------------------------

@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} is not installed")
def test_the_dashboard_shows_a_running_sweep_in_a_browser(tmp_path, chromium):
    # About a second per epoch and many epochs: time to look while the trial is still running.
    spec = write_spec(tmp_path, {"name": "watched", "data": {"name": "mnist5k", "batch_size": 50},
                                 "model": {"name": "mlp", "hidden_sizes": [1024, 1024]}, "train": {"epochs": 60},
                                 "arms": {"sgd": {"optimizer": "sgd", "lr": 0.05}}})
    results, port = tmp_path / "results" / "watched", free_port()
    with open(tmp_path / "run.log", "w") as log:
        sweep = subprocess.Popen([sys.executable, "-m", "sweeps.cli", "run", str(spec), "--storage",
                                  str(tmp_path / "results"), "--no-dashboard"], cwd=REPO, stdout=log,
                                 stderr=subprocess.STDOUT, start_new_session=True)
    dashboard = None
    try:
        first = wait_for(lambda: (results / "optuna.log").exists() and next(
            (rows for rows in trial_results(results).values() if rows), None))
        with open(tmp_path / "dashboard.log", "w") as log:
            dashboard = subprocess.Popen([sys.executable, "-m", "sweeps.cli", "dashboard", str(results), "--port",
                                          str(port)], cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        wait_for(lambda: _answers(f"http://127.0.0.1:{port}/api/studies"), timeout=60)

        chromium.get(f"http://127.0.0.1:{port}/dashboard")
        wait_for(lambda: "sgd" in chromium.find_element("tag name", "body").text, timeout=30)
        assert sweep.poll() is None, "the sweep should still be running"
        chromium.get(f"http://127.0.0.1:{port}/dashboard/studies/0/trials")
        page = wait_for(lambda: (lambda text: text if "Intermediate Values" in text else None)(
            chromium.find_element("tag name", "body").text), timeout=30)
        assert "Running" in page and f"1 {first[0]['val_acc']}" in page.replace("\n", " ")
        # New epochs appear without restarting anything.
        later = wait_for(lambda: next((rows for rows in trial_results(results).values() if len(rows) >= 3), None))
        chromium.refresh()
        wait_for(lambda: f"3 {later[2]['val_acc']}" in chromium.find_element("tag name", "body").text.replace("\n", " "),
                 timeout=30)
        assert sweep.poll() is None, "the sweep should still be running"
    finally:
        stop(sweep)
        if dashboard:
            stop(dashboard)


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as answer:
            return answer.status == 200
    except OSError:
        return False


def test_the_dashboard_refuses_a_port_in_use(tmp_path, tiny_spec, capsys):
    # A refusal needs no process of its own: `sweep`'s entry point in this process (as tests/test_bad_inputs.py,
    # which also has the sweep without a journal).
    write_spec(tmp_path, tiny_spec)
    (tmp_path / "optuna.log").write_text("")
    with __import__("socket").socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        status = main(["dashboard", str(tmp_path), "--port", str(port)])
    assert status == 2 and capsys.readouterr().err.strip().splitlines() == [
        f"sweep: error: --port {port}: cannot listen on 127.0.0.1:{port} (Address already in use); "
        "choose another with --port"]


# --- MLflow ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` (SQLite backend) on a free port, for this module's tests."""
    folder, port = tmp_path_factory.mktemp("mlflow"), free_port()
    process = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                                "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}", "--default-artifact-root",
                                str(folder / "artifacts"), "--workers", "1"], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _answers(f"{uri}/health"), timeout=120, every=0.5)
        yield uri
    finally:  # killed, not stopped: it took 20 s to shut down gracefully, and nothing of it is kept
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def test_every_trial_is_an_mlflow_run_with_its_settings_metrics_and_status(tmp_path, tiny_spec, mlflow_server):
    import mlflow

    tiny_spec["run"] = {"mlflow": mlflow_server}
    done = run_cli("run", str(write_spec(tmp_path, tiny_spec)), "--storage", str(tmp_path), "--no-dashboard")
    assert done.returncode == 0, done.stderr[-3000:]
    client = mlflow.MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("tiny")
    runs = {run.info.run_name.split("_")[0]: run for run in client.search_runs([experiment.experiment_id])}
    assert sorted(runs) == ["adam", "sgd"]
    for arm, run in runs.items():
        tune_rows = next(r for name, r in trial_results(tmp_path / "tiny").items() if name.startswith(arm))
        assert run.info.status == "FINISHED" and run.data.tags["sweep"] == "tiny"
        assert run.data.params["arm/name"] == arm and float(run.data.params["arm/optim.lr"]) == \
            tiny_spec["arms"][arm]["lr"]
        history = client.get_metric_history(run.info.run_id, "val_acc")
        assert [m.value for m in sorted(history, key=lambda m: m.step)] == pytest.approx([r["val_acc"] for r in tune_rows])
