"""End-to-end training on CPU: smoke runs, the run directory, exact resume (also after kill -9),
the curriculum, stop conditions and the `looplens train` CLI (in-process)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from looplens.analyses.cli import main
from looplens.models.checkpoint import read_sidecar
from looplens.models.train import METRICS_COLUMNS, load_run, preset, train
from looplens.models.train import trainer as trainer_module
from looplens.models.train.trainer import Trainer

HEADER = "step,epoch,stage,split,hops,iterations,accuracy,loss,n\n"
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "smoke"
    result = train(preset("smoke-composition"), out, progress=False)
    return out, result


@pytest.mark.slow
def test_smoke_run_learns_and_writes_the_run_directory(smoke_run):
    out, result = smoke_run
    assert result.step == 300 and result.stop_reason == "max_steps"
    for name in ("config.json", "metrics.csv", "summary.json", "checkpoints/state_latest.pt"):
        assert (out / name).is_file(), name
    text = (out / "metrics.csv").read_text()
    assert text.startswith(HEADER)
    metrics = load_run(out).metrics
    assert tuple(metrics.columns) == METRICS_COLUMNS
    train_rows = metrics[metrics.split == "train_batch"]
    assert len(train_rows) == 30 and train_rows.step.tolist() == list(range(10, 301, 10))
    assert train_rows.loss.iloc[-3:].mean() < 0.6 * train_rows.loss.iloc[:3].mean()  # the loss falls
    assert train_rows.accuracy.iloc[-3:].mean() > 0.3
    evals = metrics[metrics.split != "train_batch"]
    assert set(evals.split) == {"id_atomic", "ood_atomic", "train_inferred", "test_inferred_id", "test_inferred_ood",
                                "test_inferred_first_ood", "test_inferred_second_ood"}
    assert sorted(set(evals.step)) == [0, 50, 100, 150, 200, 250, 300]
    assert sorted(set(evals.iterations)) == [1, 2, 4]
    assert set(evals[evals.split.str.contains("atomic")].hops) == {1} and set(evals[evals.split.str.contains("inferred")].hops) == {2}


@pytest.mark.slow
def test_checkpoints_sidecars_and_provenance(smoke_run):
    out, _ = smoke_run
    run = load_run(out)
    assert run.checkpoints == [0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 300]
    side = read_sidecar(out / "checkpoints" / "step_128")
    assert side["step"] == 128 and side["seed"] == 0 and side["stage"] == 0
    assert side["dataset_checksum"] == run.dataset.checksum and side["epoch"] > 0
    meta = json.loads((out / "config.json").read_text())
    for key in ("looplens_version", "git_sha", "torch_version", "seed", "device"):
        assert key in meta["provenance"], key
    assert meta["config"] == preset("smoke-composition").to_dict()
    summary = run.summary
    assert summary["status"] == "finished" and summary["final_step"] == 300
    assert run.resolve_step() == 300 and run.resolve_step("final") == 300
    with pytest.raises(ValueError, match="no checkpoint at step 5"):
        run.load_model(5)


@pytest.mark.slow
def test_final_model_reproduces_logged_accuracy(smoke_run):
    out, _ = smoke_run
    run = load_run(out)
    model = run.load_model("final")
    assert model.vocab is not None
    enc = run.dataset.encode("train_inferred")
    acc = (model.predict(enc.tokens, n_iterations=2).argmax(-1) == enc.answers).double().mean().item()
    m = run.metrics
    logged = m[(m.step == 300) & (m.split == "train_inferred") & (m.iterations == 2)].accuracy.item()
    assert acc == pytest.approx(logged, abs=1e-6)


RESUME_OVERRIDES = [
    "run.max_steps=60", "eval.every=25", "run.log_every=7", "optim.grokfast_lambda=2.0", "optim.orthograd=true",
    "model.dropout=0.1", "recurrence.mode=poisson", "recurrence.mean=2", "recurrence.min=1", "recurrence.max=4",
    "optim.schedule=cosine", "optim.decay_steps=50", "optim.grad_clip=1.0",
]


def _same_weights(a: Path, b: Path, step: int) -> bool:
    wa = load_run(a).load_model(step).state_dict()
    wb = load_run(b).load_model(step).state_dict()
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.slow
def test_resume_is_bit_identical(tmp_path):
    cfg = preset("smoke-composition").with_overrides(RESUME_OVERRIDES)
    train(cfg, tmp_path / "straight", progress=False)
    first = train(cfg.with_overrides(["run.max_steps=30"]), tmp_path / "split", progress=False)
    assert first.step == 30
    # rows a crash could leave behind after the last saved state must not survive a resume
    with open(tmp_path / "split" / "metrics.csv", "a") as fh:
        fh.write("31,9.9,0,garbage,2,1,0.5,0.5,1\n32,9.9,0,garb")
    second = train(cfg, tmp_path / "split", resume=True, progress=False)  # run.max_steps may change
    assert second.step == 60
    assert (tmp_path / "straight" / "metrics.csv").read_bytes() == (tmp_path / "split" / "metrics.csv").read_bytes()
    assert _same_weights(tmp_path / "straight", tmp_path / "split", 60)
    # the Grokfast EMA is part of the saved state and survives the resume
    sa = torch.load(tmp_path / "straight" / "checkpoints" / "state_latest.pt", weights_only=True)
    sb = torch.load(tmp_path / "split" / "checkpoints" / "state_latest.pt", weights_only=True)
    assert sa["grokfast"] and sa["grokfast"].keys() == sb["grokfast"].keys()
    assert all(torch.equal(sa["grokfast"][k], sb["grokfast"][k]) for k in sa["grokfast"])
    assert sa["step"] == sb["step"] == 60
    # a resume that would change what is computed is refused, naming the key
    with pytest.raises(ValueError, match="optim.lr"):
        train(cfg.with_overrides(["optim.lr=0.1"]), tmp_path / "split", resume=True, progress=False)


def test_grokfast_state_is_restored_not_restarted(tmp_path):
    cfg = preset("smoke-composition").with_overrides(["run.max_steps=20", "optim.grokfast_lambda=5.0",
                                                      "eval.every=10", "run.save_every=10"])
    train(cfg, tmp_path / "r", progress=False)
    trainer = Trainer(cfg.with_overrides(["run.max_steps=30"]), tmp_path / "r", False, None)
    trainer.metrics = trainer_module.MetricsLog(trainer.paths.metrics)
    trainer.load_state()
    saved = torch.load(tmp_path / "r" / "checkpoints" / "state_latest.pt", weights_only=True)["grokfast"]
    assert trainer.grokfast.ema.keys() == saved.keys()
    assert all(torch.equal(trainer.grokfast.ema[k], saved[k]) for k in saved)
    assert any(float(v.abs().sum()) > 0 for v in saved.values())


_KILL_SCRIPT = """
import sys, time
from looplens.models.train import preset, train
from looplens.models.train.trainer import Trainer
original = Trainer.train_step
def slow(self):
    time.sleep(0.03)
    original(self)
Trainer.train_step = slow
cfg = preset("smoke-composition").with_overrides(sys.argv[2:])
train(cfg, sys.argv[1], progress=False)
"""


@pytest.mark.slow
def test_kill_9_then_resume_matches_an_uninterrupted_run(tmp_path):
    overrides = ["run.max_steps=80", "eval.every=10", "run.save_every=5", "run.log_every=3"]
    cfg = preset("smoke-composition").with_overrides(overrides)
    train(cfg, tmp_path / "straight", progress=False)
    out = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", _KILL_SCRIPT, str(out), *overrides], env=env, cwd=ROOT)
    try:
        state = out / "checkpoints" / "state_latest.pt"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            if state.exists() and len(load_run(out).checkpoints) >= 7:  # past step 6: mid-run
                break
            time.sleep(0.05)
        time.sleep(0.37)  # somewhere between two saves
        assert proc.poll() is None, "the training process ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    killed_at = torch.load(out / "checkpoints" / "state_latest.pt", weights_only=True)["step"]
    assert 0 < killed_at < 80
    result = train(None, out, resume=True, progress=False)
    assert result.step == 80
    assert (tmp_path / "straight" / "metrics.csv").read_bytes() == (out / "metrics.csv").read_bytes()
    assert _same_weights(tmp_path / "straight", out, 80)


# --------------------------------------------------------------------------------------------------
# Curriculum
# --------------------------------------------------------------------------------------------------
def _scripted_eval(passing_hops: set[int]):
    """A stand-in for evaluate_set: test accuracy 0.99 at the listed hop counts, 0.5 elsewhere."""

    def fake(model, evalset, iterations, **kwargs):
        rows = []
        for split, hops in evalset.groups:
            for t in iterations:
                acc = 0.99 if (split == "test" and hops in passing_hops) else 0.5
                rows.append({"split": split, "hops": hops, "iterations": t, "accuracy": acc, "loss": 1.0, "n": 8,
                             "mean_iterations": float(t)})
        return rows

    return fake


@pytest.mark.slow
def test_curriculum_advances_and_records_learnable_depth(tmp_path, monkeypatch):
    monkeypatch.setattr(trainer_module, "evaluate_set", _scripted_eval({2, 3, 4}))
    cfg = preset("smoke-depth").with_overrides(["curriculum.stage_budget=200", "eval.every=50"])
    trainer = Trainer(cfg, tmp_path / "c", False, None)
    pools = []
    original = trainer_module.Trainer._new_batch_sampler

    def spy(self):
        sampler = original(self)
        pools.append((self.stage, sorted({int(h) for c in sampler.cyclers for h in self.train_hops[c.rows]})))
        return sampler

    monkeypatch.setattr(trainer_module.Trainer, "_new_batch_sampler", spy)
    trainer.batches = trainer._new_batch_sampler()
    result = trainer.run(resume=False)
    assert result.stop_reason == "curriculum_complete" and result.learnable_depth == 4
    assert result.step == 150  # stages 2, 3, 4 pass at the evaluations of steps 50, 100, 150
    assert pools == [(2, [1, 2]), (3, [1, 2, 3]), (4, [1, 2, 3, 4])]
    m = load_run(tmp_path / "c").metrics
    passed = m[m.split == "stage_passed"]
    assert passed[["step", "hops"]].values.tolist() == [[50, 2], [100, 3], [150, 4]]
    assert sorted(set(m[m.split == "test"].stage)) == [2, 3, 4]
    assert m.epoch.is_monotonic_increasing  # epochs add up over stages (each stage has a new sampler)
    summary = json.loads((tmp_path / "c" / "summary.json").read_text())
    assert summary["learnable_depth"] == 4 and summary["status"] == "finished"


@pytest.mark.slow
def test_curriculum_stops_when_a_stage_exhausts_its_budget(tmp_path, monkeypatch):
    monkeypatch.setattr(trainer_module, "evaluate_set", _scripted_eval({2}))
    cfg = preset("smoke-depth").with_overrides(["curriculum.stage_budget=200", "eval.every=50"])
    result = train(cfg, tmp_path / "b", progress=False)
    assert result.stop_reason == "stage_budget" and result.learnable_depth == 2
    assert result.step == 250  # stage 3 starts at step 50 and gets 200 steps
    # resuming a run that ended for good trains no further
    again = train(None, tmp_path / "b", resume=True, progress=False)
    assert again.step == 250


@pytest.mark.slow
def test_curriculum_advances_on_real_training_and_evaluation(tmp_path):
    """No stand-in evaluation: a real model is trained and evaluated. Held-out chains cannot be learned
    in seconds by composition (small worlds are memorised, not composed), so the test chains are added
    to the training rows here: the stages then pass as soon as the model has memorised each depth."""
    cfg = preset("smoke-depth")
    trainer = Trainer(cfg, tmp_path / "leak", False, None)
    train_split, test_split = trainer.dataset.encode("train"), trainer.dataset.encode("test")
    width = train_split.tokens.shape[1]
    trainer.train_tokens = torch.cat([train_split.tokens, test_split.tokens[:, :width]])
    trainer.train_answers = torch.cat([train_split.answers, test_split.answers])
    trainer.train_hops = torch.cat([train_split.hops, test_split.hops]).numpy()
    trainer.train_lengths = torch.cat([train_split.lengths, test_split.lengths]).numpy()
    trainer.batches = trainer._new_batch_sampler()
    result = trainer.run(resume=False)
    assert result.stop_reason == "curriculum_complete" and result.learnable_depth == 4
    m = load_run(tmp_path / "leak").metrics
    passed = m[m.split == "stage_passed"]
    assert passed.hops.tolist() == [2, 3, 4] and (passed.accuracy > cfg.curriculum.threshold).all()
    for _, row in passed.iterrows():  # each pass is backed by the logged test accuracy at that step
        logged = m[(m.step == row.step) & (m.split == "test") & (m.hops == row.hops) & (m.iterations == 4)]
        assert logged.accuracy.item() == pytest.approx(row.accuracy, abs=1e-6)
    first_eval = m[(m.step == 0) & (m.split == "test") & (m.iterations == 4)]
    assert (first_eval.accuracy < 0.5).all()  # nothing was known before training


# --------------------------------------------------------------------------------------------------
# Stops and the run directory
# --------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_stop_on_target_accuracy_and_time_budget(tmp_path):
    cfg = preset("smoke-composition").with_overrides(["run.stop_split=id_atomic", "run.stop_accuracy=0.0"])
    result = train(cfg, tmp_path / "t", progress=False)
    assert result.stop_reason == "target_accuracy" and result.step == cfg.eval.every
    cfg = preset("smoke-composition").with_overrides(["run.time_budget_minutes=0"])
    result = train(cfg, tmp_path / "b", progress=False)
    assert result.stop_reason == "time_budget" and result.step == 0
    assert json.loads((tmp_path / "b" / "summary.json").read_text())["status"] == "stopped"


def test_existing_run_directory_is_never_overwritten(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--preset", "smoke-composition", "--out", str(out), "--quiet", "--max-steps", "3"]
    assert main(args) == 0
    before = (out / "metrics.csv").read_bytes()
    assert main(args) == 2
    assert "already exists" in capsys.readouterr().err
    assert (out / "metrics.csv").read_bytes() == before
    assert main([*args, "--overwrite", "--max-steps", "2"]) == 0
    assert load_run(out).summary["final_step"] == 2
    stranger = tmp_path / "not-a-run"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("keep me")
    assert main(["train", "--preset", "smoke-composition", "--out", str(stranger), "--overwrite", "--quiet"]) == 2
    assert (stranger / "notes.txt").read_text() == "keep me"


@pytest.mark.filterwarnings("error")
def test_cli_train_resume_and_errors(tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["train", "--list-presets"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert any(line.startswith("tiny-composition ") for line in listed) and len(listed) >= 9
    assert main(["train", "--preset", "smoke-composition", "--out", str(out), "--quiet", "--max-steps", "20",
                 "--seed", "3", "--set", "eval.every=10", "--set", "optim.batch_size=32"]) == 0
    printed = capsys.readouterr().out
    assert "step 20 (max_steps)" in printed
    saved = load_run(out).config
    assert saved.run.seed == 3 and saved.optim.batch_size == 32 and saved.eval.every == 10
    assert main(["train", "--out", str(out), "--resume", "--quiet", "--max-steps", "30"]) == 0
    assert load_run(out).summary["final_step"] == 30
    assert main(["train", "--preset", "smoke-composition", "--out", str(tmp_path / "x"), "--set", "optim.lrate=1"]) == 2
    err = capsys.readouterr().err
    assert "optim.lrate" in err and "batch_size" in err
    assert main(["train", "--preset", "no-such-preset", "--out", str(tmp_path / "y")]) == 2
    assert "no-such-preset" in capsys.readouterr().err
    assert main(["train", "--out", str(tmp_path / "z")]) == 2
    assert main(["train", "--config", str(tmp_path / "missing.toml"), "--out", str(tmp_path / "z")]) == 2
    assert "missing.toml" in capsys.readouterr().err


def test_metrics_columns_are_exact_for_the_depth_task(tmp_path):
    cfg = preset("smoke-depth").with_overrides(["run.max_steps=20", "eval.every=10"])
    train(cfg, tmp_path / "d", progress=False)
    frame = pd.read_csv(tmp_path / "d" / "metrics.csv")
    assert list(frame.columns) == list(METRICS_COLUMNS)
    test_rows = frame[frame.split == "test"]
    assert sorted(set(test_rows.hops)) == [2, 3, 4]
    assert sorted(set(frame[frame.split == "train_eval"].hops)) == [1, 2, 3, 4]


@pytest.mark.slow
def test_supervise_from_hops_is_the_mean_of_per_iteration_answer_losses(tmp_path):
    """recurrence.supervise = "from_hops": a k-hop query's loss is the mean over iterations t >= k of the
    cross-entropy read after iteration t; it trains, and the run records the setting."""
    import torch.nn.functional as F

    cfg = preset("smoke-composition").with_overrides(["recurrence.supervise=from_hops", "run.max_steps=1"])
    trainer = Trainer(cfg, tmp_path / "t", progress=False, command=None)
    rows = trainer.batches.next_batch()
    tokens = trainer.train_tokens[torch.from_numpy(rows), : int(trainer.train_lengths[rows].max())]
    targets = trainer.train_answers[torch.from_numpy(rows)]
    T = cfg.train_iterations
    loss, last = trainer._loss_from_hops(tokens, targets, rows, T, None)
    hops = trainer.train_hops[rows]
    assert {1, 2} <= set(hops.tolist())  # both atomic and 2-hop queries in the batch
    with torch.no_grad():
        expected = []
        for i in range(len(rows)):
            ces = [F.cross_entropy(trainer.model.predict(tokens[i:i + 1], n_iterations=t), targets[i:i + 1])
                   for t in range(max(int(hops[i]), 1), T + 1)]
            expected.append(torch.stack(ces).mean())
        assert float(loss) == pytest.approx(float(torch.stack(expected).mean()), rel=1e-5)
        torch.testing.assert_close(last, trainer.model.predict(tokens, n_iterations=T))
    result = train(preset("smoke-composition").with_overrides(["recurrence.supervise=from_hops", "run.max_steps=60"]),
                   tmp_path / "run", progress=False)
    assert result.final["train_inferred"] > 0.0
    assert load_run(tmp_path / "run").config.recurrence.supervise == "from_hops"


def test_resuming_a_finished_run_changes_nothing(tmp_path):
    """A run that reached max_steps on an evaluation step, resumed with the same config, appends no rows
    (the saved state remembers that step's evaluation) and keeps its final accuracies."""
    cfg = preset("smoke-composition").with_overrides(["run.max_steps=40", "eval.every=20"])
    first = train(cfg, tmp_path / "r", progress=False)
    before = (tmp_path / "r" / "metrics.csv").read_bytes()
    again = train(cfg, tmp_path / "r", resume=True, progress=False)
    assert (tmp_path / "r" / "metrics.csv").read_bytes() == before
    assert again.step == first.step == 40 and again.final == first.final and again.final
