"""Display helpers for the pages: selecting rows to plot, plotly figures with titles and units.

Only presentation lives here (which rows, which axes, which colours); every measurement comes from
``interp`` or the run's own files. Heatmaps and analysis figures are ``interp.plots`` builders.

Importing this module is cheap (pandas, plotly): ``interp.plots`` is imported inside the functions
that use it, because importing it imports ``looplens.interp`` and so torch and TransformerLens, which a
page must not wait for before it shows its title (tests/test_app.py checks this).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import numpy as np
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go

# Splits in reading order: training first, then in-distribution, then out-of-distribution.
SPLIT_ORDER = ["train_batch", "train", "id_atomic", "ood_atomic", "train_inferred", "test_inferred_id",
               "test_inferred_ood", "test_inferred_first_ood", "test_inferred_second_ood", "train_eval", "test"]
_STAGE_SPLITS = ["train_inferred", "test_inferred_id", "test_inferred_ood"]
RUN_DASHES = ["solid", "dash", "dot", "dashdot", "longdash", "longdashdot"]
DEFAULT_SPLITS = ["train_batch", "train_inferred", "test_inferred_id", "test_inferred_ood", "train_eval", "test"]
STAGE_SPLIT = "stage_passed"  # metrics.csv rows marking a passed curriculum stage


def _plots():
    """interp.plots, imported on first use (see the module docstring)."""
    from looplens.interp import plots

    return plots


@functools.cache
def split_colours() -> dict[str, str]:
    """One colour per split on every page: the grokking stage splits take interp.plots.LINE_COLORS in
    the order interp.plots.grokking_figure uses, the other splits the colours after them."""
    return dict(zip(_STAGE_SPLITS + [s for s in SPLIT_ORDER if s not in _STAGE_SPLITS],
                    list(_plots().LINE_COLORS) + px.colors.qualitative.D3))


def ordered_splits(splits: list[str]) -> list[str]:
    known = [s for s in SPLIT_ORDER if s in splits]
    return known + sorted(s for s in splits if s not in SPLIT_ORDER and s != STAGE_SPLIT)


def default_splits(splits: list[str]) -> list[str]:
    chosen = [s for s in DEFAULT_SPLITS if s in splits]
    return chosen or splits[:4]


def style(fig: go.Figure, height: int = 420) -> go.Figure:
    fig.update_layout(height=height, margin=dict(l=10, r=10, t=40, b=10), legend_title_text="",
                      template="plotly_white")
    return fig


# ---------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------
def training_table(frames: Mapping[str, pd.DataFrame], train_iterations: Mapping[str, int], splits: list[str],
                   iterations: int | str, per_hop: bool) -> pd.DataFrame:
    """Rows to plot: one per (run, split[, hops], step), hop counts pooled by their n unless ``per_hop``.

    ``iterations`` "training count" keeps each run's training iteration count; training batches are
    always kept (they are logged at the count each batch used).
    """
    parts = []
    for run, frame in frames.items():
        f = frame[frame["split"].isin(splits) & (frame["iterations"] > 0)]
        if iterations == "training count":
            keep = f["split"].eq("train_batch") | f["iterations"].eq(train_iterations[run])
        else:
            keep = f["split"].eq("train_batch") | f["iterations"].eq(int(iterations))
        f = f[keep].copy()
        if f.empty:
            continue
        f["series"] = f["split"] + (" (" + f["hops"].astype(str) + " hops)" if per_hop else "")
        f["w_acc"] = f["accuracy"] * f["n"]
        f["w_loss"] = f["loss"] * f["n"]
        # train_batch rows of dynamic-R runs carry each batch's own count: pool them too
        g = f.groupby(["split", "series", "step"], as_index=False)[["w_acc", "w_loss", "n"]].sum()
        g["accuracy"] = g["w_acc"] / g["n"]
        g["loss"] = g["w_loss"] / g["n"]
        g["run"] = run
        parts.append(g.drop(columns=["w_acc", "w_loss"]))
    if not parts:
        return pd.DataFrame(columns=["run", "split", "series", "step", "accuracy", "loss", "n"])
    out = pd.concat(parts, ignore_index=True)
    return out[out["step"] > 0]  # a log axis cannot show step 0


def training_curves(table: pd.DataFrame, metric: str) -> go.Figure:
    runs = list(dict.fromkeys(table["run"]))
    series = list(dict.fromkeys(table.sort_values("split", key=lambda s: s.map(_split_rank))["series"]))
    colours = {s: split_colours().get(s.split(" (")[0], None) for s in series}
    if any(" (" in s for s in series):  # per-hop lines: a sequential scale within each split would be
        colours = dict(zip(series, px.colors.qualitative.Dark24 * 4))  # unreadable; one colour per line
    fig = px.line(
        table, x="step", y=metric, color="series", line_dash="run" if len(runs) > 1 else None,
        color_discrete_map=colours, category_orders={"series": series, "run": runs},
        line_dash_sequence=RUN_DASHES, log_x=True, markers=len(table) < 400,
        hover_data={"run": True, "n": True, "split": False},
        labels={"step": "training step (log scale)", "accuracy": "accuracy (fraction correct)",
                "loss": "cross-entropy loss (nats)", "series": "split", "run": "run"},
    )
    if metric == "accuracy":
        fig.update_yaxes(range=[-0.02, 1.02])
    return style(fig, 460)


def _split_rank(split: str) -> int:
    return SPLIT_ORDER.index(split) if split in SPLIT_ORDER else len(SPLIT_ORDER)


def grokking_stages(frames: Mapping[str, pd.DataFrame], train_iterations: Mapping[str, int],
                    threshold: float) -> pd.DataFrame:
    """interp.grokking_stages of every run that has the composition splits, at its training count."""
    from looplens.interp import grokking_stages as stages_of
    from looplens.interp.grokking import DEFAULT_SPLITS

    parts = []
    for run, frame in frames.items():
        if not set(DEFAULT_SPLITS.values()) <= set(frame["split"]):
            continue  # depth runs: no ID / OOD composition splits, no three stages to find
        parts.append(stages_of(frame, threshold=threshold, iterations=train_iterations[run]).assign(run=run))
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


def add_grokking_stages(fig: go.Figure, stages: pd.DataFrame) -> None:
    """A dotted vertical line per reached stage and run, coloured like the stage's split, labelled at
    the top (labels of lines close together are stacked)."""
    reached = stages[stages["reached"] & (stages["step"] > 0)].sort_values("step")  # step 0: not on a log axis
    several = stages["run"].nunique() > 1
    for i, row in enumerate(reached.itertuples()):
        colour = split_colours().get(row.split, "grey")
        fig.add_vline(x=int(row.step), line_dash="dot", line_width=1.5, line_color=colour)
        fig.add_annotation(x=float(np.log10(int(row.step))), y=1.0, yref="paper", yanchor="bottom",
                           yshift=14 * (i % 3), showarrow=False, font={"size": 10, "color": colour},
                           text=f"{row.phase} ({row.run})" if several else row.phase)
    if len(reached):
        fig.update_layout(margin={"t": 40 + 14 * min(len(reached), 3)})


def stages_table(stages: pd.DataFrame) -> pd.DataFrame:
    cols = {"run": "run", "phase": "stage", "split": "split", "reached": "reached", "step": "first step",
            "accuracy": "accuracy then", "final_accuracy": "final accuracy", "verdict": "verdict"}
    return stages[list(cols)].rename(columns=cols)


def curriculum(frames: Mapping[str, pd.DataFrame]) -> go.Figure:
    """Curriculum stage (the hop count being trained) over steps, per depth run."""
    rows = []
    for run, frame in frames.items():
        g = frame[frame["stage"] > 0].groupby("step", as_index=False)["stage"].max()
        g["run"] = run
        rows.append(g)
    table = pd.concat(rows, ignore_index=True)
    fig = px.line(table, x="step", y="stage", color="run", line_shape="hv",
                  labels={"step": "training step", "stage": "curriculum stage (max hops trained)", "run": "run"})
    fig.update_yaxes(dtick=1)
    return style(fig, 320)


def summary_table(summaries: Mapping[str, dict], descriptions: Mapping[str, dict]) -> pd.DataFrame:
    rows = []
    for run, s in summaries.items():
        row = {"run": run, **descriptions.get(run, {}), "status": s.get("status"), "stop reason": s.get("stop_reason"),
               "final step": s.get("final_step", s.get("last_saved_step")),
               "learnable depth": s.get("learnable_depth")}
        for split, acc in (s.get("final_accuracy") or {}).items():
            row[split] = acc
        rows.append(row)
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------------
# Depth
# ---------------------------------------------------------------------------------------------------
def metrics_at_step(metrics: pd.DataFrame, step: int) -> pd.DataFrame:
    """Evaluation rows of metrics.csv at one step, in the shape of a `looplens eval` table."""
    rows = metrics[(metrics["step"] == step) & (metrics["split"] != "train_batch") & (metrics["iterations"] > 0)
                   & (metrics["split"] != STAGE_SPLIT)]
    return rows.assign(method="fixed").reset_index(drop=True)


def depth_heatmap(table: pd.DataFrame, train_iterations: int | None = None,
                  learnable_depth: int | None = None) -> go.Figure:
    """Accuracy heatmap: hops (rows) x inference iterations (columns), fixed iteration counts only."""
    if "method" in table.columns:
        table = table[table["method"] == "fixed"]
    grid = table.pivot_table(index="hops", columns="iterations", values="accuracy", aggfunc="mean").sort_index()
    plots = _plots()  # accuracy in [0, 1] on the scale and range of every interp.plots figure
    fig = go.Figure(go.Heatmap(
        z=grid.to_numpy(), x=[str(c) for c in grid.columns], y=[str(i) for i in grid.index],
        colorscale=plots.SEQUENTIAL_COLORSCALE, zmin=plots.UNIT_RANGE[0], zmax=plots.UNIT_RANGE[1],
        colorbar=dict(title="accuracy"),
        hovertemplate="%{y} hops, %{x} iterations: accuracy %{z:.3f}<extra></extra>",
        text=grid.round(2).to_numpy(), texttemplate="%{text}" if grid.size <= 400 else None,
    ))
    fig.update_xaxes(title="inference iterations", type="category")
    fig.update_yaxes(title="hops in the query", type="category")
    cols, rows = [str(c) for c in grid.columns], [str(i) for i in grid.index]
    if train_iterations is not None and str(train_iterations) in cols:
        fig.add_vline(x=cols.index(str(train_iterations)), line_dash="dash", line_color="white")
    if learnable_depth is not None and str(learnable_depth) in rows:
        fig.add_hline(y=rows.index(str(learnable_depth)) + 0.5, line_dash="dash", line_color="white")
    return style(fig, 120 + 28 * max(len(rows), 4))


# ---------------------------------------------------------------------------------------------------
# Query explorer
# ---------------------------------------------------------------------------------------------------
def chain_markdown(head: int, relations: list[int], chain: list[int]) -> str:
    """``e3 -r1-> e7 -r0-> e2``, bridges in bold, the answer highlighted (Streamlit markdown).

    >>> chain_markdown(3, [1, 0], [7, 2])
    '`e3` —`r1`→ **e7** (bridge 1) —`r0`→ :green-background[**e2**] (answer)'
    """
    parts = [f"`e{head}`"]
    for i, (r, e) in enumerate(zip(relations, chain)):
        last = i == len(chain) - 1
        parts.append(f" —`r{r}`→ " + (f":green-background[**e{e}**] (answer)" if last else f"**e{e}** (bridge {i + 1})"))
    return "".join(parts)


def _final_readout(lens: pd.DataFrame) -> pd.DataFrame:
    return lens[lens["is_readout"] & (lens["layer"] == lens["layer"].max())]


def prediction_markdown(lens: pd.DataFrame, query: dict) -> str:
    final = _final_readout(lens)
    if final.empty:
        return "No readout rows."
    row = final.iloc[0]
    text = f"**Prediction**: `{row['top_str']}` with probability {row['top_prob']:.3f}"
    answer = final[final["target"] == "answer"]
    if query["chain"] is not None and len(answer):
        a = answer.iloc[0]
        verdict = ":green[correct]" if int(a["rank"]) == 0 else f":red[wrong]: the answer `{a['target_str']}` ranks {int(a['rank'])}"
        text += f" - {verdict} (answer probability {a['prob']:.3f})"
    return text


def target_label(target: str, lens: pd.DataFrame) -> str:
    token = lens.loc[lens["target"] == target, "target_str"].iloc[0]
    name = target.replace("_", " ")
    return f"{name}: {token}"


def lens_heatmap(lens: pd.DataFrame, target: str, value: str) -> go.Figure:
    """interp.plots' logit-lens heatmap of one target; ranks drawn so that bright = decoded (rank 0)."""
    fig = _plots().logit_lens_heatmap(lens, value=value, target=target, example=0)
    if value == "rank":
        fig.update_layout(coloraxis_reversescale=True, coloraxis_cmin=0, coloraxis_colorbar_title="rank")
    fig.update_layout(title=None)
    fig.update_yaxes(autorange="reversed")  # position 0 (the head entity) on top, as the query reads
    n_pos = lens["position"].nunique()
    return style(fig, 140 + 45 * n_pos)


def hops_table(located: pd.DataFrame) -> pd.DataFrame:
    if located.empty:
        return pd.DataFrame()
    out = pd.DataFrame({
        "hop": located["hop"], "entity": located["target"],
        "resolved": located["resolved"],
        "iteration": located["iteration"], "block": located["block"], "position": located["position"],
        "final rank": located["final_rank"],
    })
    return out


def attention(att: pd.DataFrame) -> go.Figure:
    fig = _plots().attention_heatmap(att, example=0)
    fig.update_layout(title=None)
    return style(fig, 160 + 22 * att["layer"].nunique())


# ---------------------------------------------------------------------------------------------------
# Patching
# ---------------------------------------------------------------------------------------------------
def typed_pair(clean: dict, corrupted: dict) -> pd.DataFrame:
    """One clean/corrupted pair from two parsed queries (app.state.parse_query) as a pairs frame."""
    if clean["chain"] is None:
        raise ValueError(f"the clean query {clean['query']!r} has no answer in the world ({clean['problem']})")
    if len(clean["tokens"]) != len(corrupted["tokens"]):
        raise ValueError(f"the queries differ in length ({len(clean['tokens'])} and {len(corrupted['tokens'])} "
                         "tokens); patching compares the same positions, so give both the same number of hops")
    c_answer = f"e{corrupted['chain'][-1]}" if corrupted["chain"] is not None else None
    if c_answer == f"e{clean['chain'][-1]}":
        raise ValueError(f"both queries have the answer {c_answer}: corrupt the clean query so that its answer changes")
    return pd.DataFrame({"clean": [clean["query"]], "corrupted": [corrupted["query"]],
                         "clean_answer": [f"e{clean['chain'][-1]}"], "corrupted_answer": [c_answer]})


def pair_columns(pairs: pd.DataFrame) -> tuple:
    """(clean, corrupted, clean_answers, corrupted_answers) as tuples, hashable for the cache."""
    corrupted_answers = None if pairs["corrupted_answer"].isna().any() else tuple(pairs["corrupted_answer"])
    return tuple(pairs["clean"]), tuple(pairs["corrupted"]), tuple(pairs["clean_answer"]), corrupted_answers


def patching(effect: pd.DataFrame) -> go.Figure:
    fig = _plots().patching_heatmap(effect)
    fig.update_layout(title=None)
    return style(fig, 160 + 26 * len(fig.data[0].y))


# ---------------------------------------------------------------------------------------------------
# Iterations
# ---------------------------------------------------------------------------------------------------
FIXED_POINT_MEASURES = {
    "relative_change": "relative change of the state",
    "cosine_to_final": "cosine to the final state",
    "norm": "state norm",
    "attention_drift": "attention drift per head",
}
EPS_CHOICES = [1e-4, 3e-4, 1e-3, 3e-3, 0.01, 0.03, 0.1, 0.3, 1.0]


def _mark_training_count(fig: go.Figure, x: float) -> None:
    fig.add_vline(x=x, line_dash="dot", line_color="grey", annotation_text="training count",
                  annotation_position="top right")


def fixed_points(fixed: pd.DataFrame, measure: str, train_iterations: int) -> go.Figure:
    fig = _plots().fixed_points_figure(fixed, measure)
    fig.update_layout(title=None)
    _mark_training_count(fig, train_iterations - 1)  # the plot's t is 0-based
    return style(fig, 380)


def spectral_table(radius: pd.DataFrame) -> pd.DataFrame:
    cols = ["spectral_radius", "spectral_norm", "fixed_point_residual"]
    out = radius[cols].describe().loc[["mean", "min", "50%", "max"]].rename(index={"50%": "median"})
    return out.T.reset_index(names="over the queries")


def overthinking(curves: pd.DataFrame, value: str, train_iterations: int) -> go.Figure:
    fig = _plots().overthinking_figure(curves, value)
    fig.update_layout(title=None)
    _mark_training_count(fig, train_iterations)
    return style(fig, 380)


def overthinking_table(curves: pd.DataFrame) -> pd.DataFrame:
    from looplens.interp import overthinking_summary

    s = overthinking_summary(curves)
    keep = {"hops": "hops", "n_examples": "queries", "peak_iteration": "peak margin at iteration",
            "peak_margin": "peak margin", "final_margin": "final margin", "peak_accuracy": "peak accuracy",
            "final_accuracy": "final accuracy"}
    return s[[c for c in keep if c in s.columns]].rename(columns=keep)


def _pooled(table: pd.DataFrame, by: str) -> pd.DataFrame:
    """n-weighted accuracy and mean iterations over hop counts."""
    t = table.assign(w_acc=table["accuracy"] * table["n"], w_it=table["mean_iterations"] * table["n"])
    g = t.groupby(by, as_index=False)[["w_acc", "w_it", "n"]].sum()
    return g.assign(accuracy=g["w_acc"] / g["n"], mean_iterations=g["w_it"] / g["n"])


def halting(fixed: pd.DataFrame, halted: pd.DataFrame, train_iterations: int) -> go.Figure:
    curve = _pooled(fixed, "iterations")
    point = _pooled(halted, "method")
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=curve["iterations"], y=curve["accuracy"], mode="lines+markers",
                             name="fixed iteration count", line={"color": "#636EFA"},
                             hovertemplate="%{x} iterations: accuracy %{y:.3f}<extra></extra>"))
    fig.add_trace(go.Scatter(x=point["mean_iterations"].tolist(), y=point["accuracy"].tolist(), mode="markers",
                             name=f"halting ({point['method'].iloc[0]})",
                             marker={"symbol": "star", "size": 18, "color": "#EF553B"},
                             hovertemplate="mean %{x:.2f} iterations: accuracy %{y:.3f}<extra></extra>"))
    _mark_training_count(fig, train_iterations)
    fig.update_xaxes(title="iterations (fixed count, or mean used by the halting rule)")
    fig.update_yaxes(title="accuracy (fraction correct)", range=[-0.02, 1.02])
    return style(fig, 380)


def halting_markdown(fixed: pd.DataFrame, halted: pd.DataFrame) -> str:
    curve = _pooled(fixed, "iterations")
    point = _pooled(halted, "method").iloc[0]
    best = curve.loc[curve["accuracy"].idxmax()]
    last = curve.iloc[-1]
    return (f"Halting: accuracy **{point['accuracy']:.3f}** using **{point['mean_iterations']:.2f}** iterations on "
            f"average. Best fixed count: {int(best['iterations'])} iterations, accuracy {best['accuracy']:.3f}; "
            f"at the maximum ({int(last['iterations'])}): {last['accuracy']:.3f}.")
