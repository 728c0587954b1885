"""Clusters, Ray jobs and live metrics, against a real two-node Ray cluster on this machine.

The cluster: `ray start --head` and a second `ray start --address=...` with a custom resource
(`worker_node`) so the tests can tell the nodes apart, both with token authentication on and a
token of their own (`RAY_AUTH_TOKEN`; `~/.ray/auth_token` is never touched). Where the machine
allows mount namespaces, the worker node sees a tmpfs over one directory: storage there is a
directory that only the driver's side can see, as on two real machines.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import requests
from conftest import REPO, run_cli, trial_results, write_spec

from sweeps.cli import main
from sweeps.cluster import find_token, job_entrypoint
from sweeps.schema import SpecError

TOKEN = "sweeps-test-" + "0123456789abcdef" * 2


# --- without a cluster --------------------------------------------------------------------------

def test_token_is_found_in_rays_order(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    assert find_token() == (None, "")
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("from-home\n")
    assert find_token() == ("from-home", str(tmp_path / ".ray" / "auth_token"))
    (tmp_path / "token").write_text("from-path")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "token"))
    assert find_token() == ("from-path", str(tmp_path / "token"))
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    assert find_token() == ("from-env", "RAY_AUTH_TOKEN")


def test_unreadable_token_path_is_an_error_not_a_fallback(tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "missing"))
    with pytest.raises(SpecError, match="RAY_AUTH_TOKEN_PATH=.*missing: cannot read"):
        find_token()
    (tmp_path / "empty").write_text("\n")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "empty"))
    with pytest.raises(SpecError, match="empty"):
        find_token()


def test_job_entrypoint_runs_sweep_against_its_own_cluster():
    command = job_entrypoint("my spec.yaml", storage="/shared/results", overrides=["train.epochs=2", "lr=0.1"],
                             smoke=True, name="try 1")
    assert shlex.split(command) == ["python", "-m", "sweeps.cli", "run", "my spec.yaml", "--address", "auto",
                                    "--storage", "/shared/results", "--set", "train.epochs=2", "--set", "lr=0.1",
                                    "--smoke", "--name", "try 1"]


def test_submit_checks_the_spec_and_storage_before_contacting_the_cluster(tmp_path, tiny_spec, capsys):
    nowhere = "http://127.0.0.1:1"  # nothing listens there: an error about it would mean we tried
    tiny_spec["train"]["epochs"] = 0
    assert main(["submit", str(write_spec(tmp_path, tiny_spec)), "--address", nowhere, "--storage", "/results"]) == 2
    error = capsys.readouterr().err
    assert "train.epochs" in error and "127.0.0.1:1" not in error
    assert main(["submit", "quickstart", "--address", nowhere, "--storage", "results"]) == 2
    assert "--storage results: give an absolute path" in capsys.readouterr().err
    assert main(["jobs", "--address", nowhere]) == 2
    assert "--address http://127.0.0.1:1: no Ray dashboard answers there" in capsys.readouterr().err


# --- a real two-node cluster --------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_node(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    """`ray start --block ...` in its own process group, so the node can be stopped as a whole."""
    with log.open("w") as out:
        return subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def stop_node(node: subprocess.Popen) -> None:
    """SIGTERM the node's group, then SIGKILL whatever is left (a worker whose head is gone ignores SIGTERM)."""
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(node.pid, sig)
        except ProcessLookupError:
            return
        try:
            node.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            pass


def can_hide_a_directory() -> bool:
    return shutil.which("unshare") is not None and subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "true"], capture_output=True).returncode == 0


def wait_for(condition, what: str, timeout: float = 90, every: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if value := condition():
                return value
        except requests.RequestException:
            pass
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A head (1 CPU) and a worker node (1 CPU + `worker_node`), token auth on; stopped worker first."""
    root = tmp_path_factory.mktemp("cluster")
    # One temp dir per node, as on separate machines (a node's runtime-env cleanup would otherwise delete
    # files the other node is using); short, because Ray's socket paths must fit in 107 bytes.
    temp_dirs = {node: tempfile.mkdtemp(prefix=f"rt-{node}-", dir="/tmp") for node in ("head", "worker")}
    hidden = root / "hidden"  # the worker node sees an empty tmpfs here (when mount namespaces are allowed)
    hidden.mkdir()
    gcs, dashboard = free_port(), free_port()
    metrics = {"head": free_port(), "worker": free_port()}
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": TOKEN,
           "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",  # stop at once instead of draining for 30 s
           "RAY_metrics_report_interval_ms": "1000",  # metrics reach Prometheus in 1 s instead of 10
           # `ray` and the jobs' `python` from this interpreter's environment, activated or not
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    common = ["--block", "--num-cpus=1", "--disable-usage-stats"]
    hide = can_hide_a_directory()
    url, auth = f"http://127.0.0.1:{dashboard}", {"Authorization": f"Bearer {TOKEN}"}
    nodes = []
    try:
        nodes.append(start_node(
            ["ray", "start", "--head", f"--port={gcs}", f"--dashboard-port={dashboard}", "--include-dashboard=true",
             f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
             f"--metrics-export-port={metrics['head']}", f"--temp-dir={temp_dirs['head']}", *common],
            env, root / "head.log"))
        wait_for(lambda: requests.get(f"{url}/api/version", headers=auth, timeout=2).ok, "the head's dashboard")
        worker = ["ray", "start", f"--address=127.0.0.1:{gcs}", '--resources={"worker_node": 1}',
                  f"--dashboard-agent-listen-port={free_port()}", f"--metrics-export-port={metrics['worker']}",
                  f"--temp-dir={temp_dirs['worker']}", *common]
        if hide:
            worker = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                      'mount -t tmpfs tmpfs "$0" && exec "$@"', str(hidden), *worker]
        nodes.append(start_node(worker, env, root / "worker.log"))

        def alive_nodes():
            listed = requests.get(f"{url}/api/v0/nodes?detail=1", headers=auth, timeout=5).json()
            alive = [n for n in listed["data"]["result"]["result"] if n["state"] == "ALIVE"]
            return alive if len(alive) == 2 else None

        alive = wait_for(alive_nodes, "the worker node to join")
        worker_id = next(n["node_id"] for n in alive if "worker_node" in n["resources_total"])
        yield SimpleNamespace(gcs=f"127.0.0.1:{gcs}", url=url, auth=auth, metrics=metrics, worker_id=worker_id,
                              node_ids={n["node_id"] for n in alive}, hidden=hidden if hide else None,
                              env={"RAY_AUTH_TOKEN": TOKEN})
    finally:
        try:  # the jobs' drivers run in process groups of their own: stop them through the Jobs API
            for job in requests.get(f"{url}/api/jobs/", headers=auth, timeout=5).json():
                if job["status"] in ("PENDING", "RUNNING"):
                    requests.post(f"{url}/api/jobs/{job['submission_id']}/stop", headers=auth, timeout=5)
        except (requests.RequestException, ValueError, TypeError, KeyError):  # best effort: the head may be down
            pass
        for node in reversed(nodes):  # the worker before the head
            stop_node(node)
        for temp_dir in temp_dirs.values():
            shutil.rmtree(temp_dir, ignore_errors=True)


def scrape(port: int) -> str:
    try:
        return requests.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text
    except requests.RequestException:
        return ""


def actors_of(cluster, trial_names: set[str]) -> list[dict]:
    """Ray's record (live or dead) of the actors whose repr is one of these trial names."""
    listed = requests.get(f"{cluster.url}/api/v0/actors?detail=1&limit=10000", headers=cluster.auth, timeout=10).json()
    return [a for a in listed["data"]["result"]["result"] if a.get("repr_name") in trial_names]


@pytest.mark.slow
def test_run_with_address_spreads_trials_over_nodes_and_exports_live_metrics(cluster, tmp_path, tiny_spec):
    tiny_spec.update(name="spread", train={"epochs": 3}, space={"seed": {"grid": [0, 1]}})
    command = [sys.executable, "-m", "sweeps.cli", "run", str(write_spec(tmp_path, tiny_spec)),
               "--address", cluster.gcs, "--storage", str(tmp_path / "results")]
    # RAY_AUTH_MODE is left unset: `sweep run` turns token mode on itself because it finds RAY_AUTH_TOKEN.
    env = {**os.environ, "RAY_AUTH_TOKEN": TOKEN}
    env.pop("RAY_AUTH_MODE", None)
    gauges = set()
    log = tmp_path / "sweep.log"
    with log.open("w") as out, subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT) as sweep:
        while sweep.poll() is None:  # scrape both nodes' Prometheus endpoints while the sweep runs
            for port in cluster.metrics.values():
                gauges.update(re.findall(r"^ray_sweep_val_acc\{(.*)\} ", scrape(port), re.MULTILINE))
            time.sleep(0.5)
    assert sweep.returncode == 0, log.read_text()[-3000:]
    trials = trial_results(tmp_path / "results" / "spread")
    assert len(trials) == 4 and all(len(rows) == 3 for rows in trials.values())

    # Live metrics: tagged by sweep, arm and trial id, for trials of this sweep.
    tags = [dict(re.findall(r'(\w+)="([^"]*)"', labels)) for labels in gauges]
    ours = [t for t in tags if t.get("sweep") == "spread"]
    assert ours, f"no ray_sweep_val_acc gauge of this sweep on either node; saw {tags}"
    assert {t["arm"] for t in ours} <= {"sgd", "adam"}
    assert {f"{t['arm']}_{t['trial']}" for t in ours} <= set(trials)

    # Trial actors carry their trial's name, and ran on both nodes: on the worker (known by its custom
    # resource) and on the head.
    actors = actors_of(cluster, set(trials))
    assert actors, "no actor is named after a trial"
    ran_on = {a["node_id"] for a in actors}
    assert cluster.worker_id in ran_on and ran_on == cluster.node_ids, "trials did not land on both nodes"
    assert {a["class_name"] for a in actors} == {"SweepTrial"}


@pytest.mark.slow
def test_local_storage_a_node_cannot_see_is_refused(cluster, tmp_path, tiny_spec):
    if cluster.hidden is None:
        pytest.skip("needs mount namespaces (unshare -m) to give one node a different view of a directory")
    storage = cluster.hidden / "results"
    done = run_cli("run", str(write_spec(tmp_path, tiny_spec)), "--address", cluster.gcs, "--storage", str(storage),
                   env=cluster.env)
    assert done.returncode == 2, done.stderr[-3000:]
    error = done.stderr.strip().splitlines()[-1]
    assert f"--storage {storage}: a local directory that 1 of 2 nodes cannot see" in error
    assert "s3://" in error
    assert list(cluster.hidden.iterdir()) == []  # nothing started: no results directory, the probe file removed


@pytest.fixture
def sweep(capsys, monkeypatch):
    """The `sweep` CLI in this process, with the cluster's token: (exit status, stdout, stderr).

    The job verbs only talk HTTP to the dashboard, so they run here, without a 10 s interpreter start each.
    """
    monkeypatch.setenv("RAY_AUTH_TOKEN", TOKEN)

    def run(*args: str) -> tuple[int, str, str]:
        code = main(list(args))
        out, err = capsys.readouterr()
        return code, out, err

    return run


@pytest.mark.slow
def test_submit_runs_the_sweep_as_a_job_and_the_job_commands_manage_it(cluster, sweep, tmp_path, tiny_spec):
    tiny_spec["name"] = "as-a-job"
    spec = write_spec(tmp_path, tiny_spec, name="my-spec.yaml")
    storage = tmp_path / "shared"
    code, out, err = sweep("submit", str(spec), "--address", cluster.url, "--storage", str(storage),
                           "--set", "train.epochs=1")
    assert code == 0, err
    job_id = re.search(r"^job (\S+)$", out, re.MULTILINE).group(1)
    assert f"dashboard {cluster.url}/#/jobs/{job_id}" in out

    code, out, err = sweep("logs", job_id, "--address", cluster.url, "--follow")
    assert code == 0 and f"job {job_id}: SUCCEEDED" in out, out[-3000:]
    assert "Comparison (as in report/comparison.md)" in out

    results = storage / "as-a-job"
    trials = trial_results(results)
    assert len(trials) == 2 and all(len(rows) == 1 for rows in trials.values())  # --set reached the job
    assert (results / "spec.yaml").is_file() and (results / "report" / "report.html").is_file()

    code, out, err = sweep("jobs", "--address", cluster.url)
    line = next(line for line in out.splitlines() if line.startswith(job_id))
    assert line.split()[1] == "SUCCEEDED" and "as-a-job" in line and str(results) in line
    assert "Comparison (as in report/comparison.md)" in sweep("logs", job_id, "--address", cluster.url)[1]
    code, out, err = sweep("logs", "raysubmit_nosuchjob", "--address", cluster.url)
    assert code == 2 and "job raysubmit_nosuchjob: no such job" in err


@pytest.mark.slow
def test_stop_ends_a_running_job(cluster, sweep, tmp_path, tiny_spec):
    tiny_spec.update(name="stopped", train={"epochs": 500}, arms={"sgd": {"optimizer": "sgd", "lr": 0.1}})
    code, out, err = sweep("submit", str(write_spec(tmp_path, tiny_spec)), "--address", cluster.url,
                           "--storage", str(tmp_path / "shared"))
    assert code == 0, err
    job_id = re.search(r"^job (\S+)$", out, re.MULTILINE).group(1)
    status = lambda: requests.get(f"{cluster.url}/api/jobs/{job_id}", headers=cluster.auth, timeout=5).json()["status"]
    wait_for(lambda: status() == "RUNNING", "the job to start")
    code, out, err = sweep("stop", job_id, "--address", cluster.url)
    assert code == 0 and f"{job_id}: STOPPED" in out, err
    assert status() == "STOPPED"


@pytest.mark.slow
def test_jobs_api_and_dashboard_require_the_token(cluster, sweep, tmp_path, monkeypatch):
    for path in ("/api/jobs/", "/nodes?view=summary"):  # the Jobs API, and an API the dashboard's pages call
        assert requests.get(cluster.url + path, timeout=5).status_code == 401
        assert requests.get(cluster.url + path, headers={"Authorization": "Bearer wrong"}, timeout=5).status_code == 403
        assert requests.get(cluster.url + path, headers=cluster.auth, timeout=5).status_code == 200

    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.ray/auth_token here
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    code, out, err = sweep("jobs", "--address", cluster.url)
    assert code == 2 and "the cluster requires an auth token and none was found; set RAY_AUTH_TOKEN" in err
    monkeypatch.setenv("RAY_AUTH_TOKEN", "wrong")
    code, out, err = sweep("jobs", "--address", cluster.url)
    assert code == 2 and "the cluster refused the token from RAY_AUTH_TOKEN" in err
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text(TOKEN)
    code, out, err = sweep("jobs", "--address", cluster.url)
    assert code == 0 and out.startswith("job "), err
