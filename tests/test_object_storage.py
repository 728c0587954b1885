"""Results in object storage (S3, served here by moto's real HTTP API): bad buckets and refused credentials are
caught before anything starts, a sweep writes its results and checkpoints there, `sweep report s3://...` works
from this machine, and `sweep resume s3://...` finishes a sweep whose driver was killed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO, S3_CREDENTIALS, run_cli, s3_objects, start_moto, sweep, trial_results, write_spec



def listing(env: dict, prefix: str) -> list[str]:
    return s3_objects(env["AWS_ENDPOINT_URL"], prefix)


def set_env(monkeypatch, env: dict) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)


@pytest.mark.parametrize("verb", ["run", "resume"])
def test_a_bucket_that_does_not_exist_is_refused_before_anything_starts(tmp_path, tiny_spec, s3, verb, monkeypatch,
                                                                         capsys, ray_must_not_start):
    set_env(monkeypatch, s3)
    args = [str(write_spec(tmp_path, tiny_spec)), "--storage", "s3://nowhere/sweeps"] if verb == "run" else \
        ["s3://nowhere/sweeps/tiny"]
    status, err = sweep([verb, *args], capsys)
    flag = "--storage s3://nowhere/sweeps" if verb == "run" else "resume s3://nowhere/sweeps/tiny"
    assert status == 2 and err.strip().splitlines() == [
        f"sweep: error: {flag}: bucket nowhere does not exist; create it first"]
    assert listing(s3, "nowhere") == [] and listing(s3, "sweeps") == []  # no bucket made, nothing written


@pytest.fixture(scope="module")
def refusing_s3(tmp_path_factory):
    """A moto S3 server that checks credentials (INITIAL_NO_AUTH_ACTION_COUNT=0): these keys belong to nobody."""
    process, endpoint = start_moto(tmp_path_factory.mktemp("moto-auth"), INITIAL_NO_AUTH_ACTION_COUNT="0")
    try:
        yield {**S3_CREDENTIALS, "AWS_ENDPOINT_URL": endpoint}
    finally:
        process.kill()
        process.wait()


@pytest.mark.parametrize("verb", ["run", "resume"])
def test_refused_credentials_are_said_before_anything_starts(tmp_path, tiny_spec, verb, refusing_s3, monkeypatch,
                                                             capsys, ray_must_not_start):
    set_env(monkeypatch, refusing_s3)
    args = [str(write_spec(tmp_path, tiny_spec)), "--storage", "s3://sweeps/x"] if verb == "run" else ["s3://sweeps/x"]
    status, err = sweep([verb, *args], capsys)
    assert status == 2 and len(err.strip().splitlines()) == 1
    flag = "--storage" if verb == "run" else "resume"
    assert f"{flag} s3://sweeps/x: the object store refused it (" in err
    assert "check the credentials" in err


@pytest.mark.slow
def test_a_sweep_on_s3_is_reported_and_resumed_from_this_machine(tmp_path, s3, monkeypatch, capsys,
                                                                  ray_must_not_start):  # reports start no Ray
    # About a second per epoch, one trial at a time: slow enough to kill the driver between two epochs.
    spec = write_spec(tmp_path, {"name": "remote", "data": {"name": "mnist5k", "batch_size": 50},
                                 "model": {"name": "mlp", "hidden_sizes": [1024, 1024]}, "train": {"epochs": 4},
                                 "arms": {"sgd": {"optimizer": "sgd", "lr": 0.05}, "adam": {"optimizer": "adam", "lr": 0.001}},
                                 "search": {"max_concurrent": 1}})
    with open(tmp_path / "run.log", "w") as log:
        driver = subprocess.Popen([sys.executable, "-m", "sweeps.cli", "run", str(spec), "--storage", "s3://sweeps/runs",
                                   "--no-dashboard"], cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True, env={**os.environ, **s3})
    try:  # kill once the first trial has checkpointed its second epoch in the bucket: it has two more to go
        deadline = time.monotonic() + 300
        while not any("checkpoint_000001" in p for p in listing(s3, "sweeps/runs/remote")):
            assert time.monotonic() < deadline and driver.poll() is None, (tmp_path / "run.log").read_text()[-3000:]
            time.sleep(0.2)
        time.sleep(0.5)
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    finally:
        try:
            os.killpg(driver.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    stored = listing(s3, "sweeps/runs/remote")
    assert "sweeps/runs/remote/spec.yaml" in stored and any(p.endswith("state.pt") for p in stored)
    time.sleep(5)  # the orphaned worker notices its raylet is gone and exits

    resumed = run_cli("resume", "s3://sweeps/runs/remote", "--no-dashboard", env=s3)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    out = tmp_path / "here"
    set_env(monkeypatch, s3)
    status, err = sweep(["report", "s3://sweeps/runs/remote", "--out", str(out)], capsys)
    assert status == 0, err[-3000:]
    assert (out / "report" / "report.html").is_file() and not list(out.rglob("checkpoint_*"))
    rows = trial_results(out)
    seen = {name: [(r["epoch"], r["iterations_since_restore"]) for r in t] for name, t in rows.items()}
    assert len(rows) == 2 and all(t[-1]["epoch"] == 4 for t in rows.values()), (seen, resumed.stderr[-3000:])
    # the interrupted one went on from its checkpoint, not from epoch 1
    assert any(r["iterations_since_restore"] == 1 and r["epoch"] > 1 for t in rows.values() for r in t), seen
    status, err = sweep(["report", "s3://sweeps/runs/remote/", "--out", str(out)], capsys)
    assert status == 2 and err.strip().splitlines() == [  # a trailing slash is the same
        f"sweep: error: --out {out}: already exists; the results of s3://sweeps/runs/remote are downloaded into a "
        "new directory (choose another with --out)"]
    status, err = sweep(["report", "s3://sweeps/runs/nothing"], capsys)
    assert status == 2 and "s3://sweeps/runs/nothing: not a sweep results directory" in err
