"""`looplens` is the one import root: a user's own `data/`, `models/` or `app/` folder cannot shadow it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.fixture
def ml_project(tmp_path: Path) -> Path:
    """A working directory laid out like a typical ML project: empty data/, models/, app/ packages."""
    for name in ("data", "models", "app", "interp", "analyses"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text("# the user's own package\n")
    return tmp_path


def _run(code: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ""}
    return subprocess.run([sys.executable, *code], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_imports_are_not_shadowed_by_a_users_folders(ml_project: Path):
    code = (
        "import data, models\n"
        "assert 'looplens' not in (data.__file__ or ''), data.__file__\n"  # the user's own package wins for `data`
        "from looplens.models import LoopedConfig, LoopedTransformer\n"
        "from looplens.data import make_world\n"
        "from looplens import interp, analyses\n"
        "import looplens.app\n"
        "cfg = LoopedConfig(d_vocab=10, n_ctx=3, d_model=8, n_heads=2, n_blocks=1, n_iterations=2)\n"
        "print(type(LoopedTransformer(cfg)).__name__, make_world.__module__, interp.logit_lens.__module__)\n"
    )
    result = _run(["-c", code], ml_project)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["LoopedTransformer", "looplens.data.worlds", "looplens.interp.lens"]


def test_python_dash_m_looplens_runs_the_cli(ml_project: Path):
    result = _run(["-m", "looplens", "--help"], ml_project)
    assert result.returncode == 0, result.stderr
    assert "usage: looplens" in result.stdout
