"""TrainConfig: one dataclass tree for a training run, validated, TOML-loadable, overridable.

Sections (each a small dataclass that validates itself, per STYLE.md habit 6)::

    data        data.DataConfig: world, task, splits, data seed
    model       LoopedConfig's fields minus d_vocab / n_ctx (those come from the dataset)
    optim       AdamW, schedule, loss, batch composition, research options (Grokfast, OrthoGrad, StableMax)
    recurrence  iterations per training batch: fixed, or sampled per batch; truncated backprop
    curriculum  depth task: stage k trains hops <= k, advances when held-out k-hop accuracy passes
    eval        what is evaluated during training, how often, at which iteration counts
    run         seed, stop conditions, checkpoints, device

Each field declares its constraints beside its default (``setting(1e-3, ge=0)``); pydantic checks them
(data/validation.py), so every error names the field. ``--set section.key=value`` overrides are parsed
by the field's declared type (see :func:`parse_assignment`).

>>> cfg = TrainConfig.from_dict({"optim": {"lr": 3e-4}})
>>> cfg = cfg.with_overrides(["optim.batch_size=64", "eval.iterations=1,2,8"])
>>> cfg.optim.batch_size, cfg.eval.iterations
(64, [1, 2, 8])
>>> cfg.with_overrides(["optim.lrate=1"])
Traceback (most recent call last):
...
ValueError: --set optim.lrate: unknown key 'lrate' in section [optim]; valid keys: atomic_share, batch_size, betas, decay_steps, eps, grad_clip, grokfast_alpha, grokfast_lambda, label_smoothing, loss, lr, min_lr_ratio, no_decay, orthograd, precision, schedule, warmup_steps, weight_decay
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from looplens.data.config import DataConfig
from looplens.data.validation import check, parse, setting, validate
from looplens.models.config import LoopedConfig

SCHEDULES = ("constant", "linear", "cosine")
LOSSES = ("softmax", "stablemax")
PRECISIONS = ("auto", "fp32", "bf16")
NO_DECAY_GROUPS = ("biases", "norms", "embeddings")
RECURRENCE_MODES = ("fixed", "poisson", "uniform", "poisson-lognormal")
SUPERVISE_MODES = ("last", "from_hops")
HALTING_RULES = ("kl", "entropy", "kl+entropy", "latent")
CURRICULUM_METRICS = ("fixed", "halting")
DEVICES = ("auto", "cpu", "cuda")

# LoopedConfig fields a run does not set: d_vocab and n_ctx come from the dataset, device from run.device.
_MODEL_EXCLUDED = ("d_vocab", "n_ctx", "device")


# -------------------------------------------------------------------------------------------------
# Sections
# -------------------------------------------------------------------------------------------------
def _model_fields() -> list[tuple[str, Any, Any]]:
    out = []
    for f in dataclasses.fields(LoopedConfig):
        if f.name in _MODEL_EXCLUDED:
            continue
        default = f.default if f.default is not dataclasses.MISSING else None
        out.append((f.name, f.type, field(default=default, metadata=f.metadata)))  # metadata: its constraints
    return out


def _model_post_init(self) -> None:
    check(self, "model.")
    try:  # LoopedConfig validates everything; d_vocab / n_ctx are placeholders until the dataset is known
        self.to_looped(d_vocab=max(1024, (self.pad_token_id or 0) + 1), n_ctx=64)
    except ValueError as err:
        raise ValueError(f"model: {str(err).removeprefix('LoopedConfig: ')}") from None


def _to_looped(self, d_vocab: int, n_ctx: int, seed: int | None = None) -> LoopedConfig:
    """The LoopedConfig for a dataset: ``seed`` fills in the init seed when the section leaves it None."""
    values = dataclasses.asdict(self)
    if values["seed"] is None:
        values["seed"] = seed
    return LoopedConfig(d_vocab=d_vocab, n_ctx=n_ctx, **values)


# The model section mirrors LoopedConfig (minus d_vocab, n_ctx, device), so a field added there is
# configurable here without editing this file. Its seed (init seed) defaults to run.seed.
ModelSettings = dataclasses.make_dataclass(
    "ModelSettings",
    _model_fields(),
    namespace={"__post_init__": _model_post_init, "to_looped": _to_looped,
               "__doc__": "LoopedConfig's fields minus d_vocab / n_ctx (from the dataset) and device (run.device)."},
)
ModelSettings.__module__ = __name__


@dataclass
class OptimConfig:
    """AdamW and everything about one optimisation step.

    no_decay: parameter groups without weight decay ("biases", "norms" = LayerNorm gains and biases,
    "embeddings" = W_E (tied unembedding) and W_pos). atomic_share: fraction of each batch drawn from
    atomic facts (hops == 1); None draws uniformly from all training rows. grokfast_lambda > 0 turns the
    Grokfast EMA gradient filter on (g <- g + lambda * ema, ema <- alpha * ema + (1 - alpha) * g).
    orthograd: remove each weight's gradient component parallel to the weight (rescaled to the original
    gradient norm). loss: "softmax" cross-entropy or "stablemax" (s(x) = x + 1 for x >= 0 else 1 / (1 - x)).
    """

    lr: float = setting(1e-3, ge=0)
    betas: list[float] = setting(factory=lambda: [0.9, 0.999], ge=0, lt=1, length=2)
    eps: float = setting(1e-8, ge=0)
    weight_decay: float = setting(0.01, ge=0)
    no_decay: list[str] = setting(factory=lambda: list(NO_DECAY_GROUPS), choices=NO_DECAY_GROUPS)
    batch_size: int = setting(512, ge=1)
    warmup_steps: int = setting(0, ge=0)
    schedule: str = setting("constant", choices=SCHEDULES)
    # linear/cosine: steps from the end of warm-up to min_lr (None: max_steps)
    decay_steps: int | None = setting(None, ge=1)
    min_lr_ratio: float = setting(0.0, ge=0, le=1)
    label_smoothing: float = setting(0.0, ge=0, lt=1)
    grad_clip: float | None = setting(None, ge=0)  # max global grad norm; None or 0: off
    loss: str = setting("softmax", choices=LOSSES)
    atomic_share: float | None = setting(None, ge=0, le=1)
    grokfast_alpha: float = setting(0.98, ge=0, lt=1)
    grokfast_lambda: float = setting(0.0, ge=0)
    orthograd: bool = False
    precision: str = setting("auto", choices=PRECISIONS)  # auto: bf16 autocast on CUDA, fp32 on CPU

    def __post_init__(self) -> None:
        check(self, "optim.")


@dataclass
class RecurrenceConfig:
    """Iterations per training batch.

    mode "fixed": model.n_iterations every batch. "poisson": clip(Poisson(mean), min, max) (the paper's
    dynamic R: mean 4 in [2, 8]). "uniform": uniform integer in [min, max]. "poisson-lognormal" (Huginn):
    tau ~ N(log(mean) - sigma^2 / 2, sigma), R = Poisson(exp(tau)) + 1, clipped to [min, max].
    backprop_last: gradients flow through the last k iterations only (None: all).
    supervise: "last" (the paper): the answer loss is read after the last iteration only. "from_hops": the
    answer is read after every iteration t >= the query's hop count k and the losses are averaged, so a
    k-hop query must be answered by iteration k and keep its answer (one hop per iteration; no
    intermediate entity is supervised). Intended for the composition task (issue 8's ladder).
    """

    mode: str = setting("fixed", choices=RECURRENCE_MODES)
    mean: float = setting(4.0, ge=0)
    min: int = setting(2, ge=1)
    max: int = setting(8, ge=1)
    sigma: float = setting(0.5, ge=0)
    backprop_last: int | None = setting(None, ge=1)
    supervise: str = setting("last", choices=SUPERVISE_MODES)

    def __post_init__(self) -> None:
        check(self, "recurrence.")
        if self.max < self.min:
            raise ValueError(f"recurrence.max must be >= recurrence.min ({self.min}), got {self.max}")


@dataclass
class CurriculumConfig:
    """Depth task curriculum (paper section 6).

    Stage k trains on atomic facts + 2..k-hop chains and passes when accuracy on the held-out k-hop
    chains (split "test", hops == k) exceeds ``threshold`` at an evaluation. The run stops when a stage
    does not pass within ``stage_budget`` steps, or after the last stage (``max_stage``, default the
    dataset's max_hops). ``metric`` "halting" checks with the eval section's halting rule (the paper's
    code does this for dynamic-R models) instead of the training iteration count.
    """

    enabled: bool = False
    start: int = setting(2, ge=2)
    threshold: float = setting(0.95, ge=0, le=1)
    stage_budget: int = setting(10_000, ge=1)
    reset_optimizer: bool = True
    max_stage: int | None = setting(None, ge=2)
    metric: str = setting("fixed", choices=CURRICULUM_METRICS)

    def __post_init__(self) -> None:
        check(self, "curriculum.")
        if self.max_stage is not None and self.max_stage < self.start:
            raise ValueError(f"curriculum.max_stage must be >= curriculum.start ({self.start}), got {self.max_stage}")


@dataclass
class EvalConfig:
    """Evaluation during training: every ``every`` steps (and at the end), on every evaluation split
    of the dataset (or ``splits``), per hop count, at the training iteration count (model.n_iterations)
    and at each of ``iterations``. ``max_hops`` caps the hop counts evaluated (depth task; None: all).
    ``halting``: also evaluate with this adaptive halting rule up to ``halting_max_iterations``
    (logged with iterations = 0).
    """

    every: int = setting(100, ge=1)
    iterations: list[int] = setting(factory=list, ge=1)
    splits: list[str] = field(default_factory=list)
    max_hops: int | None = setting(None, ge=1)
    batch_size: int = setting(4096, ge=1)
    halting: str | None = setting(None, choices=HALTING_RULES)
    halting_eps: float = setting(0.01, ge=0)
    halting_entropy: float = setting(3.0, ge=0)
    halting_max_iterations: int = setting(16, ge=2)

    def __post_init__(self) -> None:
        check(self, "eval.")
        self.iterations = sorted(set(self.iterations))


@dataclass
class RunConfig:
    """Seed, stop conditions, logging, checkpoints and device of one run.

    Stop conditions (first one wins): ``max_steps``; ``time_budget_minutes`` of training wall-clock;
    ``stop_accuracy`` reached on ``stop_split`` (all hop counts together, training iteration count).
    Checkpoints (weights, permanent): step 0, log-spaced steps 2^k and 1.5 * 2^k (``log_checkpoints``),
    every ``checkpoint_every`` steps, and the last step. The resumable training state is written with
    every checkpoint and every ``save_every`` steps (checkpoints/state_latest.pt).
    ``data_root``: where datasets are cached ("" = the run directory's parent / .datasets).
    ``threads``: torch CPU threads during the run (0 = leave torch's setting).
    ``compile``: ``torch.compile`` the training step's forward (issue 16.2). Off by default: on a CPU the
    tiny-composition step runs about as fast compiled as eager (benchmarks/README.md, 16.2); calls with
    hooks attached, evaluation and seed ensembles stay eager.
    ``compile_mode``: torch.compile's ``mode`` for it; "reduce-overhead" captures the step in CUDA graphs on
    a GPU (one graph per batch shape: with fixed recurrence and equal query lengths, one in all).
    """

    seed: int = setting(0, ge=0)
    max_steps: int = setting(1000, ge=0)
    time_budget_minutes: float | None = setting(None, ge=0)
    stop_split: str | None = None
    stop_accuracy: float | None = setting(None, ge=0, le=1)
    log_every: int = setting(10, ge=1)
    checkpoint_every: int = setting(0, ge=0)
    log_checkpoints: bool = True
    save_every: int = setting(500, ge=1)
    device: str = setting("auto", choices=DEVICES)
    threads: int = setting(1, ge=0)
    data_root: str = ""
    compile: bool = False
    compile_mode: str = setting("default", choices=("default", "reduce-overhead", "max-autotune",
                                                     "max-autotune-no-cudagraphs"))

    def __post_init__(self) -> None:
        check(self, "run.")
        if (self.stop_split is None) != (self.stop_accuracy is None):
            raise ValueError("run.stop_split and run.stop_accuracy must be set together")


SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "model": ModelSettings,
    "optim": OptimConfig,
    "recurrence": RecurrenceConfig,
    "curriculum": CurriculumConfig,
    "eval": EvalConfig,
    "run": RunConfig,
}

# Keys a resumed run may change: they do not alter what is computed, only when it stops and where.
RESUMABLE_KEYS = frozenset({"run.max_steps", "run.time_budget_minutes", "run.device", "run.threads",
                            "run.data_root", "run.compile", "run.compile_mode"})


@dataclass
class TrainConfig:
    """The whole run. Build it from a preset, a TOML file or a dict; every section validates itself.

    >>> cfg = TrainConfig()
    >>> sorted(cfg.to_dict())
    ['curriculum', 'data', 'eval', 'model', 'optim', 'recurrence', 'run']
    >>> TrainConfig.from_dict(cfg.to_dict()) == cfg
    True
    """

    data: DataConfig = field(default_factory=DataConfig)
    model: Any = field(default_factory=ModelSettings)  # ModelSettings
    optim: OptimConfig = field(default_factory=OptimConfig)
    recurrence: RecurrenceConfig = field(default_factory=RecurrenceConfig)
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self) -> None:
        if self.curriculum.enabled and self.data.task != "depth":
            raise ValueError("curriculum.enabled needs data.task = \"depth\" (the composition task has only 2 hops)")
        if self.optim.schedule != "constant" and self.optim.decay_steps is None and self.run.max_steps == 0:
            raise ValueError("optim.decay_steps must be set when run.max_steps is 0")
        bp = self.recurrence.backprop_last
        if bp is not None and self.recurrence.mode == "fixed" and bp > self.model.n_iterations:
            raise ValueError(f"recurrence.backprop_last ({bp}) must be <= model.n_iterations ({self.model.n_iterations})")
        if self.curriculum.enabled and self.curriculum.metric == "halting" and self.eval.halting is None:
            raise ValueError("curriculum.metric = \"halting\" needs eval.halting (a rule name, e.g. \"kl+entropy\")")
        if self.curriculum.max_stage is not None and self.curriculum.max_stage > self.data.max_hops:
            raise ValueError(f"curriculum.max_stage ({self.curriculum.max_stage}) must be <= data.max_hops "
                             f"({self.data.max_hops})")

    # --- dict / TOML / JSON -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {name: _section_dict(getattr(self, name)) for name in SECTIONS}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        if not isinstance(d, dict):
            raise ValueError(f"TrainConfig.from_dict expects a dict, got {type(d).__name__}")
        unknown = sorted(set(d) - set(SECTIONS))
        if unknown:
            raise ValueError(f"unknown config section(s) {unknown}; valid sections: {', '.join(SECTIONS)}")
        sections = {}
        for name, kind in SECTIONS.items():
            values = d.get(name, {})
            if not isinstance(values, dict):
                raise ValueError(f"config section [{name}] must be a table, got {type(values).__name__}")
            valid = section_keys(name)
            bad = sorted(set(values) - set(valid))
            if bad:
                raise ValueError(f"unknown key {bad[0]!r} in section [{name}]; valid keys: {', '.join(valid)}")
            # checked (and ints for float fields made floats) before construction, so the error names
            # the section and key even where a type checker wraps the constructor (tests' jaxtyping hook)
            sections[name] = kind(**validate(kind, values, f"{name}."))
        return cls(**sections)

    @classmethod
    def from_toml(cls, path: str | Path) -> TrainConfig:
        """Load a TOML file with [data], [model], ... tables (missing tables and keys take defaults)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"--config {path}: no such file")
        try:
            d = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as err:
            raise ValueError(f"--config {path}: invalid TOML ({err})") from None
        for key in ("description", "summary", "extends"):
            d.pop(key, None)
        try:
            return cls.from_dict(d)
        except ValueError as err:
            raise ValueError(f"--config {path}: {err}") from None

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def with_overrides(self, assignments: list[str]) -> TrainConfig:
        """A copy with ``section.key=value`` assignments applied (typed by each field's declared type)."""
        d = self.to_dict()
        for text in assignments:
            section, key, value = parse_assignment(text)
            d[section][key] = value
        return TrainConfig.from_dict(d)

    def get(self, dotted: str) -> Any:
        section, key = dotted.split(".", 1)
        return getattr(getattr(self, section), key)

    def differences(self, other: TrainConfig) -> list[str]:
        """Dotted keys whose values differ between two configs."""
        a, b = self.to_dict(), other.to_dict()
        return [f"{s}.{k}" for s in SECTIONS for k in section_keys(s) if a[s].get(k) != b[s].get(k)]

    @property
    def train_iterations(self) -> int:
        """The iteration count evaluations call "training": model.n_iterations (fixed R, and for dynamic R
        the count the model is evaluated and checkpointed at)."""
        return self.model.n_iterations


def _section_dict(section: Any) -> dict[str, Any]:
    if hasattr(section, "to_dict"):
        return section.to_dict()
    return {f.name: _plain(getattr(section, f.name)) for f in dataclasses.fields(section)}


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, list | tuple) else value


def section_keys(section: str) -> list[str]:
    return sorted(f.name for f in dataclasses.fields(SECTIONS[section]))


# -------------------------------------------------------------------------------------------------
# --set section.key=value
# -------------------------------------------------------------------------------------------------
def parse_assignment(text: str) -> tuple[str, str, Any]:
    """``"optim.lr=3e-4"`` -> ("optim", "lr", 0.0003); errors name the key and list the valid ones."""
    if "=" not in text:
        raise ValueError(f"--set {text!r}: expected section.key=value")
    dotted, raw = text.split("=", 1)
    dotted = dotted.strip()
    if dotted.count(".") != 1:
        raise ValueError(f"--set {dotted}: expected section.key (sections: {', '.join(SECTIONS)})")
    section, key = dotted.split(".")
    if section not in SECTIONS:
        raise ValueError(f"--set {dotted}: unknown section {section!r}; valid sections: {', '.join(SECTIONS)}")
    if key not in section_keys(section):
        raise ValueError(f"--set {dotted}: unknown key {key!r} in section [{section}]; "
                         f"valid keys: {', '.join(section_keys(section))}")
    try:
        value = parse(SECTIONS[section], key, raw.strip(), f"{section}.")
    except ValueError as err:
        raise ValueError(f"--set {err}") from None
    return section, key, value


def parse_value(raw: str, section: str, key: str) -> Any:
    """Parse a command-line string as the value of ``section.key`` (by the field's declared type).

    >>> parse_value("none", "optim", "grad_clip") is None, parse_value("1e-3", "optim", "lr")
    (True, 0.001)
    >>> parse_value("yes", "optim", "orthograd"), parse_value("1e4", "run", "max_steps")
    (True, 10000)
    >>> parse_value("[1, 2, 4]", "eval", "iterations"), parse_value("biases,norms", "optim", "no_decay")
    ([1, 2, 4], ['biases', 'norms'])
    >>> parse_value("x", "optim", "batch_size")
    Traceback (most recent call last):
    ...
    ValueError: optim.batch_size must be an integer >= 1, got 'x'
    """
    return parse(SECTIONS[section], key, raw.strip(), f"{section}.")
