"""looplens analyses: scripted studies of trained runs, reports, and ``looplens reproduce``.

Each study (``analyses.studies``) reads one or more run directories and returns tables (pandas) and
figures (plotly) with a few headline numbers; :mod:`analyses.report` turns study results into a
self-contained HTML report and a claims summary; :mod:`analyses.reproduce` trains the runs the studies
need and runs them all, resumably. See docs/analyses.md.

Imports are lazy (PEP 562) so ``import analyses.cli`` (every ``looplens`` command) stays cheap.

>>> shipped_run_path().name
'shipped_run'
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

_EXPORTS = {
    "STUDIES": "looplens.analyses.studies",
    "StudyOptions": "looplens.analyses.studies.base",
    "StudyResult": "looplens.analyses.studies.base",
    "run_study": "looplens.analyses.studies",
    "study_names": "looplens.analyses.studies",
    "build_report": "looplens.analyses.report",
    "report_runs": "looplens.analyses.report",
    "judge_claims": "looplens.analyses.claims",
    "reproduce": "looplens.analyses.reproduce",
    "plan_for": "looplens.analyses.reproduce",
}

__all__ = sorted([*_EXPORTS, "shipped_run_path"])


def shipped_run_path() -> Path:
    """Where the trained runs shipped inside the package live: ``analyses/shipped_run``.

    The folder holds run directories (``looped/``, ``vanilla/``) and their ``report/``; it may not exist
    (it is produced separately), so check ``.exists()`` first, e.g.
    ``models.train.load_run(shipped_run_path() / "looped")``. ``looplens report`` accepts the folder itself.
    """
    return Path(__file__).resolve().parent / "shipped_run"


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'analyses' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
