"""Which run directories the app shows: the ones given, the shipped one, folders of runs.

Plain Python (no Streamlit), so the CLI and the tests use it too. Opening a run is
:func:`models.train.load_run`; this module only finds directories and turns the ways a directory can
be wrong (missing, empty, not a run, corrupt) into one-line messages that say what to do.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

RUNS_ENV = "LOOPLENS_APP_RUNS"  # os.pathsep-separated run directories, set by `looplens app`
SHIPPED_RUN_ENV = "LOOPLENS_SHIPPED_RUN"  # overrides where the shipped run is looked for
SHIPPED_RUN_PACKAGE, SHIPPED_RUN_FOLDER = "analyses", "shipped_run"
RUN_MARKER = "config.json"


def shipped_run_dir() -> Path:
    """Where the run shipped with the package lives (it may not exist yet).

    The one place to change when the shipped run moves: ``$LOOPLENS_SHIPPED_RUN`` if set, else
    ``analyses/shipped_run/`` inside the installed package.
    """
    if os.environ.get(SHIPPED_RUN_ENV):
        return Path(os.environ[SHIPPED_RUN_ENV]).expanduser()
    spec = importlib.util.find_spec(SHIPPED_RUN_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return Path(SHIPPED_RUN_PACKAGE) / SHIPPED_RUN_FOLDER
    return Path(next(iter(spec.submodule_search_locations))) / SHIPPED_RUN_FOLDER


def default_run_dirs() -> list[Path]:
    """The runs shown when `looplens app` gets no RUN_DIR: the shipped run(s), or none."""
    root = shipped_run_dir()
    return expand_run_dirs([root]) if root.is_dir() else []


def is_run_dir(path: Path) -> bool:
    return (path / RUN_MARKER).is_file()


def expand_run_dirs(paths: list[str | Path]) -> list[Path]:
    """Each path as given, except a folder of runs (no config.json, run directories inside), which
    stands for its runs in name order. Paths that are not runs are kept: opening them explains why.
    Duplicates are dropped, order kept."""
    out: list[Path] = []
    for raw in paths:
        path = Path(raw).expanduser()
        inner = sorted(p for p in path.iterdir() if p.is_dir() and is_run_dir(p)) if (
            path.is_dir() and not is_run_dir(path)) else []
        for p in inner or [path]:
            if p not in out:
                out.append(p)
    return out


def run_dirs_from_env() -> list[Path]:
    """The run directories `looplens app` passed to the Streamlit script."""
    value = os.environ.get(RUNS_ENV, "")
    return expand_run_dirs([p for p in value.split(os.pathsep) if p.strip()])


def check_run_dir(path: Path) -> None:
    """Raise FileNotFoundError / ValueError with a fix when ``path`` cannot be a run directory."""
    if not path.exists():
        raise FileNotFoundError(f"run directory {path} does not exist: check the path, or train one with "
                                f"`looplens train --preset smoke-composition --out {path}`")
    if not path.is_dir():
        raise ValueError(f"{path} is a file, not a run directory (give the folder holding config.json)")
    if not any(path.iterdir()):
        raise ValueError(f"run directory {path} is empty: training has not started there, or it was cleaned; "
                         "train into it with `looplens train ... --out` or pick another run")
    if not is_run_dir(path):
        raise ValueError(f"{path} has no config.json, so it is not a looplens run directory (nor a folder of runs); "
                         "give the folder that `looplens train --out` wrote")


def check_run_config(path: Path) -> None:
    """:func:`check_run_dir`, and config.json reads as a run's JSON: what can be told about a run
    without importing torch (the sidebar shows it at once; opening the run tells the rest)."""
    check_run_dir(path)
    config = path / RUN_MARKER
    try:
        meta = json.loads(config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{config} is corrupt, not JSON ({err}); restore it, or train the run again") from None
    if not isinstance(meta, dict) or "config" not in meta:
        raise ValueError(f"{config} has no 'config' section, so `looplens train` did not write it; "
                         "give the folder that `looplens train --out` wrote")


def quick_problem(path: Path) -> str | None:
    """None when :func:`check_run_config` passes, else its message (one line, with the fix)."""
    try:
        check_run_config(path)
    except (OSError, ValueError) as err:
        return str(err)
    return None


def run_label(path: Path, all_paths: list[Path]) -> str:
    """A short unique label: the folder name, with its parent when two runs share a name.

    >>> runs = [Path("sweep/a/looped"), Path("sweep/b/looped"), Path("runs/vanilla")]
    >>> [run_label(p, runs) for p in runs]
    ['a/looped', 'b/looped', 'vanilla']
    """
    same = [p for p in all_paths if p.name == path.name]
    return path.name if len(same) <= 1 else f"{path.parent.name}/{path.name}"
