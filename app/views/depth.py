"""Depth: accuracy over hop count x inference iterations, from a run's evaluations.

Sources, in order of preference: the tables `looplens eval RUN` wrote under RUN/eval/, the
evaluations logged during training (metrics.csv, at the iteration counts the run evaluated), or a
fresh evaluation of one checkpoint (models.train.evaluate, cached).
"""

from __future__ import annotations

import streamlit as st
from looplens.app import figures, state, ui

st.caption("Accuracy by number of hops (rows) and inference iterations (columns). A looped model that "
           "extrapolates answers deeper queries when given more iterations than it was trained with.")

run_path = ui.pick_run(prefer="depth")
if run_path is None:
    st.stop()
path = str(run_path)

SOURCES = ["evaluation files (eval/*.csv)", "training metrics (metrics.csv)", "evaluate a checkpoint now"]
eval_files = []
with ui.guard("Listing the run's evaluation files"):
    eval_files = state.eval_files(path)
source = st.radio("Source", SOURCES, index=0 if eval_files else 1, horizontal=True, key="depth_source",
                  help="`looplens eval RUN --iterations 1:32` writes eval/step_<N>.csv; training logs only the "
                  "iteration counts in its eval section.")

table = None
if source == SOURCES[0]:
    if not eval_files:
        st.info(f"No evaluation files under {run_path / 'eval'}. Write one with "
                f"`looplens eval {run_path} --iterations 1:16`, or pick another source.")
    else:
        name = st.selectbox("Evaluation file", eval_files, key=f"depth_file:{path}")
        with ui.guard(f"Reading eval/{name}", "The file should be a CSV written by `looplens eval`."):
            table = state.eval_table(path, name)
elif source == SOURCES[1]:
    with ui.guard("Reading metrics.csv"):
        metrics = state.metrics(path)
        steps = sorted(int(s) for s in metrics.loc[metrics["split"] != "train_batch", "step"].unique())
        if not steps:
            st.info("metrics.csv has no evaluation rows yet.")
        else:
            step = st.select_slider("Training step", steps, value=steps[-1], key=f"depth_metrics_step:{path}")
            table = figures.metrics_at_step(metrics, step)
else:
    step = ui.pick_step(run_path, key="depth_step")
    max_t = st.slider("Up to iterations", 1, 64, 16, key="depth_max_iterations")
    if step is not None:
        with ui.guard(f"Evaluating step {step}"), st.spinner(f"Evaluating step {step} at 1..{max_t} iterations..."):
            table = state.evaluate(path, step, max_t)

if table is not None and len(table):
    splits = figures.ordered_splits(sorted(table["split"].unique()))
    default = next((s for s in ("test_inferred_ood", "test", "test_inferred_id") if s in splits), splits[0])
    split = st.selectbox("Split", splits, index=splits.index(default), key="depth_split")
    with ui.guard("Plotting accuracy by hops and iterations"):
        sub = table[table["split"] == split]
        summary = state.summary(path)
        fig = figures.depth_heatmap(sub, train_iterations=state.train_iterations(path),
                                    learnable_depth=summary.get("learnable_depth"))
        st.plotly_chart(fig, key="depth_heatmap")
        st.caption("Dashed lines: the training iteration count (vertical) and the learnable depth the "
                   "curriculum reached (horizontal), where known.")
elif table is not None:
    st.info("The table is empty.")
