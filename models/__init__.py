"""The hooked looped transformer: config, model, halting rules, checkpoints.

>>> from looplens.models import LoopedConfig, LoopedTransformer
"""

from looplens.models.config import LoopedConfig
from looplens.models.halting import (
    EntropyHalting,
    HaltingRule,
    KLEntropyHalting,
    KLHalting,
    LatentChangeHalting,
    make_halting_rule,
)
from looplens.models.looped import AdaptiveOutput, LoopedActivationCache, LoopedTransformer, ModelAtIterations

__all__ = [
    "AdaptiveOutput",
    "EntropyHalting",
    "HaltingRule",
    "KLEntropyHalting",
    "KLHalting",
    "LatentChangeHalting",
    "LoopedActivationCache",
    "LoopedConfig",
    "LoopedTransformer",
    "ModelAtIterations",
    "make_halting_rule",
]
