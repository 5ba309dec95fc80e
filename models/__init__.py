"""The hooked looped transformer: config, model, halting rules, checkpoints.

Names are imported lazily (PEP 562), so ``import looplens.models.cli`` (done for every ``looplens``
command, ``--help`` included) does not pay for torch.

>>> from looplens.models import LoopedConfig, LoopedTransformer
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "LoopedConfig": "looplens.models.config",
    "EntropyHalting": "looplens.models.halting",
    "HaltingRule": "looplens.models.halting",
    "KLEntropyHalting": "looplens.models.halting",
    "KLHalting": "looplens.models.halting",
    "LatentChangeHalting": "looplens.models.halting",
    "LearnedExit": "looplens.models.halting",
    "make_halting_rule": "looplens.models.halting",
    "AdaptiveOutput": "looplens.models.looped",
    "LoopedActivationCache": "looplens.models.looped",
    "LoopedTransformer": "looplens.models.looped",
    "LoopStep": "looplens.models.looped",
    "ModelAtIterations": "looplens.models.looped",
    "from_pretrained": "looplens.models.pretrained",
    "ForeignLoopedModel": "looplens.models.foreign",
    "wrap_looped": "looplens.models.foreign",
    "retrofit_loop": "looplens.models.foreign",
    "ExitHead": "looplens.models.exit",
    "ExitTrace": "looplens.models.exit",
    "entropy_regularised_loss": "looplens.models.exit",
    "exit_distribution": "looplens.models.exit",
    "exit_iterations": "looplens.models.exit",
    "exit_vs_halting": "looplens.models.exit",
    "forward_exit": "looplens.models.exit",
    "improvement_loss": "looplens.models.exit",
    "train_exit_head": "looplens.models.exit",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'looplens.models' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
