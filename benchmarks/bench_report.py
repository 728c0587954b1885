"""Times `sweep report` on a synthetic results directory of 1,000 trials x 100 epochs (aim: under 30 s
on 2 cores). The baseline, measured in the same process, is the I/O floor: reading every result.json
and `json.loads` of each line, nothing else.

    python benchmarks/bench_report.py [--trials 1000] [--epochs 100] [--keep DIR]
"""

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from results_fixtures import synthetic_sweep  # noqa: E402  (the tests' fixture builder)

from analysis import load_results, write_report  # noqa: E402
from analysis.figures import FIGURES  # noqa: E402
from analysis.plotting import NotApplicable, report_colours  # noqa: E402
from analysis.tables import compare, reference_table  # noqa: E402


def json_floor(results_dir: Path) -> int:
    rows = 0
    for path in results_dir.glob("*/result.json"):
        for line in path.read_text().splitlines():
            try:
                json.loads(line)
                rows += 1
            except ValueError:  # the running trial's half-written last line
                pass
    return rows


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    value = fn(*args, **kwargs)
    return value, time.perf_counter() - start


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--keep", type=Path, help="build the results here and keep them (default: a temp dir)")
    args = parser.parse_args()

    root = args.keep or Path(tempfile.mkdtemp(prefix="bench-report-"))
    results_dir, build_s = timed(synthetic_sweep, root / "bench", n_trials=args.trials, epochs=args.epochs)
    size_mb = sum(p.stat().st_size for p in results_dir.glob("*/result.json")) / 1e6

    rows, floor_s = timed(json_floor, results_dir)
    results, load_s = timed(load_results, results_dir)
    comparison, tables_s = timed(lambda: (c := compare(results), reference_table(results, c))[0])

    def draw_all():
        drawn, palette = {}, report_colours(results, comparison)
        for name, draw in FIGURES.items():
            try:
                drawn[name] = draw(results, comparison, palette)
            except NotApplicable:
                pass
        return drawn

    figures, figures_s = timed(draw_all)
    report, total_s = timed(write_report, results_dir)

    print(f"\nmachine: {os.cpu_count()} cores, {cpu_model()}, Python {platform.python_version()}")
    print(f"results: {args.trials} trials x {args.epochs} epochs = {rows:,} result lines, {size_mb:.0f} MB "
          f"(built in {build_s:.1f} s); {len(figures)} figures; report.html {report.stat().st_size / 1e6:.1f} MB\n")
    print(f"{'stage':<40}{'seconds':>10}{'x floor':>10}")
    stages = [("baseline: json.loads of every line", floor_s), ("load_results (read + tidy frames)", load_s),
              ("comparison + reference tables", tables_s), ("all figures (build)", figures_s),
              ("sweep report end to end (write_report)", total_s)]
    for stage, seconds in stages:
        print(f"{stage:<40}{seconds:>10.2f}{seconds / floor_s:>10.1f}")
    print(f"\naim: under 30 s end to end -> {'met' if total_s < 30 else 'NOT met'}")


if __name__ == "__main__":
    main()
