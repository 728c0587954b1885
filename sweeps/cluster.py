"""Ray clusters: the auth token, the shared-storage check, and sweeps as Ray jobs (the Job Submission SDK).

`sweep run --address` drives a sweep from this process on an existing cluster; `sweep submit` ships the
project and the spec to the cluster and runs that same `sweep run --address auto` there as a Ray job, so
the sweep outlives this terminal. `sweep jobs / logs / stop` manage those jobs.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import shutil
import socket
import tempfile
import time
import uuid
from datetime import datetime
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

from sweeps.schema import SpecError
from sweeps.spec import flag_overrides, load_spec

TOKEN_HELP = ("set RAY_AUTH_TOKEN, point RAY_AUTH_TOKEN_PATH at a file holding it, or save it as ~/.ray/auth_token "
              "(`ray get-auth-token` prints it on the head node)")
SHARED_STORAGE_HELP = ("a cluster needs storage that the driver and every node share: a network file system mounted "
                       "at the same path everywhere, or a URI such as s3://bucket/sweeps or gs://bucket/sweeps")
PROBE_TIMEOUT_S = 120  # a node may first have to set up the job's runtime environment
STOP_TIMEOUT_S = 60


# --- token --------------------------------------------------------------------------------------

def find_token() -> tuple[str | None, str]:
    """The cluster's auth token and where it came from, looked up in Ray's own order."""
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return os.environ["RAY_AUTH_TOKEN"].strip(), "RAY_AUTH_TOKEN"
    if os.environ.get("RAY_AUTH_TOKEN_PATH"):
        path = Path(os.environ["RAY_AUTH_TOKEN_PATH"]).expanduser()
        try:
            token = path.read_text().strip()
        except OSError as err:
            raise SpecError(f"RAY_AUTH_TOKEN_PATH={path}: cannot read the token ({err.strerror})") from None
        if not token:
            raise SpecError(f"RAY_AUTH_TOKEN_PATH={path}: the file is empty")
        return token, str(path)
    default = Path.home() / ".ray" / "auth_token"
    if default.is_file() and default.read_text().strip():
        return default.read_text().strip(), str(default)
    return None, ""


def use_token_if_found() -> None:
    """Turn on Ray's token mode for this process when a token is at hand.

    Ray does this by itself only for `address="auto"`; an explicit address would otherwise fail to
    connect to a token cluster after 20 s with no word about the token. Sending a token to a
    cluster without auth is harmless: it ignores it.
    """
    if "RAY_AUTH_MODE" not in os.environ and find_token()[0]:
        from ray._raylet import Config
        os.environ["RAY_AUTH_MODE"] = "token"
        Config.initialize("")  # Ray reads its config once per process; re-read it, as Ray's own _enable_token_auth does


def token_hint() -> str:
    """What to check when connecting to a cluster fails: Ray's own error never mentions the token."""
    token, source = find_token()
    if token:
        return f"if the cluster uses token authentication, check that the token from {source} is the cluster's"
    return f"if the cluster uses token authentication, {TOKEN_HELP}"


# --- shared storage -----------------------------------------------------------------------------

def check_shared_storage(storage: str) -> None:
    """Refuse a local directory that some node of the connected cluster cannot see.

    Every trial writes its results and checkpoints straight into storage from whichever node it runs
    on, and the driver writes the experiment state there, so all of them must see one directory.
    Rather than trusting a flag or guessing from the file-system type, this asks each node: a marker
    file written here must be visible there.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [node for node in ray.nodes() if node["Alive"]]
    sees = ray.remote(num_cpus=0, max_retries=0)(os.path.exists)
    path = Path(storage)
    folder = next(p for p in [path, *path.parents] if p.exists())  # storage itself is made later, if at all
    marker = folder / f".sweep-shared-{uuid.uuid4().hex}"
    marker.touch()
    try:
        checks = [sees.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False))
                  .remote(str(marker)) for node in nodes]
        seen = ray.get(checks, timeout=PROBE_TIMEOUT_S)
    except ray.exceptions.GetTimeoutError:
        raise SpecError(f"--storage {storage}: could not check within {PROBE_TIMEOUT_S} s that every node sees it; "
                        + SHARED_STORAGE_HELP) from None
    finally:
        marker.unlink()
    blind = [f"{node['NodeManagerAddress']} ({node['NodeID'][:8]})" for node, ok in zip(nodes, seen) if not ok]
    if blind:
        raise SpecError(f"--storage {storage}: a local directory that {len(blind)} of {len(nodes)} nodes cannot see "
                        f"({', '.join(blind)}); " + SHARED_STORAGE_HELP)


# --- jobs ---------------------------------------------------------------------------------------

def connect(address: str | None):
    """A Job Submission client for the cluster's dashboard address, authenticated with the token if there is one."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    address = address or os.environ.get("RAY_API_SERVER_ADDRESS")
    if not address:
        raise SpecError("--address: give the cluster's dashboard address, e.g. --address http://HEAD:8265 "
                        "(or set RAY_API_SERVER_ADDRESS)")
    address = (address if "://" in address else f"http://{address}").rstrip("/")
    url = urlsplit(address)
    if url.scheme not in ("http", "https") or not url.hostname:
        raise SpecError(f"--address {address}: jobs go to the dashboard's HTTP address, e.g. http://HEAD:8265")
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=5).close()
    except OSError as err:
        raise SpecError(f"--address {address}: no Ray dashboard answers there ({err.strerror or err})") from None
    token, source = find_token()
    try:
        return JobSubmissionClient(address, headers={"Authorization": f"Bearer {token}"} if token else None)
    except AuthenticationError:  # 401 without a token, 403 with a wrong one
        if token:
            raise SpecError(f"--address {address}: the cluster refused the token from {source}; use the cluster's "
                            f"own token: {TOKEN_HELP}") from None
        raise SpecError(f"--address {address}: the cluster requires an auth token and none was found; "
                        + TOKEN_HELP) from None
    except (ConnectionError, RuntimeError) as err:
        raise SpecError(f"--address {address}: not a Ray dashboard ({str(err).splitlines()[0]})") from None


def job_info(client, job_id: str):
    """The job's details; an unknown id is bad input (exit 2), not a crash."""
    try:
        return client.get_job_info(job_id)
    except RuntimeError as err:
        if "status code 404" not in str(err):  # the SDK reports every HTTP error as a RuntimeError
            raise
        raise SpecError(f"job {job_id}: no such job on {client.get_address()}; `sweep jobs` lists them") from None


def job_entrypoint(spec: str, *, storage: str, overrides: list[str], smoke: bool, name: str | None) -> str:
    """The shell command the job runs on the cluster: `sweep run` against the cluster it is on."""
    args = ["python", "-m", "sweeps.cli", "run", spec, "--address", "auto", "--storage", storage]
    for text in overrides:
        args += ["--set", text]
    args += ["--smoke"] * smoke + (["--name", name] if name else [])
    return shlex.join(args)


def submit_sweep(spec: str, *, address: str | None, storage: str, overrides: list[str] = (), smoke: bool = False,
                 name: str | None = None) -> tuple[str, str]:
    """Validate the spec here, then run it on the cluster as a Ray job. Returns (job id, dashboard URL)."""
    import analysis
    import sweeps
    import trainables
    from sweeps.smoke import smoke_spec

    checked, path = load_spec(spec, flag_overrides(list(overrides), name))
    if smoke:
        checked = smoke_spec(checked)
    if "://" not in storage and not PurePosixPath(storage).is_absolute():
        raise SpecError(f"--storage {storage}: give an absolute path on the cluster or a URI such as s3://bucket/sweeps "
                        "(a relative path would land in the job's temporary working directory)")
    client = connect(address)
    with tempfile.TemporaryDirectory() as folder:
        if Path(spec).is_file():  # a spec file travels in the job's working directory; bundled ones inside `sweeps`
            shutil.copy(path, Path(folder) / path.name)
            spec = path.name
        job_id = client.submit_job(
            entrypoint=job_entrypoint(spec, storage=storage, overrides=list(overrides), smoke=smoke, name=name),
            runtime_env={"working_dir": folder, "excludes": ["__pycache__", "*.pyc"],
                         "py_modules": [str(Path(package.__file__).parent) for package in (sweeps, trainables, analysis)]},
            metadata={"sweep": checked.name, "results": f"{storage.rstrip('/')}/{checked.name}"})
    return job_id, f"{client.get_address()}/#/jobs/{job_id}"


def list_jobs(*, address: str | None) -> None:
    """One line per job on the cluster, oldest first."""
    client = connect(address)
    jobs = sorted(client.list_jobs(), key=lambda job: job.start_time or 0)
    print(f"{'job':28s} {'status':10s} {'started':19s} {'sweep':24s} results")
    for job in jobs:
        started = datetime.fromtimestamp(job.start_time / 1000).strftime("%Y-%m-%d %H:%M:%S") if job.start_time else "-"
        metadata = job.metadata or {}
        print(f"{job.submission_id or job.job_id:28s} {job.status.value:10s} {started:19s} "
              f"{metadata.get('sweep', '-'):24s} {metadata.get('results', '-')}")


def print_logs(job_id: str, *, address: str | None, follow: bool = False) -> None:
    """The job's output so far; with `follow`, stream it until the job ends."""
    client = connect(address)
    job_info(client, job_id)
    if not follow:
        print(client.get_job_logs(job_id), end="")
        return

    async def tail() -> None:
        async for lines in client.tail_job_logs(job_id):
            print(lines, end="", flush=True)

    asyncio.run(tail())
    print(f"[sweep] job {job_id}: {client.get_job_status(job_id).value}", flush=True)


def stop_job(job_id: str, *, address: str | None) -> None:
    """Stop a job and wait until it has ended; the sweep's results directory can then be resumed."""
    client = connect(address)
    info = job_info(client, job_id)
    if not client.stop_job(job_id):
        print(f"{job_id}: already {info.status.value}")
        return
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while not (status := client.get_job_status(job_id)).is_terminal() and time.monotonic() < deadline:
        time.sleep(1)
    print(f"{job_id}: {status.value}")
