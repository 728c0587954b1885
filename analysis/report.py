"""`write_report`: tidy tables (CSV and Parquet), comparison.csv/.md and one self-contained report.html
that works offline (plotly.js inlined once). Every file is written atomically, so a reader (or a
browser refreshing while a sweep runs) never sees half a file."""

from __future__ import annotations

import datetime
import html
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.offline import get_plotlyjs, get_plotlyjs_version

from analysis.budget import TUNING_ASSUMES, time_to_target, tuning_curves
from analysis.figures import FIGURES, NotApplicable, pbt_copies
from analysis.results import STATUSES, Results, ResultsError, _read_spec, load_results
from analysis.tables import (Comparison, compare, comparison_markdown, display, pareto_table, reference_table,
                             seed_columns)

STYLE = """
body { font: 15px/1.45 system-ui, sans-serif; color: #222; max-width: 1280px; margin: 0 auto; padding: 0 24px 48px; }
h1 { margin: 24px 0 4px; } h2 { margin-top: 36px; border-bottom: 1px solid #ddd; padding-bottom: 4px; }
.description { color: #555; margin-top: 0; }
.partial { background: #fff4ce; border: 1px solid #e0c060; padding: 8px 12px; border-radius: 4px; }
dl.facts { display: grid; grid-template-columns: max-content auto; gap: 4px 16px; }
dl.facts dt { font-weight: 600; } dl.facts dd { margin: 0; }
table.data { border-collapse: collapse; font-size: 13px; margin: 8px 0; }
table.data th, table.data td { border: 1px solid #ddd; padding: 4px 8px; text-align: right; }
table.data th { background: #f4f4f4; } table.data td:nth-child(-n+3) { text-align: left; }
table.data tbody tr:first-child { background: #eef7ee; }
.method { color: #444; font-size: 14px; max-width: 1000px; }
figure { margin: 28px 0; } .scroll { overflow-x: auto; } footer { margin-top: 40px; color: #666; font-size: 13px; }
"""


def write_report(results_dir: str | Path, out_dir: str | Path | None = None, *, target: float | None = None) -> Path:
    """Reads the results under `results_dir` and writes the tables and report.html into `out_dir`
    (default `results_dir/report`); returns the path of report.html. `target`: the validation score to
    time each arm to (default: `analysis.budget.default_target`). Raises ResultsError when the directory
    is not a sweep's results directory."""
    if (Path(results_dir) / "tune" / "spec.yaml").exists():  # a two-stage protocol (sweeps/protocol.py)
        return _write_protocol_report(Path(results_dir), out_dir, target)
    results = load_results(results_dir)
    out = Path(out_dir) if out_dir is not None else results.directory / "report"
    out.mkdir(parents=True, exist_ok=True)

    _log("tables")
    comparison = compare(results)
    reference = reference_table(results, comparison)
    compute = compute_table(results, comparison, target)
    curves = tuning_curves(results)
    tables = {"comparison.md": comparison_markdown(results, comparison, reference),
              "comparison.csv": comparison.table.to_csv(index=False), "compute.csv": compute.to_csv(index=False)}
    if reference is not None:
        tables["reference.csv"] = reference.to_csv(index=False)
    if len(curves):
        tables["tuning_curves.csv"] = curves.to_csv(index=False)
    if (results.spec.get("scheduler") or {}).get("name") == "pbt":
        tables["pbt.csv"] = pbt_copies(results).to_csv(index=False)
    pareto = pareto_table(results)
    if pareto is not None:
        tables["pareto.csv"] = pareto.to_csv(index=False)
    for name, frame in (("trials", results.trials), ("epochs", results.epochs)):
        tables[f"{name}.csv"] = frame.to_csv(index=False)
        tables[f"{name}.parquet"] = frame.to_parquet(index=False)
    for filename, data in tables.items():
        _write_atomic(out / filename, data)

    _log("figures")
    figures, skipped = {}, {}
    for name, draw in FIGURES.items():
        try:
            figures[name] = draw(results, comparison)
        except NotApplicable as reason:
            skipped[name] = str(reason)
    _write_atomic(out / "report.html", _page(results, comparison, reference, compute, figures, skipped,
                                             files=list(tables), target_given=target is not None))
    _log(f"{len(figures)} figures, {len(skipped)} not applicable; wrote {out / 'report.html'}")
    return out / "report.html"


def _write_protocol_report(results_dir: Path, out_dir: str | Path | None, target: float | None) -> Path:
    """Each stage's own report, then the protocol's verdict page."""
    from analysis.protocol import protocol_page

    spec = _read_spec(results_dir)
    for stage in ("tune", "confirm"):
        if (results_dir / stage / "spec.yaml").exists():
            write_report(results_dir / stage, target=target)
    if not (results_dir / "confirm" / "spec.yaml").exists():
        raise ResultsError(f"{results_dir}: the confirm stage has not started yet; "
                           f"see {results_dir / 'tune' / 'report' / 'report.html'} for the tune stage so far")
    out = Path(out_dir) if out_dir is not None else results_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    page, tables = protocol_page(results_dir, spec, STYLE, get_plotlyjs(), _html_table, target)
    for filename, text in tables.items():
        _write_atomic(out / filename, text)
    _write_atomic(out / "report.html", page)
    _log(f"wrote {out / 'report.html'}")
    return out / "report.html"


def console_summary(report_dir: str | Path) -> str:
    """The report's ranking and verdicts for the terminal, read back from the tables it wrote, so the console
    and comparison.md (or a protocol's verdicts.csv) always name the same winners."""
    report_dir = Path(report_dir)
    if (report_dir / "verdicts.csv").exists():  # a two-stage protocol
        table, title = pd.read_csv(report_dir / "verdicts.csv"), "Protocol verdicts (confirm stage, test split)"
        keep = ["rank", "arm", "tuned_config", "n_seeds", "n_diverged"]
        keep += [c for c in table.columns if c.endswith("_mean") and not c.startswith("test_loss")][:1]
        keep += [c for c in table.columns if c.endswith("ci95_low") and not c.startswith("test_loss")][:1]
        keep += ["verdict_vs_top", "note"]
    else:
        table, title = pd.read_csv(report_dir / "comparison.csv", keep_default_na=False, na_values=[""]), "Comparison"
        metric_mean = next(c for c in table.columns if c.endswith("_mean"))
        prefix = metric_mean.removesuffix("_mean")
        groups = table.columns[1:table.columns.get_loc("best_config")].tolist()
        keep = ["rank", *groups, "best_config", "n_seeds", "n_seeds_diverged", metric_mean, f"{prefix}_std",
                f"{prefix}_ci95_low", "distinguishable", "note"]
    if table.empty:
        return f"{title}: no trial has reported yet"
    table = table.assign(note=table["note"].astype(object).fillna(""))  # an all-empty column reads back as float
    cells = display(table[[c for c in keep if c in table] + [c for c in table if c.endswith("ci95_high")]])
    return f"\n{title} (as in {report_dir.name}/{'verdicts.csv' if 'verdict_vs_top' in keep else 'comparison.md'}):\n" \
        + cells.to_string(index=False) + "\n"


TARGET_GIVEN = "set with sweep report --target"
TARGET_DEFAULT = ("the best score more than half of every row's seeds reach, so every row can be timed; "
                  "set another with sweep report --target")


def _log(message: str) -> None:
    print(f"report: {message}", file=sys.stderr)


def _write_atomic(path: Path, data: str | bytes) -> None:
    """Writes a temporary file beside `path`, then renames it over `path` (atomic on one filesystem)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; reports are for sharing
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def compute_table(results: Results, comparison: Comparison, target: float | None = None) -> pd.DataFrame:
    """Per comparison row: trials, epochs and seconds the sweep spent on it, and its time to the target."""
    spent = results.trials.groupby(comparison.group_of[results.trials["trial_id"]].to_numpy(), sort=False).agg(
        trials=("trial_id", "size"), epochs=("epochs_run", "sum"), seconds=("wall_time_s", "sum"))
    timed = time_to_target(results, comparison, target).set_index("arm")
    return spent.join(timed, how="right").rename_axis("arm").reset_index()


def _page(results: Results, comparison: Comparison, reference: pd.DataFrame | None, compute: pd.DataFrame,
          figures: dict[str, go.Figure], skipped: dict[str, str], files: list[str], target_given: bool) -> str:
    name = html.escape(str(results.spec.get("name", results.directory.name)))
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{name}: sweep report</title>",
             f"<style>{STYLE}</style><script>{get_plotlyjs()}</script></head><body>",
             f"<h1>{name}</h1>"]
    if results.spec.get("description"):
        parts.append(f"<p class='description'>{html.escape(str(results.spec['description']))}</p>")
    if results.partial:
        parts.append(f"<p class='partial'><b>Partial results.</b> {_partial_text(results)} "
                     "Numbers and figures will change; run <code>sweep report</code> again later.</p>")
    parts.append(_facts(results, comparison))
    for note in results.spec.get("notes") or []:
        parts.append(f"<p class='method'>Note: {html.escape(str(note))}</p>")

    parts.append("<h2>Comparison</h2>")
    if len(comparison.table):
        parts += [f"<p class='method'>{html.escape(comparison.method)}</p>", _html_table(comparison.table)]
    else:
        parts.append("<p>No trial has reported yet.</p>")
    if reference is not None:
        source = html.escape(str((results.spec.get("reference") or {}).get("source", "spec")))
        parts += [f"<h2>Published vs reproduced</h2><p class='method'>Published: {source}. Reproduced: mean and "
                  "std over the seeds of the arm's best configuration, final epoch. 95% PI: where a single new run "
                  "of ours would land (mean ± t·s·√(1 + 1/n)); a published number is one run, so it is judged "
                  "against that, not against the CI of the mean.</p>", _html_table(reference)]

    if len(compute):
        target = compute["target"].iloc[0]
        parts += [f"<h2>Compute and time to target</h2><p class='method'>Target: {results.metric} "
                  f"{'≥' if results.mode == 'max' else '≤'} {_short(target)} on validation "
                  f"({TARGET_GIVEN if target_given else TARGET_DEFAULT}). Epochs and seconds (Ray's clock since the "
                  "trial began, evaluation included) until each seed of the row's best configuration first reaches "
                  "it; the median over seeds, a seed that never reached it counting as never (AlgoPerf's time to "
                  "result).</p>", _html_table(compute)]
    if "tuning_curves" in figures:
        parts.append(f"<p class='method'>Tuning curves: {html.escape(TUNING_ASSUMES)}</p>")
    parts.append("<h2>Figures</h2>" + ("" if figures else "<p>No figure applies yet (see below).</p>"))
    for key, fig in figures.items():
        height = fig.layout.height or 450
        parts.append("<figure>" + fig.to_html(full_html=False, include_plotlyjs=False, div_id=f"figure-{key}",
                                              default_height=f"{height}px",
                                              config={"displaylogo": False, "responsive": True}) + "</figure>")
    if skipped:
        parts.append("<h2>Not shown</h2><ul>" + "".join(f"<li><b>{k.replace('_', ' ')}</b>: {html.escape(v)}</li>"
                                                       for k, v in skipped.items()) + "</ul>")
    links = " · ".join(f"<a href='{html.escape(f)}'>{html.escape(f)}</a>" for f in files)
    generated = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    parts.append(f"<footer>Tables: {links}<br>Results: {html.escape(str(results.directory.resolve()))} · "
                 f"generated {generated} · plotly.js {get_plotlyjs_version()} embedded, works offline</footer>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _partial_text(results: Results) -> str:
    if results.trials.empty:
        return "No trial has reported yet."
    running = int((results.trials["status"] == "running").sum())
    return f"{running} of {len(results.trials)} trials have not finished (still running, or the sweep was interrupted)."


def _facts(results: Results, comparison: Comparison) -> str:
    trials = results.trials
    counts = trials["status"].value_counts()
    breakdown = ", ".join(f"{int(counts[s])} {'stopped early' if s == 'stopped' else 'failed' if s == 'error' else s}"
                          for s in STATUSES if s in counts)
    facts = {"Trials": f"{len(trials)}" + (f" ({breakdown})" if breakdown else "")}
    search, scheduler = results.spec.get("search") or {}, results.spec.get("scheduler") or {}
    epochs = (results.spec.get("train") or {}).get("epochs")
    facts["Search"] = (f"{search.get('algorithm', '?')} over {results.metric} ({results.mode}), scheduler "
                       f"{scheduler.get('name', 'fifo')}" + (f", {epochs} epochs per trial" if epochs else ""))
    if results.spec.get("smoke"):
        facts["Smoke run"] = "data, epochs and image size were shrunk: not comparable to published numbers"
    if len(trials):
        facts["Compute"] = (f"{_duration(float(np.nansum(trials['wall_time_s'])))} of trial time, "
                            f"{int(trials['epochs_run'].sum()):,} epochs (sums over trials)")
    if len(comparison.table) and comparison.members[0]:
        top = comparison.table.iloc[0]
        first = trials.set_index("trial_id").loc[comparison.members[0][0]]
        seeds = set(seed_columns(results))
        config = ", ".join(f"{k}={_short(first[k])}" for k in results.hyperparameters
                           if k not in seeds and not pd.isna(first[k]))
        m = results.metric
        spread = f" ± {top[f'{m}_std']:.4g}" if np.isfinite(top[f"{m}_std"]) else ""
        facts["Best configuration"] = (f"{comparison.labels[0]}: {config} → {m} {top[f'{m}_mean']:.4g}{spread} "
                                       f"over {top['n_seeds']} seed(s)")
    return "<dl class='facts'>" + "".join(f"<dt>{k}</dt><dd>{html.escape(v)}</dd>" for k, v in facts.items()) + "</dl>"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def _short(value) -> str:
    return f"{value:.4g}" if isinstance(value, (float, np.floating)) else str(value)


def _html_table(table: pd.DataFrame) -> str:
    return "<div class='scroll'>" + display(table).to_html(index=False, classes="data", border=0) + "</div>"
