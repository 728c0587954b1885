"""The image and the compose cluster for real: build docker/Dockerfile with podman, start docker/docker-compose.yml
(a head and 2 workers, token auth, a shared results volume), submit sweeps from this machine, kill a worker
container mid-trial, and keep results in S3 (moto's real HTTP API, reached from inside the containers).

No registry is reachable here, so the base image is made from Debian's own packages (debootstrap, then
`podman import`); torch comes from the CPU wheel pip's configuration points at, else from PyTorch's CPU index.
Compose is Debian's docker-compose 1.29 against podman's Docker-compatible socket: the same program and file a
Docker user runs. The images stay as the build cache of the next run; everything else the test starts
(containers, network, volume, the podman API service, moto) ends with it, also when it fails.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from conftest import (
    REPO,
    S3_CREDENTIALS,
    free_port,
    make_bucket,
    run_cli,
    s3_objects,
    start_moto,
    trial_results,
    write_spec,
)

BASE = "localhost/debian-python:bookworm"  # Debian 12: its python3 is 3.11
IMAGE = "localhost/sweeps:test"
pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]  # the first test waits for a cold build


def missing_tools() -> str | None:
    """Why containers cannot run here, or None."""
    for tool in ("podman", "debootstrap", "catatonit", "docker-compose"):  # Debian packages of the same names
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install {tool})"
    info = subprocess.run(["podman", "info"], capture_output=True, text=True)
    if info.returncode != 0:
        return f"podman cannot run here: {info.stderr.strip().splitlines()[-1] if info.stderr.strip() else info.returncode}"
    return None


def podman(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0 or not check, f"podman {' '.join(args)}: {done.stderr[-2000:]}"
    return done


PYTEST = []  # pytest's config, once the first fixture has run


def say(text: str) -> None:
    """A line in the test log even under `pytest -q`: the build and cluster times are worth seeing in CI."""
    for config in PYTEST:
        with config.pluginmanager.get_plugin("capturemanager").global_and_fixture_disabled():
            config.pluginmanager.get_plugin("terminalreporter").write_line(f"[containers] {text}")


# --- the image --------------------------------------------------------------------------------------


def make_base_image() -> None:
    """Debian bookworm's minimal root file system with python3, imported as BASE."""
    with tempfile.TemporaryDirectory(prefix="debian-root-") as root:
        subprocess.run(["debootstrap", "--variant=minbase", "--include=python3,python3-venv,ca-certificates",
                        "bookworm", root], check=True, capture_output=True, timeout=900)
        tar = subprocess.Popen(["tar", "-C", root, "-c", "."], stdout=subprocess.PIPE)
        try:
            subprocess.run(["podman", "import", "-", BASE], stdin=tar.stdout, check=True, capture_output=True,
                           timeout=300)
        finally:
            tar.stdout.close()  # if the import failed, tar gets EPIPE and ends
            assert tar.wait(timeout=60) == 0


def torch_build_args() -> list[str]:
    """Build arguments for torch: the CPU wheel in pip's find-links folders when there is one (torchvision, built
    for the same release, from PyPI), else the Dockerfile's default, PyTorch's CPU index."""
    config = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
    folders = [value.strip("'") for line in config.splitlines() for key, _, value in [line.partition("=")]
               if key.endswith("find-links")]
    wheels = sorted(w for folder in folders for w in Path(folder).glob("torch-*+cpu-cp311-*.whl"))
    if not wheels:
        return []
    version = wheels[-1].name.split("-")[1]  # e.g. 2.13.0+cpu
    minor = int(version.split(".")[1])
    return ["-v", f"{wheels[-1].parent}:/wheels:ro", "--build-arg", "TORCH_SOURCE=--find-links /wheels",
            "--build-arg", f"TORCH_VERSION={version}",
            # torchvision 0.(N+15) is the release built for torch 2.N
            "--build-arg", "TORCHVISION_SOURCE=--index-url https://pypi.org/simple",
            "--build-arg", f"TORCHVISION_VERSION=0.{minor + 15}.0"]


@pytest.fixture(scope="module")
def image(pytestconfig) -> str:
    PYTEST.append(pytestconfig)
    problem = missing_tools()
    if problem:
        pytest.skip(problem)
    start = time.monotonic()
    if podman("image", "exists", BASE, check=False).returncode != 0:
        make_base_image()
        say(f"base image {BASE} made with debootstrap in {time.monotonic() - start:.0f} s")
    # The host's CA bundle and pip settings: package registries here are reached through a TLS proxy.
    mounts = [arg for path in ("/etc/ssl/certs/ca-certificates.crt", "/etc/pip.conf") if Path(path).is_file()
              for arg in ("-v", f"{path}:{path}:ro")]
    start = time.monotonic()
    build = subprocess.run(["podman", "build", "--network", "host", *mounts, *torch_build_args(),
                            "--build-arg", f"BASE={BASE}", "-f", "docker/Dockerfile", "-t", IMAGE, "."],
                           cwd=REPO, capture_output=True, text=True, timeout=1800)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    cached = build.stdout.count("Using cache")
    say(f"image {IMAGE} built in {time.monotonic() - start:.0f} s ({cached} cached steps)")
    return IMAGE


def test_the_image_runs_the_cli_as_a_non_root_user_with_the_clients_ray(image):
    import ray

    done = podman("run", "--rm", image, "sh", "-c", "id -u; ray --version; sweep validate quickstart")
    uid, ray_version, *validate = done.stdout.splitlines()
    assert uid == "1000" and ray.__version__ in ray_version
    assert validate[0].endswith("quickstart.yaml: valid"), done.stdout + done.stderr


# --- the compose cluster ----------------------------------------------------------------------------


@dataclass
class Cluster:
    url: str  # the head's Jobs API and dashboard, from this machine
    env: dict  # what a client here needs: the token
    project: str
    s3: dict  # the environment that points clients here at the S3 server the containers use
    results: Path  # the shared results volume, as this machine sees it

    def container(self, service: str, index: int = 1) -> str:
        return f"{self.project}_{service}_{index}"

    def sweep(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        return run_cli(*args, env={**self.env, **self.s3}, timeout=timeout)


def compose(env: dict, project: str, env_file: Path, *args: str) -> subprocess.Popen:
    """`docker-compose ARGS` for this project, its output appended to compose.log beside the env file."""
    with open(env_file.parent / "compose.log", "a") as log:
        return subprocess.Popen(["docker-compose", "-f", str(REPO / "docker" / "docker-compose.yml"), "--env-file",
                                 str(env_file), "-p", project, *args], env=env, stdout=log, stderr=subprocess.STDOUT)


def up(env: dict, project: str, env_file: Path, timeout: float = 300) -> None:
    """`docker-compose up`: it waits for the head's healthcheck before it starts the workers. Podman runs
    healthchecks from systemd timers, and there is no systemd here, so this runs them meanwhile."""
    starting = compose(env, project, env_file, "up", "-d", "--no-build", "--scale", "worker=2")
    deadline = time.monotonic() + timeout
    while starting.poll() is None and time.monotonic() < deadline:
        podman("healthcheck", "run", f"{project}_head_1", check=False)
        time.sleep(2)
    if starting.poll() is None:
        starting.kill()
    log = (env_file.parent / "compose.log").read_text()
    assert starting.wait() == 0, f"docker-compose up failed or took over {timeout:.0f} s: {log[-3000:]}"


@pytest.fixture(scope="module")
def cluster(image, tmp_path_factory):
    folder = tmp_path_factory.mktemp("compose")
    moto, endpoint = start_moto(folder)
    socket = folder / "podman.sock"
    service = subprocess.Popen(["podman", "system", "service", "--time=0", f"unix://{socket}"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    project = f"sweepstest{os.getpid()}"
    port, token = free_port(), secrets.token_hex(16)
    env_file = folder / "cluster.env"  # as docker/.env would be, plus the S3 server as the containers reach it
    env_file.write_text("".join(f"{k}={v}\n" for k, v in {
        "RAY_AUTH_TOKEN": token, "SWEEPS_IMAGE": image, "DASHBOARD_PORT": port, "WORKER_CPUS": 1, **S3_CREDENTIALS,
        "AWS_ENDPOINT_URL": f"http://host.containers.internal:{endpoint.rsplit(':', 1)[1]}"}.items()))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_AUTH"))}  # the env file decides
    env["DOCKER_HOST"] = f"unix://{socket}"
    try:
        for _ in range(100):
            if socket.exists():
                break
            time.sleep(0.1)
        start = time.monotonic()
        up(env, project, env_file)
        say(f"compose cluster (head and 2 workers) up in {time.monotonic() - start:.0f} s")
        volume = podman("volume", "inspect", f"{project}_results", "--format", "{{.Mountpoint}}").stdout.strip()
        make_bucket(endpoint, "sweeps")
        yield Cluster(url=f"http://127.0.0.1:{port}", env={"RAY_AUTH_TOKEN": token, "RAY_AUTH_MODE": "token"},
                      project=project, s3={**S3_CREDENTIALS, "AWS_ENDPOINT_URL": endpoint}, results=Path(volume))
    finally:  # each step runs even if the one before it fails
        try:
            down = compose(env, project, env_file, "down", "-v", "--timeout", "5")
            try:
                down.wait(timeout=300)
            except subprocess.TimeoutExpired:
                down.kill()
                podman("rm", "-f", *[line for line in podman("ps", "-a", "-q", "--filter",
                                                             f"label=com.docker.compose.project={project}",
                                                             check=False).stdout.split()], check=False)
        finally:
            for process in (service, moto):
                process.kill()
                process.wait()


def wait_for(condition, what: str, timeout: float = 300, job: tuple[Cluster, str] | None = None):
    """Poll `condition` until it returns something true, and return that; fail at once if `job` has ended."""
    start = time.monotonic()
    while True:
        if job:
            cluster, job_id = job
            answer = requests.get(f"{cluster.url}/api/jobs/{job_id}", timeout=5,
                                  headers={"Authorization": f"Bearer {cluster.env['RAY_AUTH_TOKEN']}"}).json()
            assert answer["status"] in ("PENDING", "RUNNING"), f"job {answer['status']}: {follow(cluster, job_id)[-3000:]}"
        try:
            value = condition()
        except ValueError:  # a result file caught mid-write: half a line of JSON
            value = None
        if value:
            return value
        assert time.monotonic() - start < timeout, f"timed out waiting for {what}"
        time.sleep(0.25)


def submit(cluster: Cluster, spec: Path, storage: str) -> str:
    done = cluster.sweep("submit", str(spec), "--address", cluster.url, "--storage", storage)
    assert done.returncode == 0, done.stderr[-3000:]
    return re.search(r"^job (\S+)$", done.stdout, re.MULTILINE).group(1)


def follow(cluster: Cluster, job_id: str) -> str:
    """The job's output once it has ended."""
    done = cluster.sweep("logs", job_id, "--address", cluster.url, "--follow")
    return done.stdout


def slow_spec(folder: Path, name: str, trials: int) -> Path:
    """`trials` trials of about a second per epoch each: long enough to be caught between two epochs."""
    arms = {f"lr{i}": {"optimizer": "sgd", "lr": 0.01 * (i + 1)} for i in range(trials)}
    return write_spec(folder, {"name": name, "data": {"name": "mnist5k", "batch_size": 50},
                               "model": {"name": "mlp", "hidden_sizes": [1024, 1024]}, "train": {"epochs": 5},
                               "arms": arms})


def test_a_sweep_survives_the_loss_of_a_worker_container(cluster, tmp_path):
    # One trial per worker at a time (WORKER_CPUS=1): two trials finish, then one of the next two loses its node.
    job_id = submit(cluster, slow_spec(tmp_path, "fault", 4), "/results")
    results = cluster.results / "fault"

    def victim():
        trials = trial_results(results)
        finished = {name: rows for name, rows in trials.items() if rows and rows[-1]["epoch"] == 5}
        running = [rows for rows in trials.values() if rows and 2 <= rows[-1]["epoch"] < 4]
        return (finished, running[0]) if finished and running else None

    finished, rows = wait_for(victim, "a trial that has checkpointed twice while another has finished",
                              job=(cluster, job_id))
    finished_files = {name: (results / name / "result.json").read_text() for name in finished}
    lost = next(name for name, r in trial_results(results).items() if r and r[0]["trial_id"] == rows[0]["trial_id"])
    podman("kill", rows[-1]["hostname"])  # a container's host name is its id
    say(f"killed worker {rows[-1]['hostname']} after epoch {rows[-1]['epoch']} of {lost}")
    try:
        log = follow(cluster, job_id)
    finally:
        podman("start", rows[-1]["hostname"])  # the next test has two workers again
    assert f"job {job_id}: SUCCEEDED" in log, log[-3000:]
    assert (results / "report" / "report.html").is_file() and (results / "report" / "comparison.csv").is_file()
    trials = trial_results(results)
    assert len(trials) == 4 and all(sorted({r["epoch"] for r in t}) == [1, 2, 3, 4, 5] for t in trials.values())
    for name, text in finished_files.items():  # finished before the fault: untouched by it
        assert (results / name / "result.json").read_text() == text, name
    restarts = [i for i, r in enumerate(trials[lost]) if r["iterations_since_restore"] == 1]
    assert len(restarts) == 2 and trials[lost][0]["epoch"] == 1, trials[lost]
    before = [r["epoch"] for r in trials[lost][:restarts[1]]]
    # It goes on from its last checkpoint (one every epoch): right after the last epoch it reported, not from 1.
    assert trials[lost][restarts[1]]["epoch"] == max(before) + 1 and max(before) >= rows[-1]["epoch"], trials[lost]
    restarts = [trials[lost][i] for i in restarts]
    assert restarts[1]["hostname"] != rows[-1]["hostname"]  # it went on on the other worker


def s3_listing(cluster: Cluster, prefix: str) -> list[str]:
    return s3_objects(cluster.s3["AWS_ENDPOINT_URL"], prefix)


def test_a_sweep_keeps_its_results_in_s3_and_resumes_from_there_after_its_driver_is_killed(cluster, tmp_path):
    job_id = submit(cluster, slow_spec(tmp_path, "ins3", 2), "s3://sweeps/cluster")
    wait_for(lambda: any("checkpoint_000001" in p for p in s3_listing(cluster, "sweeps/cluster/ins3")),
             "a checkpoint in the bucket", job=(cluster, job_id))
    time.sleep(1)
    # The job's driver is the `sweeps.cli run` process in the head container: SIGKILL, as a crash would.
    podman("exec", cluster.container("head"), "python", "-c",
           "import os\n"
           "for pid in filter(str.isdigit, os.listdir('/proc')):\n"
           "    try:\n"
           "        if b'sweeps.cli\\0run' in open(f'/proc/{pid}/cmdline', 'rb').read(): os.kill(int(pid), 9)\n"
           "    except (FileNotFoundError, ProcessLookupError):\n"
           "        pass  # a process that ended meanwhile")
    log = follow(cluster, job_id)
    assert f"job {job_id}: FAILED" in log, log[-3000:]
    stored = s3_listing(cluster, "sweeps/cluster/ins3")
    assert "sweeps/cluster/ins3/spec.yaml" in stored and any(p.endswith("state.pt") for p in stored)
    assert not any(p.endswith("report.html") for p in stored)

    resumed = podman("exec", cluster.container("head"), "sweep", "resume", "s3://sweeps/cluster/ins3",
                     "--address", "auto", "--no-dashboard", timeout=600, check=False)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    out = tmp_path / "here"
    report = cluster.sweep("report", "s3://sweeps/cluster/ins3", "--out", str(out))
    assert report.returncode == 0, report.stderr[-3000:]
    assert (out / "report" / "report.html").is_file()
    trials = trial_results(out)
    # Every trial finished, and what the kill interrupted went on from a checkpoint, not from epoch 1. (The rows
    # of epochs between Tune's last upload of its state and the kill can be missing: see SweepTrial.restore.)
    epochs = {name: [(r["epoch"], r["iterations_since_restore"]) for r in rows] for name, rows in trials.items()}
    assert len(trials) == 2 and all(t[-1][0] == 5 for t in epochs.values()), json.dumps(epochs)
    assert any(e > 1 for t in epochs.values() for e, since in t if since == 1), json.dumps(epochs)
    checkpointed = {p.split("/")[3] for p in s3_listing(cluster, "sweeps/cluster/ins3") if p.endswith("state.pt")}
    assert checkpointed == set(trials)  # the checkpoints stay in the bucket, and only there
