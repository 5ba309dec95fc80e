"""`DataConfig`: everything that determines a dataset, validated on construction.

One frozen dataclass for both tasks; fields a task does not use are kept (and hashed) rather than
silently reset, so `meta.json` always shows exactly what the user asked for.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from looplens.data.validation import check, setting

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

    task: str = setting("composition", choices=TASKS)
    world: str = setting("random-tail", choices=WORLDS)
    n_entities: int = setting(2000, ge=2)
    n_relations: int = setting(200, ge=1)
    out_degree: int = setting(20, ge=1)
    ood_fraction: float = setting(0.05, ge=0, lt=1)  # composition: share of atomic facts (per fact) that are OOD
    phi: float = setting(7.2, ge=0)  # composition: |trained 2-hop facts| = round(phi * |ID atomic facts|)
    test_id_fraction: float = setting(0.005, ge=0, lt=1)  # composition: trainable 2-hop facts held out as test_inferred_id
    eval_max: int = setting(3000, ge=1)  # cap on every evaluation split
    max_hops: int = setting(40, ge=2)  # depth: chains of k = 2..max_hops hops
    per_hop_train: int = setting(15000, ge=1)  # depth: train chains per k
    per_hop_test: int = setting(750, ge=1)  # depth: test chains per k
    seed: int = setting(0, ge=0)

    def __post_init__(self) -> None:
        # types and ranges (data/validation.py, pydantic); numpy scalars are stored as Python numbers,
        # ints given for float fields as floats, so to_dict() is JSON-ready and the checksum stable
        check(self, "DataConfig.")
        if self.world == "permutation":
            # every entity has every relation in a permutation world; a different value would be
            # meaningless, so normalise it instead of hashing a number that changes nothing
            object.__setattr__(self, "out_degree", self.n_relations)
        if self.out_degree > self.n_relations:
            raise ValueError(
                f"DataConfig.out_degree must be <= n_relations ({self.n_relations}): an entity has at most "
                f"one edge per relation, got {self.out_degree}"
            )

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

