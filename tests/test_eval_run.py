"""Evaluation: the batched multi-iteration readout, evaluate() on a run, and `looplens eval`."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from looplens.analyses.cli import main
from looplens.models import LoopedConfig, LoopedTransformer
from looplens.models.train import evaluate, format_tables, load_run, preset, train
from looplens.models.train.evaluate_run import EVAL_COLUMNS
from looplens.models.train.evaluation import EvalSet, evaluate_set, parse_range, readout_per_iteration


@pytest.fixture(scope="module")
def depth_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "depth"
    train(preset("smoke-depth").with_overrides(["run.max_steps=100"]), out, progress=False)
    return out


@pytest.mark.parametrize("n_coda, injection", [(0, "none"), (0, "add"), (1, "none")])
def test_readout_per_iteration_matches_separate_runs(n_coda, injection):
    cfg = LoopedConfig(d_vocab=30, n_ctx=6, d_model=16, n_heads=2, n_blocks=2, n_iterations=3, seed=0,
                       n_coda=n_coda, n_prelude=1, input_injection=injection)
    model = LoopedTransformer(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():  # off the identity-ish init so iterations differ
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.2)
    tokens = torch.tensor([[1, 21, 22, 0, 0], [3, 24, 25, 26, 27], [5, 23, 0, 0, 0]])
    model(tokens, n_iterations=2)  # leave the model bound to another iteration count
    out = readout_per_iteration(model, tokens, [1, 4, 7])
    for t, logits in out.items():
        torch.testing.assert_close(logits, model.predict(tokens, n_iterations=t), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_evaluate_set_groups_and_counts(depth_run):
    run = load_run(depth_run)
    ds = run.dataset
    evalset = EvalSet.build({"test": ds.encode("test")}, batch_size=5, max_hops=3)
    model = run.load_model()
    rows = evaluate_set(model, evalset, [1, 4])
    assert {(r["split"], r["hops"]) for r in rows} == {("test", 2), ("test", 3)}
    assert all(r["n"] == 8 for r in rows) and len(rows) == 4
    enc = ds.encode("test")
    mask = enc.hops == 3
    expected = (model.predict(enc.tokens[mask], n_iterations=4).argmax(-1) == enc.answers[mask]).double().mean()
    got = next(r["accuracy"] for r in rows if r["hops"] == 3 and r["iterations"] == 4)
    assert got == pytest.approx(float(expected))
    assert model.training is False


@pytest.mark.slow
def test_evaluate_run_fixed_and_halting(depth_run):
    df = evaluate(depth_run, iterations=range(1, 7), hops=[2, 3], halting="kl+entropy", eps=0.01, entropy=3.0,
                  max_iterations=6)
    assert tuple(df.columns) == EVAL_COLUMNS
    fixed, halt = df[df.method == "fixed"], df[df.method != "fixed"]
    assert sorted(set(fixed.iterations)) == [1, 2, 3, 4, 5, 6]
    assert set(df.hops) == {2, 3} and set(df.split) == {"test", "train_eval"}
    assert (halt.iterations == 6).all() and halt.mean_iterations.between(2, 6).all()
    assert set(halt.method) == {"kl<0.01&H<3"}
    assert (df.step == load_run(depth_run).resolve_step()).all()
    # the fixed-count accuracies agree with what training logged at the same step
    m = load_run(depth_run).metrics
    step = int(df.step.iloc[0])
    logged = m[(m.step == step) & (m.split == "test") & (m.iterations == 4) & (m.hops == 2)].accuracy.item()
    assert fixed[(fixed.split == "test") & (fixed.hops == 2) & (fixed.iterations == 4)].accuracy.item() == pytest.approx(logged, abs=1e-6)
    text = format_tables(df)
    assert "test" in text and "adaptive halting" in text


@pytest.mark.slow
def test_eval_cli_writes_csv_and_prints_tables(depth_run, tmp_path, capsys):
    assert main(["eval", str(depth_run), "--iterations", "1:4", "--hops", "2:3", "--checkpoint", "64"]) == 0
    printed = capsys.readouterr().out
    assert "accuracy by split and hops" in printed
    written = depth_run / "eval" / "step_64.csv"
    frame = pd.read_csv(written)
    assert tuple(frame.columns) == EVAL_COLUMNS and (frame.step == 64).all()
    out = tmp_path / "h.csv"
    assert main(["eval", str(depth_run), "--halting", "kl+entropy", "--max-iterations", "5", "--out", str(out),
                 "--quiet"]) == 0
    assert (pd.read_csv(out).method != "fixed").any()
    assert main(["eval", str(depth_run), "--checkpoint", "7"]) == 2
    assert "no checkpoint at step 7" in capsys.readouterr().err
    assert main(["eval", str(depth_run), "--iterations", "4:2"]) == 2
    assert main(["eval", str(tmp_path / "nothing")]) == 2


def test_parse_range():
    assert parse_range("1:3,8", "--iterations") == [1, 2, 3, 8]
    with pytest.raises(ValueError, match="--hops"):
        parse_range("a:b", "--hops")
    with pytest.raises(ValueError):
        parse_range("0:2", "--iterations")
