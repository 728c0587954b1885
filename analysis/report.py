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
from plotly.offline import get_plotlyjs, get_plotlyjs_version

from analysis.budget import (
    TUNING_ASSUMES,
    time_to_target,
    trial_compute_seconds,
    tuning_curves,
)
from analysis.figures import FIGURES, NotApplicable, pbt_copies, report_colours
from analysis.results import STATUSES, Results, ResultsError, _read_spec, load_results
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

STYLE = """
body { font: 15px/1.45 system-ui, sans-serif; color: #222; max-width: 1400px; margin: 0 auto; padding: 0 24px 48px; }
h1 { margin: 24px 0 4px; } h2 { margin-top: 36px; border-bottom: 1px solid #ddd; padding-bottom: 4px; }
.description { color: #555; margin-top: 0; }
.partial, .smoke { background: #fff4ce; border: 1px solid #e0c060; padding: 8px 12px; border-radius: 4px; }
dl.facts { display: grid; grid-template-columns: max-content auto; gap: 4px 16px; }
dl.facts dt { font-weight: 600; } dl.facts dd { margin: 0; }
table.data { border-collapse: collapse; font-size: 13px; margin: 8px 0; }
table.data th, table.data td { border: 1px solid #ddd; padding: 4px 6px; text-align: right; white-space: nowrap; }
table.data th { background: #f4f4f4; vertical-align: bottom; }
table.data .text, table.data .prose { text-align: left; } table.data td.prose { white-space: normal; min-width: 11em; }
table.data tbody tr:first-child { background: #eef7ee; } table.trials tbody tr:first-child { background: none; }
table.sortable th { cursor: pointer; } table.sortable th[aria-sort]::after { content: " \\25B4"; }
table.sortable th[aria-sort=descending]::after { content: " \\25BE"; }
h2 .smoke { font-size: 14px; font-weight: normal; padding: 2px 8px; vertical-align: middle; }
.columns:not(.all) .detail { display: none; } label.columns-toggle { font-size: 13px; color: #444; }
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
    page, tables = protocol_page(results_dir, spec, STYLE, get_plotlyjs(), _html_table, target)
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
        table.add_column(str(column), justify="left" if last or not all(map(_numeric, cells[column])) else "right",
                         no_wrap=not last, min_width=len(str(column)) if last else None)
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
    name = html.escape(str(results.spec.get("name", results.directory.name)))
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{name}: sweep report</title>",
             f"<style>{STYLE}</style><script>{get_plotlyjs()}</script></head><body>",
             f"<h1>{name}</h1>"]
    parts.append(header_notes(results.spec))
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
                  _html_table(comparison.table, details=[f"{metric}_std", "test", "p_value", "n_configs", "n_trials",
                                                         "n_diverged", "epochs_trained"])]
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
                  f"({TARGET_GIVEN if target_given else TARGET_DEFAULT}). Epochs and seconds (of training and "
                  "evaluation, as the trials timed them: not the start-up of the worker a trial ran on) until each "
                  "seed of the row's best configuration first reaches it; the median over seeds, a seed that never "
                  "reached it counting as never (AlgoPerf's time to result). Seconds: the training and evaluation "
                  "the sweep spent on the row.</p>", _html_table(compute)]
    if "tuning_curves" in figures:
        parts.append(f"<p class='method'>Tuning curves: {html.escape(TUNING_ASSUMES)}</p>")
    parts.append("<h2>Figures</h2>" + ("" if figures else "<p>No figure applies yet (see below).</p>"))
    for key, fig in figures.items():
        height = fig.layout.height or 450
        parts.append("<figure>" + fig.to_html(full_html=False, include_plotlyjs=False, div_id=f"figure-{key}",
                                              default_height=f"{height}px",
                                              config={"displaylogo": False, "responsive": True}) + "</figure>")
    parts += [f"<h2>Every trial</h2><p class='method'>{TRIALS_TEXT}</p>", _html_table(trial_table(results),
                                                                                   classes="data trials sortable")]
    if skipped:
        parts.append("<h2>Not shown</h2><ul>" + "".join(f"<li><b>{k.replace('_', ' ')}</b>: {html.escape(v)}</li>"
                                                       for k, v in skipped.items()) + "</ul>")
    links = " · ".join(f"<a href='{html.escape(f)}'>{html.escape(f)}</a>" for f in files)
    generated = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    parts.append(f"<footer>Tables: {links}<br>Results: {html.escape(str(results.directory.resolve()))} · "
                 f"generated {generated} · plotly.js {get_plotlyjs_version()} embedded, works offline</footer>")
    parts.append(f"<script>{SORT_JS}</script></body></html>")
    return "\n".join(parts)


SMOKE = ("<b>Smoke run</b> (<code>--smoke</code>): the spec shrunk to check that it runs end to end (a data subset, "
         "a few epochs, small images, one seed, a couple of trials per arm). Its numbers and verdicts are not "
         "results and are not comparable to published ones; run it without <code>--smoke</code> for those.")


def header_notes(spec: dict) -> str:
    """Under the title: the spec's description, or, for a smoke run, a banner saying what it is instead (the full
    spec's description would promise trials and epochs the smoke run did not run)."""
    if spec.get("smoke"):
        return f"<p class='smoke' id='smoke'>{SMOKE}</p>"
    return f"<p class='description'>{html.escape(str(spec['description']))}</p>" if spec.get("description") else ""


def smoke_tag(spec: dict) -> str:
    """Beside a verdict's heading: a reminder that a smoke run's verdicts are not results."""
    return " <span class='smoke'>smoke run: not a result</span>" if spec.get("smoke") else ""


TRIALS_TEXT = ("One row per trial: its status, the epochs it ran, the settings that vary in this sweep and its final "
               "metrics (an early-stopped trial's at its last epoch). Click a header to sort.")
# Sorts a table.sortable by the clicked column: numbers as numbers, before text; a second click reverses.
SORT_JS = """
document.querySelectorAll('table.sortable th').forEach((th, column) => th.addEventListener('click', () => {
  const body = th.closest('table').tBodies[0], down = th.getAttribute('aria-sort') === 'ascending';
  th.parentElement.querySelectorAll('th').forEach(h => h.removeAttribute('aria-sort'));
  th.setAttribute('aria-sort', down ? 'descending' : 'ascending');
  const key = row => { const t = row.cells[column].textContent.trim(), n = t === '' ? NaN : Number(t);
                       return isNaN(n) ? [1, t] : [0, n]; };
  const rows = Array.from(body.rows).sort((a, b) => { const [p, x] = key(a), [q, y] = key(b);
    return (p - q || (x < y ? -1 : x > y ? 1 : 0)) * (down ? -1 : 1); });
  body.append(...rows);
}));
"""


def trial_table(results: Results) -> pd.DataFrame:
    """The trials as the report lists them: id, arm, status, epochs, the settings that vary, final metrics."""
    trials = results.trials
    settings = [h for h in results.hyperparameters if trials[h].nunique(dropna=False) > 1]
    metrics = [f"final_{m}" for m in dict.fromkeys([*results.search_metrics, "val_acc", "val_loss", "test_acc"])]
    columns = ["trial_id", "arm", "status", "epochs_run", *settings, *(m for m in metrics if m in trials)]
    return trials[columns].rename(columns={"epochs_run": "epochs"})


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


PROSE = 24  # characters: a column with longer cells (a note, a verdict, a configuration) wraps at a readable width


def _html_table(table: pd.DataFrame, *, details: list[str] = (), classes: str = "data") -> str:
    """`display(table)` as an HTML table that reads on a 1400 px window without scrolling sideways: numbers, labels
    and headers stay on one line, columns of prose wrap at a readable width (CSS class `prose`), and the `details`
    columns (the table's names) are hidden until the reader ticks "all columns" (the CSV has them all)."""
    cells = display(table)
    hidden = set(display(table[[c for c in table.columns if c in details]]).columns) if details else set()
    kinds = {c: _cell_class(cells[c], c in hidden) for c in cells}
    head = "".join(f"<th{kinds[c].replace('prose', 'text')}>{html.escape(str(c))}</th>" for c in cells)
    rows = "".join("<tr>" + "".join(f"<td{kinds[c]}>{html.escape(str(v))}</td>" for c, v in row.items()) + "</tr>"
                   for _, row in cells.iterrows())
    toggle = (f"<label class='columns-toggle'><input type='checkbox' onchange=\"this.closest('.columns').classList"
              f".toggle('all', this.checked)\"> all {len(cells.columns)} columns (also "
              f"{html.escape(', '.join(c for c in cells if c in hidden))})</label>") if hidden else ""
    return (f"<div class='scroll columns'>{toggle}<table class='{classes}'><thead><tr>{head}</tr></thead>"
            f"<tbody>{rows}</tbody></table></div>")


def _cell_class(column: pd.Series, detail: bool) -> str:
    """Numbers (and intervals, and the dash of a missing value) align right; labels left; long text wraps."""
    kind = "prose" if len(column) and column.str.len().max() > PROSE else \
        "" if all(_numeric(text) for text in column) else "text"
    names = " ".join(n for n in (kind, "detail" if detail else "") if n)
    return f" class='{names}'" if names else ""


def _numeric(text: str) -> bool:
    """A number, an interval `low – high`, or the dash that stands for a missing number."""
    try:
        [float(part) for part in text.split(" – ")]
    except ValueError:
        return text == "—"
    return True
