import os

# 2-thread OpenMP stalls on a busy 2-core machine; one thread is faster here (see DESIGN.md).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


def _chromium() -> str | None:
    from app_browser import find_chromium  # tests/app_browser.py (tests/ is on sys.path)

    return find_chromium()


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Browser tests skip, saying why, where no Chromium is installed (scripts/test.sh installs no system
    packages). `.ci/run` installs Chromium and sets LOOPLENS_REQUIRE_CHROMIUM=1: there a missing browser
    makes the tests fail instead, so CI cannot pass them by skipping."""
    if item.get_closest_marker("browser") is None or os.environ.get("LOOPLENS_REQUIRE_CHROMIUM") == "1":
        return
    if _chromium() is None:
        pytest.skip("chromium is missing (as root: apt-get install -y chromium; or set LOOPLENS_CHROMIUM)")


@pytest.fixture(autouse=True)
def _restore_main_module():
    """Streamlit's AppTest runs app scripts as ``__main__`` and leaves its module in sys.modules; a later
    test that spawns processes (the grids' --jobs) would then re-run app/main.py in every child
    (multiprocessing's spawn re-imports the parent's ``__main__`` by path) and break the pool."""
    import sys

    main = sys.modules.get("__main__")
    yield
    if main is not None and sys.modules.get("__main__") is not main:
        sys.modules["__main__"] = main
