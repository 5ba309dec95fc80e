"""interp.activation_patching and make_patching_pairs: agreement with transformer_lens.patching and with
manual patches, full patches restore the clean run, batching does not change results, errors."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from looplens.data import DataConfig, Vocab, build_dataset, load_dataset, make_world
from looplens.interp import activation_patching, logit_diff, make_patching_pairs
from looplens.interp.plots import DIVERGING_COLORSCALE, patching_heatmap
from looplens.models import LoopedConfig, LoopedTransformer
from transformer_lens import patching

N_ENT, N_REL = 6, 3


def model_with(**kw) -> LoopedTransformer:
    base = dict(d_vocab=1 + N_ENT + N_REL, n_ctx=4, d_model=16, n_heads=2, n_blocks=2, n_iterations=3, seed=0)
    base.update(kw)
    model = LoopedTransformer(LoopedConfig(**base))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.4
                    + (1.0 if p.ndim == 1 and p.shape[0] == model.cfg.d_model else 0.0))
    model.vocab = Vocab(N_ENT, N_REL)
    return model.eval()


# "e0 r0 r1" / "e1 r0 r1", "e2 r2 r0" / "e3 r2 r0", "e4 r1" / "e5 r1" (right-padded)
CLEAN = torch.tensor([[1, 7, 8], [3, 9, 7], [5, 8, 0]])
CORRUPT = torch.tensor([[2, 7, 8], [4, 9, 7], [6, 8, 0]])
CLEAN_ANS = torch.tensor([4, 5, 6])
CORRUPT_ANS = torch.tensor([1, 2, 3])
READOUT = torch.tensor([2, 2, 1])

CONFIGS = {
    "looped": {},
    "vanilla": {"n_blocks": 4, "n_iterations": 1},
    "injection": {"input_injection": "add"},
    "feedback": {"feedback": 1.0},
    "prelude_coda": {"n_prelude": 1, "n_coda": 1, "positional": "none"},
}


def tl_metric(model, T):
    """The normalised logit difference as a scalar metric of full logits, for transformer_lens.patching."""
    clean_ld = logit_diff(model.predict(CLEAN, n_iterations=T), CLEAN_ANS, CORRUPT_ANS).mean()
    corrupt_ld = logit_diff(model.predict(CORRUPT, n_iterations=T), CLEAN_ANS, CORRUPT_ANS).mean()

    def metric(logits):
        ld = logit_diff(logits[torch.arange(3), READOUT], CLEAN_ANS, CORRUPT_ANS).mean()
        return (ld - corrupt_ld) / (clean_ld - corrupt_ld)

    return metric


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.slow
def test_agrees_with_transformer_lens_patching(config):
    model = model_with(**CONFIGS[config])
    T = model.cfg.n_iterations
    n_layers = model.cfg.n_layers
    _, cache = model.run_with_cache(CLEAN, n_iterations=T)
    metric = tl_metric(model, T)
    cases = [
        ("resid_pre", True, patching.get_act_patch_resid_pre, (n_layers, 3)),
        ("attn_out", True, patching.get_act_patch_attn_out, (n_layers, 3)),
        ("mlp_out", True, patching.get_act_patch_mlp_out, (n_layers, 3)),
        ("z", True, patching.get_act_patch_attn_head_out_by_pos, (n_layers, 3, 2)),
        ("z", False, patching.get_act_patch_attn_head_out_all_pos, (n_layers, 2)),
    ]
    for hook, by_position, tl_fn, shape in cases:
        ours = activation_patching(model, CLEAN, CORRUPT, CLEAN_ANS, CORRUPT_ANS, hook=hook, by_position=by_position,
                                   clean_cache=cache if hook != "mlp_out" else None, batch_size=20, progress=False)
        with model.iterations(T):
            want = tl_fn(model, CORRUPT, cache, metric)
        assert want.shape == shape
        got = torch.tensor(ours["effect"].to_numpy(), dtype=torch.float32).view(shape)
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    assert model.cfg.n_iterations == T


def test_equals_a_one_cell_manual_patch():
    model = model_with()
    T = 4  # more iterations than the model's default
    _, cache = model.run_with_cache(CLEAN, n_iterations=T)
    clean_ld = logit_diff(model.predict(CLEAN, n_iterations=T), CLEAN_ANS, CORRUPT_ANS)
    corrupt_ld = logit_diff(model.predict(CORRUPT, n_iterations=T), CLEAN_ANS, CORRUPT_ANS)
    for hook, name, layer, pos, head in [
        ("resid_post", "hook_resid_post", 5, 1, -1), ("resid_mid", "hook_resid_mid", 2, 0, -1),
        ("z", "attn.hook_z", 6, 2, 1),
    ]:
        full = f"blocks.{layer}.{name}"

        def patch(x, hook, full=full, pos=pos, head=head):
            x = x.clone()
            if head < 0:
                x[:, pos] = cache[full][:, pos]
            else:
                x[:, pos, head] = cache[full][:, pos, head]
            return x

        with torch.no_grad():
            logits = model.run_with_hooks(CORRUPT, n_iterations=T,
                                          fwd_hooks=[(f"loop.{layer // 2}.blocks.{layer % 2}.{name}", patch)])
        ld = logit_diff(logits[torch.arange(3), READOUT], CLEAN_ANS, CORRUPT_ANS)
        expected = float((ld.mean() - corrupt_ld.mean()) / (clean_ld.mean() - corrupt_ld.mean()))
        df = activation_patching(model, CLEAN, CORRUPT, CLEAN_ANS, CORRUPT_ANS, hook=hook, n_iterations=T,
                                 layers=[layer], positions=[pos], heads=None if head < 0 else [head], progress=False)
        assert len(df) == 1 and df["effect"].iloc[0] == pytest.approx(expected, abs=1e-5)
        row = df.iloc[0]
        assert (row["iteration"], row["block"], row["position"], row["head"]) == (layer // 2, layer % 2, pos, head)
        per = activation_patching(model, CLEAN, CORRUPT, CLEAN_ANS, CORRUPT_ANS, hook=hook, n_iterations=T,
                                  layers=[layer], positions=[pos], heads=None if head < 0 else [head],
                                  per_example=True, progress=False)
        np.testing.assert_allclose(per["metric"], ld.numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(per["effect"], ((ld - corrupt_ld) / (clean_ld - corrupt_ld)).numpy(), rtol=1e-3, atol=1e-4)


def test_patching_everything_from_clean_gives_the_clean_output():
    model = model_with()
    for hook in ("resid_pre", "resid_post"):
        df = activation_patching(model, CLEAN, CORRUPT, CLEAN_ANS, CORRUPT_ANS, hook=hook, by_position=False,
                                 progress=False)
        assert (df["position"] == -1).all() and len(df) == 6
        np.testing.assert_allclose(df["effect"], 1.0, atol=1e-5)
        np.testing.assert_allclose(df["metric"], df["clean_metric"], atol=1e-5)
    # the readout position's last residual decides the output alone
    df = activation_patching(model, CLEAN, CORRUPT, CLEAN_ANS, CORRUPT_ANS, hook="resid_post", layers=[5],
                             per_example=True, progress=False)
    at_readout = df[df["position"] == df["pair"].map(dict(enumerate(READOUT.tolist())))]
    np.testing.assert_allclose(at_readout["effect"], 1.0, atol=1e-5)
    # positions after a query's readout (its padding) never matter
    pad = df[(df["pair"] == 2) & (df["position"] == 2)]
    np.testing.assert_allclose(pad["effect"], 0.0, atol=1e-5)


def test_batching_does_not_change_results_and_progress_is_off():
    model = model_with()
    one = activation_patching(model, CLEAN, CORRUPT, CLEAN_ANS, CORRUPT_ANS, hook="z", batch_size=1, progress=False)
    many = activation_patching(model, CLEAN, CORRUPT, CLEAN_ANS, CORRUPT_ANS, hook="z", batch_size=10_000,
                               progress=False)
    pd.testing.assert_frame_equal(one, many, check_exact=False, atol=1e-5, rtol=1e-4)
    assert len(one) == 6 * 3 * 2


def test_pairs_frame_strings_and_default_corrupted_answers():
    world = make_world("permutation", N_ENT, N_REL, seed=0)
    pairs = make_patching_pairs(world, 16, hops=2, corrupt="head", seed=1)
    model = model_with()
    from_frame = activation_patching(model, pairs, layers=[0, 3], progress=False)
    from_strings = activation_patching(model, pairs["clean"].tolist(), pairs["corrupted"].tolist(),
                                       pairs["clean_answer"].tolist(), pairs["corrupted_answer"].tolist(),
                                       layers=[0, 3], progress=False)
    pd.testing.assert_frame_equal(from_frame, from_strings)
    assert from_frame["n_pairs"].iloc[0] == len(pairs)
    default = activation_patching(model, CLEAN, CORRUPT, CLEAN_ANS, layers=[0], progress=False)
    explicit = activation_patching(model, CLEAN, CORRUPT, CLEAN_ANS, model.predict(CORRUPT).argmax(-1),
                                   layers=[0], progress=False)
    pd.testing.assert_frame_equal(default, explicit)


@pytest.mark.parametrize("kind", ["permutation", "random-tail"])
def test_make_patching_pairs_from_a_world(kind):
    world = make_world(kind, 20, 5, out_degree=3, seed=0)
    for corrupt, position in [("head", None), ("relation", 1), ("relation", 3)]:
        pairs = make_patching_pairs(world, 40, hops=3, corrupt=corrupt, position=position, seed=2)
        assert 20 <= len(pairs) <= 40 and pairs["pair"].tolist() == list(range(len(pairs)))
        vocab = Vocab(20, 5)
        for col, ans in (("clean", "clean_answer"), ("corrupted", "corrupted_answer")):
            tokens = torch.tensor(pairs[f"{col}_tokens"].tolist())
            assert torch.equal(tokens, vocab.encode_batch(pairs[col].tolist())[0])
            ids = tokens.numpy()
            answers, _ = world.follow(ids[:, 0] - 1, ids[:, 1:] - 1 - 20)  # the chains exist in the world
            assert (answers + 1 == pairs[ans + "_token"].to_numpy()).all()
            assert pairs[ans].tolist() == [f"e{a}" for a in answers]
        assert (pairs["clean_answer"] != pairs["corrupted_answer"]).all()
        diff = np.array(pairs["clean_tokens"].tolist()) != np.array(pairs["corrupted_tokens"].tolist())
        expected = 0 if corrupt == "head" else position
        assert (diff.sum(1) == 1).all() and (diff.argmax(1) == expected).all()
        assert (pairs["position"] == expected).all()
    again = make_patching_pairs(world, 40, hops=3, seed=2)
    pd.testing.assert_frame_equal(again, make_patching_pairs(world, 40, hops=3, seed=2))


def test_make_patching_pairs_from_a_dataset_split(tmp_path):
    cfg = DataConfig(task="depth", world="permutation", n_entities=8, n_relations=2, max_hops=3, per_hop_train=6,
                     per_hop_test=2, eval_max=4)
    ds = load_dataset(build_dataset(cfg, tmp_path / "ds"))
    pairs = make_patching_pairs(ds, 10, hops=2, corrupt="relation", position=2, split="train")
    train = set(ds.rows("train")["query"])
    assert set(pairs["clean"]) <= train and len(pairs) <= 6
    with pytest.raises(ValueError, match="no 5-hop"):
        make_patching_pairs(ds, 10, hops=5, split="train")


def test_patching_errors():
    model = model_with()
    with pytest.raises(ValueError, match="unknown hook"):
        activation_patching(model, CLEAN, CORRUPT, CLEAN_ANS, CORRUPT_ANS, hook="resid_pree", progress=False)
    with pytest.raises(ValueError, match="same shape"):
        activation_patching(model, CLEAN, CORRUPT[:, :2], CLEAN_ANS, CORRUPT_ANS, progress=False)
    with pytest.raises(ValueError, match="same lengths"):
        activation_patching(model, CLEAN, torch.tensor([[2, 7, 8], [4, 9, 0], [6, 8, 0]]), CLEAN_ANS, CORRUPT_ANS,
                            progress=False)
    with pytest.raises(ValueError, match="outside the run"):
        activation_patching(model, CLEAN, CORRUPT, CLEAN_ANS, CORRUPT_ANS, iterations=[3], progress=False)
    with pytest.raises(ValueError, match="virtual layers"):
        activation_patching(model, CLEAN, CORRUPT, CLEAN_ANS, CORRUPT_ANS, layers=[6], progress=False)
    with pytest.raises(ValueError, match="heads only applies"):
        activation_patching(model, CLEAN, CORRUPT, CLEAN_ANS, CORRUPT_ANS, heads=[0], progress=False)
    with pytest.raises(ValueError, match="one token id per query"):
        activation_patching(model, CLEAN, CORRUPT, CLEAN_ANS[:2], CORRUPT_ANS, progress=False)
    with pytest.raises(ValueError, match="not both"):
        activation_patching(model, make_patching_pairs(make_world("permutation", N_ENT, N_REL), 4), CORRUPT,
                            progress=False)
    _, cache = model.run_with_cache(CLEAN, n_iterations=2)
    with pytest.raises(ValueError, match="holds a run of 2 iterations"):
        activation_patching(model, CLEAN, CORRUPT, CLEAN_ANS, CORRUPT_ANS, clean_cache=cache, n_iterations=3,
                            progress=False)
    with pytest.raises(ValueError, match="corrupt"):
        make_patching_pairs(make_world("permutation", N_ENT, N_REL), 4, corrupt="tail")
    with pytest.raises(ValueError, match="position"):
        make_patching_pairs(make_world("permutation", N_ENT, N_REL), 4, corrupt="relation", position=3)


def test_hooks_removed_and_mode_restored_when_the_metric_fails():
    model = model_with()
    model.train()
    calls = []

    def metric(logits, clean, corrupted):
        calls.append(logits.shape[0])
        if len(calls) > 2:  # the two baselines pass, the first patched pass fails with hooks attached
            raise RuntimeError("metric failed")
        return logit_diff(logits, clean, corrupted)

    with pytest.raises(RuntimeError, match="metric failed"):
        activation_patching(model, CLEAN, CORRUPT, CLEAN_ANS, CORRUPT_ANS, metric=metric, progress=False)
    assert model.training and model.cfg.n_iterations == 3
    assert not any(hp.fwd_hooks for hp in model.hook_dict.values())


PATCH_SCHEMA = [
    ("hook", "object"), ("layer", "int64"), ("stage", "object"), ("iteration", "int64"), ("block", "int64"),
    ("position", "int64"), ("head", "int64"), ("effect", "float64"), ("metric", "float64"),
    ("clean_metric", "float64"), ("corrupted_metric", "float64"), ("n_pairs", "int64"),
]
PATCH_EXAMPLE_SCHEMA = [
    ("hook", "object"), ("pair", "int64"), ("layer", "int64"), ("stage", "object"), ("iteration", "int64"),
    ("block", "int64"), ("position", "int64"), ("head", "int64"), ("effect", "float64"), ("metric", "float64"),
    ("clean_metric", "float64"), ("corrupted_metric", "float64"),
]
PAIRS_SCHEMA = [
    ("pair", "int64"), ("hops", "int64"), ("corrupt", "object"), ("position", "int64"), ("clean", "object"),
    ("corrupted", "object"), ("clean_answer", "object"), ("corrupted_answer", "object"), ("clean_tokens", "object"),
    ("corrupted_tokens", "object"), ("clean_answer_token", "int64"), ("corrupted_answer_token", "int64"),
]


def test_schemas_and_figure():
    model = model_with()
    schema = lambda df: [(c, str(t)) for c, t in df.dtypes.items()]  # noqa: E731
    df = activation_patching(model, CLEAN, CORRUPT, CLEAN_ANS, CORRUPT_ANS, hook="z", progress=False)
    assert schema(df) == PATCH_SCHEMA
    per = activation_patching(model, CLEAN, CORRUPT, CLEAN_ANS, CORRUPT_ANS, per_example=True, progress=False)
    assert schema(per) == PATCH_EXAMPLE_SCHEMA
    assert schema(make_patching_pairs(make_world("permutation", N_ENT, N_REL), 4)) == PAIRS_SCHEMA
    fig = patching_heatmap(df)
    assert fig.layout.coloraxis.cmid == 0 and (fig.layout.coloraxis.cmin, fig.layout.coloraxis.cmax) == (-1, 1)
    assert fig.data[0].z.shape == (3 * 2, 6) and DIVERGING_COLORSCALE == "RdBu"
    assert "layer" in fig.layout.xaxis.title.text
