"""What every study shares: options, the result object (save / load), run descriptions, sampling.

A study is a module in ``analyses/studies/`` with ``NAME``, ``TITLE``, ``CLAIMS`` (the PAPER.md claims
it informs), ``select(runs)`` (the runs it applies to, or a ValueError saying why none) and
``run(runs, options) -> StudyResult``. Results hold tidy tables, plotly figures, a few headline numbers
(``findings``, plain JSON, which the claim rules in :mod:`analyses.claims` read) and notes in words.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from looplens.data.provenance import atomic_dir, atomic_write_text, provenance

RESULT_FORMAT = "looplens-study-v1"
# The splits of the composition task that trace systematic generalization (train -> ID -> OOD).
COMPOSITION_CURVES = ("train_inferred", "test_inferred_id", "test_inferred_ood")
COMPOSITION_DIAGNOSTICS = ("test_inferred_first_ood", "test_inferred_second_ood")


@dataclass(frozen=True)
class StudyOptions:
    """Knobs shared by the studies (sizes of the samples they analyse, iteration ranges, device).

    n_queries: queries sampled per split (and per hop count, for the depth task) for the model-level
    analyses (hop locator, overthinking, shortcut behaviour). max_iterations: the largest inference
    iteration count tried (depth heatmap, overthinking, halting cap). patch_pairs: clean/corrupted pairs
    for activation patching. fixed_point_iterations: how far the loop is run for the fixed-point curves.
    halting_eps / halting_entropy: the paper's KL and entropy thresholds (0.01, 3.0 nats).
    depth_threshold: the accuracy at which a hop count counts as answered (depth study).
    """

    n_queries: int = 256
    max_iterations: int = 32
    patch_pairs: int = 64
    fixed_point_iterations: int = 32
    halting_eps: float = 0.01
    halting_entropy: float = 3.0
    depth_threshold: float = 0.9
    seed: int = 0
    device: str = "cpu"
    progress: bool = False

    def __post_init__(self) -> None:
        for name in ("n_queries", "max_iterations", "patch_pairs", "fixed_point_iterations"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"StudyOptions.{name} must be a positive integer, got {value!r}")
        if self.max_iterations < 2:
            raise ValueError(f"StudyOptions.max_iterations must be >= 2, got {self.max_iterations}")
        if not 0 < self.depth_threshold <= 1:
            raise ValueError(f"StudyOptions.depth_threshold must be in (0, 1], got {self.depth_threshold}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("progress")  # how it is shown, not what is computed
        return d

    def replace(self, **changes: Any) -> StudyOptions:
        return dataclasses.replace(self, **changes)


@dataclass
class StudyResult:
    """One study's output. ``tables`` and ``figures`` are keyed by a short file-safe name."""

    study: str
    title: str
    runs: list[str]
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    figures: dict[str, Any] = field(default_factory=dict)  # name -> plotly Figure
    findings: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)

    def save(self, out_dir: str | os.PathLike, html: bool = True, overwrite: bool = True) -> Path:
        """Write ``out_dir/result.json``, ``tables/*.csv``, ``figures/*.json`` (plotly JSON, reloadable)
        and, with ``html``, ``figures/*.html`` (offline: they load ``figures/plotly.min.js`` beside them).
        The directory appears complete or not at all (written to a temp dir, then renamed)."""
        out = Path(out_dir)
        with atomic_dir(out, overwrite=overwrite) as tmp:
            (tmp / "tables").mkdir()
            (tmp / "figures").mkdir()
            for name, table in self.tables.items():
                atomic_write_text(tmp / "tables" / f"{name}.csv", table.to_csv(index=False))
            for name, fig in self.figures.items():
                atomic_write_text(tmp / "figures" / f"{name}.json", fig.to_json())
                if html:
                    write_figure_html(fig, tmp / "figures" / f"{name}.html", div_id=f"{self.study}-{name}")
            meta = {
                "format": RESULT_FORMAT, "study": self.study, "title": self.title, "runs": self.runs,
                "tables": list(self.tables), "figures": list(self.figures), "findings": self.findings,
                "notes": self.notes, "options": self.options, "provenance": provenance(),
            }
            atomic_write_text(tmp / "result.json", dumps(meta))
        return out

    @classmethod
    def load(cls, out_dir: str | os.PathLike) -> StudyResult:
        import plotly.io as pio

        out = Path(out_dir)
        path = out / "result.json"
        if not path.is_file():
            raise FileNotFoundError(f"{out}: no result.json (not a study result directory)")
        meta = json.loads(path.read_text(encoding="utf-8"))
        if meta.get("format") != RESULT_FORMAT:
            raise ValueError(f"{path}: format {meta.get('format')!r}, expected {RESULT_FORMAT!r}")
        tables = {name: pd.read_csv(out / "tables" / f"{name}.csv") for name in meta["tables"]}
        figures = {name: pio.from_json((out / "figures" / f"{name}.json").read_text(encoding="utf-8"))
                   for name in meta["figures"]}
        return cls(meta["study"], meta["title"], list(meta["runs"]), tables, figures, meta["findings"],
                   list(meta["notes"]), meta.get("options", {}))


def load_findings(out_dir: str | os.PathLike) -> dict[str, Any]:
    """The ``findings`` of a saved study result (result.json only: cheap)."""
    meta = json.loads((Path(out_dir) / "result.json").read_text(encoding="utf-8"))
    if meta.get("format") != RESULT_FORMAT:
        raise ValueError(f"{out_dir}: not a study result")
    return meta["findings"]


def write_figure_html(fig: Any, path: Path, div_id: str) -> None:
    """A standalone figure page that works offline: it loads ``plotly.min.js`` from its own folder
    (written there once). A fixed ``div_id`` keeps the file identical from one run to the next."""
    from plotly.offline import get_plotlyjs

    js = path.parent / "plotly.min.js"
    if not js.exists():
        atomic_write_text(js, get_plotlyjs())
    atomic_write_text(path, fig.to_html(include_plotlyjs="directory", full_html=True, div_id=div_id))


# -------------------------------------------------------------------------------------------------
# JSON
# -------------------------------------------------------------------------------------------------
def jsonable(obj: Any) -> Any:
    """numpy / pandas scalars -> Python; NaN and NA -> None; tuples -> lists (recursively)."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return [jsonable(v) for v in obj.tolist()]
    if obj is None or obj is pd.NA or obj is pd.NaT:
        return None
    if isinstance(obj, bool | np.bool_):
        return bool(obj)
    if isinstance(obj, int | np.integer):
        return int(obj)
    if isinstance(obj, float | np.floating):
        value = float(obj)
        return None if math.isnan(value) or math.isinf(value) else round(value, 6)
    return obj


def dumps(obj: Any) -> str:
    return json.dumps(jsonable(obj), indent=2, sort_keys=True) + "\n"


# -------------------------------------------------------------------------------------------------
# Runs
# -------------------------------------------------------------------------------------------------
def as_runs(items: Iterable) -> list:
    """Runs from ``models.train.Run`` objects or run directories (opened with :func:`models.train.load_run`,
    which fails clearly on a non-run). Run directory names must be unique: studies label runs by them."""
    from looplens.models.train import Run, load_run

    runs = [item if isinstance(item, Run) else load_run(item) for item in items]
    for run in runs:
        _dataset_where_writable(run)
    names = [r.name for r in runs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"--run: several runs share the directory name {dupes[0]!r}; studies label runs by it")
    return runs


def _dataset_where_writable(run) -> None:
    """A run whose dataset directory is gone rebuilds it under ``<run parent>/.datasets``; when that is not
    writable (a run shipped inside an installed package), build it in the user cache instead."""
    from looplens.models.train.run import data_root

    if "dataset" in run.__dict__ or Path(run.meta["dataset"]["path"]).is_dir():
        return
    root = data_root(run.config, run.path)
    probe = root
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if os.access(probe, os.W_OK):
        return
    from looplens.data import ensure_dataset

    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "looplens" / "datasets"
    ds = ensure_dataset(run.config.data, cache)
    if ds.checksum != run.dataset_checksum:
        raise ValueError(f"run {run.path}: rebuilt dataset {ds.path} has checksum {ds.checksum[:12]}, the run was "
                         f"trained on {run.dataset_checksum[:12]}")
    run.__dict__["dataset"] = ds  # Run.dataset is a cached_property: this is its cached value


def run_info(run) -> dict[str, Any]:
    """One run described the way the studies label it.

    kind: "looped" (more than one iteration at training) or "vanilla" (one iteration: distinct layers).
    recurrence: "fixed" or the dynamic mode ("poisson", ...). R: the training iteration count (for a
    dynamic run the count it is evaluated at). virtual_layers: layers one forward runs (the compute).
    """
    cfg = run.config
    m = cfg.model
    R = int(cfg.train_iterations)
    summary = run.summary
    kind = "looped" if (R > 1 or cfg.recurrence.mode != "fixed") else "vanilla"
    shape = f"{m.n_blocks}x{R}" if kind == "looped" else f"{m.n_prelude + m.n_blocks + m.n_coda} layers"
    recurrence = cfg.recurrence.mode
    label = f"{run.name} ({kind} {shape}" + (f", dynamic R ({recurrence})" if recurrence != "fixed" else "") + ")"
    return {
        "run": run.name, "label": label, "task": cfg.data.task, "world": cfg.data.world, "kind": kind,
        "recurrence": "fixed" if recurrence == "fixed" else "dynamic", "recurrence_mode": recurrence, "R": R,
        "n_blocks": int(m.n_blocks), "virtual_layers": int(m.n_prelude + m.n_blocks * R + m.n_coda),
        "d_model": int(m.d_model), "n_parameters": run.meta.get("n_parameters"),
        "final_step": summary.get("final_step"), "status": summary.get("status"),
        "stop_reason": summary.get("stop_reason"), "learnable_depth": summary.get("learnable_depth"),
        "curriculum": bool(cfg.curriculum.enabled),
    }


def runs_table(runs: Sequence) -> pd.DataFrame:
    return pd.DataFrame([run_info(r) for r in runs])


def select_task(runs: Sequence, task: str, study: str) -> list:
    chosen = [r for r in runs if r.config.data.task == task]
    if not chosen:
        raise ValueError(f"study {study} needs at least one {task}-task run; got "
                         + ", ".join(f"{r.name} ({r.config.data.task})" for r in runs))
    return chosen


def final_step(run) -> int:
    """The checkpoint the studies analyse: the final one of a finished run, else the latest."""
    return run.resolve_step(None)


def load_model(run, step: int | str | None, options: StudyOptions):
    model = run.load_model(step if step is not None else final_step(run), device=_device(options.device))
    model.vocab = run.dataset.vocab
    model.eval()
    return model


def _device(name: str) -> str:
    if name == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


# -------------------------------------------------------------------------------------------------
# Metrics and evaluation
# -------------------------------------------------------------------------------------------------
def accuracy_curves(run, splits: Sequence[str], iterations: int | None = None) -> pd.DataFrame:
    """Per (split, step): accuracy at the training iteration count (hop counts pooled, n-weighted).

    Columns: run, split, step, epoch, accuracy. Splits the run never evaluated are left out.
    """
    metrics = run.metrics
    T = run.config.train_iterations if iterations is None else iterations
    df = metrics[metrics["split"].isin(list(splits)) & (metrics["iterations"] == T)].dropna(subset=["accuracy"])
    if df.empty:
        return pd.DataFrame({"run": [], "split": [], "step": [], "epoch": [], "accuracy": []})
    df = df.assign(wa=df["accuracy"] * df["n"])
    g = df.groupby(["split", "step"], sort=True).agg(epoch=("epoch", "first"), wa=("wa", "sum"), n=("n", "sum"))
    g = g.reset_index()
    g["accuracy"] = g["wa"] / g["n"]
    g.insert(0, "run", run.name)
    order = {s: i for i, s in enumerate(splits)}
    g = g.sort_values(["split", "step"], key=lambda c: c.map(order) if c.name == "split" else c, kind="stable")
    return g[["run", "split", "step", "epoch", "accuracy"]].reset_index(drop=True)


_EVAL_CACHE: dict[tuple, pd.DataFrame] = {}


def evaluate_cached(run, step: int, iterations: Sequence[int], splits: Sequence[str], options: StudyOptions,
                    halting: str | None = None, hops: Sequence[int] | None = None) -> pd.DataFrame:
    """:func:`models.train.evaluate` with a per-process memo (the depth and halting studies share runs)."""
    from looplens.models.train import evaluate

    key = (str(Path(run.path).resolve()), int(step), tuple(iterations), tuple(splits), halting,
           None if hops is None else tuple(hops), options.halting_eps, options.halting_entropy,
           options.max_iterations, options.device)
    if key not in _EVAL_CACHE:
        if len(_EVAL_CACHE) > 64:
            _EVAL_CACHE.clear()
        _EVAL_CACHE[key] = evaluate(run, checkpoint=step, iterations=list(iterations), hops=hops, splits=list(splits),
                                    halting=halting, eps=options.halting_eps, entropy=options.halting_entropy,
                                    max_iterations=options.max_iterations, device=_device(options.device))
    return _EVAL_CACHE[key].copy()


# -------------------------------------------------------------------------------------------------
# Sampling queries
# -------------------------------------------------------------------------------------------------
def rng_for(seed: int, *tags: str) -> np.random.Generator:
    """A generator that depends on the seed and the tags only (stable across processes)."""
    return np.random.default_rng([seed, *(zlib.crc32(t.encode()) for t in tags)])


def sample_split(dataset, split: str, n: int, seed: int, hops: int | None = None):
    """Up to ``n`` rows of ``split`` (only ``hops``-hop rows when given), seeded, in dataset order.
    Returns a ``data.EncodedSplit``."""
    enc = dataset.encode(split)
    rows = np.arange(len(enc))
    if hops is not None:
        rows = rows[enc.hops.numpy() == hops]
    if len(rows) > n:
        rows = np.sort(rng_for(seed, split, str(hops)).choice(rows, size=n, replace=False))
    return enc.subset(rows)


def spread(values: Sequence[int], limit: int) -> list[int]:
    """At most ``limit`` values from a sorted list, evenly spread, both ends kept.

    >>> spread(list(range(2, 41)), 5)
    [2, 12, 21, 30, 40]
    """
    values = sorted(values)
    if len(values) <= limit:
        return list(values)
    idx = sorted({round(i * (len(values) - 1) / (limit - 1)) for i in range(limit)})
    return [values[i] for i in idx]


def fmt(x: Any, digits: int = 2) -> str:
    """A number for notes and summaries; "n/a" for None / NaN."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    if isinstance(x, int | np.integer):
        return str(int(x))
    return f"{float(x):.{digits}f}"
