"""Plotly figures of a sweep. Like Optuna's visualization module, each figure is two functions:
`_<name>_info` computes its data (a small NamedTuple, unit-tested) and `_<name>_plot` draws it.

FIGURES maps a name to a function (results, comparison, palette) -> go.Figure, in the report's order. A
figure that does not apply to these results (batch size never varies, no trial finished) raises
NotApplicable with the reason, which the report lists instead of the figure. `palette` (`arm_colours`) is
built once per report, so an arm has one colour in every figure.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.colors import hex_to_rgb, qualitative
from plotly.subplots import make_subplots

from analysis.outcome import GRACE_PERIOD, REDUCTION_FACTOR, asha_rungs
from analysis.results import FINISHED, Results
from analysis.tables import Comparison, seed_columns

MAX_POINTS = 400  # points drawn per curve; longer curves are downsampled so the page stays responsive
STATUS_COLOURS = {"completed": "#2ca02c", "stopped": "#ff7f0e", "diverged": "#d62728", "error": "#7f7f7f",
                  "running": "#1f77b4"}
LEARNING = ["train_loss", "val_loss", "train_acc", "val_acc"]
GENERALISATION = ["gen_gap", "weight_l2"]
CALIBRATION = ["ece"]


class NotApplicable(Exception):
    """This figure does not apply to these results; the message says why."""


def arm_colours(arms: list[str], labels: list[str] = ()) -> dict[str, str]:
    """One colour per arm, in the spec's order (so neither the ranking nor the figure changes it), then one per
    comparison label that is not an arm (`adam · data.batch_size=64`, with `compare_by`)."""
    palette = qualitative.Plotly + qualitative.Dark24
    keys = list(dict.fromkeys([*arms, *labels]))
    return {key: palette[i % len(palette)] for i, key in enumerate(keys)}


def report_colours(results: Results, comparison: Comparison) -> dict[str, str]:
    """`arm_colours` of a sweep: its spec's arms, any arm only its trials name, then its comparison's labels."""
    arms = [*(results.spec.get("arms") or {}), *results.trials.get("arm", pd.Series(dtype=str)).astype(str)]
    return arm_colours(arms, comparison.labels)


def _band(x: np.ndarray, upper: np.ndarray, lower: np.ndarray, colour: str, group: str, alpha: float) -> go.Scatter:
    """A filled area between two curves, with no outline and no markers (corner markers look like data points)."""
    return go.Scatter(x=np.concatenate([x, x[::-1]]), y=np.concatenate([upper, lower[::-1]]), mode="none",
                      fill="toself", fillcolor=_rgba(colour, alpha), hoverinfo="skip", showlegend=False,
                      legendgroup=group)


def _rgba(colour: str, alpha: float) -> str:
    return "rgba({},{},{},{})".format(*hex_to_rgb(colour), alpha)


def _layout(fig: go.Figure, title: str, note: str = "", height: int = 420) -> go.Figure:
    text = f"{title}<br><sup>{note}</sup>" if note else title
    fig.update_layout(title={"text": text, "x": 0.01}, template="plotly_white", height=height,
                      margin={"t": 90, "l": 70, "r": 30, "b": 60}, legend={"title": {"text": ""}})
    return fig


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
    return _layout(fig, title, note, height=200 + 40 * len(info.labels))


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
            colour, band = palette[curve.label], np.isfinite(curve.std)
            if band.any():
                fig.add_trace(_band(curve.epoch[band], (curve.mean + curve.std)[band], (curve.mean - curve.std)[band],
                                    colour, curve.label, 0.18), row, col)
            fig.add_trace(go.Scatter(
                x=curve.epoch, y=curve.mean, name=curve.label, legendgroup=curve.label, showlegend=i == 0,
                mode="lines+markers" if len(curve.epoch) <= 30 else "lines", line={"color": colour},
                customdata=curve.n, hovertemplate=f"{curve.label}<br>epoch %{{x}}<br>{metric} %{{y:.4g}}"
                                                  "<br>%{customdata} seed(s)<extra></extra>"), row, col)
        fig.update_xaxes(title_text="epoch", dtick=dtick, row=row, col=col)
    note = "mean ± std over the seeds of each arm's best configuration"
    if info.stride > 1:
        note += f"; downsampled: every {info.stride}th epoch drawn"
    return _layout(fig, title, note, height=height)


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


# -- sensitivity: final metric against one hyperparameter, one line per arm -------------------------

class SensitivityInfo(NamedTuple):
    key: str
    log_x: bool
    y_columns: list[str]
    points: pd.DataFrame  # trial_id, arm, status, x, y columns: trials that ended (finished or stopped)
    means: pd.DataFrame  # arm, x, <y>_mean, <y>_std, <y>_count over finished trials, for arms that repeat an x


def _sensitivity_info(results: Results, key: str, y_columns: list[str]) -> SensitivityInfo:
    trials = results.trials
    if trials[key].nunique() < 2:
        raise NotApplicable(f"{key} does not vary in this sweep")
    y_columns = [c for c in y_columns if c in trials]
    ended = trials[trials["status"].isin([*FINISHED, "stopped"]) & trials[key].notna()]
    if ended.empty or not y_columns:
        raise NotApplicable(f"no trial has ended with a {y_columns[0] if y_columns else 'final metric'} yet")
    points = ended[["trial_id", "arm", "status", key, *y_columns]].rename(columns={key: "x"})
    points[y_columns] = points[y_columns].replace([np.inf, -np.inf], np.nan)
    x = pd.to_numeric(points["x"], errors="coerce")
    log_x = bool(x.notna().all() and (x > 0).all() and x.max() / x.min() >= 4)
    finished = points[points["status"].isin(FINISHED)]
    means = finished.groupby(["arm", "x"])[y_columns].agg(["mean", "std", "count"])
    means.columns = [f"{y}_{stat}" for y, stat in means.columns]
    means = means.reset_index()
    repeats = means.groupby("arm")[f"{y_columns[0]}_count"].transform("max") > 1  # grid-like: a mean per x
    return SensitivityInfo(key, log_x, y_columns, points, means[repeats])


def _sensitivity_plot(info: SensitivityInfo, title: str, arms: list[str], palette: dict[str, str]) -> go.Figure:
    fig = make_subplots(rows=1, cols=len(info.y_columns), subplot_titles=info.y_columns)
    for col, y in enumerate(info.y_columns, start=1):
        for arm in arms:
            points, means = info.points[info.points["arm"] == arm], info.means[info.means["arm"] == arm]
            for stopped in (False, True):
                p = points[(points["status"] == "stopped") == stopped]
                if p.empty:
                    continue
                fig.add_trace(go.Scatter(
                    x=p["x"], y=p[y], mode="markers", name=f"{arm} (stopped early)" if stopped else arm,
                    legendgroup=arm, showlegend=col == 1,
                    marker={"color": palette[arm], "size": 7, "opacity": 0.7,
                            "symbol": "circle-open" if stopped else "circle"},
                    text=p["trial_id"] + " · " + p["status"],
                    hovertemplate=f"%{{text}}<br>{info.key} %{{x:.4g}}<br>{y} %{{y:.4g}}<extra>{arm}</extra>"), 1, col)
            if len(means):
                fig.add_trace(go.Scatter(
                    x=means["x"], y=means[f"{y}_mean"], mode="lines", name=f"{arm} mean", legendgroup=arm,
                    showlegend=False, line={"color": palette[arm]},
                    error_y={"type": "data", "array": means[f"{y}_std"].fillna(0), "thickness": 1}), 1, col)
        values = sorted(info.points["x"].unique())
        fig.update_xaxes(title_text=info.key + (" (log)" if info.log_x else ""), type="log" if info.log_x else None,
                         tickvals=values if info.log_x and len(values) <= 8 else None, row=1, col=col)
    return _layout(fig, title, "each marker a trial (hollow: stopped early, at its last epoch); lines: mean ± std "
                               "over finished trials at each value", height=460)


def _hyperparameter(results: Results, names: tuple[str, ...]) -> str:
    matches = [h for h in results.hyperparameters if h.rsplit(".", 1)[-1] in names]
    if not matches:
        raise NotApplicable(f"no hyperparameter named {' or '.join(names)} (or *.{names[0]}) in this sweep")
    return matches[0]


def _ranked_arms(comparison: Comparison) -> list[str]:
    return list(dict.fromkeys(comparison.table["arm"])) if len(comparison.table) else []


def lr_sensitivity(results: Results, comparison: Comparison, palette: dict[str, str]) -> go.Figure:
    info = _sensitivity_info(results, _hyperparameter(results, ("lr", "learning_rate")), [f"final_{results.metric}"])
    return _sensitivity_plot(info, f"Learning-rate sensitivity: final {results.metric} against {info.key}",
                             _ranked_arms(comparison), palette)


def batch_size_effect(results: Results, comparison: Comparison, palette: dict[str, str]) -> go.Figure:
    info = _sensitivity_info(results, _hyperparameter(results, ("batch_size",)),
                             [f"final_{results.metric}", "final_samples_per_s"])
    return _sensitivity_plot(info, f"Batch-size effect: final {results.metric} and throughput",
                             _ranked_arms(comparison), palette)


# -- parallel coordinates over every hyperparameter that varies -------------------------------------

class Dimension(NamedTuple):
    label: str
    values: np.ndarray
    tickvals: list | None  # None: Plotly's own ticks
    ticktext: list | None


class ParallelInfo(NamedTuple):
    dimensions: list[Dimension]  # the hyperparameters, then the metric (which also colours the lines)
    colour_range: tuple[float, float]  # the worst 10% share one colour, so an outlier does not flatten the rest
    n_trials: int
    omitted: list[str]  # seeds (not tuned) and settings fixed within each arm (the arm axis says them)


def _parallel_info(results: Results) -> ParallelInfo:
    trials, value = results.trials, f"final_{results.metric}"
    if value not in trials:
        raise NotApplicable(f"no trial reported {results.metric} yet")
    shown = trials[np.isfinite(trials[value].to_numpy(float)) & (trials["status"] != "running")]
    seeds = seed_columns(results)
    per_arm = shown.groupby("arm")[results.hyperparameters].nunique(dropna=False).max()
    omitted = [*seeds, *(k for k in results.hyperparameters if k not in seeds and per_arm.get(k, 0) <= 1)]
    keys = [k for k in ["arm", *results.hyperparameters] if k not in omitted and shown[k].nunique(dropna=False) > 1]
    if shown.empty or not keys:
        raise NotApplicable("no hyperparameter varies across the trials that ended" if len(shown)
                            else "no trial has ended yet")
    dimensions = [_dimension(k, shown[k]) for k in keys]
    metric = shown[value].to_numpy(float)
    dimensions.append(Dimension(value, metric, None, None))
    low, high = np.percentile(metric, [10, 100] if results.mode == "max" else [0, 90])
    return ParallelInfo(dimensions, (float(low), float(high)), len(shown), omitted)


def _dimension(name: str, series: pd.Series) -> Dimension:
    """Numbers stay numbers (log10 when they span two decades); labels and short lists of numbers with
    gaps (a key only some arms have) become categories; missing numbers sit below the axis as "n/a"."""
    numeric = pd.api.types.is_numeric_dtype(series) and not pd.api.types.is_bool_dtype(series)
    values = series.to_numpy(float) if numeric else None
    if numeric and series.notna().all():
        if (values > 0).all() and values.max() / values.min() >= 100:
            logs = np.log10(values)
            inner = [d for d in range(math.ceil(logs.min()), math.floor(logs.max()) + 1)
                     if min(abs(d - logs.min()), abs(d - logs.max())) > 0.25]  # not on top of an end label
            ticks = [logs.min(), *inner, logs.max()]  # the ends too: Plotly draws the axis line between ticks
            return Dimension(f"{name} (log)", logs, ticks, [f"{10 ** t:.2g}" for t in ticks])
        return Dimension(name, values, None, None)
    if not numeric or series.nunique() <= 12:
        categories = sorted(series.dropna().unique(), key=lambda v: (not numeric, v if numeric else str(v)))
        labels = ["n/a", *(_short(v) for v in categories)] if series.isna().any() else [_short(v) for v in categories]
        position = {v: i + series.isna().any() for i, v in enumerate(categories)}
        codes = np.array([0 if pd.isna(v) else position[v] for v in series], dtype=float)
        return Dimension(name, codes, list(range(len(labels))), labels)
    low, high = np.nanmin(values), np.nanmax(values)
    sentinel = low - 0.1 * (high - low)
    ticks = np.linspace(low, high, 5)
    return Dimension(name, np.where(np.isnan(values), sentinel, values), [sentinel, *ticks],
                     ["n/a", *(f"{t:.3g}" for t in ticks)])


def _short(value) -> str:
    return f"{value:.4g}" if isinstance(value, (float, np.floating)) else str(value)


def _parallel_plot(info: ParallelInfo) -> go.Figure:
    metric = info.dimensions[-1]
    fig = go.Figure(go.Parcoords(
        line={"color": metric.values, "colorscale": "Viridis", "showscale": True, "cmin": info.colour_range[0],
              "cmax": info.colour_range[1],
              "colorbar": {"title": {"text": metric.label}}},
        dimensions=[{"label": d.label, "values": d.values,
                     **({"tickvals": d.tickvals, "ticktext": d.ticktext} if d.tickvals is not None else {})}
                    for d in info.dimensions]))
    note = f"{info.n_trials} trials that ended (early-stopped ones at their last epoch)"
    if info.omitted:
        note += f"; not shown: {', '.join(info.omitted)} (seeds, or fixed within each arm)"
    fig = _layout(fig, "Parallel coordinates over the hyperparameters", note, height=520)
    fig.update_layout(margin={"t": 140, "l": 90})  # axis labels sit above the axes
    return fig


def parallel_coordinates(results: Results, comparison: Comparison, palette: dict[str, str]) -> go.Figure:
    return _parallel_plot(_parallel_info(results))


# -- early stopping: epochs each trial consumed, the rungs, and the budget saved ---------------------

class EarlyStoppingInfo(NamedTuple):
    trial_ids: list[str]  # in Ray's creation order
    epochs_run: np.ndarray
    status: list[str]
    rungs: list[float]  # ASHA's milestones (epochs) below max_t; empty for FIFO
    spent: int  # epochs run by all trials
    full: int  # epochs a full run of every trial would take


def _early_stopping_info(results: Results) -> EarlyStoppingInfo:
    trials = results.trials
    if trials.empty:
        raise NotApplicable("no trial has started yet")
    planned = trials["epochs_planned"].fillna(int(trials["epochs_run"].max())).to_numpy(int)
    scheduler = results.spec.get("scheduler") or {}
    rungs = []
    if scheduler.get("name") == "asha":
        max_t = scheduler.get("max_t") or int(planned.max())  # None in a spec means "train.epochs"
        rungs = asha_rungs(scheduler.get("grace_period", GRACE_PERIOD),
                           scheduler.get("reduction_factor", REDUCTION_FACTOR), max_t)
    return EarlyStoppingInfo(trials["trial_id"].tolist(), trials["epochs_run"].to_numpy(int),
                             trials["status"].tolist(), rungs, int(trials["epochs_run"].sum()),
                             int(np.maximum(planned, trials["epochs_run"]).sum()))


def _early_stopping_plot(info: EarlyStoppingInfo) -> go.Figure:
    fig = make_subplots(rows=1, cols=2, column_widths=[0.75, 0.25], horizontal_spacing=0.1,
                        subplot_titles=["epochs run by each trial", "epochs spent"])
    status = np.array(info.status)
    for name, colour in STATUS_COLOURS.items():
        chosen = np.flatnonzero(status == name)
        if len(chosen):
            fig.add_trace(go.Scatter(x=chosen + 1, y=info.epochs_run[chosen], mode="markers", name=name,
                                     marker={"color": colour, "size": 6},
                                     text=[info.trial_ids[i] for i in chosen],
                                     hovertemplate="%{text}<br>%{y} epochs<extra>" + name + "</extra>"), 1, 1)
    for rung in info.rungs:
        fig.add_hline(y=rung, line={"dash": "dot", "color": "#999", "width": 1}, annotation_text=f"rung {rung:g}",
                      annotation_position="top left", row=1, col=1)
    saved = 1 - info.spent / info.full if info.full else 0.0
    fig.add_trace(go.Bar(x=["spent", "full grid"], y=[info.spent, info.full], marker_color=["#1f77b4", "#c7c7c7"],
                         text=[f"{info.spent:,}", f"{info.full:,}"], textposition="auto", showlegend=False), 1, 2)
    fig.update_xaxes(title_text="trial (creation order)", row=1, col=1)
    fig.update_yaxes(title_text="epochs", rangemode="tozero", dtick=1 if info.epochs_run.max() <= 12 else None,
                     row=1, col=1)
    note = f"{info.spent:,} of {info.full:,} epochs run ({saved:.0%} saved against training every trial to the end)"
    if info.rungs:
        note += "; dotted lines: ASHA rungs"
    return _layout(fig, "Early stopping", note, height=440)


def early_stopping(results: Results, comparison: Comparison, palette: dict[str, str]) -> go.Figure:
    return _early_stopping_plot(_early_stopping_info(results))


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
    return _layout(fig, f"Confusion matrix of the best trial ({info.trial_id}, {info.label})",
                   "validation split, final epoch; cells: counts, colour: share of the true class", height=size)


def confusion_matrix(results: Results, comparison: Comparison, palette: dict[str, str]) -> go.Figure:
    return _confusion_plot(_confusion_info(results, comparison))


# -- tuning curves: expected best score after n trials, per arm -------------------------------------

class TuningInfo(NamedTuple):
    metric: str
    curves: pd.DataFrame  # budget.tuning_curves: arm, n, expected_best_<metric>, band_low, band_high, n_configs


def _tuning_info(results: Results) -> TuningInfo:
    from analysis.budget import tuning_curves

    curves = tuning_curves(results)
    if curves.empty:
        raise NotApplicable("no arm has two or more configurations that ended")
    return TuningInfo(results.metric, curves)


def _tuning_plot(info: TuningInfo, arms: list[str], palette: dict[str, str]) -> go.Figure:
    arms = [a for a in arms if a in set(info.curves["arm"])] or list(dict.fromkeys(info.curves["arm"]))
    column = f"expected_best_{info.metric}"
    fig = go.Figure()
    for arm in arms:
        c = info.curves[info.curves["arm"] == arm]
        banded = c[c["band_low"].notna()]
        fig.add_trace(_band(banded["n"].to_numpy(), banded["band_high"].to_numpy(float),
                            banded["band_low"].to_numpy(float), palette[arm], arm, 0.15))
        fig.add_trace(go.Scatter(x=c["n"], y=c[column], mode="lines+markers" if len(c) <= 30 else "lines", name=arm,
                                 legendgroup=arm, line={"color": palette[arm]},
                                 hovertemplate=f"{arm}<br>%{{x}} trials<br>expected best %{{y:.4g}}<extra></extra>"))
    fig.update_xaxes(title_text="tuning trials n", type="log" if info.curves["n"].max() > 30 else None)
    fig.update_yaxes(title_text=f"expected best {info.metric}")
    return _layout(fig, "Tuning curves: expected best score after n trials",
                   "unbiased for n independent trials (random search; an approximation for TPE and ASHA); band: 95% "
                   "bootstrap interval, for n up to N/5", height=460)


def tuning_curves(results: Results, comparison: Comparison, palette: dict[str, str]) -> go.Figure:
    return _tuning_plot(_tuning_info(results), _ranked_arms(comparison), palette)


# -- several objectives: the Pareto front of the first two ----------------------------------------

class ParetoInfo(NamedTuple):
    x: str  # the first two search metrics
    y: str
    points: pd.DataFrame  # pareto_table: trial_id, arm, final_<metric>..., on_front


def _pareto_info(results: Results) -> ParetoInfo:
    from analysis.tables import pareto_table

    table = pareto_table(results)
    if table is None:
        raise NotApplicable("the search has one metric")
    if table.empty:
        raise NotApplicable("no trial has finished yet")
    return ParetoInfo(results.search_metrics[0], results.search_metrics[1], table)


def _pareto_plot(info: ParetoInfo, palette: dict[str, str]) -> go.Figure:
    points, x, y = info.points, f"final_{info.x}", f"final_{info.y}"
    fig = go.Figure()
    for arm, rows in points.groupby("arm", sort=False):
        fig.add_trace(go.Scatter(x=rows[x], y=rows[y], mode="markers", name=arm,
                                 marker={"color": palette.get(arm, "#888"), "size": 9,
                                         "line": {"width": [2 if f else 0 for f in rows["on_front"]], "color": "#111"}},
                                 text=rows["trial_id"], hovertemplate=f"%{{text}}<br>{info.x} %{{x:.4g}}<br>{info.y} "
                                                                      f"%{{y:.4g}}<extra>{arm}</extra>"))
    front = points[points["on_front"]].sort_values(x)
    fig.add_trace(go.Scatter(x=front[x], y=front[y], mode="lines", name="Pareto front", line={"color": "#111",
                                                                                              "dash": "dot"}))
    fig.update_xaxes(title_text=f"final {info.x}")
    fig.update_yaxes(title_text=f"final {info.y}")
    return _layout(fig, f"Pareto front: {info.x} against {info.y}",
                   f"{int(points['on_front'].sum())} of {len(points)} finished trials on the front (ringed): no other "
                   "trial is at least as good on both and better on one", height=480)


def pareto_front(results: Results, comparison: Comparison, palette: dict[str, str]) -> go.Figure:
    return _pareto_plot(_pareto_info(results), palette)


# -- population based training: each trial's learning rate, and who copied whom ---------------------

class PBTInfo(NamedTuple):
    lr: pd.DataFrame  # trial_id, arm, epoch, lr: every report of every trial
    copies: pd.DataFrame  # trial_id, arm, epoch, copied_from, copied_epoch, lr_before, lr_after


def pbt_copies(results: Results) -> pd.DataFrame:
    """One row per PBT exploit: the trial, the epoch it went on from another trial's checkpoint, whose and from
    which epoch, and its learning rate before and after (the explored value, in effect from that epoch)."""
    epochs = results.epochs
    columns = ["trial_id", "arm", "epoch", "copied_from", "copied_epoch", "lr_before", "lr_after"]
    if "copied_from" not in epochs or "lr" not in epochs:
        return pd.DataFrame(columns=columns)
    ordered = epochs.sort_values(["trial_id", "epoch"])
    before = ordered.groupby("trial_id")["lr"].shift(1)
    copies = ordered.assign(lr_before=before, lr_after=ordered["lr"])[ordered["copied_from"].notna()]
    return copies.reindex(columns=columns).reset_index(drop=True)


def _pbt_info(results: Results) -> PBTInfo:
    if (results.spec.get("scheduler") or {}).get("name") != "pbt":
        raise NotApplicable("the sweep did not use PBT")
    if "lr" not in results.epochs:
        raise NotApplicable("no trial reported lr yet")
    return PBTInfo(results.epochs[["trial_id", "arm", "epoch", "lr"]], pbt_copies(results))


def _pbt_plot(info: PBTInfo, palette: dict[str, str]) -> go.Figure:
    fig = go.Figure()
    for trial_id, rows in info.lr.groupby("trial_id", sort=False):
        arm = rows["arm"].iloc[0]
        fig.add_trace(go.Scatter(x=rows["epoch"], y=rows["lr"], mode="lines", name=arm, legendgroup=arm,
                                 showlegend=trial_id == info.lr[info.lr["arm"] == arm]["trial_id"].iloc[0],
                                 line={"color": palette.get(arm, "#888"), "width": 1.5}, opacity=0.8,
                                 hovertemplate=f"{trial_id}<br>epoch %{{x}}<br>lr %{{y:.3g}}<extra>{arm}</extra>"))
    if len(info.copies):
        fig.add_trace(go.Scatter(
            x=info.copies["epoch"], y=info.copies["lr_after"], mode="markers", name="copied a better trial",
            marker={"symbol": "star", "size": 10, "color": "#222"},
            text=[f"{r.trial_id} took {r.copied_from}'s epoch-{int(r.copied_epoch)} checkpoint; lr "
                  f"{r.lr_before:.3g} → {r.lr_after:.3g}" for r in info.copies.itertuples()],
            hovertemplate="%{text}<extra></extra>"))
    fig.update_xaxes(title_text="epoch")
    fig.update_yaxes(title_text="lr", type="log")
    return _layout(fig, "Population based training: each trial's learning rate",
                   f"{len(info.copies)} copies (stars): a trial went on from a better trial of its arm, with an "
                   "explored lr", height=460)


def pbt_schedule(results: Results, comparison: Comparison, palette: dict[str, str]) -> go.Figure:
    return _pbt_plot(_pbt_info(results), palette)


# -- hyperparameter importance per arm: Optuna's fANOVA over the arm's finished trials ----------------

MIN_IMPORTANCE_TRIALS = 16  # fANOVA's forest on fewer trials is noise: a setting that alone drove the score got
# 8% to 69% of the importance from 8 trials, 66% to 82% from 16 (two log-uniform settings, 5 draws each)


class ImportanceInfo(NamedTuple):
    importance: pd.DataFrame  # arm, setting, importance (an arm's importances add up to 1), n_trials
    not_shown: dict[str, str]  # arm -> why it has no importances


def _importance_info(results: Results) -> ImportanceInfo:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # not a "new study created" line per arm on the console
    trials, value = results.trials, f"final_{results.metric}"
    if value not in trials:
        raise NotApplicable(f"no trial reported {results.metric} yet")
    seeds = set(seed_columns(results))
    full = trials[(trials["status"] == "completed") & np.isfinite(trials[value].to_numpy(float))]
    rows, not_shown = [], {}
    for arm in dict.fromkeys(trials["arm"]):
        group = full[full["arm"] == arm]
        settings = [h for h in results.hyperparameters if h not in seeds and group[h].nunique() > 1]
        if len(settings) < 2:
            not_shown[arm] = f"{len(settings) or 'no'} setting{'s' * (len(settings) != 1)} varied (2 needed)"
        elif len(group) < MIN_IMPORTANCE_TRIALS:
            not_shown[arm] = f"{len(group)} full-budget trial{'s' * (len(group) != 1)} ({MIN_IMPORTANCE_TRIALS} needed)"
        else:
            study = optuna.create_study(direction="maximize" if results.mode == "max" else "minimize",
                                        study_name=arm)
            distributions = {k: _distribution(group[k]) for k in settings}
            study.add_trials([optuna.trial.create_trial(params={k: _param(t[k]) for k in settings},
                                                        distributions=distributions, value=float(t[value]))
                              for _, t in group.iterrows()])
            evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)  # seeded: the same report every time
            rows += [{"arm": arm, "setting": k, "importance": float(v), "n_trials": len(group)}
                     for k, v in optuna.importance.get_param_importances(study, evaluator=evaluator).items()]
    if not rows:
        raise NotApplicable("per arm, among its trials that ran the full budget: "
                            + "; ".join(f"{arm}: {why}" for arm, why in not_shown.items()))
    return ImportanceInfo(pd.DataFrame(rows), not_shown)


def _distribution(values: pd.Series):
    """The Optuna distribution a setting was searched in, as far as its values show: numbers between their least
    and greatest (log-scaled when they span a decade or more), anything else as categories."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    if pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values):
        low, high = float(values.min()), float(values.max())
        return FloatDistribution(low, high, log=low > 0 and high / low >= 10)
    return CategoricalDistribution(sorted({_param(v) for v in values}, key=str))


def _param(value):
    return float(value) if isinstance(value, (int, float, np.number)) and not isinstance(value, bool) else str(value)


def _importance_plot(info: ImportanceInfo, palette: dict[str, str]) -> go.Figure:
    fig = go.Figure()
    for arm, rows in info.importance.groupby("arm", sort=False):
        fig.add_trace(go.Bar(x=rows["importance"], y=rows["setting"], orientation="h", name=arm,
                             marker_color=palette[arm], customdata=rows["n_trials"],
                             hovertemplate=f"{arm}<br>%{{y}}: %{{x:.2f}}<br>%{{customdata}} trials<extra></extra>"))
    fig.update_layout(barmode="group")
    fig.update_xaxes(title_text="share of the variance of the final score (fANOVA)", range=[0, 1])
    fig.update_yaxes(autorange="reversed")
    note = f"Optuna's fANOVA over each arm's trials that ran the full budget (at least {MIN_IMPORTANCE_TRIALS})"
    if info.not_shown:
        note += "; not shown: " + "; ".join(f"{arm}: {why}" for arm, why in info.not_shown.items())
    settings = info.importance["setting"].nunique()
    return _layout(fig, "Hyperparameter importance per arm", note,
                   height=220 + 28 * settings * max(1, info.importance["arm"].nunique()))


def hyperparameter_importance(results: Results, comparison: Comparison, palette: dict[str, str]) -> go.Figure:
    return _importance_plot(_importance_info(results), palette)


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
