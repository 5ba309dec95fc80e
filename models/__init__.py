"""The hooked looped transformer: config, model, halting rules, checkpoints.

>>> from models import LoopedConfig, LoopedTransformer
"""

from models.config import LoopedConfig
from models.halting import (
    EntropyHalting,
    HaltingRule,
    KLEntropyHalting,
    KLHalting,
    LatentChangeHalting,
    make_halting_rule,
)
from models.looped import AdaptiveOutput, LoopedActivationCache, LoopedTransformer, ModelAtIterations

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
