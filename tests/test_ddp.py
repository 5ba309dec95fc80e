"""One run on several processes: ``torchrun --nproc_per_node 2 -m looplens train`` (DDP, gloo on CPU) trains
the run one process trains with the same global batch, and its checkpoints resume with another world size.
The fast tests cover the helpers in one process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from looplens.models.train import distributed

# dynamic R (the draws must agree across ranks), from-hops supervision (the per-iteration forward through
# DDP), an odd global batch (unequal shards: 32 + 31 rows) and a constant lr after warmup
SETS = ["recurrence.mode=poisson", "recurrence.mean=3", "recurrence.min=1", "recurrence.max=4",
        "recurrence.supervise=from_hops", "optim.batch_size=63", "run.device=cpu", "run.threads=1",
        "eval.every=20"]


def _train(tmp: Path, out: str, nproc: int, *extra: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] \
        if nproc > 1 else [sys.executable]
    args = ["-m", "looplens", "train", "--out", out, "--quiet", *extra]
    done = subprocess.run([*launcher, *args], cwd=tmp, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def _fresh(tmp: Path, out: str, nproc: int, steps: int) -> str:
    sets = [a for s in SETS for a in ("--set", s)]
    return _train(tmp, out, nproc, "--preset", "smoke-composition", "--max-steps", str(steps), *sets)


def _metrics(path: Path) -> pd.DataFrame:
    return pd.read_csv(path / "metrics.csv")


def _assert_same_curve(a: pd.DataFrame, b: pd.DataFrame) -> None:
    assert len(a) == len(b) and (a["split"] == b["split"]).all() and (a["step"] == b["step"]).all()
    assert (a["iterations"] == b["iterations"]).all() and (a["n"] == b["n"]).all()
    train_a, train_b = a[a["split"] == "train_batch"], b[b["split"] == "train_batch"]
    assert len(train_a) >= 4
    np.testing.assert_allclose(train_b["loss"].to_numpy(), train_a["loss"].to_numpy(), rtol=1e-4)
    np.testing.assert_allclose(b["accuracy"].to_numpy(), a["accuracy"].to_numpy(), atol=0.02)


@pytest.mark.slow
def test_two_processes_train_the_single_process_run_and_resume_with_another_world_size(tmp_path):
    _fresh(tmp_path, "single", 1, 40)
    out = _fresh(tmp_path, "ddp", 2, 40)
    assert out.count("ddp: step 40 (max_steps)") == 1  # rank 0 alone reports
    single, ddp = _metrics(tmp_path / "single"), _metrics(tmp_path / "ddp")
    _assert_same_curve(single, ddp)
    assert (ddp[ddp["split"] == "train_batch"]["n"] == 63 * 10).all()  # the global batch's loss is logged
    assert single[single["split"] == "train_batch"]["iterations"].nunique() > 1  # R really was drawn per batch
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir()) == sorted(p.name for p in (tmp_path / "single").iterdir())

    # stopped at 25 steps by two processes, resumed to 40 by one: the single process's uninterrupted curve
    _fresh(tmp_path, "resumed", 2, 25)
    _train(tmp_path, "resumed", 1, "--resume", "--max-steps", "40")
    _assert_same_curve(single, _metrics(tmp_path / "resumed"))
    # and back: one process to 25, two processes from there
    _fresh(tmp_path, "resumed2", 1, 25)
    _train(tmp_path, "resumed2", 2, "--resume", "--max-steps", "40")
    _assert_same_curve(single, _metrics(tmp_path / "resumed2"))


def test_helpers_in_one_process(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    one = distributed.from_env()
    assert one == distributed.Dist(0, 1, 0) and one.is_main and not one.enabled
    rows = np.arange(7)
    assert (distributed.shard(one, rows) == rows).all() and distributed.loss_scale(one, 7, 7) == 1.0
    assert distributed.on_main(one, lambda: 5) == 5 and distributed.broadcast(one, [1]) == [1]
    assert distributed.any_rank(one, True, torch.device("cpu"))


def test_shards_cover_the_global_batch_and_scales_restore_its_mean():
    rows = np.arange(63)
    ranks = [distributed.Dist(r, 2, r) for r in range(2)]
    shards = [distributed.shard(d, rows) for d in ranks]
    assert sorted(np.concatenate(shards).tolist()) == rows.tolist() and [len(s) for s in shards] == [32, 31]
    # DDP averages the ranks' gradients: scaled local means must average to the global mean
    losses = np.random.default_rng(0).random(63)
    scaled = [losses[s].mean() * distributed.loss_scale(d, len(s), 63) for d, s in zip(ranks, shards)]
    assert np.mean(scaled) == pytest.approx(losses.mean())


def test_bad_torchrun_environment(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ValueError, match="RANK 2 / WORLD_SIZE 2"):
        distributed.from_env()
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(ValueError, match="must be integers"):
        distributed.from_env()
