"""Plotly figure builders over the analyses' DataFrames (no analysis logic here).

Every builder takes the frame an ``interp`` function returned and gives a ``plotly.graph_objects.Figure``.
Colours are consistent across the toolkit (the app imports the same names):

- ``SEQUENTIAL_COLORSCALE`` for quantities in [0, 1] (probability, accuracy, attention weight), always
  drawn on the fixed range ``UNIT_RANGE`` so figures are comparable;
- ``DIVERGING_COLORSCALE`` for signed effects (patching, margins), centred at 0.

>>> fig = patching_heatmap(pd.DataFrame({"hook": ["resid_pre"] * 2, "layer": [0, 1], "stage": ["loop"] * 2,
...     "iteration": [0, 0], "block": [0, 1], "position": [0, 0], "head": [-1, -1], "effect": [0.2, 0.9]}))
>>> fig.data[0].type, fig.layout.coloraxis.cmid
('heatmap', 0.0)
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from looplens.interp._common import layer_label
from looplens.interp.hops import hop_resolution_distribution
from plotly.subplots import make_subplots

SEQUENTIAL_COLORSCALE = "Viridis"
DIVERGING_COLORSCALE = "RdBu"
ACCURACY_COLORSCALE = PROBABILITY_COLORSCALE = SEQUENTIAL_COLORSCALE  # the same scale under the app's names
EFFECT_COLORSCALE = DIVERGING_COLORSCALE
UNIT_RANGE = (0.0, 1.0)
# A qualitative palette for lines (hop depths, positions, splits).
LINE_COLORS = ("#636EFA", "#EF553B", "#00CC96", "#AB63FA", "#FFA15A", "#19D3F3", "#FF6692", "#B6E880")

_UNIT_VALUES = {"prob", "top_prob", "accuracy", "weight", "correct", "effect_abs"}
_SIGNED_VALUES = {"margin", "logit", "effect"}
_AXIS = {
    "prob": "probability of the target",
    "top_prob": "probability of the top-1 token",
    "rank": "rank of the target (0 = top-1)",
    "logit": "target logit (logits)",
    "margin": "logit margin: target minus best other (logits)",
    "entropy": "entropy of the decoded distribution (nats)",
    "effect": "normalised logit difference (1 = clean, 0 = corrupted)",
    "relative_change": "relative change |h_t − h_{t−1}| / |h_{t−1}|",
    "cosine_to_final": "cosine similarity to the final state",
    "norm": "state norm |h_t| (residual units)",
    "attention_drift": "attention drift (total variation, 0..1)",
    "accuracy": "accuracy (fraction correct)",
    "weight": "attention weight (probability)",
}


def _layer_axis(df: pd.DataFrame) -> tuple[list[int], list[str]]:
    """Sorted virtual layers and their labels ("embed", "t0.b1", ...)."""
    first = df.drop_duplicates("layer").sort_values("layer")
    return first["layer"].tolist(), [layer_label(s, int(i), int(b)) for s, i, b in
                                     zip(first["stage"], first["iteration"], first["block"])]


def _color_kwargs(value: str, values: np.ndarray) -> dict:
    if value in _UNIT_VALUES:
        return {"colorscale": SEQUENTIAL_COLORSCALE, "cmin": UNIT_RANGE[0], "cmax": UNIT_RANGE[1]}
    if value in _SIGNED_VALUES:
        finite = np.abs(values[np.isfinite(values)])
        bound = 1.0 if value == "effect" else float(finite.max()) if finite.size else 1.0
        return {"colorscale": DIVERGING_COLORSCALE, "cmid": 0.0,
                **({"cmin": -bound, "cmax": bound} if value == "effect" else {})}
    return {"colorscale": SEQUENTIAL_COLORSCALE}


def _check(df: pd.DataFrame, columns: tuple[str, ...], what: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"{what} needs columns {missing} (pass the frame returned by the matching interp function)")
    if df.empty:
        raise ValueError(f"{what}: the frame is empty")


def logit_lens_heatmap(lens: pd.DataFrame, value: str = "prob", target: str | None = None,
                       example: int | None = None) -> go.Figure:
    """Heatmap of a lens statistic over (virtual layer, position); mean over examples unless one is chosen.

    value: a numeric column of :func:`interp.logit_lens` (prob, rank, logit, margin, entropy, top_prob).
    target: which target (default: the first in the frame).
    """
    _check(lens, ("layer", "position", "target", value), "logit_lens_heatmap")
    target = lens["target"].iloc[0] if target is None else target
    df = lens[lens["target"] == target]
    if example is not None:
        df = df[df["example"] == example]
    if df.empty:
        raise ValueError(f"no lens rows for target={target!r}, example={example!r}")
    layers, labels = _layer_axis(df)
    grid = df.pivot_table(index="position", columns="layer", values=value, aggfunc="mean").reindex(columns=layers)
    if example is not None and "token_str" in df.columns:
        tok = df.drop_duplicates("position").set_index("position")["token_str"]
        ylabels = [f"{p}: {tok.get(p, '')}" for p in grid.index]
    else:
        ylabels = [str(p) for p in grid.index]
    z = grid.to_numpy(dtype=float)
    fig = go.Figure(go.Heatmap(z=z, x=labels, y=ylabels, coloraxis="coloraxis",
                               hovertemplate="layer %{x}<br>position %{y}<br>" + value + " %{z:.3f}<extra></extra>"))
    fig.update_layout(coloraxis={**_color_kwargs(value, z), "colorbar": {"title": value}},
                      title=f"Logit lens: {value} of {target}" + ("" if example is not None else " (mean over queries)"),
                      xaxis_title="virtual layer (t = iteration, b = block)", yaxis_title="position (token)")
    return fig


def logit_lens_lines(lens: pd.DataFrame, value: str = "prob", readout_only: bool = True) -> go.Figure:
    """One line per target: mean lens statistic against the virtual layer (at the readout by default)."""
    _check(lens, ("layer", "target", value, "is_readout"), "logit_lens_lines")
    df = lens[lens["is_readout"]] if readout_only else lens
    layers, labels = _layer_axis(df)
    fig = go.Figure()
    for i, (target, g) in enumerate(df.groupby("target", sort=False)):
        mean = g.groupby("layer")[value].mean().reindex(layers)
        fig.add_trace(go.Scatter(x=labels, y=mean.to_numpy(), mode="lines+markers", name=str(target),
                                 line={"color": LINE_COLORS[i % len(LINE_COLORS)]}))
    fig.update_layout(title=f"Logit lens by layer ({'readout position' if readout_only else 'all positions'})",
                      xaxis_title="virtual layer (t = iteration, b = block)", yaxis_title=_AXIS.get(value, value))
    if value in _UNIT_VALUES:
        fig.update_yaxes(range=list(UNIT_RANGE))
    return fig


def hop_resolution_figure(located: pd.DataFrame) -> go.Figure:
    """Where hops resolve: fraction of queries per resolving iteration (and "never"), one bar group per hop,
    one panel per hop count."""
    _check(located, ("hops", "hop", "resolved", "iteration"), "hop_resolution_figure")
    dist = hop_resolution_distribution(located)
    ks = sorted(dist["hops"].unique())
    fig = make_subplots(rows=1, cols=len(ks), subplot_titles=[f"{k}-hop queries" for k in ks], shared_yaxes=True)
    order = sorted(int(i) for i in dist["iteration"].dropna().unique())
    cats = [("embed/prelude" if i < 0 else f"t{i}") for i in order] + ["never"]
    for c, k in enumerate(ks, start=1):
        for hop, g in dist[dist["hops"] == k].groupby("hop"):
            x = ["never" if not r else ("embed/prelude" if int(i) < 0 else f"t{int(i)}")
                 for r, i in zip(g["resolved"], g["iteration"].fillna(-99))]
            fig.add_trace(go.Bar(x=x, y=g["fraction"], name=f"hop {hop} ({g['target'].iloc[0]})",
                                 marker_color=LINE_COLORS[(hop - 1) % len(LINE_COLORS)], legendgroup=str(hop),
                                 showlegend=c == 1), row=1, col=c)
        fig.update_xaxes(categoryorder="array", categoryarray=cats, title_text="resolving iteration", row=1, col=c)
    fig.update_yaxes(title_text="fraction of queries", range=list(UNIT_RANGE), row=1, col=1)
    fig.update_layout(title="Where each hop is resolved (first iteration from which it stays top-1)",
                      barmode="group")
    return fig


def patching_heatmap(patch: pd.DataFrame, value: str = "effect") -> go.Figure:
    """Patching effect over (virtual layer, position[, head]) on the diverging scale, fixed at [-1, 1]."""
    _check(patch, ("layer", "position", "head", value), "patching_heatmap")
    df = patch.groupby(["layer", "position", "head", "stage", "iteration", "block"], as_index=False)[value].mean()
    layers, labels = _layer_axis(df)
    df["row"] = [("all positions" if p < 0 else f"pos {p}") + ("" if h < 0 else f" · head {h}")
                 for p, h in zip(df["position"], df["head"])]
    rows = df.sort_values(["position", "head"]).drop_duplicates("row")["row"].tolist()
    grid = df.pivot_table(index="row", columns="layer", values=value, aggfunc="mean").reindex(index=rows, columns=layers)
    z = grid.to_numpy(dtype=float)
    hook = patch["hook"].iloc[0] if "hook" in patch.columns else "activation"
    fig = go.Figure(go.Heatmap(z=z, x=labels, y=rows, coloraxis="coloraxis",
                               hovertemplate="layer %{x}<br>%{y}<br>effect %{z:.3f}<extra></extra>"))
    fig.update_layout(coloraxis={**_color_kwargs("effect", z), "colorbar": {"title": "effect"}},
                      title=f"Activation patching of {hook}: normalised logit difference",
                      xaxis_title="virtual layer (t = iteration, b = block)", yaxis_title="patched position")
    fig.update_yaxes(autorange="reversed")
    return fig


def fixed_points_figure(fixed: pd.DataFrame, measure: str = "relative_change", log_y: bool | None = None) -> go.Figure:
    """A fixed-point measure against the iteration: one line per position (state measures, mean over
    queries) or per block and head (attention_drift, mean over queries and positions)."""
    _check(fixed, ("measure", "iteration", "block", "position", "value"), "fixed_points_figure")
    df = fixed[fixed["measure"] == measure]
    if df.empty:
        raise ValueError(f"no rows with measure {measure!r}; measures: {sorted(fixed['measure'].unique())}")
    fig = go.Figure()
    if measure == "attention_drift":
        groups = df.groupby(["block", "head"])
        name = "block {} head {}"
    else:
        df = df[df["block"] == -1]
        groups = df.groupby(["position"])
        name = "position {}"
    for i, (key, g) in enumerate(groups):
        key = key if isinstance(key, tuple) else (key,)
        mean = g.groupby("iteration")["value"].mean()
        fig.add_trace(go.Scatter(x=mean.index, y=mean.to_numpy(), mode="lines", name=name.format(*key),
                                 line={"color": LINE_COLORS[i % len(LINE_COLORS)]}))
    log_y = measure == "relative_change" if log_y is None else log_y
    fig.update_layout(title=f"Fixed points: {measure.replace('_', ' ')} per iteration",
                      xaxis_title="iteration t (0-based)", yaxis_title=_AXIS.get(measure, measure))
    if log_y:
        fig.update_yaxes(type="log")
    return fig


def overthinking_figure(curves: pd.DataFrame, value: str = "margin") -> go.Figure:
    """Mean margin (or accuracy, value="accuracy") of the answer against the number of iterations, per hops."""
    _check(curves, ("hops", "n_iterations", "margin", "correct"), "overthinking_figure")
    column = "correct" if value == "accuracy" else value
    fig = go.Figure()
    for i, (k, g) in enumerate(curves.groupby("hops", sort=True)):
        mean = g.groupby("n_iterations")[column].mean()
        fig.add_trace(go.Scatter(x=mean.index, y=mean.to_numpy(dtype=float), mode="lines+markers",
                                 name=f"{k} hops", line={"color": LINE_COLORS[i % len(LINE_COLORS)]}))
    fig.update_layout(title=f"Overthinking: {value} per number of iterations",
                      xaxis_title="iterations run (readout after t iterations)", yaxis_title=_AXIS.get(value, value))
    if value == "accuracy":
        fig.update_yaxes(range=[UNIT_RANGE[0], UNIT_RANGE[1] + 0.02])
    return fig


def attention_heatmap(attention: pd.DataFrame, example: int | None = None) -> go.Figure:
    """Attention of the query (readout) position: rows = virtual layers, columns = key positions, one panel
    per head; mean over queries unless ``example`` is given."""
    _check(attention, ("layer", "head", "key_position", "weight"), "attention_heatmap")
    df = attention if example is None else attention[attention["example"] == example]
    if df.empty:
        raise ValueError(f"no attention rows for example {example!r}")
    heads = sorted(df["head"].unique())
    layers, labels = _layer_axis(df)
    fig = make_subplots(rows=1, cols=len(heads), subplot_titles=[f"head {h}" for h in heads], shared_yaxes=True)
    for c, h in enumerate(heads, start=1):
        g = df[df["head"] == h]
        grid = g.pivot_table(index="layer", columns="key_position", values="weight", aggfunc="mean").reindex(layers)
        if example is not None:
            keys = g.drop_duplicates("key_position").set_index("key_position")["key_str"]
            x = [f"{k}: {keys.get(k, '')}" for k in grid.columns]
        else:
            x = [str(k) for k in grid.columns]
        fig.add_trace(go.Heatmap(z=grid.to_numpy(dtype=float), x=x, y=labels, coloraxis="coloraxis",
                                 hovertemplate="layer %{y}<br>key %{x}<br>weight %{z:.3f}<extra></extra>"),
                      row=1, col=c)
        fig.update_xaxes(title_text="key position", row=1, col=c)
    fig.update_yaxes(title_text="virtual layer (t = iteration, b = block)", autorange="reversed", row=1, col=1)
    fig.update_layout(coloraxis={**_color_kwargs("weight", np.zeros(0)), "colorbar": {"title": "weight"}},
                      title="Attention of the query position per iteration")
    return fig


def grokking_figure(metrics: pd.DataFrame, stages: pd.DataFrame | None = None, log_x: bool = True) -> go.Figure:
    """Accuracy curves of the stage splits against the step, with the stage steps marked."""
    _check(metrics, ("step", "split", "accuracy"), "grokking_figure")
    splits = stages["split"].tolist() if stages is not None else sorted(metrics["split"].unique())
    fig = go.Figure()
    for i, split in enumerate(splits):
        g = metrics[metrics["split"] == split].groupby("step")["accuracy"].mean()
        fig.add_trace(go.Scatter(x=g.index, y=g.to_numpy(dtype=float), mode="lines", name=split,
                                 line={"color": LINE_COLORS[i % len(LINE_COLORS)]}))
    if stages is not None:
        for i, row in enumerate(stages.itertuples()):
            if row.reached:
                fig.add_vline(x=int(row.step), line_dash="dash", line_color=LINE_COLORS[i % len(LINE_COLORS)],
                              annotation_text=row.phase)
    fig.update_layout(title="Grokking stages", xaxis_title="training step (optimizer steps)",
                      yaxis_title=_AXIS["accuracy"])
    fig.update_yaxes(range=[UNIT_RANGE[0], UNIT_RANGE[1] + 0.02])
    if log_x:
        fig.update_xaxes(type="log")
    return fig
