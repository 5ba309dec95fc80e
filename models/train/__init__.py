"""Training and evaluation of looped transformers (issue 4).

Python API::

    from looplens.models.train import TrainConfig, preset, train, load_run, evaluate

    cfg = preset("tiny-composition").with_overrides(["run.max_steps=2000"])
    result = train(cfg, "runs/tiny")          # -> RunResult(step, stop_reason, final, ...)
    run = load_run("runs/tiny")               # -> Run(.config, .metrics, .checkpoints, .load_model(), .dataset)
    table = evaluate(run, iterations=range(1, 17), halting="kl+entropy")   # -> DataFrame

See docs/training.md for the run directory, the metrics format, the options and the presets.
"""

from looplens.models.train.config import (
    CurriculumConfig,
    EvalConfig,
    ModelSettings,
    OptimConfig,
    RecurrenceConfig,
    RunConfig,
    TrainConfig,
)
from looplens.models.train.evaluate_run import evaluate, format_tables
from looplens.models.train.presets import preset, preset_description, preset_names, preset_summaries
from looplens.models.train.run import METRICS_COLUMNS, Run, load_run
from looplens.models.train.trainer import RunResult, train

__all__ = [
    "METRICS_COLUMNS",
    "CurriculumConfig",
    "EvalConfig",
    "ModelSettings",
    "OptimConfig",
    "RecurrenceConfig",
    "Run",
    "RunConfig",
    "RunResult",
    "TrainConfig",
    "evaluate",
    "format_tables",
    "load_run",
    "preset",
    "preset_description",
    "preset_names",
    "preset_summaries",
    "train",
]
