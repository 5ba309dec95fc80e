"""Query explorer: one query through one checkpoint, iteration by iteration.

Build a query (head entity + relation chain, or type "e17 r3 r9"), pick a checkpoint and an iteration
count; see the true chain with its bridge entities, the prediction, the logit lens of every chain
entity over (iteration, block, position), where each hop resolves, and the attention per iteration.
"""

from __future__ import annotations

import numpy as np
import streamlit as st
from looplens.app import figures, state, ui

st.caption("Follow one query through the loop. The logit lens decodes the residual stream after every "
           "block of every iteration: watch each bridge entity, then the answer, become the top token.")

run_path = ui.pick_run(prefer="composition")
if run_path is None:
    st.stop()
path = str(run_path)

ds = None
with ui.guard("Loading the run's dataset", "The run records where its dataset is; if it moved, the app "
              "rebuilds it from the config under <runs>/.datasets/."):
    ds = state.dataset(path)
if ds is None:
    st.stop()
vocab, world = ds.vocab, ds.world
train_t = state.train_iterations(path)
max_hops = max(1, min(state.max_query_hops(path) or ds.max_hops, 12))


# ---- the query -------------------------------------------------------------------------------------
def _draw_example(split: str) -> None:
    rows = state.split_rows(path, split)
    if len(rows):
        seed = st.session_state.get("query_draws", 0)
        st.session_state["query_draws"] = seed + 1
        st.session_state["query_text"] = rows["query"].iloc[int(np.random.default_rng(seed).integers(len(rows)))]


with st.container(border=True):
    st.markdown("**Query**")
    c_head, c_hops, c_rel = st.columns([1.2, 0.8, 4])
    head = c_head.selectbox("Head entity", range(vocab.n_entities), format_func=lambda e: f"e{e}", key="query_head")
    hops = c_hops.number_input("Hops", 1, max_hops, min(2, max_hops), key="query_hops")
    relations, entity = [], head
    rel_cols = c_rel.columns(int(hops))
    for i in range(int(hops)):  # only relations the current entity has (random-tail worlds lack some)
        options = state.entity_relations(path, entity) if entity is not None else list(range(vocab.n_relations))
        options = options or list(range(vocab.n_relations))
        r = rel_cols[i].selectbox(f"Relation {i + 1}", options, format_func=lambda r: f"r{r}", key=f"query_rel_{i}")
        relations.append(r)
        entity = int(world.tails[entity, r]) if entity is not None and world.tails[entity, r] >= 0 else None
    built = " ".join([f"e{head}", *(f"r{r}" for r in relations)])

    c_text, c_split, c_draw = st.columns([3, 1.5, 1.1], vertical_alignment="bottom")
    typed = c_text.text_input("...or type a query", key="query_text", placeholder=f"{built}   (entity, then relations)",
                              help="Overrides the builder above while not empty. Tokens: e<entity> then r<relation>.")
    splits = [s for s in ds.split_names if s != "train"] or ds.split_names
    split = c_split.selectbox("Example from split", splits, key="query_split",
                              index=splits.index("test_inferred_ood") if "test_inferred_ood" in splits else 0)
    c_draw.button("Random", on_click=_draw_example, args=(split,), icon=":material/casino:",
                  help="Put a random query of this split in the text box.")
    query_text = typed.strip() or built

    c_step, c_iter = st.columns(2)
    with c_step:
        step = ui.pick_step(run_path, key="query_step")
    with c_iter:
        n_iter = st.slider("Iterations at inference", 1, max(16, 2 * train_t), train_t, key="query_iterations",
                           help=f"This run trained with {train_t} iteration(s); more or fewer can be run at inference.")

query = None
with ui.guard("Query", "Write an entity then relations separated by spaces, e.g. `e3 r1 r0`; entities are "
              f"e0..e{vocab.n_entities - 1}, relations r0..r{vocab.n_relations - 1}."):
    query = state.parse_query(path, query_text)
if query is None or step is None:
    st.stop()

# ---- the true chain and the prediction -----------------------------------------------------------
st.subheader("True chain")
if query["chain"] is None:
    st.warning(f"This query has no answer in the world: {query['problem']}. The model still predicts "
               "something; the lens below tracks its prediction.", icon=":material/link_off:")
else:
    st.markdown(figures.chain_markdown(query["head"], query["relations"], query["chain"]))

lens = None
with ui.guard(f"Logit lens at step {step}"), st.spinner("Running the logit lens..."):
    lens = state.logit_lens(path, step, query["query"], n_iter)
if lens is None:
    st.stop()

st.markdown(figures.prediction_markdown(lens, query))

# ---- logit lens ------------------------------------------------------------------------------------
st.subheader("Logit lens")
c_value, c_note = st.columns([1, 3])
value = c_value.radio("Show", ["rank", "prob"], horizontal=True, key="query_lens_value",
                      format_func={"rank": "rank among entities", "prob": "probability"}.get)
c_note.caption("Rows: the query's positions; columns: every block of every iteration (t = iteration, b = "
               "block). Rank 0 means the entity is the top decoded token there; bright = decoded.")
targets = list(dict.fromkeys(lens["target"]))
tabs = st.tabs([figures.target_label(t, lens) for t in targets])
for tab, target in zip(tabs, targets):
    with tab, ui.guard(f"Lens heatmap of {target}"):
        st.plotly_chart(figures.lens_heatmap(lens, target, value), key=f"query_lens_{target}")

if query["chain"] is not None:
    with ui.guard("Locating the hops"):
        located = state.locate_hops(path, step, query["query"], n_iter)
        st.markdown("**Where each hop resolves** (first layer from which the entity stays top-1 at some position)")
        st.dataframe(figures.hops_table(located), hide_index=True)

# ---- attention ------------------------------------------------------------------------------------
st.subheader("Attention per iteration")
st.caption("Attention of the readout position (where the answer is read) to each earlier token, per head, "
           "for every block of every iteration.")
with ui.guard("Attention patterns"), st.spinner("Reading attention patterns..."):
    att = state.attention(path, step, query["query"], n_iter)
    st.plotly_chart(figures.attention(att), key="query_attention")
