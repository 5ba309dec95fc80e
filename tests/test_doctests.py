"""The docstring examples of every looplens module, run against the installed ``looplens.*`` modules.

pytest's ``--doctest-modules`` on the folders would import ``models/looped.py`` as ``models.looped``,
a second copy of the module under a name that does not exist for users. Here each module is imported
by its real name (``looplens.models.looped``) and its examples run with :mod:`doctest`, one test per
module. The jaxtyping + beartype import hook (``--jaxtyping-packages`` in pyproject) is installed
before collection, so the modules run with their shape annotations checked, as in every other test.
"""

from __future__ import annotations

import doctest
import importlib
import importlib.util
import pkgutil
from pathlib import Path

import pytest

SUBPACKAGES = ("data", "models", "interp", "analyses", "app")
# Streamlit scripts (importing them runs a page; tests/test_app.py drives them with AppTest) and the
# pytest configuration that keeps pytest from importing them.
NOT_IMPORTABLE = {"looplens.app.main", "looplens.app.conftest", "looplens.__main__"}


def _modules() -> list[tuple[str, Path]]:
    """(module name, source file) of every looplens module whose source holds a ``>>>`` example."""
    import looplens

    found = [("looplens", Path(looplens.__file__))]
    for sub in SUBPACKAGES:
        package = importlib.import_module(f"looplens.{sub}")
        found.append((package.__name__, Path(package.__file__)))
        for info in pkgutil.walk_packages(package.__path__, prefix=f"{package.__name__}."):
            if info.name in NOT_IMPORTABLE:
                continue
            spec = importlib.util.find_spec(info.name)
            if spec is not None and spec.origin and spec.origin.endswith(".py"):
                found.append((info.name, Path(spec.origin)))
    return sorted((name, path) for name, path in found if ">>>" in path.read_text(encoding="utf-8"))


MODULES = _modules()


def test_modules_with_examples_are_found():
    # guards the walk itself: an empty list would make this file pass while testing nothing
    names = [name for name, _ in MODULES]
    assert "looplens.models.looped" in names and "looplens.data.vocab" in names, names


@pytest.mark.parametrize("name", [name for name, _ in MODULES])
def test_docstring_examples(name: str):
    module = importlib.import_module(name)
    assert module.__name__ == name
    tests = [t for t in doctest.DocTestFinder(exclude_empty=True).find(module, name) if t.examples]
    assert tests, f"{name} has '>>>' in its source but no docstring example doctest can find"
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    failures: list[str] = []
    for test in tests:
        result = runner.run(test, out=failures.append)
        assert result.attempted == len(test.examples)
    if failures:
        pytest.fail(f"{name}: docstring examples failed\n" + "".join(failures), pytrace=False)
