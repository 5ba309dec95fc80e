"""Plotly figures specific to the studies (the per-analysis ones live in :mod:`interp.plots`).

Colours and ranges follow interp.plots: accuracies on the fixed [0, 1] range with the sequential scale,
lines from ``LINE_COLORS`` in a stable order (one colour per run or per hop count).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from looplens.interp.plots import LINE_COLORS, SEQUENTIAL_COLORSCALE, UNIT_RANGE
from plotly.subplots import make_subplots

_Y_ACC = [UNIT_RANGE[0] - 0.02, UNIT_RANGE[1] + 0.02]


def _color(i: int) -> str:
    return LINE_COLORS[i % len(LINE_COLORS)]


def curves_by_split(curves: pd.DataFrame, splits: Sequence[str], title: str, labels: dict[str, str] | None = None,
                    log_x: bool = False, marks: pd.DataFrame | None = None) -> go.Figure:
    """One panel per split, one line per run: accuracy against the training step.

    ``curves``: columns run, split, step, accuracy (:func:`analyses.studies.base.accuracy_curves`).
    ``marks``: optional rows (run, step, text) drawn as dashed vertical lines.
    """
    splits = [s for s in splits if s in set(curves["split"])]
    if not splits:
        raise ValueError("curves_by_split: none of the splits has data")
    labels = labels or {}
    runs = list(dict.fromkeys(curves["run"]))
    fig = make_subplots(rows=1, cols=len(splits), subplot_titles=splits, shared_yaxes=True)
    for c, split in enumerate(splits, start=1):
        for i, run in enumerate(runs):
            g = curves[(curves["run"] == run) & (curves["split"] == split)]
            if g.empty:
                continue
            fig.add_trace(go.Scatter(x=g["step"], y=g["accuracy"], mode="lines", name=labels.get(run, run),
                                     legendgroup=run, showlegend=c == 1, line={"color": _color(i)}),
                          row=1, col=c)
        fig.update_xaxes(title_text="training step", type="log" if log_x else "linear", row=1, col=c)
    if marks is not None:
        for _, m in marks.iterrows():
            i = runs.index(m["run"]) if m["run"] in runs else 0
            for c in range(1, len(splits) + 1):
                fig.add_vline(x=max(float(m["step"]), 1.0) if log_x else float(m["step"]), line_dash="dash",
                              line_color=_color(i), row=1, col=c)
    fig.update_yaxes(range=_Y_ACC, row=1, col=1, title_text="accuracy (fraction correct)")
    fig.update_layout(title=title, legend_title_text="run")
    return fig


def hops_iterations_heatmap(table: pd.DataFrame, title: str, marks: dict[str, float] | None = None) -> go.Figure:
    """Accuracy over (hops, inference iterations), on the fixed [0, 1] scale.

    ``table``: columns hops, iterations, accuracy. ``marks``: optional horizontal lines, label -> hops
    (e.g. the learnable depth), drawn just above that row.
    """
    grid = table.pivot_table(index="hops", columns="iterations", values="accuracy", aggfunc="mean").sort_index()
    fig = go.Figure(go.Heatmap(z=grid.to_numpy(dtype=float), x=[int(c) for c in grid.columns],
                               y=[int(h) for h in grid.index], colorscale=SEQUENTIAL_COLORSCALE, zmin=UNIT_RANGE[0],
                               zmax=UNIT_RANGE[1], colorbar={"title": "accuracy"},
                               hovertemplate="iterations %{x}<br>hops %{y}<br>accuracy %{z:.3f}<extra></extra>"))
    for i, (label, hops) in enumerate((marks or {}).items()):
        if hops is None:
            continue
        fig.add_hline(y=int(hops) + 0.5, line_dash="dash", line_color=_color(i + 1), annotation_text=label)
    fig.update_layout(title=title, xaxis_title="inference iterations", yaxis_title="hops in the query")
    fig.update_xaxes(dtick=1 if grid.shape[1] <= 20 else None)
    fig.update_yaxes(dtick=1 if grid.shape[0] <= 20 else None)
    return fig


def lines(frame: pd.DataFrame, x: str, y: str, group: str, title: str, x_title: str, y_title: str,
          unit: bool = False, facet: str | None = None, dash: str | None = None) -> go.Figure:
    """Lines of ``y`` against ``x``, one per ``group`` value (optionally one panel per ``facet`` value,
    and line dash by ``dash``)."""
    facets = list(dict.fromkeys(frame[facet])) if facet else [None]
    groups = list(dict.fromkeys(frame[group]))
    dashes = list(dict.fromkeys(frame[dash])) if dash else [None]
    styles = ("solid", "dash", "dot", "dashdot")
    fig = make_subplots(rows=1, cols=len(facets), subplot_titles=[str(f) for f in facets] if facet else None,
                        shared_yaxes=True)
    for c, f in enumerate(facets, start=1):
        part = frame if f is None else frame[frame[facet] == f]
        for i, gval in enumerate(groups):
            for j, dval in enumerate(dashes):
                g = part[part[group] == gval]
                if dash:
                    g = g[g[dash] == dval]
                if g.empty:
                    continue
                g = g.sort_values(x)
                name = f"{gval}" + (f" · {dval}" if dash else "")
                fig.add_trace(go.Scatter(x=g[x], y=g[y], mode="lines+markers", name=name, legendgroup=name,
                                         showlegend=c == 1, line={"color": _color(i), "dash": styles[j % 4]}),
                              row=1, col=c)
        fig.update_xaxes(title_text=x_title, row=1, col=c)
    fig.update_yaxes(title_text=y_title, row=1, col=1)
    if unit:
        fig.update_yaxes(range=_Y_ACC)
    if pd.api.types.is_integer_dtype(frame[x]) and frame[x].nunique() <= 24:
        fig.update_xaxes(dtick=1)  # hop counts, iteration counts: no 2.5 hops
    fig.update_layout(title=title)
    return fig


def grouped_bars(frame: pd.DataFrame, x: str, y: str, group: str, title: str, y_title: str,
                 unit: bool = True) -> go.Figure:
    """Bars of ``y`` per ``x`` category, one bar per ``group`` value."""
    fig = go.Figure()
    for i, (gval, g) in enumerate(frame.groupby(group, sort=False)):
        fig.add_trace(go.Bar(x=g[x].astype(str), y=g[y], name=str(gval), marker_color=_color(i)))
    fig.update_layout(title=title, barmode="group", yaxis_title=y_title, xaxis_title=x)
    if unit:
        fig.update_yaxes(range=[0, 1.02])
    return fig


def finite_or_none(values: np.ndarray) -> list:
    return [None if not np.isfinite(v) else float(v) for v in values]
