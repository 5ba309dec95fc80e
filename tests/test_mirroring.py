"""Stage mirroring (interp/mirroring.py): linear CKA and logit-lens agreement between a looped model's
iterations and a vanilla twin's layers."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from looplens.interp import linear_cka, mirroring_heatmap, mirroring_summary, stage_mirroring
from looplens.interp.mirroring import MIRRORING_COLUMNS
from looplens.models import LoopedConfig, LoopedTransformer

CFG = LoopedConfig(d_vocab=11, n_ctx=4, d_model=16, n_heads=2, n_blocks=1, n_iterations=3, seed=0, init_std=0.3)


def tokens(n: int = 40) -> torch.Tensor:
    t = torch.randint(1, CFG.d_vocab, (n, CFG.n_ctx), generator=torch.Generator().manual_seed(2))
    t[: n // 2, -1] = 0  # right padding
    return t


def unrolled_twin(looped: LoopedTransformer, T: int) -> LoopedTransformer:
    """A vanilla model of T blocks x 1 iteration, every block carrying the looped core block: the looped
    model *is* this feed-forward model, so its iterations re-enact the twin's layers exactly."""
    twin = LoopedTransformer(looped.cfg.replace(n_blocks=T, n_iterations=1))
    state = {k: v for k, v in looped.state_dict().items() if not k.startswith(("core.", "blocks.", "loop."))}
    for t in range(T):
        state.update({k.replace("core.0.", f"core.{t}.", 1): v for k, v in looped.state_dict().items()
                      if k.startswith("core.0.")})
    missing, unexpected = twin.load_state_dict(state, strict=False)
    assert not [m for m in missing if m.startswith("core.")] and not unexpected
    return twin.eval()


def test_linear_cka_matches_the_gram_matrix_definition():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(30, 5, generator=g), torch.randn(30, 7, generator=g)
    h = torch.eye(30, dtype=torch.float64) - 1 / 30  # centring matrix
    k, l = h @ (x.double() @ x.double().T) @ h, h @ (y.double() @ y.double().T) @ h
    reference = float((k * l).sum() / ((k * k).sum() * (l * l).sum()).sqrt())  # HSIC form, Kornblith et al.
    assert linear_cka(x, y) == pytest.approx(reference, rel=1e-9)
    assert linear_cka(x, y) == pytest.approx(linear_cka(y, x), rel=1e-12)
    q, _ = torch.linalg.qr(torch.randn(5, 5, generator=g))
    assert linear_cka(x, 2.5 * x @ q - 3) == pytest.approx(1.0, abs=1e-9)  # rotation, scale, shift invariant
    assert 0.0 <= linear_cka(x, y) < 0.6
    with pytest.raises(ValueError, match="same rows"):
        linear_cka(x, y[:10])


@pytest.mark.parametrize("positions", ["readout", "all"])
def test_an_unrolled_twin_mirrors_the_loop_exactly(positions):
    looped = LoopedTransformer(CFG).eval()
    twin = unrolled_twin(looped, 3)
    df = stage_mirroring(looped, twin, tokens(), positions=positions, embed=True, progress=False)
    assert list(df.columns) == list(MIRRORING_COLUMNS) and dict(df.dtypes.astype(str)) == {
        k: "object" if v is object else v for k, v in MIRRORING_COLUMNS.items()}
    assert len(df) == 4 * 4  # (embed + 3 iterations) x (embed + 3 layers)
    n_valid = int((tokens() != 0).sum()) if positions == "all" else 40
    assert (df["n_rows"] == n_valid).all()
    diag = df[df["looped_layer"] == df["vanilla_layer"]]
    assert diag["cka"].to_numpy() == pytest.approx(1.0, abs=1e-6)
    assert (diag["lens_agreement"] == 1.0).all()
    off = df[df["looped_layer"] != df["vanilla_layer"]]
    assert off["cka"].max() < 0.999  # the layers are distinguishable: the diagonal is informative
    summary = mirroring_summary(df)
    assert summary["best_vanilla_layer"].tolist() == summary["looped_layer"].tolist()


def test_an_unrelated_twin_does_not_mirror():
    looped = LoopedTransformer(CFG).eval()
    other = LoopedTransformer(CFG.replace(n_blocks=3, n_iterations=1, seed=7)).eval()
    df = stage_mirroring(looped, other, tokens(), n_iterations=4, progress=False)
    assert sorted(df["looped_layer"].unique()) == [0, 1, 2, 3]  # n_iterations overrides the default
    assert df["cka"].between(0, 1).all() and df["lens_agreement"].between(0, 1).all()
    assert df["cka"].max() < 0.99


def test_heatmap_and_errors():
    looped = LoopedTransformer(CFG).eval()
    df = stage_mirroring(looped, unrolled_twin(looped, 2), tokens(8), n_iterations=2, progress=False)
    fig = mirroring_heatmap(df, "lens_agreement")
    assert list(fig.data[0].y) == ["t0.b0", "t1.b0"] and list(fig.data[0].x) == ["t0.b0", "t0.b1"]
    assert fig.data[0].zmin == 0 and fig.data[0].zmax == 1
    pd.testing.assert_frame_equal(
        pd.DataFrame(fig.data[0].z), pd.DataFrame(df.pivot(index="looped_layer", columns="vanilla_layer",
                                                           values="lens_agreement").to_numpy()))
    with pytest.raises(ValueError, match="value must be one of"):
        mirroring_heatmap(df, "prob")
    with pytest.raises(ValueError, match="different vocabularies"):
        stage_mirroring(looped, LoopedTransformer(CFG.replace(d_vocab=12)), tokens(4), progress=False)
    with pytest.raises(ValueError, match="positions must be one of"):
        stage_mirroring(looped, looped, tokens(4), positions="last", progress=False)
    with pytest.raises(ValueError, match="expected a stage_mirroring frame"):
        mirroring_summary(pd.DataFrame({"x": [1]}))


def test_a_wrapped_foreign_model_mirrors_its_looplens_import():
    from looplens.models import wrap_looped

    class Tiny(torch.nn.Module):  # a foreign loop: one residual MLP block, looped R times
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.emb, self.ln_f = torch.nn.Embedding(11, 8), torch.nn.LayerNorm(8)
            self.blocks = torch.nn.ModuleList([torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh())])
            self.lm_head, self.R = torch.nn.Linear(8, 11, bias=False), 3

        def forward(self, x):
            h = self.emb(x)
            for _ in range(self.R):
                for block in self.blocks:
                    h = h + block(h)
            return self.lm_head(self.ln_f(h))

    wrapped = wrap_looped(Tiny().eval(), n_iterations=3, embed="emb", iterations_attr="R")
    df = stage_mirroring(wrapped, wrapped, tokens(), progress=False)
    diag = df[df["looped_layer"] == df["vanilla_layer"]]
    assert diag["cka"].to_numpy() == pytest.approx(1.0, abs=1e-6) and (diag["lens_agreement"] == 1).all()


@pytest.mark.slow
def test_shipped_runs_study_numbers():
    """The study in docs/foreign.md ("Stage mirroring on the shipped runs"): recomputed, its claims checked."""
    from looplens.analyses import shipped_run_path
    from looplens.models.train import load_run

    runs = [load_run(shipped_run_path() / name) for name in ("looped", "vanilla")]
    looped, vanilla = (run.load_model() for run in runs)
    enc = runs[0].dataset.encode("test_inferred_id")
    df = stage_mirroring(looped, vanilla, enc.tokens, embed=True, entities_only=True, progress=False)
    cka = df.pivot(index="looped_layer", columns="vanilla_layer", values="cka")
    agree = df.pivot(index="looped_layer", columns="vanilla_layer", values="lens_agreement")
    # iteration 0 looks like the vanilla model's first three layers (and the embedding), not its last
    assert cka.loc[0, [0, 1, 2]].min() > 0.85 and cka.loc[0, 3] < 0.5
    # iterations 1..3 are closest to the vanilla model's last layer, and decode to the same answers
    assert (cka.loc[[1, 2, 3]].idxmax(axis=1) == 3).all()
    assert agree.loc[[1, 2, 3], 3].min() > 0.99
    # no diagonal: iteration t is not most like vanilla layer t for t = 1, 2
    assert cka.loc[1, 1] < cka.loc[1, 3] and cka.loc[2, 2] < cka.loc[2, 3]
