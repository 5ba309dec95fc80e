"""Synthetic knowledge graphs (random-tail and permutation worlds), k-hop tasks and honest splits.

The public API (see docs/data.md)::

    from data import (DataConfig, World, Vocab, Dataset, EncodedSplit,
                      make_world, build_dataset, load_dataset, ensure_dataset, shortcut_rate)

Names are imported lazily (PEP 562), so ``import data.cli`` (done for every ``looplens`` command,
``--help`` included) does not pay for torch and pandas.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "DataConfig": "data.config",
    "Facts": "data.facts",
    "export_grokked": "data.grokked",
    "import_grokked": "data.grokked",
    "shortcut_rate": "data.shortcuts",
    "Dataset": "data.storage",
    "EncodedSplit": "data.storage",
    "build_dataset": "data.storage",
    "ensure_dataset": "data.storage",
    "load_dataset": "data.storage",
    "COMPOSITION_SPLITS": "data.tasks",
    "DEPTH_SPLITS": "data.tasks",
    "TRAIN_SAMPLES": "data.tasks",
    "generate": "data.tasks",
    "Vocab": "data.vocab",
    "World": "data.worlds",
    "make_world": "data.worlds",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'data' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
