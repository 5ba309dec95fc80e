"""Training: accuracy (or loss) of every split over training steps, several runs overlaid, grokking
stages marked, and curriculum progress for depth runs."""

from __future__ import annotations

import streamlit as st
from looplens.app import figures, state, ui
from looplens.app.runs import run_label

st.caption("Accuracy of each split over training steps (log axis). Memorisation shows as train accuracy "
           "rising first; in-distribution and then out-of-distribution (OOD) accuracy follow, if they do.")

runs = ui.good_runs()
if not runs:
    ui.no_usable_run()
    st.stop()

labels = {run_label(p, runs): p for p in runs}
chosen = st.multiselect("Runs to overlay", list(labels), default=list(labels), key="training_runs",
                        format_func=lambda lbl: ui.choice_label(lbl, labels[lbl]),
                        help="Lines of one run share a dash style; each split keeps its colour across runs. "
                        "\"modified\": not the paper's model (see the lines below).")
if not chosen:
    st.info("Pick at least one run.")
    st.stop()
for label in chosen:
    ui.fidelity_banner(labels[label], label)

frames = {}
for label in chosen:
    with ui.guard(f"Reading metrics.csv of {label}"):
        frames[label] = state.metrics(str(labels[label]))
frames = {k: v for k, v in frames.items() if len(v)}
if not frames:
    st.warning("No metrics yet: the chosen runs have empty metrics.csv files (training writes a row per evaluation).")
    st.stop()

all_splits = figures.ordered_splits(sorted({s for f in frames.values() for s in f["split"].unique()}))
eval_iterations = sorted({int(t) for f in frames.values() for t in f["iterations"].unique() if t > 0})

c1, c2, c3, c4 = st.columns([3, 1.2, 1.2, 1.2])
splits = c1.multiselect("Splits", all_splits, default=figures.default_splits(all_splits), key="training_splits",
                        help="train_batch: the training batches themselves; id_* / ood_*: atomic facts; "
                        "test_inferred_id / _ood: held-out compositions; first_ood / second_ood: which hop is OOD.")
metric = c2.radio("Metric", ["accuracy", "loss"], horizontal=True, key="training_metric")
iterations = c3.selectbox("Inference iterations", ["training count", *eval_iterations], key="training_iterations",
                          help="Evaluation splits are measured at several iteration counts; training batches "
                          "always at the count used in training.")
per_hop = c4.toggle("One line per hop count", value=False, key="training_per_hop",
                    help="Depth runs: split every evaluation split by its number of hops.")

c5, c6 = st.columns([1, 3])
show_stages = c5.toggle("Mark grokking stages", value=True, key="training_show_stages",
                        help="Memorisation (train_inferred), in-distribution (test_inferred_id) and systematic "
                        "(test_inferred_ood) generalisation: the first step each split passes the threshold.")
threshold = c6.slider("Stage threshold (accuracy)", 0.5, 1.0, 0.9, 0.01, key="training_threshold",
                      disabled=not show_stages)
with ui.guard("Plotting the training curves"):
    train_t = {lbl: state.train_iterations(str(labels[lbl])) for lbl in frames}
    table = figures.training_table(frames, train_t, splits, iterations, per_hop)
    if table.empty:
        st.info("No rows for these splits at this iteration count; pick other splits or 'training count'.")
    else:
        fig = figures.training_curves(table, metric)
        stages = None
        with ui.guard("Finding the grokking stages (interp.grokking_stages)"):
            stages = figures.grokking_stages(frames, train_t, threshold)
            if show_stages and len(stages):
                figures.add_grokking_stages(fig, stages)
        st.plotly_chart(fig, key="training_curves")
        if stages is not None and len(stages):
            with st.expander(f"Grokking stages (first evaluation with accuracy >= {threshold:g}, at the training "
                             "iteration count)"):
                st.dataframe(figures.stages_table(stages), hide_index=True)

depth_runs = {lbl: f for lbl, f in frames.items() if (f["stage"] > 0).any()}
if depth_runs:
    st.subheader("Curriculum")
    st.caption("Depth runs train on 2..k-hop chains and move to stage k+1 once held-out k-hop accuracy passes "
               "the threshold. The last stage passed is the run's learnable recursion depth.")
    with ui.guard("Plotting the curriculum"):
        st.plotly_chart(figures.curriculum(depth_runs), key="training_curriculum")

st.subheader("Summary")
with ui.guard("Reading summary.json"):
    st.dataframe(figures.summary_table({lbl: state.summary(str(labels[lbl])) for lbl in chosen},
                                       {lbl: state.describe(str(labels[lbl])) for lbl in chosen}),
                 hide_index=True)
