"""Shared helpers: run the real `sweep` CLI in a subprocess, write small specs, read results."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
# The short console's one line about how a trial ended (`sweep run` without --verbose).
TRIAL_LINE = re.compile(r"^\[sweep\] \w+_\w+_\d{5}: (completed \d+ epochs?|stopped early after \d+ epochs?|diverged at "
                        r"epoch \d+|failed; traceback in \S+)")
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"  # Debian's, installed by .ci/run


# --- ending the test process ------------------------------------------------------------------------------
# Several tests run Ray drivers in this process (ray.init, Tuner.fit, the CLI). Ray 2.60 leaves native threads
# running after ray.shutdown() (its GCS client's io thread, gRPC's, `worker.io`), and a CI run printed "450
# passed" and then died with SIGSEGV (exit 139) in the interpreter's teardown. The race never showed in a small
# driver run 70 times, so its exact partner is unproven; the teardown is not needed. Once pytest has written
# everything, the process ends with pytest's own status. (Each `sweep` process runs one driver; the suite checks
# the exit statuses of those it starts.)
_EXIT_STATUS = pytest.StashKey[int]()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    session.config.stash[_EXIT_STATUS] = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    if _EXIT_STATUS in config.stash:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(config.stash[_EXIT_STATUS])


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """`sweep ARGS...` as a user runs it; returns the finished process (text output)."""
    return subprocess.run([sys.executable, "-m", "sweeps.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def write_spec(folder: Path, spec: dict, name: str = "spec.yaml") -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def sweep(argv: list[str], capsys) -> tuple[int, str]:
    """The `sweep` entry point in this process (`sweeps.cli.main`: one import of torch and Ray for many cases
    instead of one per process); returns (exit status, stderr)."""
    from sweeps.cli import main

    try:
        status = main(argv)
    except SystemExit as exit:  # argparse's own errors
        status = exit.code
    return status, capsys.readouterr().err


@pytest.fixture
def ray_must_not_start(monkeypatch):
    """Fails the test where Ray starts: a refusal must come before anything starts."""
    import ray

    def refuse(*args, **kwargs):
        raise AssertionError("a bad input must be refused before Ray starts")
    monkeypatch.setattr(ray, "init", refuse)


def trial_results(results_dir: Path) -> dict[str, list[dict]]:
    """Trial directory name -> its result rows (one dict per reported epoch)."""
    out = {}
    for result in sorted(results_dir.glob("*/result.json")):
        out[result.parent.name] = [json.loads(line) for line in result.read_text().splitlines() if line.strip()]
    return out


# Fields of a trial's result row that differ between two runs of the same spec and seed: times, places, ids.
VOLATILE = {"epoch_time_s", "eval_time_s", "samples_per_s", "time_this_iter_s", "time_total_s", "timestamp", "date",
            "pid", "time_since_restore", "iterations_since_restore", "trial_id", "experiment_tag",
            "checkpoint_dir_name", "hostname", "node_ip", "config", "done", "training_iteration", "should_checkpoint"}


def trial_settings(spec: dict, flat: dict | None = None) -> dict:
    """The resolved settings a trial of `spec` trains with, dotted `flat` settings (`optim.lr`) laid over them."""
    from sweeps.spec import validate_spec
    from trainables.settings import apply_settings

    return apply_settings(validate_spec(spec, "test").base_settings(), flat or {})


def tiny() -> dict:
    """A spec that trains in about a second per trial on the embedded data (for module-scoped fixtures)."""
    return {
        "name": "tiny",
        "data": {"name": "mnist5k", "train_subset": 400, "batch_size": 50},
        "model": {"name": "mlp", "hidden_sizes": [32]},
        "train": {"epochs": 2},
        "arms": {"sgd": {"optimizer": "sgd", "lr": 0.1}, "adam": {"optimizer": "adam", "lr": 0.003}},
    }


@pytest.fixture
def tiny_spec() -> dict:
    """A spec that trains in about a second per trial on the embedded data."""
    return tiny()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def chromium():
    """A real headless Chromium driven by Selenium (Debian's browser and driver; nothing is downloaded)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--window-size=1400,1000", f"--user-data-dir={profile}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def start_moto(folder: Path, **env) -> tuple[subprocess.Popen, str]:
    """A real S3 HTTP API (moto's server) on a free port, listening on every interface so that containers reach
    it too; returns (process, endpoint URL on this machine)."""
    import urllib.request

    port = free_port()
    log = open(folder / f"moto-{port}.log", "w")
    # Moto takes a host name it does not know for a bucket (virtual-host style); containers call this host so.
    env = {"MOTO_S3_CUSTOM_ENDPOINTS": f"http://host.containers.internal:{port}", **env}
    process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "0.0.0.0", "-p", str(port)], stdout=log,
                               stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ, **env})
    log.close()  # the server has its own copy
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1)
            return process, endpoint
        except OSError:
            time.sleep(0.1)
    process.kill()
    process.wait()
    raise RuntimeError(f"moto did not start; see {log.name}")


S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def make_bucket(endpoint: str, name: str) -> None:
    import boto3

    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
                 aws_secret_access_key="testing").create_bucket(Bucket=name)


def s3_objects(endpoint: str, prefix: str) -> list[str]:
    """Every object under s3://prefix on the S3 server at `endpoint`, as paths."""
    import pyarrow.fs

    fs = pyarrow.fs.S3FileSystem(endpoint_override=endpoint, access_key="testing", secret_key="testing",
                                 region="us-east-1")
    found = fs.get_file_info(pyarrow.fs.FileSelector(prefix, recursive=True, allow_not_found=True))
    return sorted(info.path for info in found if info.type == pyarrow.fs.FileType.File)


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server with the bucket `sweeps`; yields the environment that points clients at it."""
    process, endpoint = start_moto(tmp_path_factory.mktemp("moto"))
    try:
        make_bucket(endpoint, "sweeps")
        yield {**S3_CREDENTIALS, "AWS_ENDPOINT_URL": endpoint}
    finally:
        process.kill()
        process.wait()
