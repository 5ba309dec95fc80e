"""The run directory: its files, the metrics log, and :func:`load_run` for notebooks and analyses.

Layout (the contract in DESIGN.md)::

    runs/NAME/config.json                  full TrainConfig, resolved model config, dataset, provenance
    runs/NAME/metrics.csv                  long format: step, epoch, stage, split, hops, iterations, accuracy, loss, n
    runs/NAME/summary.json                 status, stop reason, last step, learnable depth, final accuracies
    runs/NAME/checkpoints/step_<N>.safetensors (+ step_<N>.json)   weights at log-spaced and periodic steps
    runs/NAME/checkpoints/state_latest.pt  everything needed to resume exactly (optimizer, RNGs, samplers...)
    runs/NAME/eval/*.csv                   written by `looplens eval`

Every file is written atomically (temp file + rename) except metrics.csv, which is only appended to;
the resumable state records its byte length, and resuming truncates it back to that length.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import pandas as pd
from looplens.data.files import InvalidFileError, atomic_write_text, check_format, output_error, read_json
from looplens.models.train.config import TrainConfig

# The run directory's format: bump RUN_FORMAT_VERSION when a change breaks readers of older runs;
# load_run refuses other versions naming the looplens that wrote the run (config.json's provenance).
RUN_FORMAT_PREFIX = "looplens-run-v"
RUN_FORMAT_VERSION = 1
RUN_FORMAT = f"{RUN_FORMAT_PREFIX}{RUN_FORMAT_VERSION}"
METRICS_COLUMNS = ("step", "epoch", "stage", "split", "hops", "iterations", "accuracy", "loss", "n")
TRAIN_SPLIT = "train_batch"  # metrics rows of training batches (hops 0: every hop count mixed)
STAGE_SPLIT = "stage_passed"  # one row per passed curriculum stage (hops = the stage)
_STEP_FILE = re.compile(r"^step_(\d+)\.json$")


@dataclass(frozen=True)
class RunPaths:
    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.csv"

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def state(self) -> Path:
        return self.checkpoints / "state_latest.pt"

    @property
    def eval_dir(self) -> Path:
        return self.root / "eval"

    def checkpoint(self, step: int) -> Path:
        """The checkpoint stem for ``step`` (``.safetensors`` + ``.json``)."""
        return self.checkpoints / f"step_{step}"

    def checkpoint_steps(self) -> list[int]:
        """Steps with a complete checkpoint (its JSON sidecar, written last, exists)."""
        if not self.checkpoints.is_dir():
            return []
        steps = []
        for p in self.checkpoints.iterdir():
            m = _STEP_FILE.match(p.name)
            if m and p.with_suffix(".safetensors").exists():
                steps.append(int(m.group(1)))
        return sorted(steps)


# -------------------------------------------------------------------------------------------------
# metrics.csv
# -------------------------------------------------------------------------------------------------
def _fmt_float(x: float | None, digits: int) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return ""
    return f"{x:.{digits}f}"


def format_row(row: dict[str, Any]) -> str:
    """One CSV line; fixed float formatting, so identical runs write identical bytes."""
    fields = [
        str(int(row["step"])),
        _fmt_float(row["epoch"], 4),
        str(int(row["stage"])),
        str(row["split"]),
        str(int(row["hops"])),
        str(int(row["iterations"])),
        _fmt_float(row.get("accuracy"), 6),
        _fmt_float(row.get("loss"), 6),
        str(int(row["n"])),
    ]
    return ",".join(fields) + "\n"


class MetricsLog:
    """Append-only metrics.csv; rows are buffered and written by :meth:`flush` (one write + fsync)."""

    def __init__(self, path: Path):
        self.path = path
        self.pending: list[str] = []
        if not path.exists():
            atomic_write_text(path, ",".join(METRICS_COLUMNS) + "\n")
        self.rows = self._count_rows()

    def _count_rows(self) -> int:
        """Complete data rows in the file (header and a partial last line excluded)."""
        with open(self.path, "rb") as fh:
            return max(fh.read().count(b"\n") - 1, 0)

    def add(self, rows: list[dict[str, Any]]) -> None:
        self.pending.extend(format_row(r) for r in rows)

    def flush(self) -> None:
        if not self.pending:
            return
        size = self.size()
        try:
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write("".join(self.pending))
                fh.flush()
                os.fsync(fh.fileno())
        except OSError as err:  # a full disk: cut the rows written so far, so no half row stays behind
            with contextlib.suppress(OSError):
                os.truncate(self.path, size)
            raise output_error(err, self.path) from None
        self.rows += len(self.pending)
        self.pending.clear()

    def size(self) -> int:
        return self.path.stat().st_size

    def truncate(self, n_bytes: int) -> None:
        """Cut the file back to ``n_bytes`` (resume: rows written after the saved state are dropped)."""
        self.pending.clear()
        if self.size() < n_bytes:
            raise ValueError(f"{self.path} is shorter ({self.size()} bytes) than the saved state says ({n_bytes}); "
                             "the run directory was modified")
        os.truncate(self.path, n_bytes)
        self.rows = self._count_rows()


def _check_metrics_header(path: Path, header: str) -> None:
    if tuple(header.strip().split(",")) != METRICS_COLUMNS:
        raise InvalidFileError(path, f"metrics header is {header.strip()[:60]!r}, expected "
                                     f"{','.join(METRICS_COLUMNS)!r} (not a looplens metrics file)")


def read_metrics(path: Path) -> pd.DataFrame:
    """metrics.csv as a DataFrame; a partial last line (a crash mid-append) is ignored.

    Garbage (not text, wrong columns, a row that is not numbers) raises :class:`InvalidFileError`
    naming the file and the first bad line.
    """
    try:
        text = path.read_text(encoding="utf-8") if path.exists() else ""
    except UnicodeDecodeError:
        raise InvalidFileError(path, "metrics file is not text (binary garbage?)") from None
    if not text:
        return pd.DataFrame({c: [] for c in METRICS_COLUMNS})
    if not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
    _check_metrics_header(path, text[: text.find("\n")])
    from io import StringIO

    try:
        frame = pd.read_csv(StringIO(text), dtype={"split": str})
    except (pd.errors.ParserError, ValueError) as err:
        raise InvalidFileError(path, f"metrics rows are not CSV ({' '.join(str(err).split())})") from None
    numeric = [c for c in METRICS_COLUMNS if c != "split"]
    for column in numeric:
        if not pd.api.types.is_numeric_dtype(frame[column]):
            values = pd.to_numeric(frame[column], errors="coerce")
            bad = int((values.isna() & frame[column].notna()).to_numpy().argmax())
            raise InvalidFileError(path, f"line {bad + 2}: {column} is {frame[column].iloc[bad]!r}, "
                                         "expected a number")
    return frame


def write_json(path: Path, obj: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


# -------------------------------------------------------------------------------------------------
# Run
# -------------------------------------------------------------------------------------------------
@dataclass
class Run:
    """A run directory opened for reading. Example (needs a trained run; tests/test_train_run.py)::

        run = load_run("runs/tiny")
        run.metrics.query("split == 'test_inferred_ood'")
        model = run.load_model("final")
    """

    path: Path
    config: TrainConfig
    meta: dict[str, Any] = field(repr=False)

    @property
    def paths(self) -> RunPaths:
        return RunPaths(self.path)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def metrics(self) -> pd.DataFrame:
        """metrics.csv (read afresh on every access, so a live run can be followed)."""
        return read_metrics(self.paths.metrics)

    @property
    def summary(self) -> dict[str, Any]:
        path = self.paths.summary
        return read_json(path, "run summary") if path.exists() else {"status": "unknown"}

    @property
    def ended(self) -> bool:
        """The run stopped on its own and wrote its final summary: "finished" (max_steps, a target, the
        curriculum) or "stopped" by its time budget. Not an interrupted, crashed or still running run."""
        return self.summary.get("status") in ("finished", "stopped")

    @property
    def checkpoints(self) -> list[int]:
        """Steps with a saved checkpoint, ascending."""
        return self.paths.checkpoint_steps()

    @property
    def dataset_checksum(self) -> str:
        return self.meta["dataset"]["checksum"]

    @cached_property
    def dataset(self):
        """The run's data.Dataset: at its recorded path, else rebuilt from the config (checksum checked)."""
        from looplens.data import ensure_dataset, load_dataset

        recorded = Path(self.meta["dataset"]["path"])
        ds = None
        if recorded.is_dir():
            ds = load_dataset(recorded)
        else:
            ds = ensure_dataset(self.config.data, data_root(self.config, self.path))
        if ds.checksum != self.dataset_checksum:
            raise ValueError(f"run {self.path}: dataset {ds.path} has checksum {ds.checksum[:12]}, the run was "
                             f"trained on {self.dataset_checksum[:12]}")
        return ds

    def resolve_step(self, step: int | str | None = None) -> int:
        """None -> "final" for a finished run, else "latest"; "final", "latest" or a saved step number."""
        steps = self.checkpoints
        if not steps:
            raise FileNotFoundError(f"run {self.path}: no checkpoints yet")
        if step is None:
            step = "final" if self.summary.get("status") == "finished" else "latest"
        if step == "latest":
            return steps[-1]
        if step == "final":
            summary = self.summary
            if summary.get("status") != "finished":
                raise ValueError(f"run {self.path} has not finished (status {summary.get('status')!r}); "
                                 "use checkpoint 'latest' or a step number")
            return int(summary["final_step"])
        try:
            step = int(step)
        except (TypeError, ValueError):
            raise ValueError(f"checkpoint must be 'final', 'latest' or a step number, got {step!r}") from None
        if step not in steps:
            raise ValueError(f"run {self.path}: no checkpoint at step {step}; saved steps: {steps}")
        return step

    def load_model(self, step: int | str | None = None, device: str = "cpu"):
        """The model at a checkpoint (see :meth:`resolve_step`), verified against this run's dataset,
        with the dataset's vocab attached, in eval mode."""
        from looplens.models.checkpoint import load_checkpoint

        step = self.resolve_step(step)
        model = load_checkpoint(self.paths.checkpoint(step), device=device, step=step,
                                dataset_checksum=self.dataset_checksum)
        return model


def data_root(cfg: TrainConfig, run_dir: Path) -> Path:
    """Where a run's dataset is cached: run.data_root, else ``<parent of the run>/.datasets``."""
    if cfg.run.data_root:
        return Path(cfg.run.data_root).expanduser()
    return Path(run_dir).resolve().parent / ".datasets"


def load_run(path: str | os.PathLike) -> Run:
    """Open a run directory written by :func:`models.train.train`."""
    path = Path(path)
    config_path = RunPaths(path).config
    if not config_path.is_file():
        raise FileNotFoundError(f"run {path}: no config.json (not a looplens run directory)")
    meta = read_json(config_path, "run config")
    check_format(config_path, meta, RUN_FORMAT_PREFIX, RUN_FORMAT_VERSION, "run directory")
    for key in ("config", "dataset"):
        if not isinstance(meta.get(key), dict):
            raise InvalidFileError(config_path, f"run config has no {key!r} table (truncated or edited?)")
    try:
        config = TrainConfig.from_dict(meta["config"])
    except ValueError as err:
        raise InvalidFileError(config_path, f"invalid training config: {err}") from None
    if not isinstance(meta["dataset"].get("checksum"), str):
        raise InvalidFileError(config_path, "run config has no dataset checksum (truncated or edited?)")
    metrics = RunPaths(path).metrics
    if metrics.is_file():  # its first line only: a damaged run fails here, not deep inside an analysis
        with open(metrics, "rb") as fh:
            first = fh.readline(4096)
        try:
            header = first.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidFileError(metrics, "metrics file is not text (binary garbage?)") from None
        if header.endswith("\n"):
            _check_metrics_header(metrics, header)
    return Run(path, config, meta)
