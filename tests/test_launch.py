"""analyses.launch: the launcher interface (local, Ray), the Ray extra's install hint, the dry-run GPU-time
plan read from the measured throughput, and (slow, real Ray on a local 2-CPU instance) a grid on Ray equal
to the local grid, also when a worker process is killed mid-run."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
from looplens.analyses import launch
from looplens.analyses.cli import main
from looplens.models.train import preset


def _job(tmp_path: Path, name: str, launcher=None, **sets) -> launch.RunJob:
    cfg = preset("smoke-composition").with_overrides([f"{k.replace('__', '.')}={v}" for k, v in sets.items()])
    return (launcher or launch.LocalLauncher()).job(name, tmp_path / "runs" / name, cfg)


# -------------------------------------------------------------------------------------------------
# Fast: the interface, errors, the plan
# -------------------------------------------------------------------------------------------------
def test_ray_missing_gives_the_install_hint(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    with pytest.raises(launch.LaunchError, match=r"pip install 'looplens\[ray\]'"):
        launch.make_launcher("ray")
    assert main(["reproduce", "--preset", "smoke", "--out", str(tmp_path / "r"), "--launcher", "ray"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install 'looplens[ray]'" in err
    assert not (tmp_path / "r").exists()
    # a dry run only plans: it needs no Ray
    assert main(["reproduce", "--preset", "smoke", "--out", str(tmp_path / "r"), "--launcher", "ray", "--dry-run"]) == 0


def test_bad_launcher_arguments():
    with pytest.raises(ValueError, match="--address is for --launcher ray"):
        launch.make_launcher("local", address="auto")
    with pytest.raises(ValueError, match="--jobs must be a positive integer"):
        launch.make_launcher("local", jobs=0)
    with pytest.raises(ValueError, match="--gpus-per-run"):
        launch.RunJob.of("x", "x", preset("smoke-composition"), gpus=1.5)


def test_job_resources_follow_the_config_and_the_launcher(tmp_path):
    cfg = preset("smoke-composition").with_overrides(["run.threads=2", "run.device=cuda"])
    job = launch.LocalLauncher().job("a", tmp_path / "a", cfg)
    assert (job.cpus, job.gpus) == (2.0, 1.0) and job.run_dir.is_absolute()
    job = launch.RayLauncher(gpus_per_run=0.25, cpus_per_run=1).job("a", tmp_path / "a", cfg)
    assert (job.cpus, job.gpus) == (1.0, 0.25)
    assert launch.LocalLauncher().job("a", tmp_path / "a", preset("smoke-composition")).gpus == 0.0


@pytest.mark.slow
def test_local_launcher_trains_skips_finished_and_reports(tmp_path):
    jobs = [_job(tmp_path, "a", run__max_steps=20), _job(tmp_path, "b", run__max_steps=30)]
    lines, done = [], []
    results = launch.LocalLauncher().run(jobs, log=lines.append, progress=False,
                                         on_done=lambda job, res: done.append(job.name))
    assert [(r.name, r.status, r.step, r.stop_reason) for r in results] == [
        ("a", "trained", 20, "max_steps"), ("b", "trained", 30, "max_steps")]
    assert done == ["a", "b"] and "2 runs (2 trained, 0 skipped" in lines[-1]
    metrics = (tmp_path / "runs" / "a" / "metrics.csv").read_bytes()
    again = launch.LocalLauncher().run(jobs, log=lines.append, progress=False)
    assert [r.status for r in again] == ["skipped", "skipped"]
    assert (tmp_path / "runs" / "a" / "metrics.csv").read_bytes() == metrics
    assert "finished earlier (step 20, max_steps), skipped" in "\n".join(lines)
    # the two runs share one dataset, built once by the driver before any run started
    built = [line for line in lines if line.startswith("dataset ")]
    assert len(built) == 1 and "built once" in built[0] and lines.index(built[0]) == 0
    assert [p.name for p in (tmp_path / "runs" / ".datasets").iterdir()] == [built[0].split()[1].rstrip(":")]


def test_a_worker_that_cannot_see_out_refuses_to_train(tmp_path):
    job = _job(tmp_path, "a")
    job.run_dir.parent.mkdir(parents=True)
    with pytest.raises(launch.LaunchError, match="is not visible from worker .*every node mounts"):
        launch._worker(job.config, str(job.run_dir), ".looplens-shared-missing", "")
    assert not job.run_dir.exists()


@pytest.mark.slow
def test_a_grid_worker_ignores_torchrun_variables(tmp_path, monkeypatch):
    job = _job(tmp_path, "a", run__max_steps=10)
    job.run_dir.parent.mkdir(parents=True)
    (job.run_dir.parent / ".marker").write_text("")
    monkeypatch.setenv("WORLD_SIZE", "2")  # e.g. a PyTorch-job pod: the run must not wait for a peer
    monkeypatch.setenv("RANK", "0")
    info = launch._worker(job.config, str(job.run_dir), ".marker", "")
    assert info["step"] == 10 and info["attempts"] == 1 and "WORLD_SIZE" not in os.environ


def _throughput_file(tmp_path: Path, steps_per_s: float) -> Path:
    path = tmp_path / "throughput.json"
    path.write_text(json.dumps({"machine": {"cuda": "Test GPU"}, "results": [
        {"preset": "paper-composition", "device": "cuda", "steps_per_s": steps_per_s}]}))
    return path


def test_paper_dry_run_prints_gpu_hours_from_the_measured_throughput(monkeypatch, capsys, tmp_path):
    measured = launch.load_throughput()  # the shipped H100 measurement
    assert measured["preset"] == "paper-composition" and measured["steps_per_s"] > 0
    monkeypatch.setattr(launch, "THROUGHPUT_FILE", _throughput_file(tmp_path, 10.0))
    assert main(["reproduce", "--preset", "paper", "--launcher", "ray", "--dry-run", "--out", str(tmp_path / "p")]) == 0
    out = capsys.readouterr().out
    assert "at 10 steps/s for paper-composition on Test GPU" in out
    max_steps = preset("paper-composition").run.max_steps
    line = next(x for x in out.splitlines() if x.strip().startswith("comp-r4 "))
    assert f"{max_steps / 10 / 3600:.1f} GPU-h" in line  # the preset itself: exactly max_steps / measured rate
    r8 = next(x for x in out.splitlines() if x.strip().startswith("comp-r8 "))
    assert f"{2 * max_steps / 10 / 3600:.1f} GPU-h" in r8  # twice the layers run per step: twice the time
    assert "(at most)" in next(x for x in out.splitlines() if x.strip().startswith("depth-r4 "))
    total = sum(float(x.split("GPU-h")[0].split()[-1]) for x in launch_rows(out))
    printed = float(out.split("total: ")[1].split(" GPU-hours")[0].replace(",", ""))
    assert printed == pytest.approx(total, abs=0.1 * len(launch_rows(out)))  # the sum of the rows (each rounded)
    assert not (tmp_path / "p").exists()


def launch_rows(out: str) -> list[str]:
    return [x for x in out.splitlines() if "GPU-h" in x and "steps/s  " in x]


def test_time_capped_runs_are_priced_at_their_cap(tmp_path):
    thr = {"preset": "paper-composition", "steps_per_s": 10.0, "gpu": "G", "file": "f"}
    job = launch.RayLauncher(gpus_per_run=0.5).job(
        "c", tmp_path / "c", preset("paper-composition").with_overrides(["run.time_budget_minutes=90"]))
    (row,) = launch.plan_table([job], thr)
    assert row["hours"] == pytest.approx(1.5) and row["gpu_hours"] == pytest.approx(0.75) and row["bound"] == "time cap"


def test_grokking_speed_dry_run_lists_the_grid(capsys, tmp_path):
    assert main(["study", "grokking-speed", "--out", str(tmp_path / "g"), "--base", "smoke-composition",
                 "--interventions", "lr-half", "--seeds", "0,1", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.count("  run ") == 4 and "run lr-half-s1: looplens train --preset smoke-composition" in out
    assert "total:" in out and not (tmp_path / "g").exists()


def test_submitit_requeue_resubmits_the_same_run(tmp_path, monkeypatch):
    import submitit  # the dev extra installs it

    run = launch.SubmititRun()
    args = ({"run": {}}, str(tmp_path / "runs" / "a"), ".marker", "/")
    again = run.checkpoint(*args)  # what SLURM preemption or a time limit requeues
    assert isinstance(again, submitit.helpers.DelayedSubmission) and again.function is run and again.args == args
    assert launch.make_launcher("submitit").cluster is None  # submitit picks SLURM where sbatch exists
    assert launch.make_launcher("submitit", address="local").cluster == "local"
    assert launch.make_launcher("submitit", address="gpu").partition == "gpu"
    monkeypatch.setitem(sys.modules, "submitit", None)
    with pytest.raises(launch.LaunchError, match=r"pip install 'looplens\[submitit\]'"):
        launch.make_launcher("submitit", address="local")


@pytest.mark.slow
def test_submitit_local_jobs_equal_local_runs(tmp_path):
    def jobs(root: Path, launcher):
        return [_job(root, f"r{seed}", launcher, run__max_steps=30, run__seed=seed) for seed in (0, 1)]

    launch.LocalLauncher().run(jobs(tmp_path / "local", None), progress=False)
    launcher = launch.make_launcher("submitit", address="local")
    lines = []
    results = launcher.run(jobs(tmp_path / "sub", launcher), log=lines.append)
    assert sorted(r.name for r in results if r.status == "trained") == ["r0", "r1"]
    assert any(line.startswith("submitit: 2 jobs submitted to local") for line in lines)
    _same_runs(tmp_path / "local", tmp_path / "sub", ["r0", "r1"])
    assert list((tmp_path / "sub" / "runs" / ".submitit").iterdir())  # the jobs' logs


# -------------------------------------------------------------------------------------------------
# Slow: real Ray, a local 2-CPU instance
# -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ray_local():
    import ray  # the dev extra installs it (scripts/test.sh)

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


def _grid_args(out: Path, launcher: str) -> list[str]:
    return ["study", "grokking-speed", "--out", str(out), "--base", "smoke-composition", "--interventions",
            "weight-decay-1,lr-half,zero-init", "--seeds", "0", "--max-steps", "40", "--quiet", "--launcher", launcher]


def _same_runs(a: Path, b: Path, names) -> None:
    for name in names:
        assert (a / "runs" / name / "metrics.csv").read_bytes() == (b / "runs" / name / "metrics.csv").read_bytes(), name
        sa, sb = (json.loads((d / "runs" / name / "summary.json").read_text()) for d in (a, b))
        assert sa["final_accuracy"] == sb["final_accuracy"] and sa["final_step"] == sb["final_step"]


@pytest.mark.slow
def test_smoke_grid_on_ray_equals_local(ray_local, tmp_path):
    assert main(_grid_args(tmp_path / "local", "local")) == 0
    assert main(_grid_args(tmp_path / "ray", "ray")) == 0
    names = ["weight-decay-1-s0", "lr-half-s0", "zero-init-s0", "control-s0"]
    _same_runs(tmp_path / "local", tmp_path / "ray", names)
    records = {n: json.loads((tmp_path / "ray" / "runs" / launch.RECORDS / f"{n}.json").read_text()) for n in names}
    assert {r["pid"] for r in records.values()} - {os.getpid()}  # trained in Ray worker processes
    drop = ["run", "wall_seconds", "steps_per_second", "seconds_to_id", "seconds_to_ood"]
    local, ray = (pd.read_csv(tmp_path / d / "runs.csv").drop(columns=drop) for d in ("local", "ray"))
    pd.testing.assert_frame_equal(local, ray)
    assert not list((tmp_path / "ray" / "runs").glob(".looplens-shared-*"))  # the storage marker is cleaned up
    # the same command again: every run had finished, none is sent to Ray or touched
    summaries = {n: (tmp_path / "ray" / "runs" / n / "summary.json").stat().st_mtime_ns for n in names}
    assert main(_grid_args(tmp_path / "ray", "ray")) == 0
    assert summaries == {n: (tmp_path / "ray" / "runs" / n / "summary.json").stat().st_mtime_ns for n in names}
    assert all(json.loads((tmp_path / "ray" / "runs" / launch.RECORDS / f"{n}.json").read_text())["attempt"] == 1
               for n in names)


@pytest.mark.slow
def test_killed_worker_is_retried_and_the_grid_matches(ray_local, tmp_path):
    def jobs(root: Path, launcher):
        return [_job(root, "victim", launcher, run__max_steps=500),
                *[_job(root, f"r{seed}", launcher, run__max_steps=40, run__seed=seed) for seed in (1, 2, 3)]]

    straight = tmp_path / "straight"
    launch.LocalLauncher().run(jobs(straight, None), progress=False)

    out = tmp_path / "ray"
    killed = []

    def kill_mid_run():  # SIGKILL the victim's worker once it has saved a state at step 48 or later
        record, summary = out / "runs" / launch.RECORDS / "victim.json", out / "runs" / "victim" / "summary.json"
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not killed:
            try:
                s = json.loads(summary.read_text())
                if s["status"] == "running" and s["final_step"] >= 48:
                    pid = json.loads(record.read_text())["pid"]
                    os.kill(pid, signal.SIGKILL)
                    killed.append((pid, s["final_step"]))
            except (FileNotFoundError, json.JSONDecodeError, KeyError):
                pass
            time.sleep(0.02)

    watcher = threading.Thread(target=kill_mid_run, daemon=True)
    watcher.start()
    launcher = launch.RayLauncher(max_retries=2)
    lines = []
    results = {r.name: r for r in launcher.run(jobs(out, launcher), log=lines.append)}
    watcher.join(timeout=5)
    assert killed, "the victim finished before the watcher could kill its worker"
    victim = results["victim"]
    assert victim.status == "trained" and victim.step == 500 and victim.attempts == 2
    assert json.loads((out / "runs" / launch.RECORDS / "victim.json").read_text())["pid"] != killed[0][0]
    resumes = json.loads((out / "runs" / "victim" / "config.json").read_text())["resumes"]
    assert len(resumes) == 1 and resumes[0]["step"] >= 48  # resumed from its last saved state, not from scratch
    assert "1 retried after a worker died" in lines[-1] and "attempt 2" in "\n".join(lines)
    _same_runs(straight, out, ["victim", "r1", "r2", "r3"])
