"""The comparison table: one row per arm (and per value of the spec's `compare_by` keys), holding that
arm's best configuration, the mean, standard deviation and 95% CI of the search metric over its seeds,
and Welch's t-test against the top row; plus the published-vs-reproduced table of `reference:`."""

from __future__ import annotations

import sys
from typing import NamedTuple

import numpy as np
import pandas as pd

from analysis.results import FINISHED, Results
from analysis.stats import summarize, welch_test

ALPHA = 0.05  # significance level of the test against the top row
CONFIDENCE = 0.95


class Comparison(NamedTuple):
    table: pd.DataFrame  # one row per group, ranked best first; written as comparison.csv
    labels: list[str]  # display name of each table row's group, e.g. "adamw" or "adamw · optim.weight_decay=0.01"
    members: list[list[str]]  # trial ids of each row's best configuration (its seeds), aligned with `table`
    group_of: pd.Series  # trial_id -> group label, for every trial
    method: str  # how the numbers were computed, one paragraph shown above the table


def group_columns(results: Results) -> list[str]:
    """`arm` plus the spec's `compare_by` keys, each matched to a hyperparameter exactly or by its last
    dotted part (`weight_decay` -> `optim.weight_decay`)."""
    columns = ["arm"]
    for key in (results.spec.get("compare_by") or []):
        matches = [h for h in results.hyperparameters if h == key or h.rsplit(".", 1)[-1] == key]
        if len(matches) == 1:
            columns.append(matches[0])
        else:  # e.g. no trial has started yet, so its hyperparameters are unknown
            print(f"report: compare_by key {key!r} matches {matches or 'no hyperparameter'}; not grouping by it",
                  file=sys.stderr)
    return columns


def seed_columns(results: Results) -> list[str]:
    return [h for h in results.hyperparameters if h.rsplit(".", 1)[-1] == "seed"]


def compare(results: Results) -> Comparison:
    """The ranked comparison table (one row per group) and, for the figures, each row's seeds."""
    metric, trials = results.metric, results.trials
    groups, seeds = group_columns(results), seed_columns(results)
    settings = [h for h in results.hyperparameters if h not in seeds and h not in groups]
    mean, sign = f"{metric}_mean", (1 if results.mode == "max" else -1)
    columns = ["rank", *groups, "best_config", "n_seeds", mean, f"{metric}_std", f"{metric}_ci95_low",
               f"{metric}_ci95_high", "diff_vs_top", "p_value", "distinguishable", "n_configs", "n_trials",
               "n_diverged", "note"]
    method = _method(results, groups, seeds)
    if trials.empty:
        return Comparison(pd.DataFrame(columns=columns), [], [], pd.Series(dtype=str), method)
    values = trials[f"final_{metric}"] if f"final_{metric}" in trials else pd.Series(np.nan, index=trials.index)
    group_of = trials.apply(lambda t: " · ".join([str(t["arm"]), *(f"{c}={_fmt(t[c])}" for c in groups[1:])]), axis=1)
    configs = trials[settings].map(str).agg("|".join, axis=1) if settings else pd.Series("", index=trials.index)

    rows = []  # (row, label, trial index labels of the best configuration)
    for label, group in trials.groupby(group_of, sort=False):
        pool, note = group[group["status"].isin(FINISHED)], ""
        if pool.empty:  # show something for a sweep still running, clearly marked
            pool = group[group["epochs_run"] > 0]
            note = "provisional: no trial finished; last reported values" if len(pool) else "nothing reported yet"
        best, best_ids = summarize([]), []
        for _, config in pool.groupby(configs[pool.index], sort=False):
            summary = summarize(values[config.index])
            if _score(summary.mean, sign) > _score(best.mean, sign):
                best, best_ids = summary, config.index.tolist()
        if len(pool) and not best_ids:
            note = f"no finite {metric}: every finished trial diverged to NaN/inf"
        varying = [s for s in settings if group[s].nunique(dropna=False) > 1]
        best_config = ", ".join(f"{s}={_fmt(trials.at[best_ids[0], s])}" for s in varying) if best_ids else ""
        row = {**{c: group[c].iloc[0] for c in groups}, "best_config": best_config or "—", "n_seeds": best.n,
               mean: best.mean, f"{metric}_std": best.std, f"{metric}_ci95_low": best.ci_low,
               f"{metric}_ci95_high": best.ci_high, "n_configs": int(configs[pool.index].nunique()),
               "n_trials": len(group), "n_diverged": int((group["status"] == "diverged").sum()), "note": note}
        rows.append((row, label, best_ids))

    rows.sort(key=lambda r: (-_score(r[0][mean], sign), -r[0]["n_seeds"]))
    top, top_values = rows[0][0], values[rows[0][2]]
    for rank, (row, _, ids) in enumerate(rows, start=1):
        test = welch_test(top_values, values[ids])
        row.update(rank=rank, diff_vs_top=row[mean] - top[mean], p_value=test.p_value if rank > 1 else np.nan,
                   distinguishable=_verdict(rank, test.p_value, top["n_seeds"], row["n_seeds"]))
    table = pd.DataFrame([r[0] for r in rows], columns=columns)
    return Comparison(table, [r[1] for r in rows], [trials.loc[r[2], "trial_id"].tolist() for r in rows],
                      pd.Series(group_of.to_numpy(), index=trials["trial_id"]), method)


def _score(mean: float, sign: int) -> float:
    return sign * mean if np.isfinite(mean) else -np.inf


def _verdict(rank: int, p_value: float, n_top: int, n_row: int) -> str:
    if n_row == 0:
        return "n/a (no value)"
    if rank == 1:
        return "top"
    if min(n_row, n_top) < 2:
        return f"n/a ({min(n_row, n_top)} seed)"
    if not np.isfinite(p_value):
        return "n/a (no variance)"
    return "yes" if p_value < ALPHA else "no"


def _method(results: Results, groups: list[str], seeds: list[str]) -> str:
    better = "higher" if results.mode == "max" else "lower"
    seed_text = f"trials differing only in {', '.join(seeds)}" if seeds else "trials with the same configuration"
    return (f"Metric: {results.metric} at each trial's final epoch ({better} is better). Only finished trials "
            f"count (trained to the planned epochs, or diverged); trials stopped early, failed or still running "
            f"do not, and non-finite values are dropped. One row per {' × '.join(groups)}: its best configuration, "
            f"the one with the best mean over its seeds ({seed_text}). 95% CI: Student's t on the mean over seeds. "
            f"Distinguishable: Welch's two-sided t-test against rank 1 at α = {ALPHA} (no correction for "
            f"multiple comparisons); it needs at least 2 seeds on both sides.")


def reference_table(results: Results, comparison: Comparison) -> pd.DataFrame | None:
    """Published numbers from the spec's `reference:` block beside the reproduced mean and 95% CI of the
    same arm's best configuration (its top row in the comparison)."""
    reference = results.spec.get("reference") or {}
    if not reference.get("rows"):
        return None
    trials = results.trials.set_index("trial_id")
    arms = comparison.table["arm"].tolist() if len(comparison.table) else []
    rows = []
    for published in reference["rows"]:
        arm = published.get("arm")
        for metric, value in published.items():
            if metric == "arm":
                continue
            row = {"arm": arm, "metric": metric, "published": value}
            column = f"final_{metric}"
            if arm not in arms or column not in trials:
                rows.append({**row, "within_ci95": "not run" if arm not in arms else "not reported"})
                continue
            s = summarize(trials.loc[comparison.members[arms.index(arm)], column])
            within = (f"n/a ({s.n} seed)" if s.n < 2 else "yes" if s.ci_low <= value <= s.ci_high else "no")
            rows.append({**row, "reproduced_mean": s.mean, "ci95_low": s.ci_low, "ci95_high": s.ci_high,
                         "n_seeds": s.n, "difference": s.mean - value, "within_ci95": within})
    columns = ["arm", "metric", "published", "reproduced_mean", "ci95_low", "ci95_high", "n_seeds",
               "difference", "within_ci95"]
    return pd.DataFrame(rows).reindex(columns=columns)


# Short headers for Markdown and HTML; the CSV keeps the exact column names.
HEADERS = {"best_config": "best configuration", "n_seeds": "seeds", "diff_vs_top": "Δ vs top",
           "p_value": "p (Welch)", "n_configs": "configs", "n_trials": "trials", "n_diverged": "diverged",
           "reproduced_mean": "reproduced", "within_ci95": "published within CI"}


def display(table: pd.DataFrame) -> pd.DataFrame:
    """The table as short strings (4 significant digits, p-values 2, each CI in one cell), for Markdown and HTML."""
    columns = {}
    for column in table.columns:
        if column.endswith("ci95_high"):
            continue
        if column.endswith("ci95_low"):
            high = table[column.removesuffix("low") + "high"]
            prefix = column.removesuffix("_ci95_low")
            label = "95% CI" if prefix == "" or f"{prefix}_mean" not in table else f"{prefix} 95% CI"
            columns[label] = [f"{_fmt(lo)} – {_fmt(hi)}" if np.isfinite(lo) else "—"
                                 for lo, hi in zip(table[column].astype(float), high.astype(float), strict=True)]
        elif column == "p_value":
            columns[HEADERS[column]] = [f"{v:.2g}" if np.isfinite(v) else "—" for v in table[column].astype(float)]
        else:
            columns[HEADERS.get(column, column)] = [_fmt(v) for v in table[column]]
    return pd.DataFrame(columns, index=table.index)


def to_markdown(table: pd.DataFrame) -> str:
    cells = display(table)
    lines = ["| " + " | ".join(cells.columns) + " |", "|" + "---|" * len(cells.columns)]
    lines += ["| " + " | ".join(v.replace("|", "\\|") for v in row) + " |" for row in cells.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def comparison_markdown(results: Results, comparison: Comparison, reference: pd.DataFrame | None) -> str:
    name = results.spec.get("name", results.directory.name)
    parts = [f"# {name}: comparison\n", comparison.method + "\n"]
    if results.partial:
        parts.append("**Partial results: the sweep is still running or was interrupted.**\n")
    if results.spec.get("smoke"):
        parts.append("**Smoke run: data, epochs and image size were shrunk; not comparable to published numbers.**\n")
    parts.append(to_markdown(comparison.table) if len(comparison.table) else "No trial has reported yet.\n")
    if reference is not None:
        source = (results.spec.get("reference") or {}).get("source", "spec")
        parts += [f"## Published vs reproduced (source: {source})\n",
                  "Reproduced: mean and 95% CI over the seeds of the arm's best configuration, final epoch.\n",
                  to_markdown(reference)]
    return "\n".join(parts)


def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)) or value is pd.NA:
        return "—"
    if isinstance(value, (float, np.floating)):
        return f"{value:.4g}"
    return str(value)
