"""Seed ensembles (issue 16.4): N seeds trained as one batched model write the run directories that
training each seed alone writes, equal within float tolerance; each seed directory resumes alone."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from looplens.analyses.cli import main
from looplens.models.train import load_run, preset, train
from looplens.models.train.ensemble import check_batchable, parse_seeds, train_ensemble

KEYS = ["step", "stage", "split", "hops", "iterations", "n"]
# The paper-recipe features that act per model (gradient clipping, OrthoGrad) or per slice (Grokfast),
# both losses, truncated backprop and readout feedback.
CONFIGS = {
    "from_hops+feedback+clip": ["model.feedback=1.0", "recurrence.supervise=from_hops", "optim.grad_clip=0.05",
                                "optim.schedule=cosine"],
    "last+orthograd+grokfast": ["optim.orthograd=true", "optim.grokfast_lambda=0.5", "recurrence.backprop_last=1",
                                "model.n_iterations=3", "optim.weight_decay=0.5"],
}


def _cfg(extra: list[str], steps: int = 8):
    return preset("smoke-composition").with_overrides(
        [f"run.max_steps={steps}", "eval.every=4", "run.log_every=2", "run.save_every=4", *extra])


def _assert_same_run(a, b, weight_atol: float = 2e-5) -> None:
    ma, mb = pd.read_csv(a / "metrics.csv"), pd.read_csv(b / "metrics.csv")
    assert ma[KEYS].equals(mb[KEYS])
    assert (ma["accuracy"] - mb["accuracy"]).abs().max() <= 1 / mb["n"].min() + 1e-9  # at most one answer flips
    assert ((ma["loss"] - mb["loss"]).abs() <= 1e-4 * (1 + mb["loss"].abs())).all()
    ra, rb = load_run(a), load_run(b)
    assert ra.summary["checkpoints"] == rb.summary["checkpoints"]
    assert ra.summary["stop_reason"] == rb.summary["stop_reason"]
    sa, sb = ra.load_model().state_dict(), rb.load_model().state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        torch.testing.assert_close(sa[name], sb[name], atol=weight_atol, rtol=1e-4, msg=name)


@pytest.mark.parametrize("name", [
    "from_hops+feedback+clip",
    pytest.param("last+orthograd+grokfast", marks=pytest.mark.slow),
])
def test_each_seed_equals_training_that_seed_alone(tmp_path, name):
    cfg = _cfg(CONFIGS[name])
    results = train_ensemble(cfg, [0, 3], tmp_path / "ens", progress=False)
    assert [r.path.name for r in results] == ["seed-0", "seed-3"]
    for seed in (0, 3):
        alone = tmp_path / f"alone-{seed}"
        train(cfg.with_overrides([f"run.seed={seed}"]), alone, progress=False)
        run_dir = tmp_path / "ens" / f"seed-{seed}"
        _assert_same_run(run_dir, alone)
        meta = json.loads((run_dir / "config.json").read_text())
        assert meta["config"]["run"]["seed"] == seed and meta["provenance"]["seed"] == seed
    # the seeds really differ (not one model written twice)
    w0 = load_run(tmp_path / "ens" / "seed-0").load_model().W_E
    w3 = load_run(tmp_path / "ens" / "seed-3").load_model().W_E
    assert not torch.allclose(w0, w3)


@pytest.mark.slow
def test_a_seed_directory_resumes_alone_like_an_uninterrupted_run(tmp_path):
    cfg = _cfg(CONFIGS["from_hops+feedback+clip"], steps=6)
    train_ensemble(cfg, [1, 2], tmp_path / "ens", progress=False)
    longer = cfg.with_overrides(["run.max_steps=10"])
    train(longer.with_overrides(["run.seed=2"]), tmp_path / "ens" / "seed-2", resume=True, progress=False)
    train(longer.with_overrides(["run.seed=2"]), tmp_path / "alone", progress=False)
    _assert_same_run(tmp_path / "ens" / "seed-2", tmp_path / "alone")


def test_looplens_train_seeds_writes_one_run_directory_per_seed(tmp_path, capsys):
    out = tmp_path / "E"
    assert main(["train", "--preset", "smoke-composition", "--seeds", "0-1", "--out", str(out),
                 "--max-steps", "2", "--quiet"]) == 0
    printed = capsys.readouterr().out
    for seed in (0, 1):
        run = load_run(out / f"seed-{seed}")
        assert run.summary["final_step"] == 2 and f"seed-{seed}: step 2" in printed
    with pytest.raises(FileExistsError, match="seed-0"):
        train_ensemble(preset("smoke-composition"), [0], out, progress=False)


def test_parse_seeds():
    assert parse_seeds("0-7") == list(range(8))
    assert parse_seeds("3") == [3]
    assert parse_seeds("0-2, 9") == [0, 1, 2, 9]
    for bad in ("", "a-b", "3-1", "-1", "1,1"):
        with pytest.raises(ValueError, match="--seeds"):
            parse_seeds(bad)


@pytest.mark.parametrize("override, words", [
    ("recurrence.mode=poisson", "recurrence.mode"),
    ("curriculum.enabled=true", "curriculum"),
    ("model.dropout=0.1", "dropout"),
])
def test_settings_an_ensemble_cannot_batch_fail_in_one_line(override, words):
    with pytest.raises(ValueError, match=words):
        check_batchable(preset("smoke-composition").with_overrides([override]))
