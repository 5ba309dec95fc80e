"""TrainConfig: one dataclass tree for a training run, validated, TOML-loadable, overridable.

Sections (each a small dataclass that validates itself, per STYLE.md habit 6)::

    data        data.DataConfig: world, task, splits, data seed
    model       LoopedConfig's fields minus d_vocab / n_ctx (those come from the dataset)
    optim       AdamW, schedule, loss, batch composition, research options (Grokfast, OrthoGrad, StableMax)
    recurrence  iterations per training batch: fixed, or sampled per batch; truncated backprop
    curriculum  depth task: stage k trains hops <= k, advances when held-out k-hop accuracy passes
    eval        what is evaluated during training, how often, at which iteration counts
    run         seed, stop conditions, checkpoints, device

``--set section.key=value`` overrides are parsed by the field's declared type (see :func:`parse_value`).

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
import math
import numbers
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from looplens.data import DataConfig
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


def _fail(section: str, key: str, what: str) -> None:
    raise ValueError(f"{section}.{key} {what}")


def _int(section: str, key: str, value: Any, minimum: int | None = None, optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        _fail(section, key, f"must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        _fail(section, key, f"must be >= {minimum}, got {value!r}")


def _float(section: str, key: str, value: Any, lo: float | None = None, hi: float | None = None,
           optional: bool = False, hi_open: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        _fail(section, key, f"must be a finite number, got {value!r}")
    if lo is not None and value < lo:
        _fail(section, key, f"must be >= {lo}, got {value!r}")
    if hi is not None and (value >= hi if hi_open else value > hi):
        _fail(section, key, f"must be {'<' if hi_open else '<='} {hi}, got {value!r}")


def _choice(section: str, key: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        _fail(section, key, f"must be one of {', '.join(choices)}; got {value!r}")


# -------------------------------------------------------------------------------------------------
# Sections
# -------------------------------------------------------------------------------------------------
def _model_fields() -> list[tuple[str, Any, Any]]:
    out = []
    for f in dataclasses.fields(LoopedConfig):
        if f.name in _MODEL_EXCLUDED:
            continue
        default = f.default if f.default is not dataclasses.MISSING else None
        out.append((f.name, f.type, field(default=default)))
    return out


def _model_post_init(self) -> None:
    if self.seed is not None:
        _int("model", "seed", self.seed, 0)
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

    lr: float = 1e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.01
    no_decay: list[str] = field(default_factory=lambda: list(NO_DECAY_GROUPS))
    batch_size: int = 512
    warmup_steps: int = 0
    schedule: str = "constant"
    decay_steps: int | None = None  # linear/cosine: steps from the end of warm-up to min_lr (None: max_steps)
    min_lr_ratio: float = 0.0
    label_smoothing: float = 0.0
    grad_clip: float | None = None  # max global grad norm; None or 0: off
    loss: str = "softmax"
    atomic_share: float | None = None
    grokfast_alpha: float = 0.98
    grokfast_lambda: float = 0.0
    orthograd: bool = False
    precision: str = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU

    def __post_init__(self) -> None:
        s = "optim"
        _float(s, "lr", self.lr, 0.0)
        if not (isinstance(self.betas, list | tuple) and len(self.betas) == 2):
            _fail(s, "betas", f"must be two numbers, got {self.betas!r}")
        self.betas = [float(b) for b in self.betas]
        for b in self.betas:
            _float(s, "betas", b, 0.0, 1.0, hi_open=True)
        _float(s, "eps", self.eps, 0.0)
        _float(s, "weight_decay", self.weight_decay, 0.0)
        self.no_decay = list(self.no_decay)
        for group in self.no_decay:
            _choice(s, "no_decay", group, NO_DECAY_GROUPS)
        _int(s, "batch_size", self.batch_size, 1)
        _int(s, "warmup_steps", self.warmup_steps, 0)
        _choice(s, "schedule", self.schedule, SCHEDULES)
        _int(s, "decay_steps", self.decay_steps, 1, optional=True)
        _float(s, "min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)
        _float(s, "label_smoothing", self.label_smoothing, 0.0, 1.0, hi_open=True)
        _float(s, "grad_clip", self.grad_clip, 0.0, optional=True)
        _choice(s, "loss", self.loss, LOSSES)
        _float(s, "atomic_share", self.atomic_share, 0.0, 1.0, optional=True)
        _float(s, "grokfast_alpha", self.grokfast_alpha, 0.0, 1.0, hi_open=True)
        _float(s, "grokfast_lambda", self.grokfast_lambda, 0.0)
        if not isinstance(self.orthograd, bool):
            _fail(s, "orthograd", f"must be true or false, got {self.orthograd!r}")
        _choice(s, "precision", self.precision, PRECISIONS)


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

    mode: str = "fixed"
    mean: float = 4.0
    min: int = 2
    max: int = 8
    sigma: float = 0.5
    backprop_last: int | None = None
    supervise: str = "last"

    def __post_init__(self) -> None:
        s = "recurrence"
        _choice(s, "supervise", self.supervise, SUPERVISE_MODES)
        _choice(s, "mode", self.mode, RECURRENCE_MODES)
        _float(s, "mean", self.mean, 0.0)
        _int(s, "min", self.min, 1)
        _int(s, "max", self.max, 1)
        if self.max < self.min:
            _fail(s, "max", f"must be >= recurrence.min ({self.min}), got {self.max}")
        _float(s, "sigma", self.sigma, 0.0)
        _int(s, "backprop_last", self.backprop_last, 1, optional=True)


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
    start: int = 2
    threshold: float = 0.95
    stage_budget: int = 10_000
    reset_optimizer: bool = True
    max_stage: int | None = None
    metric: str = "fixed"

    def __post_init__(self) -> None:
        s = "curriculum"
        if not isinstance(self.enabled, bool):
            _fail(s, "enabled", f"must be true or false, got {self.enabled!r}")
        _int(s, "start", self.start, 2)
        _float(s, "threshold", self.threshold, 0.0, 1.0)
        _int(s, "stage_budget", self.stage_budget, 1)
        if not isinstance(self.reset_optimizer, bool):
            _fail(s, "reset_optimizer", f"must be true or false, got {self.reset_optimizer!r}")
        _int(s, "max_stage", self.max_stage, 2, optional=True)
        if self.max_stage is not None and self.max_stage < self.start:
            _fail(s, "max_stage", f"must be >= curriculum.start ({self.start}), got {self.max_stage}")
        _choice(s, "metric", self.metric, CURRICULUM_METRICS)


@dataclass
class EvalConfig:
    """Evaluation during training: every ``every`` steps (and at the end), on every evaluation split
    of the dataset (or ``splits``), per hop count, at the training iteration count (model.n_iterations)
    and at each of ``iterations``. ``max_hops`` caps the hop counts evaluated (depth task; None: all).
    ``halting``: also evaluate with this adaptive halting rule up to ``halting_max_iterations``
    (logged with iterations = 0).
    """

    every: int = 100
    iterations: list[int] = field(default_factory=list)
    splits: list[str] = field(default_factory=list)
    max_hops: int | None = None
    batch_size: int = 4096
    halting: str | None = None
    halting_eps: float = 0.01
    halting_entropy: float = 3.0
    halting_max_iterations: int = 16

    def __post_init__(self) -> None:
        s = "eval"
        _int(s, "every", self.every, 1)
        self.iterations = [int(t) if isinstance(t, numbers.Integral) and not isinstance(t, bool) else t
                           for t in self.iterations]
        for t in self.iterations:
            _int(s, "iterations", t, 1)
        self.iterations = sorted(set(self.iterations))
        self.splits = [str(x) for x in self.splits]
        _int(s, "max_hops", self.max_hops, 1, optional=True)
        _int(s, "batch_size", self.batch_size, 1)
        if self.halting is not None:
            _choice(s, "halting", self.halting, HALTING_RULES)
        _float(s, "halting_eps", self.halting_eps, 0.0)
        _float(s, "halting_entropy", self.halting_entropy, 0.0)
        _int(s, "halting_max_iterations", self.halting_max_iterations, 2)


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
    """

    seed: int = 0
    max_steps: int = 1000
    time_budget_minutes: float | None = None
    stop_split: str | None = None
    stop_accuracy: float | None = None
    log_every: int = 10
    checkpoint_every: int = 0
    log_checkpoints: bool = True
    save_every: int = 500
    device: str = "auto"
    threads: int = 1
    data_root: str = ""

    def __post_init__(self) -> None:
        s = "run"
        _int(s, "seed", self.seed, 0)
        _int(s, "max_steps", self.max_steps, 0)
        _float(s, "time_budget_minutes", self.time_budget_minutes, 0.0, optional=True)
        _float(s, "stop_accuracy", self.stop_accuracy, 0.0, 1.0, optional=True)
        if (self.stop_split is None) != (self.stop_accuracy is None):
            _fail(s, "stop_split", "and run.stop_accuracy must be set together")
        _int(s, "log_every", self.log_every, 1)
        _int(s, "checkpoint_every", self.checkpoint_every, 0)
        if not isinstance(self.log_checkpoints, bool):
            _fail(s, "log_checkpoints", f"must be true or false, got {self.log_checkpoints!r}")
        _int(s, "save_every", self.save_every, 1)
        _choice(s, "device", self.device, DEVICES)
        _int(s, "threads", self.threads, 0)
        if not isinstance(self.data_root, str):
            _fail(s, "data_root", f"must be a string, got {self.data_root!r}")


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
                            "run.data_root"})


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
            sections[name] = kind(**{k: _coerce(v, field_type(name, k)) for k, v in values.items()})
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
        return cls.from_dict(d)

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


def _coerce(value: Any, type_text: str) -> Any:
    """TOML and JSON write 4 for 4.0: give float fields floats (so a type-checked dataclass accepts them)."""
    options = {t.strip() for t in type_text.split("|")}
    if "float" in options and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if "list[float]" in options and isinstance(value, list | tuple):
        return [float(v) if isinstance(v, int) and not isinstance(v, bool) else v for v in value]
    return value


def section_keys(section: str) -> list[str]:
    return sorted(f.name for f in dataclasses.fields(SECTIONS[section]))


def field_type(section: str, key: str) -> str:
    for f in dataclasses.fields(SECTIONS[section]):
        if f.name == key:
            return f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    raise KeyError(key)


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
        value = parse_value(raw.strip(), field_type(section, key))
    except ValueError as err:
        raise ValueError(f"--set {dotted}: {err}") from None
    return section, key, value


def parse_value(raw: str, type_text: str) -> Any:
    """Parse a command-line value by a dataclass field's type annotation (as text).

    >>> parse_value("none", "int | None") is None, parse_value("1e-3", "float"), parse_value("yes", "bool")
    (True, 0.001, True)
    >>> parse_value("[1, 2, 4]", "list[int]"), parse_value("biases,norms", "list[str]")
    ([1, 2, 4], ['biases', 'norms'])
    >>> parse_value("x", "int")
    Traceback (most recent call last):
    ...
    ValueError: expected int, got 'x'
    """
    options = [t.strip() for t in type_text.split("|")]
    if "None" in options and raw.lower() in ("none", "null", ""):
        return None
    options = [t for t in options if t != "None"]
    kind = options[0] if len(options) == 1 else None
    if kind is None:
        raise ValueError(f"cannot parse a value of type {type_text}")
    if kind.startswith("list["):
        inner = kind[5:-1]
        body = raw.strip()
        if body.startswith("[") and body.endswith("]"):
            body = body[1:-1]
        items = [item.strip().strip("'\"") for item in body.split(",") if item.strip()]
        return [parse_value(item, inner) for item in items]
    if kind == "bool":
        low = raw.lower()
        if low in ("true", "1", "yes", "on"):
            return True
        if low in ("false", "0", "no", "off"):
            return False
        raise ValueError(f"expected true or false, got {raw!r}")
    if kind == "int":
        try:
            return int(raw)
        except ValueError:
            try:
                as_float = float(raw)
            except ValueError:
                raise ValueError(f"expected int, got {raw!r}") from None
            if as_float.is_integer():  # "1e4"
                return int(as_float)
            raise ValueError(f"expected int, got {raw!r}") from None
    if kind == "float":
        try:
            return float(raw)
        except ValueError:
            raise ValueError(f"expected a number, got {raw!r}") from None
    if kind == "str":
        return raw.strip("'\"")
    raise ValueError(f"cannot parse a value of type {type_text}")
