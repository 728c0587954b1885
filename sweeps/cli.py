"""The `sweep` command line. Bad input exits with status 2 and one line naming the file and field."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import textwrap
import time
from pathlib import Path
from typing import NoReturn

from analysis import ResultsError
from sweeps.schema import Override, SpecError, SweepFailed, SweepInterrupted, count_trials
from sweeps.spec import bundled_specs, flag_overrides, load_spec, parse_spec


def cmd_list(args: argparse.Namespace) -> None:
    """One line per bundled spec, within the terminal's width (100 in a pipe): its description is cut to fit. Read
    with the schema alone, so listing imports no torch; `sweep validate NAME` checks one in full."""
    specs = sorted(bundled_specs().items())
    width, pad = shutil.get_terminal_size((100, 24)).columns, max(len(name) for name, _ in specs)
    for name, path in specs:
        spec = parse_spec(path)
        line = f"{name:{pad}s} {sum(count_trials(spec).values()):5d} trials  "
        print(line + textwrap.shorten(" ".join(spec.description.split()), max(20, width - len(line)), placeholder=" …"))


def overrides(args: argparse.Namespace) -> list[Override]:
    """The --set values and --name, each with the flag it came from."""
    return flag_overrides(args.set, getattr(args, "name", None))


def cmd_validate(args: argparse.Namespace) -> None:
    spec, path = load_spec(args.spec, overrides(args))
    if args.smoke:
        from sweeps.smoke import smoke_spec
        spec = smoke_spec(spec)
    trials = count_trials(spec)
    print(f"{path}: valid")
    print(f"  name       {spec.name}")
    print(f"  data       {spec.data.name}, batch {spec.data.batch_size}" + (f", resize {spec.data.resize}" if spec.data.resize else ""))
    print(f"  model      {spec.model.name}")
    print(f"  train      {spec.train.epochs} epochs, loss {spec.train.loss}")
    per_arm = (f" per arm, one TPE study each ({spec.search.tpe_startup_trials()} start-up trials)"
               if spec.search.algorithm == "optuna" else "")
    print(f"  search     {spec.search.algorithm}, num_samples {spec.search.num_samples}{per_arm}, "
          f"{', '.join(f'{m} ({o})' for m, o in zip(spec.search.metrics, spec.search.modes))}")
    print(f"  scheduler  {spec.scheduler.plan(spec.train.epochs)}")
    r, pack = spec.resources, spec.resources.pack_size()
    print(f"  resources  {r.cpu:g} CPU, {r.gpu:g} GPU per trial" + (
        f"; packed: up to {pack} trials that share their shapes train as one model in one worker, each trial "
        f"asking for {r.cpu / pack:g} CPU, {r.gpu / pack:g} GPU" if pack > 1 else ""))
    print(f"  trials     {sum(trials.values())}")
    width = max(14, *map(len, trials))
    for arm, settings in spec.arm_settings().items():
        shown = ", ".join(f"{k}={_show(v)}" for k, v in settings.items()) or "(the base settings)"
        print(f"    {arm:{width}s} {trials[arm]:5d}  {shown}")
    for key, value in spec.space_settings().items():
        print(f"  space      {key} = {_show(value)}")
    from sweeps.checks import run_notes

    for note in [*spec.notes, *run_notes(spec)]:
        print(f"  note       {note}")


def _show(value) -> str:
    return f"{value.kind}{list(value.values)}" if hasattr(value, "kind") else repr(value)


def cmd_run(args: argparse.Namespace) -> None:
    from sweeps.runner import run_sweep
    from sweeps.smoke import smoke_spec
    spec, _ = load_spec(args.spec, overrides(args))
    if args.smoke:
        spec = smoke_spec(spec)
    if spec.protocol:
        from sweeps.protocol import run_protocol
        results_dir = run_protocol(spec, storage=args.storage, address=args.address, dashboard=not args.no_dashboard,
                                   verbose=args.verbose)
    else:
        results_dir = run_sweep(spec, storage=args.storage, address=args.address, dashboard=not args.no_dashboard,
                                verbose=args.verbose, started=args.started)
    _report(results_dir)


def cmd_resume(args: argparse.Namespace) -> None:
    from sweeps.runner import resume_sweep
    from sweeps.storage import check_object_store, read_spec, storage_uri
    check_object_store(storage_uri(args.results_dir), "resume")  # a missing bucket or refused credentials, said so
    spec = read_spec(storage_uri(args.results_dir))
    if spec.protocol:
        from sweeps.protocol import run_protocol
        results_dir = Path(storage_uri(args.results_dir))
        _report(run_protocol(spec, storage=str(results_dir.parent), address=args.address,
                             dashboard=not args.no_dashboard, resume=True))
        return
    _report(resume_sweep(args.results_dir, address=args.address, dashboard=not args.no_dashboard))


def cmd_report(args: argparse.Namespace) -> None:
    from analysis import write_report
    from sweeps.storage import check_writable
    results_dir = args.results_dir
    if "://" in results_dir:  # object storage: the results come here first (without checkpoints)
        from sweeps.storage import SPEC_FILE, download_results, exists, storage_uri
        results_dir = storage_uri(results_dir)
        if not exists(f"{results_dir}/{SPEC_FILE}"):
            raise SpecError(f"{results_dir}: not a sweep results directory (no {SPEC_FILE})")
        local = Path(args.out or results_dir.rsplit("/", 1)[1]).resolve()
        if local.exists():
            raise SpecError(f"--out {local}: already exists; the results of {results_dir} are downloaded into a new "
                            "directory (choose another with --out)")
        check_writable(str(local), "--out")
        results_dir, out = str(download_results(results_dir, local)), None
    else:
        out = args.out
        if out:
            check_writable(out, "--out")
    if args.target is not None:
        from sweeps.checks import check_target
        from sweeps.storage import read_spec

        check_target(args.target, read_spec(results_dir).search.metrics[0])
    print(write_report(results_dir, out, target=args.target))


def cmd_dashboard(args: argparse.Namespace) -> None:
    from sweeps.dashboard import serve
    serve(args.results_dir, host=args.host, port=args.port)


def cmd_plan(args: argparse.Namespace) -> None:
    from analysis.budget import plan_report
    print(plan_report(args.results_dir, args.effect, args.power))


def _fraction(text: str) -> float:
    """An argparse type: a number strictly between 0 and 1."""
    value = _positive(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def _positive(text: str) -> float:
    """An argparse type: a number greater than 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be greater than 0, got {text}")
    return value


def _report(results_dir: str) -> None:
    """Write the report, then print its comparison: the console and comparison.md name the same winners."""
    if "://" in results_dir:
        print(f"results in {results_dir}; `sweep report {results_dir}` downloads them and writes the report")
        return
    from analysis import console_summary, write_report
    page = write_report(results_dir)
    print(console_summary(page.parent))
    print(f"report: {page}")


def cmd_submit(args: argparse.Namespace) -> None:
    from sweeps.cluster import submit_sweep
    job_id, url = submit_sweep(args.spec, address=args.address, storage=args.storage, overrides=args.set,
                               smoke=args.smoke, name=args.name)
    print(f"job {job_id}")
    print(f"dashboard {url}")
    print(f"[sweep] follow it with `sweep logs {job_id} --follow`, stop it with `sweep stop {job_id}`",
          file=sys.stderr)


def cmd_jobs(args: argparse.Namespace) -> None:
    from sweeps.cluster import list_jobs
    list_jobs(address=args.address)


def cmd_logs(args: argparse.Namespace) -> None:
    from sweeps.cluster import print_logs
    print_logs(args.job, address=args.address, follow=args.follow)


def cmd_stop(args: argparse.Namespace) -> None:
    from sweeps.cluster import stop_job
    stop_job(args.job, address=args.address)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sweep", description="Hyperparameter sweeps on Ray Tune from a YAML spec.")
    sub = p.add_subparsers(dest="command", required=True)

    sub.add_parser("list", help="bundled specs, one line each").set_defaults(func=cmd_list)

    def spec_args(q: argparse.ArgumentParser) -> None:
        q.add_argument("spec", help="a YAML file or the name of a bundled spec (see `sweep list`)")
        q.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a spec value by dotted key, e.g. --set train.epochs=3 (repeatable)")
        q.add_argument("--smoke", action="store_true", help="shrink the sweep to run in about a minute on a CPU")

    q = sub.add_parser("validate", help="check a spec and print the trial plan; starts nothing")
    spec_args(q)
    q.set_defaults(func=cmd_validate)

    def ray_args(q: argparse.ArgumentParser) -> None:
        q.add_argument("--address", help="an existing Ray cluster: auto, HOST:6379 or ray://HOST:10001 "
                                         "(default: start a local Ray instance)")
        q.add_argument("--no-dashboard", action="store_true", help="do not start the Ray dashboard (local runs)")

    q = sub.add_parser("run", help="run a sweep, then write its report")
    spec_args(q)
    ray_args(q)
    q.add_argument("--storage", help="where results go: a directory or a URI such as s3://bucket/path "
                                     "(default: $SWEEP_STORAGE or ./results)")
    q.add_argument("--name", help="results directory name (default: the spec's name)")
    q.add_argument("--verbose", action="store_true", help="Tune's own trial tables instead of the progress display")
    q.set_defaults(func=cmd_run)

    q = sub.add_parser("resume", help="continue an interrupted sweep")
    q.add_argument("results_dir")
    ray_args(q)
    q.set_defaults(func=cmd_resume)

    q = sub.add_parser("report", help="write tables and report.html for a results directory (also while running)")
    q.add_argument("results_dir")
    q.add_argument("--out", help="output directory (default: RESULTS_DIR/report; for s3://... results, where they "
                                 "are downloaded to, default ./NAME, with the report in its report/)")
    q.add_argument("--target", type=float, help="validation score to time each arm to (default: the best score "
                                                "more than half of every arm's seeds reach)")
    q.set_defaults(func=cmd_report)

    q = sub.add_parser("dashboard", help="serve optuna-dashboard over a sweep (also while it runs)")
    q.add_argument("results_dir")
    q.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    q.add_argument("--port", type=int, default=8080, help="port to listen on (default 8080)")
    q.set_defaults(func=cmd_dashboard)

    q = sub.add_parser("plan", help="how many seeds a difference needs, from a sweep's observed spread")
    q.add_argument("results_dir", help="a protocol's results directory, or a sweep's whose arms have seeds")
    q.add_argument("--effect", type=_positive, required=True, help="the true difference to detect, in the metric's "
                                                                   "units (e.g. 0.005 for half a point of accuracy)")
    q.add_argument("--power", type=_fraction, default=0.8, help="chance of detecting it (default 0.8)")
    q.set_defaults(func=cmd_plan)

    def job_args(q: argparse.ArgumentParser) -> None:
        q.add_argument("--address", help="the cluster's dashboard, e.g. http://HEAD:8265 "
                                         "(default: $RAY_API_SERVER_ADDRESS)")

    q = sub.add_parser("submit", help="run a sweep as a Ray job on a cluster; prints the job id and dashboard URL")
    spec_args(q)
    job_args(q)
    q.add_argument("--storage", required=True, help="where the cluster writes results: an absolute path that every "
                                                    "node shares, or a URI such as s3://bucket/path")
    q.add_argument("--name", help="results directory name (default: the spec's name)")
    q.set_defaults(func=cmd_submit)

    q = sub.add_parser("jobs", help="list the Ray jobs on a cluster")
    job_args(q)
    q.set_defaults(func=cmd_jobs)

    q = sub.add_parser("logs", help="print a job's output")
    q.add_argument("job", help="the job id `sweep submit` printed")
    q.add_argument("--follow", "-f", action="store_true", help="stream the output until the job ends")
    job_args(q)
    q.set_defaults(func=cmd_logs)

    q = sub.add_parser("stop", help="stop a job and wait until it has ended")
    q.add_argument("job", help="the job id `sweep submit` printed")
    job_args(q)
    q.set_defaults(func=cmd_stop)
    return p


def main(argv: list[str] | None = None) -> int:
    started = time.time()  # timeline.json counts from here (`sweep run`)
    args = parser().parse_args(argv)
    args.started = started
    try:
        args.func(args)
    except (SpecError, ResultsError) as err:  # bad user input: one line, exit 2
        print(f"sweep: error: {err}", file=sys.stderr)
        return 2
    except SweepFailed as err:  # it ran, and no trial gave a result
        print(f"sweep: error: {err}", file=sys.stderr)
        return 1
    except SweepInterrupted as err:  # Ctrl-C: Tune saved the sweep's state as it stopped
        print(f"sweep: {err}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:  # Ctrl-C before the sweep started, or twice
        print("sweep: interrupted", file=sys.stderr)
        return 130
    return 0


def run(argv: list[str] | None = None) -> NoReturn:
    """The `sweep` command: `main`, then Ray's shutdown, then the end of the process without Python's own teardown,
    which after a sweep spent about 2 s in Ray's and gRPC's native code with nothing left to save."""
    status = main(argv)
    if "ray" in sys.modules:
        import ray

        ray.shutdown()  # the local instance's processes end with it; a cluster is only disconnected from
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


if __name__ == "__main__":
    run()
