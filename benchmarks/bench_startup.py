"""Where the seconds before a sweep's first epoch go: `sweep run quickstart` as a user runs it, timed from outside.

Each run is a real `sweep run` in a subprocess. The phases are read from what the command prints (the time each
`[sweep]` line arrives) and from the trials' rows (Ray's `timestamp`, whole seconds, of the first reported epoch):

    ready      the spec is loaded and checked, the data prepared (the `data ...` line)
    ray up     Ray has started (the `Ray: ...` line)
    1st epoch  the first epoch of any trial is reported (its row's timestamp: +-0.5 s)
    done       every trial has ended (the `... trials done` line)
    exit       the command has written the report and ended

Medians of --repeats runs, with and without Ray's dashboard (the default starts it). On a GPU node the same script
shows what start-up costs there (the quickstart's trials ask for no GPU: pass --set resources.gpu=... to move them).

    python benchmarks/bench_startup.py [--spec quickstart] [--repeats 3] [--set key=value]... [--no-dashboard]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PHASES = {"ready": "] data ", "ray up": "] Ray: ", "done": " trials done"}


def run(spec: str, dashboard: bool, overrides: list[str]) -> dict[str, float]:
    """One `sweep run`: seconds from its start to each phase."""
    with tempfile.TemporaryDirectory() as folder:
        argv = [sys.executable, "-m", "sweeps.cli", "run", spec, "--storage", folder,
                *[a for o in overrides for a in ("--set", o)], *([] if dashboard else ["--no-dashboard"])]
        start = time.time()
        process = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                   env={**os.environ, "COLUMNS": "100"})
        seen, lines = {}, []
        for line in process.stderr:
            lines.append(line)
            for phase, text in PHASES.items():
                if text in line:
                    seen[phase] = time.time() - start  # the last "trials done" line wins: the sweep's end
        if process.wait():
            sys.exit(f"sweep run {spec} failed:\n{''.join(lines[-30:])}")
        seen["exit"] = time.time() - start
        rows = [json.loads(line) for result in Path(folder).glob("*/*/result.json")
                for line in result.read_text().splitlines() if line.strip()]
        seen["1st epoch"] = min(r["timestamp"] for r in rows) + 0.5 - start
        return seen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", default="quickstart")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE")
    parser.add_argument("--no-dashboard", action="store_true", help="only the row without Ray's dashboard")
    args = parser.parse_args()
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()};"
          f" sweep run {args.spec}, median of {args.repeats}", flush=True)
    order = ["ready", "ray up", "1st epoch", "done", "exit"]
    print(f"{'':<16}" + "".join(f"{p:>11}" for p in order))
    for dashboard in (False,) if args.no_dashboard else (True, False):
        runs = [run(args.spec, dashboard, args.overrides) for _ in range(args.repeats)]
        medians = [statistics.median(r.get(p, float("nan")) for r in runs) for p in order]
        print(f"{'dashboard' if dashboard else '--no-dashboard':<16}" + "".join(f"{m:>10.1f}s" for m in medians),
              flush=True)


if __name__ == "__main__":
    main()
