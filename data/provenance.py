"""Provenance shared by every artifact looplens writes: package version and git SHA.

Lives in data/ because data/ is the root of the dependency chain (models/, interp/, analyses/ and
app/ may all import it; it imports none of them).
"""

from __future__ import annotations

import functools
import subprocess
from importlib import metadata
from pathlib import Path

# the atomic writers live in data/files.py; re-exported here, where every writer has imported them from
from looplens.data.files import atomic_dir, atomic_write_bytes, atomic_write_text

__all__ = ["atomic_dir", "atomic_write_bytes", "atomic_write_text", "git_sha", "looplens_version", "provenance"]

_ROOT = Path(__file__).resolve().parent.parent


def looplens_version() -> str:
    """The installed distribution's version (``0.0.0+unknown`` when run from a bare checkout)."""
    try:
        return metadata.version("looplens")
    except metadata.PackageNotFoundError:
        return "0.0.0+unknown"


@functools.cache
def git_sha() -> str | None:
    """The source tree's commit SHA, with ``-dirty`` when it has uncommitted changes; None outside git."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=_ROOT, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=_ROOT, capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{sha}-dirty" if dirty else sha


def provenance() -> dict:
    """Versions and source revision, recorded in every meta/config JSON looplens writes."""
    import numpy
    import torch

    return {
        "looplens_version": looplens_version(),
        "git_sha": git_sha(),
        "torch_version": torch.__version__,
        "numpy_version": numpy.__version__,
    }
