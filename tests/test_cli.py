"""The `looplens` console script: --version, fast --help, and the contract every verb module keeps."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest
from looplens.analyses.cli import _VERB_MODULES, build_parser, main

import looplens

# Modules that cost seconds to import; none may load while the parser is built (looplens --help).
HEAVY = ("torch", "transformer_lens", "streamlit", "pandas", "plotly", "pydantic", "numpy", "safetensors")


def _loaded_heavy(code: str) -> list[str]:
    """Run ``code`` in a fresh interpreter and return the heavy modules it left in sys.modules."""
    probe = f"{code}\nimport sys\nprint('HEAVY:', *(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    return out.stdout.rsplit("HEAVY:", 1)[1].split()


def test_version_prints_the_package_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"looplens {looplens.__version__}"


def test_building_the_parser_imports_nothing_heavy():
    assert _loaded_heavy("from looplens.analyses.cli import build_parser\nbuild_parser()") == []


@pytest.mark.parametrize("name", _VERB_MODULES)
def test_each_verb_module_registers_and_imports_nothing_heavy(name):
    """The contract of a verb module: ``register(subparsers)``, and heavy imports inside its commands."""
    code = (f"import importlib, argparse\nm = importlib.import_module({name!r})\n"
            "m.register(argparse.ArgumentParser().add_subparsers())")
    try:
        assert _loaded_heavy(code) == [], f"{name} imports heavy modules at import time"
    except subprocess.CalledProcessError as err:
        if f"No module named '{name}'" in err.stderr:  # listed before it is written; build_parser skips it
            pytest.skip(f"{name} does not exist yet")
        raise


def _subcommands(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for verb, sub in action.choices.items():
                out.append((*prefix, verb))
                out.extend(_subcommands(sub, (*prefix, verb)))
    return out


def test_every_subcommand_help_exits_zero(capsys):
    commands = _subcommands(build_parser())
    assert {("train",), ("eval",), ("data",), ("data", "import-grokked"), ("app",), ("report",)} <= set(commands)
    for command in [(), *commands]:
        with pytest.raises(SystemExit) as exit_:
            main([*command, "--help"])
        assert exit_.value.code == 0, command
        out = capsys.readouterr().out
        assert out.startswith("usage: looplens"), command


def test_python_dash_m_looplens_help_runs_without_heavy_imports():
    code = ("import sys, runpy\nsys.argv = ['looplens', 'train', '--help']\n"
            "try:\n    runpy.run_module('looplens', run_name='__main__')\nexcept SystemExit as e:\n"
            "    assert e.code == 0, e.code")
    assert _loaded_heavy(code) == []
