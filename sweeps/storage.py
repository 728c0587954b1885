"""Where a sweep's results live: a local directory or object storage (s3://, gs://), checked before anything
starts, written atomically, and read back (the spec a results directory was run with, its files for a report)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pyarrow.fs
import yaml

from sweeps.console import say
from sweeps.schema import Spec, SpecError
from sweeps.spec import dump_spec, validate_spec

SPEC_FILE = "spec.yaml"  # the spec as it was run, beside Tune's own files in every results directory
VERSIONS_FILE = "versions.json"  # the code and library versions that made the results, beside the spec
TIMELINE_FILE = "timeline.json"  # seconds from the command's start to each phase (sweeps.progress.Timeline)


def write_spec(results_dir: str, spec: Spec) -> None:
    """The spec as run and the versions that run it (`versions()`), into a new results directory."""
    write_text(f"{results_dir}/{SPEC_FILE}", dump_spec(spec))
    write_text(f"{results_dir}/{VERSIONS_FILE}", json.dumps(versions(), indent=2) + "\n")


def versions() -> dict[str, str]:
    """What makes a sweep's results: this code (its git commit, `+changes` when the checkout differs from it, where
    there is a checkout; else the package's version) and Python, torch, Ray and Optuna."""
    import platform
    import subprocess
    from importlib.metadata import PackageNotFoundError, version

    def installed(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    code = f"sweeps {installed('sweeps')}"
    checkout = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "-C", str(checkout), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        changed = subprocess.run(["git", "-C", str(checkout), "status", "--porcelain", "--untracked-files=no"],
                                 capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        code += f" (git {commit}{'+changes' if changed else ''})"
    except (OSError, subprocess.SubprocessError):  # no git, or not a checkout (an installed package, an image)
        pass
    return {"code": code, "python": platform.python_version(), "torch": installed("torch"), "ray": installed("ray"),
            "optuna": installed("optuna")}


def storage_uri(storage: str | None) -> str:
    """A local directory (made absolute) or a URI such as s3://bucket/sweeps."""
    storage = storage or os.environ.get("SWEEP_STORAGE") or "results"
    return storage.rstrip("/") if "://" in storage else str(Path(storage).expanduser().resolve())


def _fs(uri: str) -> tuple[pyarrow.fs.FileSystem, str]:
    if "://" not in uri:
        return pyarrow.fs.LocalFileSystem(), uri
    try:
        return pyarrow.fs.FileSystem.from_uri(uri)
    except (ValueError, OSError) as err:  # an unknown scheme, or a bucket that cannot be resolved
        raise SpecError(f"{uri}: cannot open this storage ({err})") from None


def exists(uri: str) -> bool:
    fs, path = _fs(uri)
    try:
        return fs.get_file_info(path).type != pyarrow.fs.FileType.NotFound
    except (OSError, ValueError) as err:  # ValueError: pyarrow's ArrowInvalid, e.g. an empty path component
        raise SpecError(f"{uri}: cannot read ({err})") from None


def check_writable(directory: str, flag: str = "--storage") -> None:
    """Exit 2 early if the local `directory` cannot be created or written; creates nothing that stays."""
    path = Path(directory).expanduser().resolve()
    existing = next(p for p in [path, *path.parents] if p.exists())
    if not existing.is_dir():
        raise SpecError(f"{flag} {directory}: {existing} is a file, not a directory")
    try:  # a real probe: os.access says yes to root even where the filesystem says no
        tempfile.TemporaryDirectory(dir=existing, prefix=".sweep-probe-").cleanup()
    except OSError as err:
        raise SpecError(f"{flag} {directory}: not writable (cannot create a directory in {existing}: "
                        f"{err.strerror})") from None


def write_text(uri: str, text: str) -> None:
    """Write then rename, so a crash never leaves a half-written file."""
    fs, path = _fs(uri)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(f"{path}.tmp") as out:
        out.write(text.encode())
    fs.move(f"{path}.tmp", path)


def read_spec(results_dir: str) -> Spec:
    """The spec a results directory was run with."""
    uri = f"{results_dir}/{SPEC_FILE}"
    if not exists(results_dir):
        raise SpecError(f"{results_dir}: no such directory")
    if not exists(uri):
        raise SpecError(f"{results_dir}: not a sweep results directory (no {SPEC_FILE}; "
                        "`sweep run` writes one into every results directory)")
    fs, path = _fs(uri)
    try:
        with fs.open_input_stream(path) as f:
            raw = yaml.safe_load(f.read().decode())
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise SpecError(f"{uri}: not valid YAML ({getattr(err, 'problem', None) or err})") from None
    if not isinstance(raw, dict):
        raise SpecError(f"{uri}: not a spec (a YAML mapping), got {type(raw).__name__}")
    return validate_spec(raw, uri)


def new_results_dir(storage: str, name: str) -> str:
    """`<storage>/<name>`, refused (SpecError) if it already exists or the storage is not writable."""
    results_dir = f"{storage.rstrip('/')}/{name}"
    check_object_store(storage)
    if exists(results_dir):
        raise SpecError(f"{results_dir}: already exists; continue it with `sweep resume {results_dir}` "
                        "or start over under another --name")
    if "://" not in storage:
        check_writable(storage)
    return results_dir


OBJECT_STORES = ("s3://", "gs://", "gcs://")


def check_object_store(uri: str, flag: str = "--storage") -> None:
    """Exit 2 before anything starts when object storage cannot take the results: the bucket does not exist, or
    the credentials (AWS_* or Google's variables, ~/.aws, an instance role) are refused. Writes a probe object,
    then deletes it (S3 may keep an empty marker for the prefix). Other storage is left to check_writable."""
    if not uri.startswith(OBJECT_STORES):
        return
    fs, path = _fs(uri)
    bucket = path.split("/", 1)[0]
    try:
        if fs.get_file_info(bucket).type == pyarrow.fs.FileType.NotFound:
            raise SpecError(f"{flag} {uri}: bucket {bucket} does not exist; create it first")
        probe = f"{path.rstrip('/')}/.sweep-probe-{os.getpid()}"
        with fs.open_output_stream(probe) as out:
            out.write(b"")
        fs.delete_file(probe)
    except OSError as err:  # pyarrow's S3 errors: AccessDenied, InvalidAccessKeyId, SignatureDoesNotMatch, ...
        raise SpecError(f"{flag} {uri}: the object store refused it ({str(err).strip().splitlines()[0]}); "
                        "check the credentials and the bucket's permissions") from None


def download_results(uri: str, local: Path) -> Path:
    """Copy a results directory from object storage to `local` (a new directory), leaving out the checkpoints:
    the report reads only the spec and each trial's params.json and result.json."""
    fs, path = _fs(uri)
    try:
        found = fs.get_file_info(pyarrow.fs.FileSelector(path, recursive=True))
    except OSError as err:
        raise SpecError(f"{uri}: cannot read ({str(err).strip().splitlines()[0]})") from None
    files = [f for f in found if f.type == pyarrow.fs.FileType.File
             and not any(part.startswith("checkpoint_") for part in f.path[len(path):].split("/"))]
    say(f"downloading {len(files)} files of {uri} (checkpoints left in place) to {local}")
    partial = local.with_name(f".{local.name}.partial")  # renamed when complete: no half copy under `local`
    shutil.rmtree(partial, ignore_errors=True)  # what an earlier, interrupted download left
    try:
        for info in files:
            target = partial / info.path[len(path):].lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            with fs.open_input_stream(info.path) as source:
                target.write_bytes(source.read())
    except OSError as err:
        raise SpecError(f"{uri}: download stopped ({str(err).strip().splitlines()[0]}); "
                        f"the files so far are in {partial}") from None
    partial.rename(local)
    return local
