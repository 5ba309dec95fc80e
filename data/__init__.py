"""Synthetic knowledge graphs (random-tail and permutation worlds), k-hop tasks and honest splits.

The public API (see docs/data.md)::

    from looplens.data import (DataConfig, World, Vocab, Dataset, EncodedSplit,
                      make_world, build_dataset, load_dataset, ensure_dataset, shortcut_rate)

Names are imported lazily (PEP 562), so ``import data.cli`` (done for every ``looplens`` command,
``--help`` included) does not pay for torch and pandas.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "DataConfig": "looplens.data.config",
    "Facts": "looplens.data.facts",
    "export_grokked": "looplens.data.grokked",
    "import_grokked": "looplens.data.grokked",
    "shortcut_rate": "looplens.data.shortcuts",
    "Dataset": "looplens.data.storage",
    "EncodedSplit": "looplens.data.storage",
    "build_dataset": "looplens.data.storage",
    "ensure_dataset": "looplens.data.storage",
    "load_dataset": "looplens.data.storage",
    "COMPOSITION_SPLITS": "looplens.data.tasks",
    "DEPTH_SPLITS": "looplens.data.tasks",
    "TRAIN_SAMPLES": "looplens.data.tasks",
    "generate": "looplens.data.tasks",
    "Vocab": "looplens.data.vocab",
    "World": "looplens.data.worlds",
    "make_world": "looplens.data.worlds",
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
