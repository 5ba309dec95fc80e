"""The studies, by name. Each is a module with NAME, TITLE, CLAIMS, select(runs) and run(runs, options).

>>> study_names()
['systematic', 'grokking', 'depth', 'overthinking', 'halting', 'mechanism', 'shortcut']
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

# name -> module; the order is the report's order (claims 1..6, then the shortcut caveat)
STUDIES = {
    "systematic": "looplens.analyses.studies.systematic",
    "grokking": "looplens.analyses.studies.grokking",
    "depth": "looplens.analyses.studies.depth",
    "overthinking": "looplens.analyses.studies.overthinking",
    "halting": "looplens.analyses.studies.halting",
    "mechanism": "looplens.analyses.studies.mechanism",
    "shortcut": "looplens.analyses.studies.shortcut",
}

# one line per study for `looplens study --list` (no imports needed)
SUMMARIES = {
    "systematic": "claim 1: train/ID/OOD curves and final table, looped R vs vanilla (composition runs)",
    "grokking": "claim 2: steps at which train, ID and OOD pass thresholds; hop locator at each stage",
    "depth": "claim 3: learnable depth; accuracy over hops x inference iterations (depth runs)",
    "overthinking": "claim 4: answer margin and accuracy over 1..N iterations per hop depth (looped runs)",
    "halting": "claim 5: fixed iteration counts vs KL-only vs KL+entropy halting (looped runs)",
    "mechanism": "claim 6: hop locator, residual patching, fixed points (composition runs)",
    "shortcut": "relation-suffix shortcut: random-tail vs permutation worlds, and what models learn",
}


def study_names() -> list[str]:
    return list(STUDIES)


def get_study(name: str) -> ModuleType:
    if name not in STUDIES:
        raise ValueError(f"unknown study {name!r}; studies: {', '.join(STUDIES)}")
    return importlib.import_module(STUDIES[name])


def run_study(name: str, runs: Sequence, options=None, out: str | os.PathLike | None = None):
    """Run study ``name`` on runs (``models.train.Run`` objects or run directories); with ``out``, also
    save the result there (see :meth:`StudyResult.save`). Returns the :class:`StudyResult`."""
    from looplens.analyses.studies.base import StudyOptions, as_runs

    module = get_study(name)
    result = module.run(as_runs(runs), options or StudyOptions())
    if out is not None:
        result.save(Path(out))
    return result
