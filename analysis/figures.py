"""Plotly figures of a sweep. Like Optuna's visualization module, each figure is two functions:
`_<name>_info` computes its data (a small NamedTuple, unit-tested) and `_<name>_plot` draws it.

FIGURES maps a name to a function (results, comparison, palette) -> go.Figure, in the report's order. A
figure that does not apply to these results (batch size never varies, no trial finished) raises
NotApplicable with the reason, which the report lists instead of the figure. `palette` (`arm_colours`) is
built once per report, so an arm has one colour in every figure.

This module holds the figures of the arms' results (the comparison, curves by epoch, the confusion matrix) and
the registry; `analysis.hyperparameter_figures` and `analysis.search_figures` hold the others, and
`analysis.plotting` what they all share (NotApplicable, colours, bands, layout).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from analysis.hyperparameter_figures import (
    batch_size_effect,
    hyperparameter_importance,
    lr_sensitivity,
    parallel_coordinates,
)
from analysis.plotting import NotApplicable, band, layout, report_colours
from analysis.results import Results
from analysis.search_figures import early_stopping, pareto_front, pbt_schedule, tuning_curves
from analysis.tables import Comparison, seed_columns

MAX_POINTS = 400  # points drawn per curve; longer curves are downsampled so the page stays responsive
LEARNING = ["train_loss", "val_loss", "train_acc", "val_acc"]
GENERALISATION = ["gen_gap", "weight_l2"]
CALIBRATION = ["ece"]


# -- comparison: mean and 95% CI of each arm's best configuration ------------------------------------

class ComparisonInfo(NamedTuple):
    metric: str
    labels: list[str]  # best first
    mean: np.ndarray
    ci_low: np.ndarray  # the table's 95% CI, kept inside the metric's range (`stats.metric_range`)
    ci_high: np.ndarray
    seeds: list[pd.Series]  # per label: the final value of each seed (indexed by seed), as the table judged them


def _comparison_info(results: Results, comparison: Comparison) -> ComparisonInfo:
    table, metric = comparison.table, results.metric
    if table.empty or not np.isfinite(table[f"{metric}_mean"].to_numpy(float)).any():
        raise NotApplicable(f"no trial reported {metric} yet")
    final = results.trials.set_index("trial_id")
    seed = next(iter(seed_columns(results)), None)
    seeds = [pd.Series(final.loc[ids, f"final_{metric}"].to_numpy(float),
                       index=final.loc[ids, seed].to_numpy() if seed else range(len(ids)))
             for ids in comparison.members]
    return ComparisonInfo(metric, comparison.labels, table[f"{metric}_mean"].to_numpy(float),
                          table[f"{metric}_ci95_low"].to_numpy(float), table[f"{metric}_ci95_high"].to_numpy(float),
                          seeds)


def comparison_plot(info: ComparisonInfo, palette: dict[str, str], title: str, note: str) -> go.Figure:
    """Each seed a small point, and the mean with its 95% CI, one row per label, best first."""
    fig = go.Figure()
    for i, label in enumerate(info.labels):
        has_ci = bool(np.isfinite(info.ci_low[i]))
        values = info.seeds[i]
        fig.add_trace(go.Scatter(
            x=values.to_numpy(float), y=[label] * len(values), mode="markers", name=f"{label} seeds",
            legendgroup=label, showlegend=False, marker={"size": 7, "color": palette[label], "opacity": 0.45},
            text=[f"seed {s}" for s in values.index],
            hovertemplate=f"{label}<br>%{{text}}: %{{x:.4g}}<extra></extra>"))
        fig.add_trace(go.Scatter(
            x=[info.mean[i]], y=[label], mode="markers", name=label, legendgroup=label,
            marker={"size": 12, "color": palette[label], "symbol": "diamond", "line": {"width": 1, "color": "#222"}},
            error_x={"type": "data", "symmetric": False, "array": [info.ci_high[i] - info.mean[i] if has_ci else 0],
                     "arrayminus": [info.mean[i] - info.ci_low[i] if has_ci else 0], "visible": has_ci,
                     "color": palette[label], "thickness": 2},
            customdata=[[info.ci_low[i], info.ci_high[i]]],
            hovertemplate=f"{label}<br>mean %{{x:.4g}}" + ("<br>95% CI %{customdata[0]:.4g} – %{customdata[1]:.4g}"
                                                           if has_ci else "") +
                          f"<br>{len(values)} seed(s)<extra></extra>"))
    fig.update_yaxes(autorange="reversed", type="category")
    fig.update_xaxes(title_text=f"final {info.metric}")
    return layout(fig, title, note, height=200 + 40 * len(info.labels))


def comparison_figure(results: Results, comparison: Comparison, palette: dict[str, str]) -> go.Figure:
    return comparison_plot(_comparison_info(results, comparison), palette, f"Arms compared: final {results.metric}",
                            "points: each seed of the arm's best configuration; diamond and bar: mean and 95% CI "
                            "(kept inside the metric's range), best first; no bar where there is 1 seed")


# -- curves by epoch: mean line and ±std band over the seeds of each arm's best configuration -------

class Curve(NamedTuple):
    label: str
    metric: str
    epoch: np.ndarray
    mean: np.ndarray
    std: np.ndarray  # NaN where fewer than 2 seeds reported that epoch
    n: np.ndarray  # seeds that reported each epoch


class CurvesInfo(NamedTuple):
    metrics: list[str]
    curves: list[Curve]
    stride: int  # every stride-th epoch is drawn (1: all)


def _curves_info(results: Results, comparison: Comparison, metrics: list[str]) -> CurvesInfo:
    epochs = results.epochs
    present = [m for m in metrics if m in epochs and epochs[m].notna().any()]
    if not present:
        raise NotApplicable(f"no trial reported {' or '.join(metrics)}")
    stride = max(1, math.ceil(epochs["epoch"].nunique() / MAX_POINTS))
    curves = []
    for label, trial_ids in zip(comparison.labels, comparison.members, strict=True):
        rows = epochs[epochs["trial_id"].isin(trial_ids)]
        values = rows[present].replace([np.inf, -np.inf], np.nan)  # a diverged seed would swamp the mean
        stats = values.groupby(rows["epoch"]).agg(["mean", "std", "count"])
        if stride > 1:
            stats = stats.iloc[sorted({*range(0, len(stats), stride), len(stats) - 1})]
        for metric in present:
            s = stats[metric]
            keep = s["count"].to_numpy() > 0
            curves.append(Curve(label, metric, s.index.to_numpy()[keep], s["mean"].to_numpy()[keep],
                                s["std"].to_numpy()[keep], s["count"].to_numpy()[keep]))
    return CurvesInfo(present, curves, stride)


def _curves_plot(info: CurvesInfo, title: str, palette: dict[str, str]) -> go.Figure:
    cols = 1 if len(info.metrics) == 1 else 2
    rows = math.ceil(len(info.metrics) / cols)
    height = 140 + 320 * rows
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=info.metrics, horizontal_spacing=0.08,
                        vertical_spacing=110 / (height - 150))  # room for an x title and the next subplot's title
    last_epoch = max((c.epoch.max() for c in info.curves if len(c.epoch)), default=0)
    dtick = 1 if last_epoch <= 12 else None  # whole epochs only: no "epoch 1.5" ticks on short runs
    for i, metric in enumerate(info.metrics):
        row, col = i // cols + 1, i % cols + 1
        for curve in (c for c in info.curves if c.metric == metric):
            colour, with_std = palette[curve.label], np.isfinite(curve.std)
            if with_std.any():
                fig.add_trace(band(curve.epoch[with_std], (curve.mean + curve.std)[with_std],
                                   (curve.mean - curve.std)[with_std], colour, curve.label, 0.18), row, col)
            fig.add_trace(go.Scatter(
                x=curve.epoch, y=curve.mean, name=curve.label, legendgroup=curve.label, showlegend=i == 0,
                mode="lines+markers" if len(curve.epoch) <= 30 else "lines", line={"color": colour},
                customdata=curve.n, hovertemplate=f"{curve.label}<br>epoch %{{x}}<br>{metric} %{{y:.4g}}"
                                                  "<br>%{customdata} seed(s)<extra></extra>"), row, col)
        fig.update_xaxes(title_text="epoch", dtick=dtick, row=row, col=col)
    note = "mean ± std over the seeds of each arm's best configuration"
    if info.stride > 1:
        note += f"; downsampled: every {info.stride}th epoch drawn"
    return layout(fig, title, note, height=height)


def learning_curves(results: Results, comparison: Comparison, palette: dict[str, str]) -> go.Figure:
    return _curves_plot(_curves_info(results, comparison, LEARNING), "Learning curves", palette)


def generalisation(results: Results, comparison: Comparison, palette: dict[str, str]) -> go.Figure:
    return _curves_plot(_curves_info(results, comparison, GENERALISATION),
                        "Generalisation gap (train_acc − val_acc) and L2 weight norm", palette)


def calibration(results: Results, comparison: Comparison, palette: dict[str, str]) -> go.Figure:
    return _curves_plot(_curves_info(results, comparison, CALIBRATION), "Expected calibration error (ECE)", palette)


def other_metrics(results: Results, comparison: Comparison, palette: dict[str, str]) -> go.Figure:
    """Every other metric the trials reported at more than one epoch: figures follow the data."""
    named = {*LEARNING, *GENERALISATION, *CALIBRATION}
    counts = results.epochs.groupby("trial_id")[[m for m in results.metrics if m not in named]].count()
    others = [m for m in counts.columns if counts[m].max() > 1]
    if not others:
        raise NotApplicable("no other metric was reported at more than one epoch")
    return _curves_plot(_curves_info(results, comparison, others), "Other metrics by epoch", palette)


# -- confusion matrix of the best trial -------------------------------------------------------------

class ConfusionInfo(NamedTuple):
    trial_id: str
    label: str
    classes: list[str]
    counts: np.ndarray  # [true][pred]
    fraction: np.ndarray  # counts over the row total: recall of each true class on the diagonal


def _confusion_info(results: Results, comparison: Comparison) -> ConfusionInfo:
    if not results.confusion:
        raise NotApplicable("no trial reported a confusion matrix (it comes with a trial's final epoch)")
    candidates = results.trials[results.trials["trial_id"].isin(list(results.confusion))]
    values = candidates[f"final_{results.metric}"].replace([np.inf, -np.inf], np.nan) \
        if f"final_{results.metric}" in candidates else pd.Series(np.nan, index=candidates.index)
    best = candidates.loc[(values.idxmax() if results.mode == "max" else values.idxmin())
                          if values.notna().any() else candidates.index[0]]
    classes, matrix = results.confusion[best["trial_id"]]
    counts = np.asarray(matrix, dtype=float)
    totals = counts.sum(axis=1, keepdims=True)
    fraction = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)
    label = comparison.group_of.get(best["trial_id"], best["arm"])
    return ConfusionInfo(best["trial_id"], label, [str(c) for c in classes], counts, fraction)


def _confusion_plot(info: ConfusionInfo) -> go.Figure:
    show_text = len(info.classes) <= 20  # numbers in cells stop being readable beyond that
    fig = go.Figure(go.Heatmap(
        z=info.fraction, x=info.classes, y=info.classes, colorscale="Blues", zmin=0, zmax=1,
        text=info.counts.astype(int), texttemplate="%{text}" if show_text else None,
        colorbar={"title": {"text": "share of<br>true class"}},
        hovertemplate="true %{y}<br>predicted %{x}<br>%{text} (%{z:.1%})<extra></extra>"))
    fig.update_xaxes(title_text="predicted", type="category")
    fig.update_yaxes(title_text="true", type="category", autorange="reversed")
    size = min(900, 200 + 36 * len(info.classes))
    return layout(fig, f"Confusion matrix of the best trial ({info.trial_id}, {info.label})",
                   "validation split, final epoch; cells: counts, colour: share of the true class", height=size)


def confusion_matrix(results: Results, comparison: Comparison, palette: dict[str, str]) -> go.Figure:
    return _confusion_plot(_confusion_info(results, comparison))


FIGURES: dict[str, Callable[[Results, Comparison, dict[str, str]], go.Figure]] = {
    "comparison": comparison_figure,
    "learning_curves": learning_curves,
    "lr_sensitivity": lr_sensitivity,
    "tuning_curves": tuning_curves,
    "pbt": pbt_schedule,
    "pareto": pareto_front,
    "batch_size": batch_size_effect,
    "parallel_coordinates": parallel_coordinates,
    "importance": hyperparameter_importance,
    "generalisation": generalisation,
    "calibration": calibration,
    "early_stopping": early_stopping,
    "confusion_matrix": confusion_matrix,
    "other_metrics": other_metrics,
}


def make_figure(name: str, results: Results, comparison: Comparison,
                palette: dict[str, str] | None = None) -> go.Figure:
    """Draws the figure `name` (in `palette`'s colours, by default `report_colours`); raises NotApplicable when it
    does not apply to these results."""
    if name not in FIGURES:
        raise ValueError(f"unknown figure {name!r}; valid names: {', '.join(FIGURES)}")
    return FIGURES[name](results, comparison, palette or report_colours(results, comparison))
