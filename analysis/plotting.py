"""What every figure of the report shares: NotApplicable, one colour per arm (`arm_colours`, built once per
report so an arm has one colour in every figure), the arms in the comparison's order, a shaded band between two
curves and the common layout (title with a note under it, white template, margins)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.colors import hex_to_rgb, qualitative

from analysis.results import Results
from analysis.tables import Comparison


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


def ranked_arms(comparison: Comparison) -> list[str]:
    """The arms in the comparison table's order, best first (an arm once, at its best row)."""
    return list(dict.fromkeys(comparison.table["arm"])) if len(comparison.table) else []


def band(x: np.ndarray, upper: np.ndarray, lower: np.ndarray, colour: str, group: str, alpha: float) -> go.Scatter:
    """A filled area between two curves, with no outline and no markers (corner markers look like data points)."""
    return go.Scatter(x=np.concatenate([x, x[::-1]]), y=np.concatenate([upper, lower[::-1]]), mode="none",
                      fill="toself", fillcolor=_rgba(colour, alpha), hoverinfo="skip", showlegend=False,
                      legendgroup=group)


def _rgba(colour: str, alpha: float) -> str:
    return "rgba({},{},{},{})".format(*hex_to_rgb(colour), alpha)


def layout(fig: go.Figure, title: str, note: str = "", height: int = 420) -> go.Figure:
    text = f"{title}<br><sup>{note}</sup>" if note else title
    fig.update_layout(title={"text": text, "x": 0.01}, template="plotly_white", height=height,
                      margin={"t": 90, "l": 70, "r": 30, "b": 60}, legend={"title": {"text": ""}})
    return fig

