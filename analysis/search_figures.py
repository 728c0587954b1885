"""Figures of how the search went: the epochs early stopping saved (with ASHA's rungs), tuning curves
(expected best score after n trials), the Pareto front of two objectives, and PBT's learning-rate schedules with
its copies (`pbt_copies`, also a table of the report). Each figure is an `_<name>_info` (its data, a NamedTuple)
and an `_<name>_plot`, as `analysis.figures` describes."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from analysis.outcome import GRACE_PERIOD, REDUCTION_FACTOR, asha_rungs
from analysis.plotting import NotApplicable, band, layout, ranked_arms
from analysis.results import Results
from analysis.tables import Comparison

STATUS_COLOURS = {"completed": "#2ca02c", "stopped": "#ff7f0e", "diverged": "#d62728", "error": "#7f7f7f",
                  "running": "#1f77b4"}


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
    return layout(fig, "Early stopping", note, height=440)


def early_stopping(results: Results, comparison: Comparison, palette: dict[str, str]) -> go.Figure:
    return _early_stopping_plot(_early_stopping_info(results))


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
        fig.add_trace(band(banded["n"].to_numpy(), banded["band_high"].to_numpy(float),
                            banded["band_low"].to_numpy(float), palette[arm], arm, 0.15))
        fig.add_trace(go.Scatter(x=c["n"], y=c[column], mode="lines+markers" if len(c) <= 30 else "lines", name=arm,
                                 legendgroup=arm, line={"color": palette[arm]},
                                 hovertemplate=f"{arm}<br>%{{x}} trials<br>expected best %{{y:.4g}}<extra></extra>"))
    fig.update_xaxes(title_text="tuning trials n", type="log" if info.curves["n"].max() > 30 else None)
    fig.update_yaxes(title_text=f"expected best {info.metric}")
    return layout(fig, "Tuning curves: expected best score after n trials",
                   "unbiased for n independent trials (random search; an approximation for TPE and ASHA); band: 95% "
                   "bootstrap interval, for n up to N/5", height=460)


def tuning_curves(results: Results, comparison: Comparison, palette: dict[str, str]) -> go.Figure:
    return _tuning_plot(_tuning_info(results), ranked_arms(comparison), palette)


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
    return layout(fig, f"Pareto front: {info.x} against {info.y}",
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
    return layout(fig, "Population based training: each trial's learning rate",
                   f"{len(info.copies)} copies (stars): a trial went on from a better trial of its arm, with an "
                   "explored lr", height=460)


def pbt_schedule(results: Results, comparison: Comparison, palette: dict[str, str]) -> go.Figure:
    return _pbt_plot(_pbt_info(results), palette)
