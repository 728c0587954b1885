"""The HTML around a report's content, shared by the sweep report and the protocol's page: the page's head (one
style sheet, plotly.js inlined once, so the file works offline), the notes under the title, and the tables."""

from __future__ import annotations

import html
import json
from pathlib import Path

import pandas as pd
from plotly.offline import get_plotlyjs

from analysis.tables import display

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


def page_start(spec: dict, name: str, kind: str) -> str:
    """The page up to its first section: head, title and the notes under it (`kind`: "sweep", "protocol")."""
    name = html.escape(name)
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{name}: {kind} report</title>"
            f"<style>{STYLE}</style><script>{get_plotlyjs()}</script></head><body><h1>{name}</h1>" + header_notes(spec))


def made_with(results_dir: Path) -> str:
    """The code and library versions the sweep recorded (`versions.json`, beside its spec), as one line; "" for
    results of a version that did not record them."""
    try:
        found = json.loads((results_dir / "versions.json").read_text())
    except (OSError, ValueError):
        return ""
    return ", ".join(f"{name} {value}" if name != "code" else str(value) for name, value in found.items())


def timeline(results_dir: Path) -> dict[str, float]:
    """When the sweep's phases ended, in seconds since `sweep run` began (`timeline.json`, written by
    `sweeps.progress.Timeline`); {} for results without one (a protocol stage, an older version)."""
    try:
        found = json.loads((results_dir / "timeline.json").read_text())
    except (OSError, ValueError):
        return {}
    return {str(phase): float(seconds) for phase, seconds in found.items()} if isinstance(found, dict) else {}


def page_end(footer: str) -> str:
    """The footer (HTML) and the script that sorts the sortable tables."""
    return f"<footer>{footer}</footer><script>{SORT_JS}</script></body></html>"


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



PROSE = 24  # characters: a column with longer cells (a note, a verdict, a configuration) wraps at a readable width


def html_table(table: pd.DataFrame, *, details: list[str] = (), classes: str = "data") -> str:
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
        "" if all(is_number_text(text) for text in column) else "text"
    names = " ".join(n for n in (kind, "detail" if detail else "") if n)
    return f" class='{names}'" if names else ""


def is_number_text(text: str) -> bool:
    """A number, an interval `low – high`, or the dash that stands for a missing number."""
    try:
        [float(part) for part in text.split(" – ")]
    except ValueError:
        return text == "—"
    return True
