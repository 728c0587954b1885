"""The report of a two-stage protocol (`sweeps/protocol.py`): a verdict per arm from the confirm stage,
paired by seed and corrected for multiple comparisons, beside each arm's learning-rate robustness from
the tune stage. Each stage also gets its own ordinary report."""

from __future__ import annotations

import html
import itertools
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd

from analysis.figures import FIGURES, NotApplicable
from analysis.results import ResultsError, load_results
from analysis.stats import holm, paired_test, summarize

GOOD_LR_TOLERANCE = 0.01  # a tuning trial is "good" if its final metric is within this of its arm's best


class Pair(NamedTuple):
    better: str
    worse: str
    mean_diff: float  # mean over seeds of better - worse (in the metric's units, sign by mode)
    p_value: float  # paired t-test, two-sided
    p_holm: float  # Holm-adjusted over all pairs of arms
    significant: bool


def pairwise(values: dict[str, pd.Series], mode: str, alpha: float) -> list[Pair]:
    """Every pair of arms, tested paired by seed; `values[arm]` is indexed by seed.

    The family is all pairs, so with Holm's step-down the chance of any false "better" claim is at most alpha.
    """
    pairs = []
    for a, b in itertools.combinations(values, 2):
        joined = pd.concat([values[a], values[b]], axis=1, join="inner").to_numpy(float)
        diff = float(np.nanmean(joined[:, 0] - joined[:, 1])) if len(joined) else np.nan
        if (mode == "max") != (diff >= 0):
            a, b, diff = b, a, -diff
        test = paired_test(joined[:, 0], joined[:, 1]) if len(joined) else None
        pairs.append((a, b, abs(diff), test.p_value if test else np.nan))
    adjusted = holm([p for *_, p in pairs])
    return [Pair(a, b, d, p, q, bool(q < alpha)) for (a, b, d, p), q in zip(pairs, adjusted)]


def verdict(pair: Pair, metric: str, n: int) -> str:
    if not np.isfinite(pair.p_holm):
        return f"{pair.better} vs {pair.worse}: not testable (fewer than 2 paired seeds, or identical results)"
    if pair.significant:
        return (f"{pair.better} is better than {pair.worse}: {metric} {pair.mean_diff:+.4f} on average over "
                f"{n} seeds (paired t-test p = {pair.p_value:.3g}, Holm-adjusted p = {pair.p_holm:.3g})")
    return (f"{pair.better} vs {pair.worse}: no detectable difference at this budget ({metric} difference "
            f"{pair.mean_diff:.4f}, paired t-test p = {pair.p_value:.3g}, Holm-adjusted p = {pair.p_holm:.3g})")


def lr_robustness(tune_trials: pd.DataFrame, metric: str, mode: str, lr_key: str = "optim.lr") -> pd.DataFrame:
    """Per arm: how wide the range of good learning rates is in the tune stage (good = within tolerance of best).

    Only trials that ran the full budget count when the arm has any, so early-stopped trials' partial
    scores are not compared with finished ones."""
    rows = []
    for arm, group in tune_trials.groupby("arm", sort=False):
        finished = group[group["status"] == "completed"]  # as in the choice of the tuned configuration:
        group = finished if len(finished) else group      # trials that ran the whole budget, when there are any
        values = group[f"final_{metric}"].astype(float)
        finite = values[np.isfinite(values)]
        if lr_key not in group or finite.empty:
            continue
        best = finite.max() if mode == "max" else finite.min()
        good = group.loc[finite.index[(finite - best).abs() <= GOOD_LR_TOLERANCE], lr_key].astype(float)
        low, high = good.min(), good.max()
        rows.append({"arm": arm, "full_budget_trials": len(group), f"best_{metric}": best, "good_trials": len(good),
                     "good_lr_low": low, "good_lr_high": high,
                     "good_lr_decades": float(np.log10(high / low)) if low > 0 else np.nan})
    return pd.DataFrame(rows)


def protocol_tables(results_dir: Path, alpha: float = 0.05) -> dict[str, object]:
    """The verdict table, the pairwise tests, the LR robustness table and compute per arm."""
    tune, confirm = load_results(results_dir / "tune"), load_results(results_dir / "confirm")
    metric = "test_acc" if "final_test_acc" in confirm.trials else confirm.metric
    mode = "max" if metric.endswith("acc") else confirm.mode
    trials = confirm.trials
    seed_key = next((h for h in confirm.hyperparameters if h.rsplit(".", 1)[-1] == "seed"), None)
    per_arm = {arm: g.set_index(seed_key)[f"final_{metric}"].astype(float) if seed_key else g[f"final_{metric}"]
               for arm, g in trials.groupby("arm", sort=False)} if not trials.empty else {}
    ranked = sorted(per_arm, key=lambda a: summarize(per_arm[a]).mean * (1 if mode == "max" else -1), reverse=True)
    pairs = pairwise({a: per_arm[a] for a in ranked}, mode, alpha)
    top = ranked[0] if ranked else None
    settings = [h for h in confirm.hyperparameters if h != seed_key]
    rows = []
    for rank, arm in enumerate(ranked, 1):
        group = trials[trials["arm"] == arm]
        acc, loss = summarize(group.get(f"final_{metric}", np.nan)), summarize(group.get("final_test_loss", np.nan))
        vs_top = next((p for p in pairs if {p.better, p.worse} == {arm, top}), None)
        first = group.iloc[0]
        rows.append({
            "rank": rank, "arm": arm,
            "tuned_config": ", ".join(f"{k}={_fmt(first[k])}" for k in settings if k in first and not pd.isna(first[k])),
            "n_seeds": acc.n, f"{metric}_mean": acc.mean, f"{metric}_ci95_low": acc.ci_low, f"{metric}_ci95_high": acc.ci_high,
            "test_loss_mean": loss.mean, "test_loss_ci95_low": loss.ci_low, "test_loss_ci95_high": loss.ci_high,
            "p_vs_top": vs_top.p_value if vs_top else np.nan, "p_holm_vs_top": vs_top.p_holm if vs_top else np.nan,
            "verdict_vs_top": "top" if arm == top else ("worse" if vs_top and vs_top.significant
                                                          else "no detectable difference"),
        })
    compute = []
    for arm in ranked:
        t, c = tune.trials[tune.trials["arm"] == arm], trials[trials["arm"] == arm]
        compute.append({"arm": arm, "tune_trials": len(t), "tune_epochs": int(t["epochs_run"].sum()),
                        "tune_seconds": float(np.nansum(t["wall_time_s"])), "confirm_trials": len(c),
                        "confirm_epochs": int(c["epochs_run"].sum()),
                        "confirm_seconds": float(np.nansum(c["wall_time_s"]))})
    return {"tune": tune, "confirm": confirm, "metric": metric, "mode": mode, "pairs": pairs,
            "verdicts": pd.DataFrame(rows), "robustness": lr_robustness(tune.trials, tune.metric, tune.mode),
            "compute": pd.DataFrame(compute), "n_seeds": max((len(v) for v in per_arm.values()), default=0)}


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def protocol_page(results_dir: Path, spec: dict, style: str, plotlyjs: str, html_table) -> tuple[str, dict[str, str]]:
    """The protocol report page and its tables (file name -> CSV/Markdown text)."""
    protocol = spec.get("protocol") or {}
    t = protocol_tables(results_dir, protocol.get("alpha", 0.05))
    metric, verdicts = t["metric"], t["verdicts"]
    name = html.escape(str(spec.get("name", results_dir.name)))
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{name}: protocol report</title>",
             f"<style>{style}</style><script>{plotlyjs}</script></head><body><h1>{name}</h1>"]
    if spec.get("description"):
        parts.append(f"<p class='description'>{html.escape(str(spec['description']))}</p>")
    if t["tune"].partial or t["confirm"].partial:
        parts.append("<p class='partial'><b>Partial results.</b> A stage has not finished; run "
                     "<code>sweep resume</code>, then <code>sweep report</code> again.</p>")
    search, train = spec.get("search") or {}, spec.get("train") or {}
    parts.append(
        "<p class='method'>Protocol: <b>tune</b> — each arm searched its own space with the same budget "
        f"({search.get('num_samples')} trials of up to {train.get('epochs')} epochs, {search.get('algorithm')} search, "
        f"scheduler {(spec.get('scheduler') or {}).get('name', 'fifo')}), judged on "
        f"{search.get('metric', 'val_acc')} on a validation split carved from the training data; the test split was "
        "not given to these trials. <b>confirm</b> — each arm's best configuration rerun with "
        f"{protocol.get('confirm_seeds')} seeds to the full budget without early stopping; the test split was "
        "evaluated once per trial, after its last epoch. Verdicts: paired t-tests over seeds (seed i of one arm "
        f"against seed i of another) for every pair of arms, Holm-corrected so the chance of any false "
        f"'better' claim is at most {protocol.get('alpha', 0.05)}.</p>")
    parts.append("<h2>Verdict</h2><ul>" + "".join(
        f"<li>{html.escape(verdict(p, metric, t['n_seeds']))}</li>" for p in t["pairs"]) + "</ul>")
    parts += ["<h2>Per arm (confirm stage, test split)</h2>", html_table(verdicts)]
    parts += ["<h2>Learning-rate robustness (tune stage)</h2><p class='method'>Good trials: final "
              f"validation metric within {GOOD_LR_TOLERANCE} of the arm's best; the width of their learning-rate "
              "range in decades says how forgiving the arm is to tuning.</p>", html_table(t["robustness"])]
    parts += ["<h2>Compute spent per arm</h2>", html_table(t["compute"])]
    from analysis.tables import compare
    for stage, key in (("tune", "lr_sensitivity"), ("confirm", "learning_curves")):
        results = t[stage]
        try:
            fig = FIGURES[key](results, compare(results))
        except NotApplicable as reason:
            parts.append(f"<p>{key.replace('_', ' ')} ({stage}): not shown: {html.escape(str(reason))}</p>")
            continue
        parts.append(f"<h2>{stage} stage: {key.replace('_', ' ')}</h2><figure>"
                     + fig.to_html(full_html=False, include_plotlyjs=False, div_id=f"figure-{stage}-{key}") + "</figure>")
    parts.append("<footer>Stage reports: <a href='../tune/report/report.html'>tune</a> · "
                 "<a href='../confirm/report/report.html'>confirm</a> · tables: "
                 "<a href='verdicts.csv'>verdicts.csv</a> · <a href='pairs.csv'>pairs.csv</a> · "
                 "<a href='lr_robustness.csv'>lr_robustness.csv</a></footer></body></html>")
    pairs = pd.DataFrame([p._asdict() for p in t["pairs"]])
    tables = {"verdicts.csv": verdicts.to_csv(index=False), "pairs.csv": pairs.to_csv(index=False),
              "lr_robustness.csv": t["robustness"].to_csv(index=False), "compute.csv": t["compute"].to_csv(index=False)}
    return "\n".join(parts), tables


def is_protocol(results_dir: Path) -> bool:
    return (results_dir / "tune").is_dir() and (results_dir / "tune" / "spec.yaml").exists()


__all__ = ["Pair", "pairwise", "verdict", "lr_robustness", "protocol_tables", "protocol_page", "is_protocol",
           "ResultsError"]
