"""`DataConfig`: everything that determines a dataset, validated on construction.

One frozen dataclass for both tasks; fields a task does not use are kept (and hashed) rather than
silently reset, so `meta.json` always shows exactly what the user asked for.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import numbers
from dataclasses import dataclass
from typing import Any

TASKS = ("composition", "depth")
WORLDS = ("random-tail", "permutation")


@dataclass(frozen=True)
class DataConfig:
    """How to build one dataset: the world, the task, the split sizes and the seed.

    Defaults are the paper's section 5 (composition) setting. Section 6 (depth) is
    ``DataConfig(task="depth", world="permutation", n_entities=200, n_relations=10)``.

    For permutation worlds ``out_degree`` is forced to ``n_relations`` (every entity has every relation).

    >>> cfg = DataConfig(task="depth", world="permutation", n_entities=200, n_relations=10)
    >>> cfg.out_degree
    10
    >>> DataConfig.from_dict(cfg.to_dict()) == cfg
    True
    >>> DataConfig(n_entities=-1)
    Traceback (most recent call last):
    ...
    ValueError: DataConfig.n_entities must be an integer >= 2, got -1
    """

    task: str = "composition"
    world: str = "random-tail"
    n_entities: int = 2000
    n_relations: int = 200
    out_degree: int = 20
    ood_fraction: float = 0.05  # composition: share of atomic facts (per fact) that are OOD
    phi: float = 7.2  # composition: |trained 2-hop facts| = round(phi * |ID atomic facts|)
    test_id_fraction: float = 0.005  # composition: trainable 2-hop facts held out as test_inferred_id
    eval_max: int = 3000  # cap on every evaluation split
    max_hops: int = 40  # depth: chains of k = 2..max_hops hops
    per_hop_train: int = 15000  # depth: train chains per k
    per_hop_test: int = 750  # depth: test chains per k
    seed: int = 0

    def __post_init__(self) -> None:
        _check_choice("task", self.task, TASKS)
        _check_choice("world", self.world, WORLDS)
        _check_int("n_entities", self.n_entities, 2)
        _check_int("n_relations", self.n_relations, 1)
        if self.world == "permutation":
            # every entity has every relation in a permutation world; a different value would be
            # meaningless, so normalise it instead of hashing a number that changes nothing
            object.__setattr__(self, "out_degree", self.n_relations)
        _check_int("out_degree", self.out_degree, 1)
        if self.out_degree > self.n_relations:
            raise ValueError(
                f"DataConfig.out_degree must be <= n_relations ({self.n_relations}): an entity has at most "
                f"one edge per relation, got {self.out_degree}"
            )
        _check_fraction("ood_fraction", self.ood_fraction)
        _check_fraction("test_id_fraction", self.test_id_fraction)
        _check_float("phi", self.phi)
        _check_int("eval_max", self.eval_max, 1)
        _check_int("max_hops", self.max_hops, 2)
        _check_int("per_hop_train", self.per_hop_train, 1)
        _check_int("per_hop_test", self.per_hop_test, 1)
        _check_int("seed", self.seed, 0)
        # numpy scalars are accepted but stored as plain Python numbers, so to_dict() is JSON-ready
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type == "int":
                object.__setattr__(self, f.name, int(value))
            elif f.type == "float":
                object.__setattr__(self, f.name, float(value))

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.field_names()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DataConfig:
        if not isinstance(d, dict):
            raise ValueError(f"DataConfig.from_dict expects a dict, got {type(d).__name__}")
        known = set(cls.field_names())
        for key in d:
            if key not in known:
                raise ValueError(f"DataConfig: unknown key {key!r} (known: {', '.join(sorted(known))})")
        return cls(**d)

    def replace(self, **changes: Any) -> DataConfig:
        return dataclasses.replace(self, **changes)

    def checksum(self) -> str:
        """First 12 hex digits of the sha256 of the canonical JSON of :meth:`to_dict`.

        Stable across runs and machines (sorted keys, fixed separators, floats via repr).
        """
        text = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def dirname(self) -> str:
        """The directory name `ensure_dataset` uses: ``<task>-<world>-<checksum>``."""
        return f"{self.task}-{self.world}-{self.checksum()}"

    def cli_args(self) -> list[str]:
        """The `looplens data` arguments that rebuild this config (without ``--out``)."""
        args = ["--task", self.task, "--world", self.world,
                "--entities", str(self.n_entities), "--relations", str(self.n_relations)]
        if self.world == "random-tail":
            args += ["--out-degree", str(self.out_degree)]
        if self.task == "composition":
            args += ["--ood-fraction", repr(self.ood_fraction), "--phi", repr(self.phi),
                     "--test-id-fraction", repr(self.test_id_fraction)]
        else:
            args += ["--max-hops", str(self.max_hops), "--per-hop-train", str(self.per_hop_train),
                     "--per-hop-test", str(self.per_hop_test)]
        return args + ["--eval-max", str(self.eval_max), "--seed", str(self.seed)]


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"DataConfig.{name} must be one of {', '.join(choices)}; got {value!r}")


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"DataConfig.{name} must be an integer >= {minimum}, got {value!r}")


def _check_float(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
        raise ValueError(f"DataConfig.{name} must be a finite number >= 0, got {value!r}")


def _check_fraction(name: str, value: Any) -> None:
    _check_float(name, value)
    if value >= 1:
        raise ValueError(f"DataConfig.{name} must be in [0, 1), got {value!r}")
