"""Figures of how the final score depends on the hyperparameters: sensitivity to one setting (learning rate,
batch size), parallel coordinates over every setting that varies, and fANOVA importance per arm. Each figure is
an `_<name>_info` (its data, a NamedTuple) and an `_<name>_plot`, as `analysis.figures` describes."""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from analysis.plotting import NotApplicable, layout, ranked_arms
from analysis.results import FINISHED, Results
from analysis.tables import Comparison, seed_columns

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
    return layout(fig, title, "each marker a trial (hollow: stopped early, at its last epoch); lines: mean ± std "
                               "over finished trials at each value", height=460)


def _hyperparameter(results: Results, names: tuple[str, ...]) -> str:
    matches = [h for h in results.hyperparameters if h.rsplit(".", 1)[-1] in names]
    if not matches:
        raise NotApplicable(f"no hyperparameter named {' or '.join(names)} (or *.{names[0]}) in this sweep")
    return matches[0]



def lr_sensitivity(results: Results, comparison: Comparison, palette: dict[str, str]) -> go.Figure:
    info = _sensitivity_info(results, _hyperparameter(results, ("lr", "learning_rate")), [f"final_{results.metric}"])
    return _sensitivity_plot(info, f"Learning-rate sensitivity: final {results.metric} against {info.key}",
                             ranked_arms(comparison), palette)


def batch_size_effect(results: Results, comparison: Comparison, palette: dict[str, str]) -> go.Figure:
    info = _sensitivity_info(results, _hyperparameter(results, ("batch_size",)),
                             [f"final_{results.metric}", "final_samples_per_s"])
    return _sensitivity_plot(info, f"Batch-size effect: final {results.metric} and throughput",
                             ranked_arms(comparison), palette)


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
    fig = layout(fig, "Parallel coordinates over the hyperparameters", note, height=520)
    fig.update_layout(margin={"t": 140, "l": 90})  # axis labels sit above the axes
    return fig


def parallel_coordinates(results: Results, comparison: Comparison, palette: dict[str, str]) -> go.Figure:
    return _parallel_plot(_parallel_info(results))


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
    return layout(fig, "Hyperparameter importance per arm", note,
                   height=220 + 28 * settings * max(1, info.importance["arm"].nunique()))


def hyperparameter_importance(results: Results, comparison: Comparison, palette: dict[str, str]) -> go.Figure:
    return _importance_plot(_importance_info(results), palette)

