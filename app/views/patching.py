"""Patching: which (iteration, block, position) carries the answer.

Run a corrupted query, paste in one activation from the clean run, and see how much of the clean answer
comes back (1 = all of it, 0 = none): interp.activation_patching over every cell, shown as a heatmap.
"""

from __future__ import annotations

import streamlit as st
from looplens.app import figures, state, ui

st.caption("Activation patching: run the corrupted query, copy one activation from the clean run into it, "
           "and measure how much of the clean answer's logit difference comes back (normalised: 1 = fully "
           "restored, 0 = no effect).")

run_path = ui.pick_run(prefer="composition")
if run_path is None:
    st.stop()
path = str(run_path)

ds = None
with ui.guard("Loading the run's dataset"):
    ds = state.dataset(path)
    train_t = state.train_iterations(path)
if ds is None:
    st.stop()

HOOKS = {"resid_pre": "residual stream before each block", "resid_mid": "residual stream after attention",
         "resid_post": "residual stream after each block", "attn_out": "attention output",
         "mlp_out": "MLP output"}

with st.container(border=True):
    mode = st.radio("Pairs", ["generated from a split", "one pair I type"], horizontal=True, key="patch_mode",
                    help="Generated: clean queries from a split, each corrupted so that its answer changes; the "
                    "effect is averaged over the pairs. Typed: one clean and one corrupted query.")
    pairs = None
    if mode == "generated from a split":
        c1, c2, c3, c4, c5 = st.columns([1.6, 1, 1.2, 1, 1])
        splits = [s for s in ds.split_names if s != "train"]
        split = c1.selectbox("Clean queries from", splits, key="patch_split",
                             index=splits.index("train_inferred") if "train_inferred" in splits else 0)
        hop_counts = sorted(int(h) for h in state.split_rows(path, split)["hops"].unique())
        hops = c2.selectbox("Hops", hop_counts, index=len(hop_counts) - 1, key="patch_hops")
        corrupt = c3.selectbox("Corrupt", ["head", *(f"relation {i}" for i in range(1, hops + 1))],
                               key="patch_corrupt", help="Replace the head entity, or one relation, by another "
                               "that changes the answer.")
        n_pairs = c4.number_input("Pairs", 1, 512, 32, key="patch_n")
        seed = c5.number_input("Seed", 0, 10_000, 0, key="patch_seed")
        with ui.guard("Making clean/corrupted pairs"):
            kind, _, pos = corrupt.partition(" ")
            made = state.patching_pairs(path, split, hops, kind, int(pos) if pos else None, int(n_pairs), int(seed))
            if made.empty:
                st.warning("No pair could be made (no corruption changes the answer); try another split or hops.")
            else:
                pairs = made
                st.caption(f"{len(made)} pairs, e.g. clean `{made['clean'].iloc[0]}` → {made['clean_answer'].iloc[0]}, "
                           f"corrupted `{made['corrupted'].iloc[0]}` → {made['corrupted_answer'].iloc[0]}")
    else:
        if "patch_clean" not in st.session_state:  # start from a valid pair of this world
            with ui.guard("Making an example pair"):
                example = state.patching_pairs(path, None, min(2, ds.max_hops), "head", None, 1, 0)
                st.session_state["patch_clean"] = example["clean"].iloc[0]
                st.session_state["patch_corrupted"] = example["corrupted"].iloc[0]
        c1, c2 = st.columns(2)
        clean_text = c1.text_input("Clean query", key="patch_clean", placeholder="e0 r1 r2")
        corrupted_text = c2.text_input("Corrupted query", key="patch_corrupted", placeholder="e5 r1 r2",
                                       help="Same number of tokens; its answer should differ from the clean one.")
        with ui.guard("Pair", "Both queries need the same length, and the clean one an answer in the world."):
            clean, corrupted = state.parse_query(path, clean_text), state.parse_query(path, corrupted_text)
            pairs = figures.typed_pair(clean, corrupted)
            st.caption(f"clean answer {pairs['clean_answer'].iloc[0]}, corrupted answer "
                       f"{pairs['corrupted_answer'].iloc[0] or '(the model prediction)'}")

    c_step, c_iter, c_hook, c_heads = st.columns([2, 1.3, 1.5, 1])
    with c_step:
        step = ui.pick_step(run_path, key="patch_step")
    n_iter = c_iter.slider("Iterations", 1, max(8, 2 * train_t), train_t, key="patch_iterations")
    hook = c_hook.selectbox("Activation", list(HOOKS), format_func=lambda h: f"{h}: {HOOKS[h]}", key="patch_hook")
    per_head = c_heads.toggle("Per head", key="patch_per_head",
                              help="Patch each attention head's output (hook z) separately: one row per head.")

if pairs is None or step is None:
    st.stop()

st.subheader("Patching effect")
hook_name = "z" if per_head else hook
with ui.guard(f"Patching {hook_name} at step {step}"), st.spinner(f"Patching {hook_name} in every cell..."):
    effect = state.patching(path, step, *figures.pair_columns(pairs), hook_name, n_iter)
    st.plotly_chart(figures.patching(effect), key="patch_heatmap")
    first = effect.iloc[0]
    st.caption(f"Mean logit difference (clean answer minus corrupted answer): clean run {first['clean_metric']:.2f}, "
               f"corrupted run {first['corrupted_metric']:.2f}, over {int(first.get('n_pairs', 1))} pair(s). "
               "Blue: patching this cell restores the clean answer (1 = fully); red: it pushes the output further "
               "towards the corrupted answer.")
