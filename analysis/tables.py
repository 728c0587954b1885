"""The comparison table: one row per arm (and per value of the spec's `compare_by` keys), holding that
arm's best configuration, the mean, standard deviation and 95% CI of the search metric over its seeds,
and a t-test against the top row (paired by seed where the rows share seeds, Holm-corrected over all
pairs); plus the published-vs-reproduced table of `reference:`, judged against a prediction interval
for a single run."""

from __future__ import annotations

import itertools
import sys
from typing import NamedTuple

import numpy as np
import pandas as pd

from analysis.results import FINISHED, Results
from analysis.stats import (
    holm,
    metric_range,
    metric_resolution,
    paired_test,
    prediction_interval,
    rank_key,
    summarize,
    welch_test,
)

ALPHA = 0.05  # family-wise error rate of the "distinguishable" verdicts
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
    columns = ["rank", *groups, "best_config", "n_seeds", "n_seeds_diverged", mean, f"{metric}_std",
               f"{metric}_ci95_low", f"{metric}_ci95_high", "diff_vs_top", "test", "p_value", "p_holm",
               "distinguishable", "n_configs", "n_trials", "n_diverged", "epochs_trained", "note"]
    method = _method(results, groups, seeds)
    if trials.empty:
        return Comparison(pd.DataFrame(columns=columns), [], [], pd.Series(dtype=str), method)
    values = trials[f"final_{metric}"] if f"final_{metric}" in trials else pd.Series(np.nan, index=trials.index)
    values = values.astype(float)
    group_of = trials.apply(lambda t: " · ".join([str(t["arm"]), *(f"{c}={_fmt(t[c])}" for c in groups[1:])]), axis=1)
    configs = trials[settings].map(str).agg("|".join, axis=1) if settings else pd.Series("", index=trials.index)
    finished = trials["status"].isin(FINISHED)
    step = metric_resolution(metric, results.confusion)

    rows = []  # (row, label, trial index labels of the best configuration's finished seeds, rank key)
    for label, group in trials.groupby(group_of, sort=False):
        notes, unfinished = [], None
        if not finished[group.index].any():  # show something, clearly marked: a sweep still running, or stopped
            running = (group["status"] == "running").any()
            unfinished = "not finished" if running else "stopped early"
            reported = group[group["epochs_run"] > 0]
            notes.append("nothing reported yet" if reported.empty else "provisional: no trial finished; last reported "
                         "values" if running else f"every trial was stopped early (after "
                         f"{_epochs(reported['epochs_run'].max())} at most): last reported values, ranked below rows "
                         "with finished trials")
        best_key, best_ids, best_seeds, repeats = (), [], 0, 0
        for _, config in group.groupby(configs[group.index], sort=False):
            # One replicate per seed: a configuration drawn twice (a small choice domain, a repeated TPE
            # suggestion) ran the same trial twice, which is not a second seed. A finished run of a seed counts
            # before an unfinished one.
            config = config.loc[finished[config.index].sort_values(ascending=False, kind="stable").index]
            once = config[~config[seeds].duplicated()] if seeds else config.iloc[:1]
            # Seeds of one configuration are judged together: a configuration some of whose seeds were stopped
            # early (or failed, or still run) is judged on the others, says so, and ranks below fully trained ones.
            judged = once[finished[once.index]] if unfinished is None else once[once["epochs_run"] > 0]
            if judged.empty:
                continue
            not_all_diverged, *rest = rank_key(values[judged.index], judged["status"] == "diverged", sign)
            key = (unfinished is None, not_all_diverged, len(judged) == len(once), *rest)  # all-diverged ranks last
            if not best_ids or key > best_key:
                best_key, best_ids, best_seeds, repeats = key, judged.index.tolist(), len(once), len(config) - len(once)
        best = summarize(values[best_ids], bounds=metric_range(metric), resolution=step)
        if repeats:
            notes.append(f"its best configuration ran {repeats} more time{'s' * (repeats > 1)} with a seed it already "
                         "had: counted once")
        partial = unfinished is None and len(best_ids) < best_seeds
        if partial:
            notes.append(f"judged on {len(best_ids)} of its {best_seeds} seeds (the others were stopped early, failed "
                         "or are still running): ranked below rows whose every seed finished")
        missing = len(best_ids) - best.n  # finished seeds whose value is not finite (a diverged loss)
        all_diverged = bool(best_ids) and not best_key[1]
        if all_diverged:
            notes.append("every seed of its best configuration diverged: ranked last")
        if best_ids and best.n == 0:
            notes.append(f"no finite {metric} on any seed")
        elif missing:
            notes.append(f"{missing} of {len(best_ids)} seeds have no finite {metric} (diverged): ranked below rows "
                         f"with a value on every seed; mean and CI over the other {best.n}")
        varying = [s for s in settings if group[s].nunique(dropna=False) > 1]
        best_config = ", ".join(f"{s}={_fmt(trials.at[best_ids[0], s])}" for s in varying) if best_ids else ""
        row = {**{c: group[c].iloc[0] for c in groups}, "best_config": best_config or "—", "n_seeds": len(best_ids),
               "n_seeds_diverged": int((trials.loc[best_ids, "status"] == "diverged").sum()),
               mean: best.mean, f"{metric}_std": best.std, f"{metric}_ci95_low": best.ci_low,
               f"{metric}_ci95_high": best.ci_high, "n_configs": int(configs[group.index].nunique()),
               "n_trials": len(group), "n_diverged": int((group["status"] == "diverged").sum()),
               "epochs_trained": int(group["epochs_run"].sum()),
               "untestable": _untestable(len(best_ids), missing, int(configs[group.index].nunique()), unfinished,
                                         all_diverged, best_seeds if partial else None),
               "note": notes}
        rows.append((row, label, best_ids, best_key))

    rows.sort(key=lambda r: r[3], reverse=True)
    _test_against_top(rows, values, trials[seeds[0]] if seeds else None, mean)
    for rank, (row, _, ids, _) in enumerate(rows, start=1):
        below = max((r[0]["n_seeds"] for r in rows[rank:]), default=0)
        if 0 < row["n_seeds"] < below:
            row["note"].append(f"ranked above rows with more seeds ({row['n_seeds']} against up to {below})")
        row.update(rank=rank, note="; ".join(row["note"]))
    table = pd.DataFrame([r[0] for r in rows], columns=columns)
    return Comparison(table, [r[1] for r in rows], [trials.loc[r[2], "trial_id"].tolist() for r in rows],
                      pd.Series(group_of.to_numpy(), index=trials["trial_id"]), method)


def _epochs(n) -> str:
    return f"{int(n)} epoch{'s' * (int(n) != 1)}"


def _untestable(n_seeds: int, missing: int, n_configs: int, unfinished: str | None, all_diverged: bool,
                planned_seeds: int | None = None) -> str | None:
    """Why a row's seeds cannot back a significance verdict, or None when they can."""
    if n_seeds == 0:
        return "no value"
    if unfinished:
        return unfinished
    if all_diverged:
        return "diverged on every seed"
    if planned_seeds:  # the survivors of a configuration are not a sample of its seeds
        return f"{n_seeds} of {planned_seeds} seeds finished"
    if missing:
        return f"{missing} seed{'s' * (missing > 1)} without a finite value"
    if n_configs > 1:  # its best configuration was chosen on these very seeds: a test on them would favour it
        return f"best of {n_configs} configurations, chosen on these seeds"
    if n_seeds < 2:
        return f"{n_seeds} seed"
    return None


MIN_PAIRED_SEEDS = 2  # shared seeds from which two rows are compared seed by seed


def two_rows_test(a: pd.Series, b: pd.Series, by_seed: bool) -> tuple[str, float]:
    """The test of two rows' final values (`by_seed`: each Series is indexed by seed): a paired t-test on the seeds
    both ran when they share at least MIN_PAIRED_SEEDS (seed i of one against seed i of the other, so what a seed
    does to both, its data order and initialisation, cancels out), else the unpaired `welch_test`.
    Returns (what was run, two-sided p-value)."""
    shared = a.index.intersection(b.index) if by_seed and a.index.is_unique and b.index.is_unique else a.index[:0]
    if len(shared) >= MIN_PAIRED_SEEDS:
        return f"paired, {len(shared)} seeds", paired_test(a[shared], b[shared]).p_value
    return "Welch", welch_test(a, b).p_value


def _test_against_top(rows: list, values: pd.Series, seed: pd.Series | None, mean: str) -> None:
    """The top row tested against each other row (`two_rows_test`). Holm over every pair of testable rows keeps
    the chance of any false "yes" at most ALPHA, however the top row came out on top."""
    why = [row.pop("untestable") for row, *_ in rows]
    testable = [i for i, reason in enumerate(why) if reason is None]
    finals = [pd.Series(values[ids].to_numpy(), index=seed[ids] if seed is not None else None) for _, _, ids, _ in rows]
    tests = {(i, j): two_rows_test(finals[i], finals[j], seed is not None) for i, j in itertools.combinations(testable, 2)}
    p = {pair: p_value for pair, (_, p_value) in tests.items()}
    adjusted = dict(zip(p, holm(list(p.values())))) if p else {}
    top = rows[0][0]
    for i, (row, *_) in enumerate(rows):
        row.update(diff_vs_top=row[mean] - top[mean], test=tests[(0, i)][0] if (0, i) in tests else "—",
                   p_value=p.get((0, i), np.nan), p_holm=adjusted.get((0, i), np.nan))
        if i == 0:
            row["distinguishable"] = "top" if row["n_seeds"] else "n/a (no value)"
        elif why[i]:
            row["distinguishable"] = f"n/a ({why[i]})"
        elif why[0]:
            row["distinguishable"] = f"n/a (top row: {why[0]})"
        elif not np.isfinite(row["p_holm"]):
            row["distinguishable"] = "tied (the same value on every seed)" if row["diff_vs_top"] == 0 \
                else "n/a (the same difference on every seed)" if row["test"].startswith("paired") else "n/a (no spread)"
        else:
            row["distinguishable"] = "yes" if row["p_holm"] < ALPHA else "no"


def _method(results: Results, groups: list[str], seeds: list[str]) -> str:
    better = "higher" if results.mode == "max" else "lower"
    seed_text = f"trials differing only in {', '.join(seeds)}" if seeds else "trials with the same configuration"
    return (f"Metric: {results.metric} at each trial's final epoch ({better} is better). Only finished trials "
            f"count: trained to the planned epochs, or diverged. A diverged seed is a result: it keeps the score its "
            f"model has (outputs that are not finite count as wrong answers); a seed with no finite value ranks its "
            f"row below every row with a value on every seed. Trials stopped early, failed or still running do not "
            f"count; a configuration some of whose seeds did not finish is judged on the others, says so, and ranks "
            f"below rows whose every seed finished. One row per {' × '.join(groups)}: its best configuration, the one "
            f"with the best mean over its seeds ({seed_text}). 95% CI: Student's t on the mean over seeds, kept "
            f"inside the metric's range. Distinguishable: a two-sided t-test against rank 1, paired by seed (seed i "
            f"of one row against seed i of the other) where the two rows ran at least {MIN_PAIRED_SEEDS} of the same "
            f"seeds, else Welch's unpaired test read at min(n₁, n₂) − 1 degrees of freedom (Hsu's, which holds α "
            f"at every seed count and spread; Test column), Holm-corrected over all pairs of testable rows, so the "
            f"chance of any false 'yes' is at most α = {ALPHA}. It needs at least 2 seeds on both sides, and a "
            f"configuration fixed in the spec: a row that is the best of several configurations was chosen on the "
            f"same seeds and would be favoured by a test on them (a protocol spec tunes first, then confirms on "
            f"fresh seeds). Epochs trained: every epoch the arm's trials ran, early-stopped ones included; early "
            f"stopping judges each trial against its own arm only.")


def reference_table(results: Results, comparison: Comparison) -> pd.DataFrame | None:
    """Published numbers from the spec's `reference:` block beside what the same arm's best configuration
    (its top row in the comparison) reproduced: mean and std over its seeds, and the 95% prediction
    interval for a single run. A published number is one run, so "within" asks whether one more run of ours
    could plausibly have given it (the CI of the mean would answer another question, and wrongly)."""
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
                rows.append({**row, "within_pi95": "not run" if arm not in arms else "not reported"})
                continue
            seeds = trials.loc[comparison.members[arms.index(arm)], column]
            s = summarize(seeds)
            low, high = prediction_interval(seeds, CONFIDENCE, bounds=metric_range(metric),
                                            resolution=metric_resolution(metric, results.confusion))
            within = f"n/a ({s.n} seed)" if s.n < 2 else "yes" if low <= value <= high else "no"
            rows.append({**row, "reproduced_mean": s.mean, "reproduced_std": s.std, "n_seeds": s.n,
                         "pi95_low": low, "pi95_high": high, "difference": s.mean - value, "within_pi95": within})
    columns = ["arm", "metric", "published", "reproduced_mean", "reproduced_std", "n_seeds", "pi95_low",
               "pi95_high", "difference", "within_pi95"]
    return pd.DataFrame(rows).reindex(columns=columns)


def pareto_table(results: Results) -> pd.DataFrame | None:
    """With several search metrics: every finished trial's final values, and whether it is on the Pareto front
    (no other finished trial is at least as good on every metric and better on one). None with one metric."""
    metrics = results.search_metrics
    if len(metrics) < 2:
        return None
    columns = [f"final_{m}" for m in metrics]
    trials = results.trials
    done = trials[trials["status"].isin(FINISHED)].reindex(columns=["trial_id", "arm", *columns])
    values = done[columns].to_numpy(float) * np.array([1 if mode == "max" else -1 for mode in results.search_modes])
    finite = np.isfinite(values).all(axis=1)
    front = []
    for i, row in enumerate(values):
        beaten = finite & (values >= row).all(axis=1) & (values > row).any(axis=1)
        front.append(bool(finite[i] and not beaten.any()))
    table = done.assign(on_front=front).reset_index(drop=True)
    return table.sort_values(["on_front", columns[0]], ascending=[False, results.mode == "min"])


# Short headers for Markdown and HTML; the CSV keeps the exact column names.
HEADERS = {"best_config": "best configuration", "n_seeds": "seeds", "n_seeds_diverged": "seeds diverged",
           "n_now": "seeds now", "sd_diff": "sd of differences", "power_now": "power now", "seeds_needed": "seeds needed",
           "diff_vs_top": "Δ vs top", "p_value": "p", "p_holm": "p (Holm)", "n_configs": "configs",
           "n_trials": "trials", "n_diverged": "diverged", "epochs_trained": "epochs trained", "reproduced_mean": "reproduced",
           "reproduced_std": "std", "within_pi95": "published within 95% PI"}
INTERVALS = {"ci95": "95% CI", "pi95": "95% PI"}  # column infix -> header of the combined "low – high" cell


def display(table: pd.DataFrame) -> pd.DataFrame:
    """The table as short strings (4 significant digits, p-values 2, each interval in one cell), for Markdown and HTML."""
    columns = {}
    for column in table.columns:
        kind = next((k for k in INTERVALS if column.endswith(f"{k}_low") or column.endswith(f"{k}_high")), None)
        if kind and column.endswith("_high"):
            continue
        if kind:
            high = table[column.removesuffix("low") + "high"]
            prefix = column.removesuffix(f"{kind}_low").removesuffix("_")
            label = INTERVALS[kind] if not prefix or f"{prefix}_mean" not in table else f"{prefix} {INTERVALS[kind]}"
            columns[label] = [f"{_fmt(lo)} – {_fmt(hi)}" if np.isfinite(lo) else "—"
                              for lo, hi in zip(table[column].astype(float), high.astype(float), strict=True)]
        elif column.startswith("p_"):
            columns[HEADERS.get(column, column)] = [f"{v:.2g}" if np.isfinite(v) else "—" for v in table[column].astype(float)]
        else:
            columns[HEADERS.get(column, column)] = [_fmt(v) for v in table[column]]
    return pd.DataFrame(columns, index=table.index)


def to_markdown(table: pd.DataFrame) -> str:
    cells = display(table)
    lines = ["| " + " | ".join(cells.columns) + " |", "|" + "---|" * len(cells.columns)]
    lines += ["| " + " | ".join(v.replace("|", "\\|") for v in row) + " |" for row in cells.itertuples(index=False)]
    return "\n".join(lines) + "\n"


CONCLUSION = "Conclusion:"  # the sentence's lead in comparison.md, where the console reads it back


def conclusion(results: Results, comparison: Comparison) -> str:
    """One plain sentence: what the comparison can and cannot conclude, and which command would tell more."""
    table = comparison.table
    if table.empty:
        return f"{CONCLUSION} nothing yet: no trial has reported."
    label, verdicts = comparison.labels[0], table["distinguishable"].iloc[1:]
    if results.partial:
        return (f"{CONCLUSION} provisional: the sweep has not finished (`sweep resume {results.directory}` continues "
                "it); the ranking may still change.")
    if len(table) == 1:
        return f"{CONCLUSION} a single row ({label}): there is nothing to compare it with."
    if (table["n_seeds"] <= 1).all():
        how = ("tune and then confirm on fresh seeds with a protocol spec (`protocol: {confirm_seeds: 5}`; bundled: "
               "`sweep run fair-optimizers-mnist`)" if (table["n_configs"] > 1).any() else
               "rerun with seeds (`--set 'space.seed={grid: [0, 1, 2, 3, 4]}'`)")
        return (f"{CONCLUSION} one seed per configuration cannot separate the arms: {label} ranks first, but "
                f"seed-to-seed noise was not measured, so the order may be luck; to tell them apart, {how}.")
    better = [comparison.labels[i + 1] for i, v in enumerate(verdicts) if v == "yes"]
    tested = [comparison.labels[i + 1] for i, v in enumerate(verdicts) if v in ("yes", "no") or v.startswith("tied")]
    if not tested:
        reasons = sorted({v.removeprefix("n/a (").removesuffix(")") for v in verdicts if v.startswith("n/a")})
        return (f"{CONCLUSION} {label} ranks first, but no row could be tested against it ({'; '.join(reasons)}); "
                "a protocol spec (tune, then confirm on fresh seeds) gives verdicts.")
    if better:
        rest = [t for t in tested if t not in better]
        return (f"{CONCLUSION} {label} is better than {', '.join(better)} (Holm-corrected, α = {ALPHA})"
                + (f"; {', '.join(rest)} cannot be told apart from it at this budget." if rest else "."))
    return (f"{CONCLUSION} no row tested can be told apart from {label} at this budget ({', '.join(tested)}); "
            f"`sweep plan {results.directory} --effect D` says how many seeds a difference D would need.")


def comparison_markdown(results: Results, comparison: Comparison, reference: pd.DataFrame | None) -> str:
    name = results.spec.get("name", results.directory.name)
    parts = [f"# {name}: comparison\n", comparison.method + "\n"]
    if results.partial:
        parts.append("**Partial results: the sweep is still running or was interrupted.**\n")
    if results.spec.get("smoke"):
        parts.append("**Smoke run: data, epochs and image size were shrunk; not comparable to published numbers.**\n")
    parts.append(to_markdown(comparison.table) if len(comparison.table) else "No trial has reported yet.\n")
    parts.append(conclusion(results, comparison) + "\n")
    if reference is not None:
        source = (results.spec.get("reference") or {}).get("source", "spec")
        parts += [f"## Published vs reproduced (source: {source})\n",
                  "Reproduced: mean and std over the seeds of the arm's best configuration, final epoch. 95% PI: "
                  "the prediction interval for a single new run, mean ± t·s·√(1 + 1/n); a published number is "
                  "one run, so it is judged against where one run of ours would land.\n",
                  to_markdown(reference)]
    return "\n".join(parts)


def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)) or value is pd.NA:
        return "—"
    if isinstance(value, (float, np.floating)):
        return f"{value:.4g}"
    return str(value)
