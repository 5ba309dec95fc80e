"""looplens: interpretability toolkit for looped (recurrent-depth, weight-shared) transformers.

The one import root. The repository keeps the folders data/, models/, interp/, analyses/ and app/ at
its top level; the package maps them to ``looplens.data``, ``looplens.models``, ``looplens.interp``,
``looplens.analyses`` and ``looplens.app`` (setuptools ``package-dir``), so a user's own ``data/`` or
``models/`` folder never shadows ours. Subpackages load on first use, keeping ``import looplens`` cheap.

>>> import looplens
>>> looplens.models.LoopedConfig.__name__
'LoopedConfig'
"""

from __future__ import annotations

import importlib
from importlib import metadata
from typing import Any

try:
    __version__ = metadata.version("looplens")
except metadata.PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

_SUBPACKAGES = ("data", "models", "interp", "analyses", "app")
__all__ = ["__version__", *_SUBPACKAGES]


def __getattr__(name: str) -> Any:
    if name in _SUBPACKAGES:
        module = importlib.import_module(f"looplens.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module 'looplens' has no attribute {name!r}")
