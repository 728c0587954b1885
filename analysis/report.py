"""`write_report`: tidy tables (CSV and Parquet), comparison.csv/.md and one self-contained report.html
that works offline (plotly.js inlined once). Every file is written atomically, so a reader (or a
browser refreshing while a sweep runs) never sees half a file."""

from __future__ import annotations

import datetime
import html
import io
import os
import shutil
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.offline import get_plotlyjs_version

from analysis.budget import (
    TUNING_ASSUMES,
    time_to_target,
    trial_compute_seconds,
    trial_startup_seconds,
    tuning_curves,
)
from analysis.figures import FIGURES
from analysis.page import html_table, is_number_text, made_with, page_end, page_start, smoke_tag, timeline
from analysis.plotting import NotApplicable, report_colours
from analysis.results import STATUSES, Results, ResultsError, _read_spec, load_results
from analysis.search_figures import pbt_copies
from analysis.tables import (
    CONCLUSION,
    Comparison,
    compare,
    comparison_markdown,
    display,
    pareto_table,
    reference_table,
    seed_columns,
)


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
    trials = results.trials.assign(startup_s=trial_startup_seconds(results).to_numpy())
    for name, frame in (("trials", trials), ("epochs", results.epochs)):
        tables[f"{name}.csv"] = frame.to_csv(index=False)
        tables[f"{name}.parquet"] = frame.to_parquet(index=False)
    for filename, data in tables.items():
        _write_atomic(out / filename, data)

    figures, skipped = {}, {}
    palette = report_colours(results, comparison)  # once: an arm has one colour in every figure
    for name, draw in FIGURES.items():
        try:
            figures[name] = draw(results, comparison, palette)
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
    page, tables = protocol_page(results_dir, spec, target)
    for filename, text in tables.items():
        _write_atomic(out / filename, text)
    _write_atomic(out / "report.html", page)
    _log(f"wrote {out / 'report.html'}")
    return out / "report.html"


def console_summary(report_dir: str | Path, width: int | None = None) -> str:
    """The report's ranking and verdicts for the terminal, read back from the tables it wrote, so the console
    and comparison.md (or a protocol's verdicts.csv) always name the same winners.

    It fits `width` columns (default: the terminal's, 100 in a pipe): a table of the numbers and verdicts, each
    row's configuration and note below it, then the sentence of what the table can conclude."""
    report_dir = Path(report_dir)
    width = width or shutil.get_terminal_size((100, 24)).columns
    if (report_dir / "verdicts.csv").exists():  # a two-stage protocol
        table, title = pd.read_csv(report_dir / "verdicts.csv"), "Protocol verdicts (confirm stage, test split)"
        source, labels, config, verdict = "verdicts.csv", ["arm"], ("Tuned configurations:", "tuned_config"), \
            "verdict_vs_top"
        mean = next(c for c in table.columns if c.endswith("_mean") and not c.startswith("test_loss"))
        counts = ["n_seeds", "n_diverged"]
    else:
        table, title = pd.read_csv(report_dir / "comparison.csv", keep_default_na=False, na_values=[""]), "Comparison"
        source, config, verdict = "comparison.md", ("Best configurations:", "best_config"), "distinguishable"
        mean = next(c for c in table.columns if c.endswith("_mean"))
        labels, counts = table.columns[1:table.columns.get_loc("best_config")].tolist(), ["n_seeds", "n_seeds_diverged"]
    if table.empty:
        return f"{title}: no trial has reported yet"
    interval = [mean.replace("_mean", "_ci95_low"), mean.replace("_mean", "_ci95_high")]
    cells = display(table[["rank", *labels, *counts, mean, *interval, verdict]])
    cells.columns = [*cells.columns[:-4], "diverged", mean.removesuffix("_mean"), "95% CI", verdict]  # short: narrow
    lines = ["", _wrap(f"{title} (as in {report_dir.name}/{source}):", width)]
    if (report_dir.parent / "spec.yaml").exists() and _read_spec(report_dir.parent).get("smoke"):
        lines.append(_wrap("Smoke run (--smoke): shrunk to check that the spec runs; these numbers are not results.",
                           width))
    lines.append(_fit(cells, width))
    label = table[labels].astype(str).agg(" · ".join, axis=1)
    for heading, column in (config, ("Notes:", "note")):
        said = [(who, text) for who, text in zip(label, display(table[[column]]).iloc[:, 0], strict=True)
                if text not in ("", "—")]
        if said:
            lines.append(heading)
            lines += [_wrap(f"{who}: {text}", width, initial_indent="  ", subsequent_indent="    ")
                      for who, text in said]
    written = (report_dir / "comparison.md").read_text().splitlines() if (report_dir / "comparison.md").exists() else []
    sentence = next((line for line in written if line.startswith(CONCLUSION)), "")  # what the table can conclude
    if sentence:
        lines += ["", _wrap(sentence, width)]
    return "\n".join(lines) + "\n"


def _wrap(text: str, width: int, **indents: str) -> str:
    """`text` in lines of at most `width`, broken at spaces only (never inside `fair-optimizers-mnist`)."""
    return textwrap.fill(text, width, break_on_hyphens=False, **indents)


def _fit(cells: pd.DataFrame, width: int) -> str:
    """`cells` as plain text within `width` columns (rich wraps the last, verdict column when it must)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(box=None, pad_edge=False, header_style="", show_edge=False, collapse_padding=True)
    for i, column in enumerate(cells.columns):
        last = i == len(cells.columns) - 1
        numbers = not last and all(map(is_number_text, cells[column]))
        table.add_column(str(column), justify="right" if numbers else "left", no_wrap=not last,
                         min_width=len(str(column)) if last else None)
    for row in cells.itertuples(index=False):
        table.add_row(*map(str, row))
    console = Console(file=io.StringIO(), width=width, color_system=None, highlight=False)
    console.print(table)
    return "\n".join(line.rstrip() for line in console.file.getvalue().splitlines())


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
    """Per comparison row: trials, epochs and seconds (training and evaluation) the sweep spent on it, and its time
    to the target."""
    trials = results.trials.assign(seconds=trial_compute_seconds(results).to_numpy())
    spent = trials.groupby(comparison.group_of[trials["trial_id"]].to_numpy(), sort=False).agg(
        trials=("trial_id", "size"), epochs=("epochs_run", "sum"), seconds=("seconds", "sum"))
    timed = time_to_target(results, comparison, target).set_index("arm")
    return spent.join(timed, how="right").rename_axis("arm").reset_index()


def _page(results: Results, comparison: Comparison, reference: pd.DataFrame | None, compute: pd.DataFrame,
          figures: dict[str, go.Figure], skipped: dict[str, str], files: list[str], target_given: bool) -> str:
    parts = [page_start(results.spec, str(results.spec.get("name", results.directory.name)), "sweep")]
    if results.partial:
        parts.append(f"<p class='partial'><b>Partial results.</b> {_partial_text(results)} "
                     "Numbers and figures will change; run <code>sweep report</code> again later.</p>")
    parts.append(_facts(results, comparison))
    for note in results.spec.get("notes") or []:
        parts.append(f"<p class='method'>Note: {html.escape(str(note))}</p>")

    parts.append(f"<h2>Comparison{smoke_tag(results.spec)}</h2>")
    if len(comparison.table):
        metric = results.metric
        parts += [f"<p class='method'>{html.escape(comparison.method)}</p>",
                  html_table(comparison.table, details=[f"{metric}_std", "test", "p_value", "n_configs", "n_trials",
                                                         "n_diverged", "epochs_trained"])]
    else:
        parts.append("<p>No trial has reported yet.</p>")
    if reference is not None:
        source = html.escape(str((results.spec.get("reference") or {}).get("source", "spec")))
        parts += [f"<h2>Published vs reproduced</h2><p class='method'>Published: {source}. Reproduced: mean and "
                  "std over the seeds of the arm's best configuration, final epoch. 95% PI: where a single new run "
                  "of ours would land (mean ± t·s·√(1 + 1/n)); a published number is one run, so it is judged "
                  "against that, not against the CI of the mean.</p>", html_table(reference)]

    if len(compute):
        target = compute["target"].iloc[0]
        parts += [f"<h2>Compute and time to target</h2><p class='method'>Target: {results.metric} "
                  f"{'≥' if results.mode == 'max' else '≤'} {_short(target)} on validation "
                  f"({TARGET_GIVEN if target_given else TARGET_DEFAULT}). Epochs and seconds (of training and "
                  "evaluation, as the trials timed them: not the start-up of the worker a trial ran on) until each "
                  "seed of the row's best configuration first reaches it; the median over seeds, a seed that never "
                  "reached it counting as never (AlgoPerf's time to result). Seconds: the training and evaluation "
                  "the sweep spent on the row.</p>", html_table(compute)]
    if "tuning_curves" in figures:
        parts.append(f"<p class='method'>Tuning curves: {html.escape(TUNING_ASSUMES)}</p>")
    parts.append("<h2>Figures</h2>" + ("" if figures else "<p>No figure applies yet (see below).</p>"))
    for key, fig in figures.items():
        height = fig.layout.height or 450
        parts.append("<figure>" + fig.to_html(full_html=False, include_plotlyjs=False, div_id=f"figure-{key}",
                                              default_height=f"{height}px",
                                              config={"displaylogo": False, "responsive": True}) + "</figure>")
    parts += [f"<h2>Every trial</h2><p class='method'>{TRIALS_TEXT}</p>", html_table(trial_table(results),
                                                                                   classes="data trials sortable")]
    if skipped:
        parts.append("<h2>Not shown</h2><ul>" + "".join(f"<li><b>{k.replace('_', ' ')}</b>: {html.escape(v)}</li>"
                                                       for k, v in skipped.items()) + "</ul>")
    links = " · ".join(f"<a href='{html.escape(f)}'>{html.escape(f)}</a>" for f in files)
    generated = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    parts.append(page_end(f"Tables: {links}<br>Results: {html.escape(str(results.directory.resolve()))} · "
                          f"generated {generated} · plotly.js {get_plotlyjs_version()} embedded, works offline"))
    return "\n".join(parts)


TRIALS_TEXT = ("One row per trial: its status, the epochs it ran, the settings that vary in this sweep, its final "
               "metrics (an early-stopped trial's at its last epoch) and its start-up: the seconds Ray counted "
               "before its first report that were not training or evaluation (the data, the model, a new worker's "
               "first torch calls, a packed trial's wait for its pack; a new worker's process start comes before "
               "Ray's clock: the Start-up line at the top has it). Click a header to sort.")
def trial_table(results: Results) -> pd.DataFrame:
    """The trials as the report lists them: id, arm, status, epochs, the settings that vary, final metrics, and the
    seconds each waited before it trained (`analysis.budget.trial_startup_seconds`)."""
    trials = results.trials.assign(startup_s=trial_startup_seconds(results).round(2).to_numpy())
    settings = [h for h in results.hyperparameters if trials[h].nunique(dropna=False) > 1]
    metrics = [f"final_{m}" for m in dict.fromkeys([*results.search_metrics, "val_acc", "val_loss", "test_acc"])]
    timed = ["startup_s"] if trials["startup_s"].notna().any() else []  # results from before trials timed epochs
    columns = ["trial_id", "arm", "status", "epochs_run", *settings, *(m for m in metrics if m in trials), *timed]
    return trials[columns].rename(columns={"epochs_run": "epochs", "startup_s": "start-up s"})


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
    if len(trials):
        facts["Compute"] = (f"{_duration(float(np.nansum(trial_compute_seconds(results))))} of training and "
                            f"evaluation, {int(trials['epochs_run'].sum()):,} epochs (sums over trials)")
    if marks := timeline(results.directory):
        facts["Start-up"] = _startup_fact(marks, trial_startup_seconds(results))
    if versions := made_with(results.directory):
        facts["Made with"] = versions
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


def _startup_fact(marks: dict[str, float], trials: pd.Series) -> str:
    """The run's phases (timeline.json: seconds since `sweep run` began) and the trials' own start-up, as one line."""
    said = ", ".join(f"{phase} at {seconds:.1f} s" for phase, seconds in marks.items()) + " after the command began"
    waited = trials.dropna()
    if len(waited):
        said += (f"; the trials waited {np.median(waited):.1f} s (median) before their first report, "
                 f"{waited.max():.1f} s the longest")
    return said


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def _short(value) -> str:
    return f"{value:.4g}" if isinstance(value, (float, np.floating)) else str(value)


