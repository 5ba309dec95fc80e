"""Launchers: where a grid's training runs execute (``--launcher local|ray``).

Every grid (``looplens reproduce``, ``looplens study grokking-speed``, any future one) describes its runs
as :class:`RunJob` s (a name, a run directory, a config and the resources one run needs) and hands them
to one :class:`Launcher`::

    launcher = make_launcher("ray", address="")          # "" starts a local Ray instance
    results = launcher.run(jobs, on_done=..., log=print)  # one JobResult per job, in completion order

Whatever the launcher, each run executes :func:`train_run` on some worker: a run that already ended is
left alone, a half-finished one resumes from its last saved state (the trainer replays exactly), a fresh
one starts. So a grid interrupted anywhere (the command killed, a Ray worker dying mid-run and retried)
ends with the same run directories an uninterrupted grid writes.

- ``local``: in this process, one run after another (progress bars on), or ``jobs`` > 1 spawned worker
  processes (what ``--jobs`` always did).
- ``ray``: one Ray task per run, declaring its CPUs and GPU fraction; a task whose worker dies is retried
  (``max_retries``) and resumes from the run's last checkpoint. Run directories are written by the
  workers straight under ``--out``, which must therefore be a path every worker can reach (a shared
  filesystem; docs/scale.md). Each task checks that before training and fails with a one-line error
  otherwise. Ray is an optional extra: ``pip install 'looplens[ray]'``.
- ``submitit``: one job per run (SLURM, or local processes), requeued on preemption or timeout and then
  resuming from the run's checkpoint; ``pip install 'looplens[submitit]'``.

This module imports neither torch, ray nor submitit at import time (the CLI imports it to add its flags).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LAUNCHERS = ("local", "ray", "submitit")
RAY_INSTALL_HINT = "--launcher ray needs Ray: pip install 'looplens[ray]' (or pip install ray==2.60.0)"
SUBMITIT_INSTALL_HINT = ("--launcher submitit needs submitit: pip install 'looplens[submitit]' "
                         "(or pip install submitit==1.5.4)")
# Where workers leave a small record of each attempt (host, pid, attempt): OUT/runs/.launch/NAME.json
RECORDS = ".launch"
THROUGHPUT_FILE = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "train_throughput_h100.json"
REFERENCE_PRESET = "paper-composition"


class LaunchError(ValueError):
    """A grid could not run as asked (Ray missing, storage not shared, runs failed): one line for the CLI."""


@dataclass(frozen=True)
class RunJob:
    """One training run of a grid: ``config`` is a ``TrainConfig.to_dict()`` (plain data, so it pickles
    cheaply to any worker); ``cpus`` and ``gpus`` are what one run needs (a GPU fraction packs several
    runs on one device)."""

    name: str
    run_dir: Path
    config: dict[str, Any]
    cpus: float = 1.0
    gpus: float = 0.0

    @classmethod
    def of(cls, name: str, run_dir: str | os.PathLike, cfg: Any, cpus: float | None = None,
           gpus: float | None = None) -> RunJob:
        """From a ``TrainConfig``. Defaults: ``run.threads`` CPUs (at least 1); one GPU when
        ``run.device`` is "cuda", none otherwise."""
        if cpus is None:
            cpus = float(max(cfg.run.threads, 1))
        if gpus is None:
            gpus = 1.0 if cfg.run.device == "cuda" else 0.0
        if cpus <= 0:
            raise ValueError(f"--cpus-per-run must be > 0, got {cpus}")
        if gpus < 0 or (gpus > 1 and gpus != int(gpus)):
            raise ValueError(f"--gpus-per-run must be a fraction in [0, 1] or a whole number, got {gpus}")
        return cls(name, Path(run_dir).resolve(), cfg.to_dict(), float(cpus), float(gpus))


@dataclass
class JobResult:
    """What became of one job. ``status``: "trained" (trained or resumed here) or "skipped" (it had
    ended before). ``seconds``: the run's wall time on its worker (last attempt); ``attempts``: how many
    times a worker started it in this grid (> 1 when a worker died and the task was retried)."""

    name: str
    run_dir: Path
    status: str
    step: int
    stop_reason: str
    seconds: float = 0.0
    attempts: int = 1
    host: str = ""

    def line(self) -> str:
        if self.status == "skipped":
            return f"{self.name}: finished earlier (step {self.step}, {self.stop_reason}), skipped"
        where = f" on {self.host}" if self.host else ""
        retried = f", attempt {self.attempts} (resumed after a worker died)" if self.attempts > 1 else ""
        return f"{self.name}: step {self.step} ({self.stop_reason}) in {self.seconds:.1f} s{where}{retried}"


def summary_line(results: Sequence[JobResult], seconds: float, launcher: str) -> str:
    trained = sum(r.status == "trained" for r in results)
    skipped = sum(r.status == "skipped" for r in results)
    retried = sum(r.attempts > 1 for r in results)
    return (f"{launcher}: {len(results)} runs ({trained} trained, {skipped} skipped as finished, "
            f"{retried} retried after a worker died) in {seconds:.1f} s")


# ---------------------------------------------------------------------------------------------------
# What every worker runs
# ---------------------------------------------------------------------------------------------------
def run_ended(run_dir: str | os.PathLike) -> bool:
    """Whether ``run_dir`` holds a run that stopped on its own (finished, or stopped by its time cap)."""
    from looplens.models.train import load_run

    run_dir = Path(run_dir)
    return (run_dir / "config.json").exists() and load_run(run_dir).ended


def train_run(config: dict[str, Any], run_dir: str | os.PathLike, progress: bool = False) -> dict[str, Any]:
    """Train, resume or leave alone one run; returns {"step", "stop_reason", "trained", "seconds"}.

    A run that ended (max_steps, a final stop, its time cap) is not trained again: resuming it would
    evaluate again or train another time budget. A run with a config.json resumes from its last saved
    state (or starts over when killed before the first one); a directory without one (killed before
    the trainer wrote anything useful) is removed and trained from scratch.
    """
    from looplens.models.train import TrainConfig, load_run, train

    run_dir = Path(run_dir)
    t0 = time.monotonic()
    if (run_dir / "config.json").exists():
        run = load_run(run_dir)
        if run.ended:
            summary = run.summary
            return {"step": int(summary["final_step"]), "stop_reason": summary.get("stop_reason") or "",
                    "trained": False, "seconds": 0.0}
        result = train(TrainConfig.from_dict(config), run_dir, resume=True, progress=progress)
    else:
        if run_dir.exists():
            shutil.rmtree(run_dir)
        result = train(TrainConfig.from_dict(config), run_dir, progress=progress)
    return {"step": result.step, "stop_reason": result.stop_reason, "trained": True,
            "seconds": round(time.monotonic() - t0, 2)}


def _record_attempt(run_dir: Path) -> dict[str, Any]:
    """Count this attempt in OUT/runs/.launch/NAME.json (host, pid, attempt), written atomically."""
    from looplens.data.provenance import atomic_write_text

    path = run_dir.parent / RECORDS / f"{run_dir.name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(path.read_text()) if path.exists() else {}
    record = {"host": socket.gethostname(), "pid": os.getpid(), "attempt": int(previous.get("attempt", 0)) + 1,
              "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    atomic_write_text(path, json.dumps(record) + "\n")
    return record


def _worker(config: dict[str, Any], run_dir: str, marker: str, cwd: str) -> dict[str, Any]:
    """A Ray task (or spawned process): check the storage is shared, record the attempt, train."""
    run_dir_path = Path(run_dir)
    if marker and not (run_dir_path.parent / marker).exists():
        raise LaunchError(f"--out: {run_dir_path.parent} is not visible from worker {socket.gethostname()} "
                          "(the workers write the run directories themselves, so --out must be on a filesystem "
                          "every node mounts at the same path; see docs/scale.md)")
    if cwd and Path(cwd).is_dir():  # relative paths in the config (run.data_root) mean what they meant to the driver
        os.chdir(cwd)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):  # a grid run is one process: never join a torchrun job
        os.environ.pop(key, None)  # (a pod's PyTorch-job variables would make the trainer wait for peers)
    record = _record_attempt(run_dir_path) if marker else {}
    info = train_run(config, run_dir_path, progress=False)
    return {**info, "attempts": record.get("attempt", 1), "host": record.get("host", "")}


# ---------------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------------
OnDone = Callable[[RunJob, JobResult], None]
Log = Callable[[str], None] | None


@dataclass
class Launcher:
    """Runs a grid's jobs. ``run`` skips jobs whose run already ended (status "skipped"), trains the rest,
    calls ``on_done(job, result)`` as each finishes (in the calling process: a grid records its ledger
    there) and returns the results in completion order. ``log`` gets one line per run and a summary."""

    cpus_per_run: float | None = None
    gpus_per_run: float | None = None
    name: str = field(init=False, default="launcher")

    def job(self, name: str, run_dir: str | os.PathLike, cfg: Any) -> RunJob:
        """The job of one run of ``cfg`` under ``run_dir``, with this launcher's resources per run."""
        return RunJob.of(name, run_dir, cfg, self.cpus_per_run, self.gpus_per_run)

    def run(self, jobs: Sequence[RunJob], *, on_done: OnDone | None = None, log: Log = None,
            progress: bool = True) -> list[JobResult]:
        _check_unique(jobs)
        t0 = time.monotonic()
        results: list[JobResult] = []
        todo = []
        for job in jobs:
            if run_ended(job.run_dir):
                from looplens.models.train import load_run

                s = load_run(job.run_dir).summary
                result = JobResult(job.name, job.run_dir, "skipped", int(s["final_step"]), s.get("stop_reason") or "")
                self._finish(job, result, results, on_done, log, len(jobs))
            else:
                todo.append(job)
        if todo:
            _build_datasets(todo, log)
            self._execute(todo, lambda job, res: self._finish(job, res, results, on_done, log, len(jobs)),
                          log, progress)
        if log:
            log(summary_line(results, time.monotonic() - t0, self.name))
        return results

    def _finish(self, job: RunJob, result: JobResult, results: list[JobResult], on_done: OnDone | None,
                log: Log, total: int) -> None:
        results.append(result)
        if log:
            log(f"[{len(results)}/{total}] {result.line()}")
        if on_done is not None:
            on_done(job, result)

    def _execute(self, jobs: list[RunJob], finish: Callable[[RunJob, JobResult], None], log: Log,
                 progress: bool) -> None:
        raise NotImplementedError


def _build_datasets(jobs: Sequence[RunJob], log: Log) -> None:
    """Build each distinct dataset the jobs need once, here, before any worker starts (else every worker
    of a grid generates the same dataset at once and all but the first throw theirs away)."""
    from looplens.data import ensure_dataset
    from looplens.models.train import TrainConfig
    from looplens.models.train.run import data_root

    needed = {}
    for job in jobs:
        cfg = TrainConfig.from_dict(job.config)
        root = data_root(cfg, job.run_dir)
        needed.setdefault(root / cfg.data.dirname(), (cfg.data, root))
    for path, (data, root) in needed.items():
        if not path.exists():
            ensure_dataset(data, root)
            if log:
                log(f"dataset {path.name}: built once for the runs that share it")


def _check_unique(jobs: Sequence[RunJob]) -> None:
    dirs = [j.run_dir for j in jobs]
    if len(set(dirs)) != len(dirs):
        raise ValueError("launcher: two jobs write the same run directory")


def _result(job: RunJob, info: dict[str, Any]) -> JobResult:
    return JobResult(job.name, job.run_dir, "trained" if info["trained"] else "skipped", int(info["step"]),
                     info["stop_reason"], float(info["seconds"]), int(info.get("attempts", 1)), info.get("host", ""))


@dataclass
class LocalLauncher(Launcher):
    """This machine: ``jobs`` = 1 trains in this process, one run after another (the trainer's progress
    bar per run); ``jobs`` > 1 trains that many at once in spawned processes (no bars; one line per run).
    A failed run re-raises its error here."""

    jobs: int = 1
    name: str = field(init=False, default="local")

    def __post_init__(self) -> None:
        if not isinstance(self.jobs, int) or self.jobs < 1:
            raise ValueError(f"--jobs must be a positive integer, got {self.jobs!r}")

    def _execute(self, jobs, finish, log, progress) -> None:
        if self.jobs == 1 or len(jobs) == 1:
            for job in jobs:
                if log:
                    log(f"{job.name}: training -> {job.run_dir}")
                finish(job, _result(job, train_run(job.config, job.run_dir, progress=progress)))
            return
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        ctx = multiprocessing.get_context("spawn")  # CUDA and torch threads start clean in each process
        with ProcessPoolExecutor(max_workers=min(self.jobs, len(jobs)), mp_context=ctx) as pool:
            futures = {pool.submit(train_run, job.config, str(job.run_dir), False): job for job in jobs}
            if log:
                log(f"local: {len(jobs)} runs in {min(self.jobs, len(jobs))} processes")
            for future in as_completed(futures):
                finish(futures[future], _result(futures[future], future.result()))  # re-raises a run's error


@dataclass
class RayLauncher(Launcher):
    """One Ray task per run on the cluster at ``address`` ("" starts a local instance with ``num_cpus``
    CPUs, None = all). A task whose worker process dies (OOM, a lost node, a kill) is retried up to
    ``max_retries`` times and resumes the run from its last checkpoint. A run that raises is not retried
    (it would fail the same way): the others finish, then one LaunchError names the failures."""

    address: str = ""
    num_cpus: int | None = None
    max_retries: int = 3
    name: str = field(init=False, default="ray")

    def _execute(self, jobs, finish, log, progress) -> None:
        ray = import_ray()
        started_here = not ray.is_initialized()
        if started_here:
            kwargs: dict[str, Any] = {"log_to_driver": False, "configure_logging": False}
            if self.address:
                ray.init(address=self.address, **kwargs)
            else:
                ray.init(num_cpus=self.num_cpus, include_dashboard=False, **kwargs)
        roots = {job.run_dir.parent for job in jobs}
        marker = f".looplens-shared-{uuid.uuid4().hex[:12]}"
        try:
            for root in roots:
                root.mkdir(parents=True, exist_ok=True)
                (root / marker).write_text("written by the looplens driver; workers check they can see it\n")
            task = ray.remote(_worker)
            refs = {}
            for job in jobs:
                ref = task.options(num_cpus=job.cpus, num_gpus=job.gpus, max_retries=self.max_retries,
                                   retry_exceptions=False, name=f"looplens-train:{job.name}").remote(
                    job.config, str(job.run_dir), marker, os.getcwd())
                refs[ref] = job
            if log:
                res = sorted({(j.cpus, j.gpus) for j in jobs})
                log(f"ray: {len(jobs)} runs submitted to {self.address or 'a local Ray instance'} "
                    f"(per run: {', '.join(f'{c:g} CPU, {g:g} GPU' for c, g in res)}; retries {self.max_retries})")
            failures = []
            pending = list(refs)
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                job = refs[done[0]]
                try:
                    info = ray.get(done[0])
                except Exception as err:  # noqa: BLE001 - a run's own error or a worker that died too often
                    cause = getattr(err, "cause", None) or err
                    first = str(cause).strip().splitlines()[-1] if str(cause).strip() else type(cause).__name__
                    failures.append(f"{job.name}: {first}")
                    if log:
                        log(f"{job.name}: FAILED: {first}")
                    continue
                finish(job, _result(job, info))
            if failures:
                raise LaunchError(f"{len(failures)} of {len(jobs)} runs failed on Ray ({'; '.join(failures)}); "
                                  "rerun the same command to retry them (finished runs are skipped)")
        finally:
            for root in roots:
                (root / marker).unlink(missing_ok=True)
            if started_here:
                ray.shutdown()


class SubmititRun:
    """A submitit job's callable: trains one run (:func:`train_run`). Submitit calls :meth:`checkpoint` when
    SLURM preempts the job or its time limit nears; it requeues the same call, which resumes the run from
    its last saved state."""

    def __call__(self, config: dict[str, Any], run_dir: str, marker: str, cwd: str) -> dict[str, Any]:
        return _worker(config, run_dir, marker, cwd)

    def checkpoint(self, *args: Any, **kwargs: Any):
        import submitit

        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


@dataclass
class SubmititLauncher(Launcher):
    """One submitit job per run: ``cluster`` None lets submitit choose (a SLURM job where ``sbatch``
    exists, else a local process), ``"local"`` forces local processes. ``partition`` is the SLURM partition, ``timeout_min`` each job's time
    limit; a job preempted or timed out is requeued up to ``max_retries`` times and resumes from the
    run's checkpoint. Job logs go to OUT/runs/.submitit. Like Ray, the jobs write the run directories
    under --out themselves (a shared filesystem; checked). Not retried: a job whose process is killed
    outright (submitit cannot tell that from a failure); rerun the command to resume it."""

    cluster: str | None = None
    partition: str = ""
    timeout_min: float = 72 * 60
    max_retries: int = 3
    poll_seconds: float = 2.0
    name: str = field(init=False, default="submitit")

    def _execute(self, jobs, finish, log, progress) -> None:
        submitit = import_submitit()
        roots = {job.run_dir.parent for job in jobs}
        folder = sorted(roots)[0] / ".submitit" / "%j"
        try:
            executor = submitit.AutoExecutor(folder=folder, cluster=self.cluster, slurm_max_num_timeout=self.max_retries,
                                             local_max_num_timeout=self.max_retries)
        except RuntimeError as err:  # submitit found no executor it can use
            raise LaunchError(f"--launcher submitit: {err}; pass --address local to run the jobs as local "
                              "processes") from None
        marker = f".looplens-shared-{uuid.uuid4().hex[:12]}"
        try:
            for root in roots:
                root.mkdir(parents=True, exist_ok=True)
                (root / marker).write_text("written by the looplens driver; jobs check they can see it\n")
            handles = []
            for job in jobs:
                params: dict[str, Any] = {"name": f"looplens-{job.name}", "timeout_min": self.timeout_min,
                                          "cpus_per_task": max(1, math.ceil(job.cpus)),
                                          "gpus_per_node": math.ceil(job.gpus)}
                if self.partition:
                    params["slurm_partition"] = self.partition
                executor.update_parameters(**params)
                handles.append((executor.submit(SubmititRun(), job.config, str(job.run_dir), marker, os.getcwd()), job))
            if log:
                log(f"submitit: {len(jobs)} jobs submitted to {executor.cluster} (logs: {folder.parent})")
            failures = []
            while handles:
                still = []
                for handle, job in handles:
                    if not handle.done():
                        still.append((handle, job))
                        continue
                    try:
                        info = handle.result()
                    except Exception as err:  # noqa: BLE001 - a job's error, reported with the others
                        first = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
                        failures.append(f"{job.name}: {first}")
                        if log:
                            log(f"{job.name}: FAILED: {first}")
                        continue
                    finish(job, _result(job, info))
                handles = still
                if handles:
                    time.sleep(self.poll_seconds)
            if failures:
                raise LaunchError(f"{len(failures)} of {len(jobs)} runs failed under submitit ({'; '.join(failures)}); "
                                  f"logs in {folder.parent}; rerun the same command to retry them")
        finally:
            for root in roots:
                (root / marker).unlink(missing_ok=True)


def import_submitit():
    try:
        import submitit
    except ImportError:
        raise LaunchError(SUBMITIT_INSTALL_HINT) from None
    return submitit


def import_ray():
    try:
        import ray
    except ImportError:
        raise LaunchError(RAY_INSTALL_HINT) from None
    return ray


def make_launcher(name: str = "local", *, address: str = "", jobs: int = 1, num_cpus: int | None = None,
                  max_retries: int = 3, cpus_per_run: float | None = None,
                  gpus_per_run: float | None = None, check: bool = True) -> Launcher:
    """A launcher by name ("local" or "ray"). ``address``, ``num_cpus`` (of a local Ray instance) and
    ``max_retries`` apply to Ray, ``jobs`` to local; ``cpus_per_run``/``gpus_per_run`` override what
    each run declares (:meth:`RunJob.of`). ``check``: fail now if Ray is missing (a dry run does not)."""
    resources = {"cpus_per_run": cpus_per_run, "gpus_per_run": gpus_per_run}
    if name == "local":
        if address:
            raise ValueError("--address is for --launcher ray (a Ray cluster address)")
        return LocalLauncher(jobs=jobs, **resources)
    if name == "ray":
        if check:
            import_ray()  # fail now, with the install hint, rather than after the grid was planned
        if max_retries < 0:
            raise ValueError(f"--max-retries must be >= 0, got {max_retries}")
        return RayLauncher(address=address, num_cpus=num_cpus, max_retries=max_retries, **resources)
    if name == "submitit":
        if check:
            import_submitit()
        # --address names the SLURM partition here ("" = the cluster's default); "local" runs subprocesses
        cluster, partition = ("local", "") if address == "local" else (None, address)
        return SubmititLauncher(cluster=cluster, partition=partition, max_retries=max_retries, **resources)
    raise ValueError(f"--launcher {name!r}: choose one of {', '.join(LAUNCHERS)}")


# ---------------------------------------------------------------------------------------------------
# The CLI's flags (shared by every grid command)
# ---------------------------------------------------------------------------------------------------
def add_launcher_arguments(parser: Any, jobs: bool = False) -> None:
    """Add --launcher, --address, --cpus-per-run, --gpus-per-run, --max-retries (and --jobs) to a parser
    or argument group."""
    parser.add_argument("--launcher", choices=LAUNCHERS, default="local",
                        help="where the training runs execute: local (this machine; default), ray (one Ray task "
                        "per run; pip install 'looplens[ray]') or submitit (one SLURM job per run)")
    parser.add_argument("--address", default="", metavar="ADDR",
                        help="ray: the cluster address (e.g. ray://head:10001 or auto; empty: start a local Ray "
                        "instance); submitit: the SLURM partition (empty: SLURM's default, or local processes without SLURM; "
                        "'local': local processes)")
    parser.add_argument("--cpus-per-run", type=float, default=None, metavar="N",
                        help="ray/submitit: CPUs each run declares (default: run.threads, at least 1)")
    parser.add_argument("--gpus-per-run", type=float, default=None, metavar="G",
                        help="ray/submitit: GPUs each run declares; on Ray a fraction packs runs on one GPU "
                        "(default: 1 when the run's device is cuda, else 0)")
    parser.add_argument("--max-retries", type=int, default=3, metavar="N",
                        help="ray: restarts of a run whose worker died; submitit: requeues after preemption or "
                        "timeout; each resumes from the run's last checkpoint (default 3)")
    if jobs:
        parser.add_argument("--jobs", type=int, default=None, metavar="N",
                            help="local launcher: runs trained at once, one process each (default: the "
                            "plan's own setting, Plan.jobs)")


def launcher_from_args(args: Any, check: bool = True, default_jobs: int = 1) -> Launcher:
    jobs = getattr(args, "jobs", None)
    return make_launcher(args.launcher, address=args.address, jobs=default_jobs if jobs is None else jobs,
                         max_retries=args.max_retries, cpus_per_run=args.cpus_per_run,
                         gpus_per_run=args.gpus_per_run, check=check)


# ---------------------------------------------------------------------------------------------------
# Planning: expected GPU-hours at the measured throughput
# ---------------------------------------------------------------------------------------------------
def load_throughput(path: str | os.PathLike | None = None, preset: str = REFERENCE_PRESET) -> dict[str, Any]:
    """The measured CUDA throughput of ``preset`` in a benchmarks/train_throughput.py result file
    (default: the H100 measurement, benchmarks/results/train_throughput_h100.json):
    {"preset", "steps_per_s", "gpu", "file"}."""
    path = Path(path or THROUGHPUT_FILE)
    if not path.is_file():
        raise FileNotFoundError(f"throughput file {path} not found (benchmarks/train_throughput.py writes it)")
    data = json.loads(path.read_text())
    for row in data.get("results", []):
        if row.get("preset") == preset and row.get("device") == "cuda":
            return {"preset": preset, "steps_per_s": float(row["steps_per_s"]),
                    "gpu": data.get("machine", {}).get("cuda", "GPU"), "file": str(path)}
    raise ValueError(f"throughput file {path}: no cuda result for preset {preset!r}")


def step_cost(cfg: Any) -> float:
    """Relative matmul FLOPs of one training step: batch x layers run x one block's weights (attention
    and MLP). Query widths and the vocabulary are taken equal across runs (they are within a task)."""
    from looplens.models.train.sampling import IterationSampler

    m = cfg.model
    d_head = m.d_head or m.d_model // m.n_heads
    d_mlp = m.d_mlp or 4 * m.d_model
    block = 4 * m.n_heads * d_head * m.d_model + 2 * m.d_model * d_mlp
    iterations = sum(r * p for r, p in IterationSampler(cfg.recurrence, cfg.train_iterations, 0).probabilities().items())
    return cfg.optim.batch_size * (m.n_blocks * iterations + m.n_prelude + m.n_coda) * block


def expected_hours(cfg: Any, reference_cfg: Any, reference_steps_per_s: float) -> tuple[float, float]:
    """(steps/s, hours) of ``cfg`` trained to run.max_steps on the reference GPU: the reference preset's
    measured steps/s scaled by the ratio of step costs (:func:`step_cost`)."""
    sps = reference_steps_per_s * step_cost(reference_cfg) / step_cost(cfg)
    return sps, cfg.run.max_steps / sps / 3600.0


def plan_table(jobs: Sequence[RunJob], throughput: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Per job: name, steps, est. steps/s, GPUs, hours, GPU-hours, and whether max_steps is only a cap
    (curriculum runs stop when the curriculum completes; time-capped runs stop at their budget)."""
    from looplens.models.train import TrainConfig, preset

    throughput = throughput or load_throughput()
    ref = preset(throughput["preset"])
    rows = []
    for job in jobs:
        cfg = TrainConfig.from_dict(job.config)
        sps, hours = expected_hours(cfg, ref, throughput["steps_per_s"])
        budget = cfg.run.time_budget_minutes
        capped = budget is not None and budget / 60.0 < hours
        if capped:
            hours = budget / 60.0
        gpus = job.gpus if job.gpus > 0 else 1.0  # a CPU-declared run is still priced on one GPU
        rows.append({"name": job.name, "steps": cfg.run.max_steps, "steps_per_s": sps, "gpus": gpus,
                     "hours": hours, "gpu_hours": hours * gpus,
                     "bound": "time cap" if capped else ("at most" if cfg.curriculum.enabled else "")})
    return rows


def format_plan(rows: Sequence[dict[str, Any]], throughput: dict[str, Any]) -> list[str]:
    """The dry-run lines: one per run and the total."""
    lines = [f"expected GPU time at {throughput['steps_per_s']:g} steps/s for {throughput['preset']} on "
             f"{throughput['gpu']} (from {throughput['file']}), scaled per run by batch x layers x block size:"]
    width = max((len(r["name"]) for r in rows), default=4)
    for r in rows:
        bound = f"  ({r['bound']})" if r["bound"] else ""
        lines.append(f"  {r['name']:<{width}}  {r['steps']:>10,} steps  ~{r['steps_per_s']:7.2f} steps/s  "
                     f"{r['gpus']:g} GPU  {r['hours']:8.1f} h  {r['gpu_hours']:8.1f} GPU-h{bound}")
    total = sum(r["gpu_hours"] for r in rows)
    longest = max((r["hours"] for r in rows), default=0.0)
    lines.append(f"  total: {total:,.1f} GPU-hours ({total / 24:.1f} GPU-days); with one GPU per run in parallel "
                 f"the grid takes ~{math.ceil(longest):,} h (its longest run)")
    return lines
