"""Iterations: what happens as the loop keeps running.

Fixed points (how much the state still changes per iteration), overthinking (the answer's margin over
many iterations) and adaptive halting (stop per query when the prediction settles: accuracy against
mean iterations used, live as the KL and entropy thresholds move).
"""

from __future__ import annotations

import streamlit as st
from looplens.app import figures, state, ui

st.caption("Run the loop past its training count: does the state settle to a fixed point, does the answer "
           "get worse (overthinking), and can per-query halting stop at the right time?")

run_path = ui.pick_run()
if run_path is None:
    st.stop()
path = str(run_path)

ds = None
with ui.guard("Loading the run's dataset"):
    ds = state.dataset(path)
    train_t = state.train_iterations(path)
if ds is None:
    st.stop()

with st.container(border=True):
    c_step, c_split, c_n, c_max = st.columns([2, 1.5, 1, 1.5])
    with c_step:
        step = ui.pick_step(run_path, key="iter_step")
    splits = [s for s in ds.split_names if s != "train"]
    default = next((s for s in ("train_inferred", "test", "train_eval") if s in splits), splits[0])
    split = c_split.selectbox("Queries from", splits, index=splits.index(default), key="iter_split")
    n = c_n.number_input("Queries", 1, 1024, 64, key="iter_n", help="A seeded sample of the split.")
    max_t = c_max.slider("Up to iterations", 2, 64, max(16, 4 * train_t), key="iter_max")
if step is None:
    st.stop()

# ---- fixed points ----------------------------------------------------------------------------------
st.subheader("Fixed points")
c_measure, c_note = st.columns([1.2, 3])
measure = c_measure.selectbox("Measure", list(figures.FIXED_POINT_MEASURES), key="iter_measure",
                              format_func=figures.FIXED_POINT_MEASURES.get)
c_note.caption("Per iteration t, how far the residual stream moved (one line per position, mean over the "
               "queries). A state that stops moving has reached a fixed point of the loop.")
with ui.guard("Fixed points"), st.spinner(f"Running {max_t} iterations..."):
    fixed = state.fixed_points(path, step, split, int(n), max_t)
    st.plotly_chart(figures.fixed_points(fixed, measure, train_t), key="iter_fixed")
with st.expander("Local contraction (spectral radius of one iteration's Jacobian)"):
    st.caption("Below 1: one more iteration pulls nearby states together, so the fixed point attracts. "
               "Power iteration with Jacobian-vector products; a few seconds on a small model.")
    if st.button("Compute", key="iter_spectral", icon=":material/functions:"):
        with ui.guard("Spectral radius"), st.spinner("Power iteration..."):
            radius = state.spectral_radius(path, step, split, min(int(n), 32), max_t)
            st.dataframe(figures.spectral_table(radius), hide_index=True)

# ---- overthinking -----------------------------------------------------------------------------------
st.subheader("Overthinking")
value = st.radio("Show", ["margin", "accuracy"], horizontal=True, key="iter_over_value",
                 format_func={"margin": "answer margin (logits)", "accuracy": "accuracy"}.get)
with ui.guard("Overthinking"), st.spinner(f"Reading out after each of {max_t} iterations..."):
    curves = state.overthinking(path, step, split, int(n), max_t)
    st.plotly_chart(figures.overthinking(curves, value, train_t), key="iter_overthinking")
    st.dataframe(figures.overthinking_table(curves), hide_index=True)

# ---- halting -----------------------------------------------------------------------------------------
st.subheader("Adaptive halting")
st.caption("Each query stops after the first iteration t >= 2 where its prediction has settled: "
           "KL(p_t || p_t-1) < ε and entropy H(p_t) < h (the paper: ε = 0.01, h = 3 nats). The curve is "
           "accuracy at fixed iteration counts; the star is the halting rule, at the mean iterations it used.")
c_rule, c_eps, c_h = st.columns([1, 2, 2])
rule = c_rule.selectbox("Rule", ["kl+entropy", "kl", "entropy"], key="iter_rule")
eps = c_eps.select_slider("KL threshold ε (nats)", figures.EPS_CHOICES, value=0.01, key="iter_eps",
                          disabled=rule == "entropy", format_func=lambda x: f"{x:g}")
h = c_h.slider("Entropy threshold h (nats)", 0.0, 6.0, 3.0, 0.1, key="iter_entropy", disabled=rule == "kl")
with ui.guard("Adaptive halting"), st.spinner("Evaluating the halting rule..."):
    fixed_acc = state.fixed_iterations(path, step, split, max_t)
    halted = state.halting(path, step, split, rule, float(eps), float(h), max_t)
    st.plotly_chart(figures.halting(fixed_acc, halted, train_t), key="iter_halting")
    st.markdown(figures.halting_markdown(fixed_acc, halted))
