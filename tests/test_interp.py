"""interp/: logit lens, hop locator, attention, overthinking, grokking stages, schemas, errors, model safety.

Patching and fixed points have their own files (test_interp_patching.py, test_interp_fixed_points.py).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest
import torch
from looplens.data import Vocab
from looplens.interp import (
    attention_by_iteration,
    grokking_stages,
    hop_resolution_distribution,
    hop_targets,
    locate_hops,
    logit_lens,
    overthinking,
    overthinking_summary,
    plots,
    resolve_hops,
    summarize_hops,
)
from looplens.models import LoopedConfig, LoopedTransformer

N_ENT, N_REL = 5, 3  # vocab: pad 0, e0..e4 = 1..5, r0..r2 = 6..8


def randomise(model: LoopedTransformer, seed: int = 1) -> LoopedTransformer:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3
                    + (1.0 if p.ndim == 1 and p.shape[0] == model.cfg.d_model else 0.0))
    return model.eval()


def random_model(**kw) -> LoopedTransformer:
    base = dict(d_vocab=1 + N_ENT + N_REL, n_ctx=4, d_model=16, n_heads=2, n_blocks=2, n_iterations=3, seed=0)
    base.update(kw)
    model = randomise(LoopedTransformer(LoopedConfig(**base)))
    model.vocab = Vocab(N_ENT, N_REL)
    return model


TOKENS = torch.tensor([[1, 6, 7], [3, 8, 0], [5, 7, 6]])  # "e0 r0 r1", "e2 r2", "e4 r1 r0"


# ---------------------------------------------------------------------------------------------------
# A model whose logit lens is known in closed form
# ---------------------------------------------------------------------------------------------------
S, C = 4.0, 2.4  # embedding scale; what each addition of the planted direction adds (0.6 * S)
PLANTED = 4  # token id that the planted direction decodes to ("e3")


def planted_model(n_blocks: int = 2, n_iterations: int = 3, add_at: tuple[int, ...] = (1,)) -> LoopedTransformer:
    """Blocks are the identity except that block(s) ``add_at`` add ``C * W_E[PLANTED]`` (an MLP output bias).

    The embedding rows are orthogonal, mean-free and of norm S, so the final LayerNorm only rescales and a
    residual ``S q_tok + n C q_PLANTED`` decodes to the input token while n C < S and to PLANTED from the
    second addition on (2 C > S > C).
    """
    d_vocab = 1 + N_ENT + N_REL
    cfg = LoopedConfig(d_vocab=d_vocab, n_ctx=4, d_model=16, n_heads=2, n_blocks=n_blocks, n_iterations=n_iterations,
                       positional="none", seed=0)
    model = LoopedTransformer(cfg)
    gen = torch.Generator().manual_seed(0)
    raw = torch.randn(16, d_vocab, generator=gen)
    raw = raw - raw.mean(0, keepdim=True)  # columns orthogonal to the all-ones vector
    q, _ = torch.linalg.qr(raw)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.ln_final.w.fill_(1.0)
        for block in [*model.core]:
            block.ln1.w.fill_(1.0)
            block.ln2.w.fill_(1.0)
        model.embed.W_E.copy_(S * q.T)
        for l in add_at:
            model.core[l].mlp.b_out.copy_(C * q[:, PLANTED])
    model.vocab = Vocab(N_ENT, N_REL)
    return model.eval()


def test_logit_lens_decodes_the_planted_token_where_it_was_planted():
    model = planted_model()
    lens = logit_lens(model, TOKENS, torch.tensor([PLANTED] * 3), positions="all", progress=False)
    # additions happen at layers 1, 3, 5 (block 1 of each iteration); two of them beat the input token
    top = lens.pivot_table(index=["example", "position"], columns="layer", values="top_token")
    tokens = TOKENS.numpy()
    for (ex, pos), row in top.iterrows():
        assert row[-1] == row[0] == row[1] == row[2] == tokens[ex, pos]  # input token up to layer 2
        assert row[3] == row[4] == row[5] == PLANTED
    first = lens[lens["rank"] == 0].groupby(["example", "position"])["layer"].min()
    assert (first == 3).all()
    at3 = lens[lens["layer"] == 3].iloc[0]
    assert (at3["stage"], at3["iteration"], at3["block"]) == ("loop", 1, 1)
    # the logit itself, in closed form: LN(x) = x / rms(x) (x is mean-free), logit = LN(x) . W_E[PLANTED]
    for layer, n_added in [(-1, 0), (2, 1), (5, 3)]:
        row = lens[(lens["example"] == 0) & (lens["position"] == 1) & (lens["layer"] == layer)].iloc[0]
        x = S * np.eye(1 + N_ENT + N_REL)[TOKENS[0, 1]] + n_added * C * np.eye(1 + N_ENT + N_REL)[PLANTED]
        scaled = x / np.sqrt((x**2).sum() / 16 + model.cfg.ln_eps)  # in the orthonormal basis q
        assert row["logit"] == pytest.approx(S * scaled[PLANTED], rel=1e-4, abs=1e-5)
        logits = S * scaled
        p = np.exp(logits - logits.max())
        p /= p.sum()
        assert row["prob"] == pytest.approx(p[PLANTED], rel=1e-4, abs=1e-5)
        assert row["entropy"] == pytest.approx(-(p * np.log(p)).sum(), rel=1e-4, abs=1e-5)
        others = np.delete(logits, PLANTED)
        assert row["margin"] == pytest.approx(logits[PLANTED] - others.max(), rel=1e-4, abs=1e-5)
        if n_added:  # (at the embedding the planted token ties with all others at logit 0)
            assert row["rank"] == int((logits > logits[PLANTED]).sum()) == (1 if n_added == 1 else 0)


def test_entities_only_ignores_relation_tokens():
    model = planted_model()
    # after one addition, a relation position still decodes to its own (relation) token, PLANTED second
    all_tokens = logit_lens(model, TOKENS, torch.tensor([PLANTED] * 3), positions="all", progress=False)
    row = all_tokens[(all_tokens.example == 0) & (all_tokens.position == 1) & (all_tokens.layer == 2)].iloc[0]
    assert row["top_token"] == 6 and row["rank"] == 1
    ent = logit_lens(model, TOKENS, torch.tensor([PLANTED] * 3), positions="all", entities_only=True, progress=False)
    row2 = ent[(ent.example == 0) & (ent.position == 1) & (ent.layer == 2)].iloc[0]
    assert row2["top_token"] == PLANTED and row2["rank"] == 0
    assert row2["prob"] > row["prob"] and row2["entropy"] < np.log(N_ENT) + 1e-6  # renormalised over entities
    with pytest.raises(ValueError, match="not an entity"):
        logit_lens(model, TOKENS, torch.tensor([7, 7, 7]), entities_only=True, progress=False)


def test_logit_lens_last_layer_is_the_model_output_and_options_agree():
    model = random_model()
    answers = torch.tensor([2, 3, 4])
    lens = logit_lens(model, TOKENS, answers, n_iterations=4, progress=False)
    last = lens[lens["layer"] == lens["layer"].max()].sort_values("example")
    probs = model.predict(TOKENS, n_iterations=4).softmax(-1)
    np.testing.assert_allclose(last["prob"], probs[torch.arange(3), answers].numpy(), rtol=1e-5)
    pred = logit_lens(model, TOKENS, n_iterations=4, progress=False)  # targets=None: the prediction
    assert (pred["target"] == "prediction").all()
    assert pred.groupby("example")["target_token"].first().tolist() == probs.argmax(-1).tolist()
    # a cache gives the same frame; positions="all" contains positions="readout"
    _, cache = model.run_with_cache(TOKENS, n_iterations=4)
    pd.testing.assert_frame_equal(lens, logit_lens(model, TOKENS, answers, cache=cache, progress=False))
    every = logit_lens(model, TOKENS, answers, n_iterations=4, positions="all", batch_size=2, progress=False)
    sub = every[every["is_readout"]].reset_index(drop=True)
    pd.testing.assert_frame_equal(sub, lens.reset_index(drop=True), check_exact=False, rtol=1e-5)
    assert len(every) == 9 * (3 + 2 + 3)  # (embedding + 4 x 2 layers) x non-pad positions
    # query strings and "e3" targets are accepted
    strings = logit_lens(model, ["e0 r0 r1", "e2 r2", "e4 r1 r0"], ["e1", "e2", "e3"], n_iterations=4, progress=False)
    pd.testing.assert_frame_equal(strings, lens)


def test_hop_targets_skip_missing_bridges():
    model = random_model()
    lens = logit_lens(model, TOKENS, hop_targets(torch.tensor([2, 3, 4]), torch.tensor([[5], [-1], [0]])),
                      progress=False)
    assert lens.groupby("example")["target"].unique().map(list).tolist() == [["bridge_1", "answer"], ["answer"], ["answer"]]


# ---------------------------------------------------------------------------------------------------
# Hop locator
# ---------------------------------------------------------------------------------------------------
def planted_lens() -> pd.DataFrame:
    """A lens frame (T=3 iterations x 2 blocks, layers -1..5) with resolution patterns set by hand.

    example 0 (2 hops): bridge_1 top-1 at position 1 from layer 2 on; at position 2 top-1 at layers 0-1,
        lost at 2, back from 4 -> resolved at (layer 2, position 1).
        answer top-1 at position 2 at layers 3 and 5 only -> resolved at (5, 2).
    example 1 (2 hops): bridge_1 top-1 at layers 0..4 of position 1 but not at the last layer -> never.
        answer top-1 from layer 1 at positions 0 and 2 (tie) -> (1, 0).
    """
    top = {  # (example, target, position) -> layers where rank == 0
        (0, "bridge_1", 1): {2, 3, 4, 5}, (0, "bridge_1", 2): {0, 1, 4, 5},
        (0, "answer", 2): {3, 5},
        (1, "bridge_1", 1): {0, 1, 2, 3, 4},
        (1, "answer", 0): {1, 2, 3, 4, 5}, (1, "answer", 2): {1, 2, 3, 4, 5},
    }
    rows = []
    for ex in (0, 1):
        for target, token in (("bridge_1", 3), ("answer", 4)):
            for layer in range(-1, 6):
                for pos in range(3):
                    stage = "embed" if layer < 0 else "loop"
                    it, block = (-1, -1) if layer < 0 else divmod(layer, 2)
                    rank = 0 if layer in top.get((ex, target, pos), set()) else 3
                    rows.append((ex, target, token, layer, stage, it, block, pos, pos == 2, rank))
    return pd.DataFrame(rows, columns=["example", "target", "target_token", "layer", "stage", "iteration", "block",
                                       "position", "is_readout", "rank"])


def test_resolve_hops_finds_the_planted_resolution_points():
    located = resolve_hops(planted_lens())
    got = {(r.example, r.hop): (r.resolved, r.layer, r.position, r.iteration, r.block) for r in located.itertuples()}
    na = pd.NA
    assert got[(0, 1)] == (True, 2, 1, 1, 0)
    assert got[(0, 2)] == (True, 5, 2, 2, 1)
    r = got[(1, 1)]
    assert r[0] is False or r[0] == False  # noqa: E712 - numpy bool
    assert all(v is na for v in r[1:])
    assert got[(1, 2)] == (True, 1, 0, 0, 1)
    assert located["hops"].tolist() == [2, 2, 2, 2]
    assert located["final_rank"].tolist() == [0, 0, 3, 0]
    np.testing.assert_allclose(located["depth_fraction"], [3 / 6, 6 / 6, np.nan, 2 / 6])

    summary = summarize_hops(located)
    assert summary[["hops", "hop", "n", "n_resolved"]].values.tolist() == [[2, 1, 2, 1], [2, 2, 2, 2]]
    assert summary["fraction_never"].tolist() == [0.5, 0.0]
    assert summary["iteration_mean"].tolist() == [1.0, 1.0]  # (2 + 0) / 2 for the answer
    dist = hop_resolution_distribution(located)
    assert dist[["hop", "resolved", "count"]].values.tolist() == [[1, True, 1], [1, False, 1], [2, True, 1], [2, True, 1]]
    assert dist["iteration"].isna().tolist() == [False, True, False, False]
    assert dist["iteration"].fillna(-9).tolist() == [1, -9, 0, 2]


def test_resolve_hops_rejects_incomplete_frames():
    lens = planted_lens()
    with pytest.raises(ValueError, match="all layers"):
        resolve_hops(lens[lens["layer"] != 3])
    with pytest.raises(ValueError, match="missing columns"):
        resolve_hops(lens.drop(columns="rank"))
    with pytest.raises(ValueError, match="bridge_"):
        resolve_hops(lens.replace({"target": {"bridge_1": "mystery"}}))


@pytest.mark.parametrize("vanilla", [False, True])
def test_locate_hops_on_looped_and_vanilla_models(vanilla):
    # looped: 3 iterations x 2 blocks, block 1 adds; vanilla: 6 distinct blocks, blocks 1, 3, 5 add.
    model = planted_model(6, 1, add_at=(1, 3, 5)) if vanilla else planted_model()
    located = locate_hops(model, TOKENS, torch.tensor([PLANTED] * 3), torch.tensor([[2], [-1], [PLANTED]]),
                          progress=False)
    answer = located[located["target"] == "answer"]
    assert answer["layer"].tolist() == [3, 3, 3] and answer["position"].tolist() == [0, 0, 0]
    assert answer["iteration"].tolist() == ([0] * 3 if vanilla else [1] * 3)
    assert answer["block"].tolist() == ([3] * 3 if vanilla else [1] * 3)
    bridges = located[located["target"] == "bridge_1"]
    assert bridges["example"].tolist() == [0, 2]
    assert not bridges.iloc[0]["resolved"]  # e1 (id 2) is never top-1 at the last layer
    assert bridges.iloc[1]["resolved"] and bridges.iloc[1]["hop"] == 1


# ---------------------------------------------------------------------------------------------------
# Attention, overthinking, grokking
# ---------------------------------------------------------------------------------------------------
def test_attention_by_iteration_matches_the_cache():
    model = random_model()
    _, cache = model.run_with_cache(TOKENS, n_iterations=2)
    att = attention_by_iteration(model, TOKENS, n_iterations=2, progress=False)
    readout = model.readout_positions(TOKENS)
    for ex, layer, head in [(0, 0, 1), (1, 3, 0), (2, 2, 1)]:
        got = att[(att.example == ex) & (att.layer == layer) & (att["head"] == head)].sort_values("key_position")
        want = cache[f"blocks.{layer}.attn.hook_pattern"][ex, head, readout[ex], : readout[ex] + 1]
        # rtol 1e-5: the full cache attaches LayerNorm hooks (unfused LN), attention_by_iteration caches the
        # patterns only, so its LayerNorms take the fused F.layer_norm fast path (same maths, ~1e-6 apart).
        np.testing.assert_allclose(got["weight"], want.numpy(), rtol=1e-5)
        assert (got["query_position"] == int(readout[ex])).all()
    sums = att.groupby(["example", "layer", "head", "query_position"])["weight"].sum()
    np.testing.assert_allclose(sums, 1.0, rtol=1e-5)
    every = attention_by_iteration(model, TOKENS, cache=cache, queries="all", progress=False)
    assert len(every) == 4 * 2 * (6 + 3 + 6)  # layers x heads x causal (query, key) pairs per example


@pytest.mark.parametrize("extra", [{}, {"n_coda": 1, "n_prelude": 1}, {"input_injection": "add"}])
def test_overthinking_equals_predict_at_every_iteration_count(extra):
    model = random_model(**extra)
    answers = torch.tensor([2, 3, 4])
    curves = overthinking(model, TOKENS, answers, max_iterations=5, batch_size=2, progress=False)
    assert len(curves) == 15 and curves["hops"].tolist()[:5] == [2] * 5
    for t in (1, 3, 5):
        logits = model.predict(TOKENS, n_iterations=t)
        rows = curves[curves["n_iterations"] == t].sort_values("example")
        target = logits[torch.arange(3), answers]
        others = logits.scatter(1, answers[:, None], float("-inf")).max(-1).values
        np.testing.assert_allclose(rows["margin"], (target - others).numpy(), rtol=1e-4, atol=1e-5)
        assert rows["prediction"].tolist() == logits.argmax(-1).tolist()
    assert model.cfg.n_iterations == 3


def test_overthinking_summary_on_a_planted_curve():
    margin = {1: 0.5, 2: 2.0, 3: 3.0, 4: 2.5, 5: 1.0}
    correct = {1: 0, 2: 1, 3: 1, 4: 1, 5: 0}
    rows = [(ex, 2, t, margin[t] + (0.1 if ex else -0.1), bool(correct[t] or (ex and t == 5)))
            for ex in (0, 1) for t in margin]
    curves = pd.DataFrame(rows, columns=["example", "hops", "n_iterations", "margin", "correct"])
    s = overthinking_summary(curves).iloc[0]
    assert (s["peak_iteration"], s["max_iterations"], s["n_examples"]) == (3, 5, 2)
    assert s["peak_margin"] == pytest.approx(3.0) and s["final_margin"] == pytest.approx(1.0)
    assert s["margin_decay"] == pytest.approx(2.0) and s["margin_decay_per_iteration"] == pytest.approx(1.0)
    assert (s["accuracy_peak_iteration"], s["peak_accuracy"], s["final_accuracy"]) == (2, 1.0, 0.5)


def metrics_frame(ood_step: int = 5000) -> pd.DataFrame:
    rows = []
    for step in (0, 100, 200, 1000, 2000, 3000, 5000, 8000):
        acc = {"train_inferred": 0.2 if step < 100 else 0.99,
               "test_inferred_id": 0.1 if step < 1000 else 0.95 if step != 2000 else 0.85,
               "test_inferred_ood": 0.0 if step < ood_step else 0.8}
        for split, a in acc.items():
            rows.append((step, step / 100, 0, split, 2, 4, a, 1.0, 50))
    return pd.DataFrame(rows, columns=["step", "epoch", "stage", "split", "hops", "iterations", "accuracy", "loss", "n"])


def test_grokking_stages_three_stage_verdict_and_gaps(tmp_path):
    stages = grokking_stages(metrics_frame(), threshold={"train": 0.9, "test_id": 0.9, "test_ood": 0.5})
    assert stages["stage"].tolist() == ["train", "test_id", "test_ood"]
    assert stages["step"].tolist() == [100, 1000, 5000]
    assert stages["gap_steps"].tolist()[1:] == [900, 4000] and stages["gap_steps"].isna().tolist()[0]
    assert (stages["verdict"] == "systematic").all() and stages["three_stage"].all()
    assert stages["epoch"].tolist() == [1.0, 10.0, 50.0]
    # patience: test_id dips at 2000, so two consecutive passes first happen at 3000
    assert grokking_stages(metrics_frame(), patience=2)["step"].tolist()[1] == 3000
    # the OOD stage never reached: in-distribution verdict; reading from a run directory
    (tmp_path / "run").mkdir()
    metrics_frame(ood_step=10**9).to_csv(tmp_path / "run" / "metrics.csv", index=False)
    stages = grokking_stages(tmp_path / "run", threshold=0.5)
    assert stages["reached"].tolist() == [True, True, False]
    assert (stages["verdict"] == "in-distribution").all() and not stages["three_stage"].any()
    assert stages["step"].isna().tolist() == [False, False, True]


def test_grokking_stages_errors():
    df = metrics_frame()
    several = pd.concat([df, df.assign(iterations=8)])
    with pytest.raises(ValueError, match="several iteration counts"):
        grokking_stages(several)
    assert grokking_stages(several, iterations=8, threshold=0.5)["step"].tolist() == [100, 1000, 5000]
    with pytest.raises(ValueError, match="no rows for split"):
        grokking_stages(df[df.split != "test_inferred_ood"])
    with pytest.raises(ValueError, match="threshold"):
        grokking_stages(df, threshold=1.5)
    with pytest.raises(FileNotFoundError):
        grokking_stages("/nonexistent/run")


# ---------------------------------------------------------------------------------------------------
# Schemas (column names and dtypes are a public API: the app reads them)
# ---------------------------------------------------------------------------------------------------
LENS_SCHEMA = [
    ("example", "int64"), ("target", "object"), ("target_token", "int64"), ("target_str", "object"),
    ("layer", "int64"), ("stage", "object"), ("iteration", "int64"), ("block", "int64"), ("position", "int64"),
    ("token", "int64"), ("token_str", "object"), ("is_readout", "bool"), ("rank", "int64"), ("prob", "float64"),
    ("logit", "float64"), ("margin", "float64"), ("entropy", "float64"), ("top_token", "int64"),
    ("top_str", "object"), ("top_prob", "float64"),
]
HOPS_SCHEMA = [
    ("example", "int64"), ("hops", "int64"), ("hop", "int64"), ("target", "object"), ("target_token", "int64"),
    ("resolved", "bool"), ("layer", "Int64"), ("stage", "object"), ("iteration", "Int64"), ("block", "Int64"),
    ("position", "Int64"), ("depth_fraction", "float64"), ("final_rank", "int64"),
]
HOP_SUMMARY_SCHEMA = [
    ("hops", "int64"), ("hop", "int64"), ("target", "object"), ("n", "int64"), ("n_resolved", "int64"),
    ("fraction_resolved", "float64"), ("fraction_never", "float64"), ("iteration_mean", "float64"),
    ("iteration_median", "float64"), ("layer_mean", "float64"), ("depth_fraction_mean", "float64"),
]
HOP_DISTRIBUTION_SCHEMA = [
    ("hops", "int64"), ("hop", "int64"), ("target", "object"), ("resolved", "bool"), ("iteration", "Int64"),
    ("count", "int64"), ("fraction", "float64"),
]
ATTENTION_SCHEMA = [
    ("example", "int64"), ("layer", "int64"), ("stage", "object"), ("iteration", "int64"), ("block", "int64"),
    ("head", "int64"), ("query_position", "int64"), ("key_position", "int64"), ("query_token", "int64"),
    ("key_token", "int64"), ("key_str", "object"), ("weight", "float64"),
]
OVERTHINKING_SCHEMA = [
    ("example", "int64"), ("hops", "int64"), ("n_iterations", "int64"), ("target_token", "int64"),
    ("prediction", "int64"), ("correct", "bool"), ("rank", "int64"), ("prob", "float64"), ("logit", "float64"),
    ("margin", "float64"), ("entropy", "float64"),
]
OVERTHINKING_SUMMARY_SCHEMA = [
    ("hops", "int64"), ("n_examples", "int64"), ("max_iterations", "int64"), ("peak_iteration", "int64"),
    ("peak_margin", "float64"), ("final_margin", "float64"), ("margin_decay", "float64"),
    ("margin_decay_per_iteration", "float64"), ("accuracy_peak_iteration", "int64"), ("peak_accuracy", "float64"),
    ("final_accuracy", "float64"), ("accuracy_decay", "float64"),
]
GROKKING_SCHEMA = [
    ("stage", "object"), ("phase", "object"), ("split", "object"), ("threshold", "float64"), ("reached", "bool"),
    ("step", "Int64"), ("epoch", "float64"), ("accuracy", "float64"), ("max_accuracy", "float64"),
    ("final_accuracy", "float64"), ("gap_steps", "Int64"), ("verdict", "object"), ("three_stage", "bool"),
]


def schema(df: pd.DataFrame) -> list[tuple[str, str]]:
    return [(c, str(t)) for c, t in df.dtypes.items()]


def test_schemas_are_pinned():
    model = random_model()
    answers, bridges = torch.tensor([2, 3, 4]), torch.tensor([[5], [-1], [1]])
    assert schema(logit_lens(model, TOKENS, answers, progress=False)) == LENS_SCHEMA
    located = locate_hops(model, TOKENS, answers, bridges, progress=False)
    assert schema(located) == HOPS_SCHEMA
    assert schema(resolve_hops(planted_lens())) == HOPS_SCHEMA
    assert schema(summarize_hops(located)) == HOP_SUMMARY_SCHEMA
    assert schema(hop_resolution_distribution(located)) == HOP_DISTRIBUTION_SCHEMA
    assert schema(attention_by_iteration(model, TOKENS, progress=False)) == ATTENTION_SCHEMA
    curves = overthinking(model, TOKENS, answers, max_iterations=3, progress=False)
    assert schema(curves) == OVERTHINKING_SCHEMA
    assert schema(overthinking_summary(curves)) == OVERTHINKING_SUMMARY_SCHEMA
    assert schema(grokking_stages(metrics_frame())) == GROKKING_SCHEMA


# ---------------------------------------------------------------------------------------------------
# Bad arguments, model safety, devices, figures
# ---------------------------------------------------------------------------------------------------
def test_bad_arguments_give_clear_errors():
    model = random_model()
    _, cache = model.run_with_cache(TOKENS, n_iterations=2)
    with pytest.raises(ValueError, match="holds a run of 2 iterations"):
        logit_lens(model, TOKENS, n_iterations=3, cache=cache, progress=False)
    with pytest.raises(ValueError, match="holds 3 queries"):
        logit_lens(model, TOKENS[:2], cache=cache, progress=False)
    with pytest.raises(ValueError, match="positions"):
        logit_lens(model, TOKENS, positions="some", progress=False)
    with pytest.raises(ValueError, match="one token id per query"):
        logit_lens(model, TOKENS, torch.tensor([1, 2]), progress=False)
    with pytest.raises(ValueError, match="max_iterations"):
        overthinking(model, TOKENS, torch.tensor([1, 2, 3]), max_iterations=0, progress=False)
    with pytest.raises(ValueError, match="queries"):
        attention_by_iteration(model, TOKENS, queries="first", progress=False)
    model.vocab = None
    with pytest.raises(ValueError, match="vocab"):
        logit_lens(model, ["e0 r1"], progress=False)
    with pytest.raises(ValueError, match="vocab"):
        logit_lens(model, TOKENS, entities_only=True, progress=False)


class Boom(RuntimeError):
    pass


def test_functions_never_mutate_the_model():
    model = random_model()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    answers = torch.tensor([2, 3, 4])
    logit_lens(model, TOKENS, answers, n_iterations=5, progress=False)
    locate_hops(model, TOKENS, answers, progress=False)
    attention_by_iteration(model, TOKENS, n_iterations=7, progress=False)
    overthinking(model, TOKENS, answers, max_iterations=4, progress=False)
    assert model.training and model.cfg.n_iterations == 3
    assert not any(hp.fwd_hooks or hp.bwd_hooks for hp in model.hook_dict.values())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    # hooks removed and train mode restored even when an analysis fails half-way
    original = model.unembed.forward

    def fail(*args, **kwargs):
        raise Boom("unembed failed")

    model.unembed.forward = fail
    try:
        with pytest.raises(Boom):
            attention_by_iteration(model, TOKENS, progress=False)  # fails inside run_with_cache's hooks
        with pytest.raises(Boom):
            logit_lens(model, TOKENS, progress=False)
    finally:
        model.unembed.forward = original
    assert model.training and not any(hp.fwd_hooks for hp in model.hook_dict.values())


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_runs_on_the_model_device(device):
    model = random_model().to(device)
    answers = torch.tensor([2, 3, 4])
    lens = logit_lens(model, TOKENS, answers, progress=False)  # CPU tokens are moved to the model's device
    assert len(lens) == 3 * 7
    assert len(overthinking(model, TOKENS, answers, max_iterations=2, progress=False)) == 6
    assert len(attention_by_iteration(model, TOKENS, progress=False)) > 0


def test_figures():
    model = random_model()
    answers, bridges = torch.tensor([2, 3, 4]), torch.tensor([[5], [-1], [1]])
    lens = logit_lens(model, TOKENS, hop_targets(answers, bridges), positions="all", progress=False)
    fig = plots.logit_lens_heatmap(lens, value="prob", target="answer")
    assert isinstance(fig, go.Figure) and fig.layout.coloraxis.cmin == 0 and fig.layout.coloraxis.cmax == 1
    assert fig.layout.xaxis.title.text and fig.layout.yaxis.title.text
    assert fig.data[0].z.shape == (3, 7)
    assert plots.logit_lens_heatmap(lens, value="margin", example=0).layout.coloraxis.cmid == 0
    assert len(plots.logit_lens_lines(lens).data) == 2
    located = locate_hops(model, TOKENS, answers, bridges, progress=False)
    assert len(plots.hop_resolution_figure(located).data) >= 1
    curves = overthinking(model, TOKENS, answers, max_iterations=3, progress=False)
    assert plots.overthinking_figure(curves, value="accuracy").layout.yaxis.title.text
    att = attention_by_iteration(model, TOKENS, progress=False)
    fig = plots.attention_heatmap(att, example=0)
    assert len(fig.data) == 2 and fig.layout.coloraxis.colorscale[0][1] == go.Figure(
        go.Heatmap(z=[[0]], colorscale=plots.SEQUENTIAL_COLORSCALE)).data[0].colorscale[0][1]
    stages = grokking_stages(metrics_frame())
    fig = plots.grokking_figure(metrics_frame(), stages)
    assert len(fig.data) == 3 and fig.layout.xaxis.type == "log"
    assert plots.ACCURACY_COLORSCALE == plots.SEQUENTIAL_COLORSCALE
    with pytest.raises(ValueError, match="needs columns"):
        plots.patching_heatmap(lens)
