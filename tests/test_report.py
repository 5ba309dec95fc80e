"""The report folder is self-contained (issue 13): plotly.js is in it exactly once, every page loads that
copy by a relative path, nothing comes from the network, and in headless Chromium (``pytest -m browser``)
index.html and a figure page draw every figure from the folder alone.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
import pytest
from looplens.analyses.report import PLOTLY_JS, build_report
from looplens.analyses.studies.base import StudyResult

PLOTLY_BANNER = "* plotly.js v"  # the licence comment at the top of every copy of plotly.js
SCRIPT_SRC = re.compile(r"<script[^>]*\bsrc=['\"]([^'\"]+)['\"]")


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    """A report over two fabricated studies with three figures (no run, no training)."""
    figures = {"curve": go.Figure(go.Scatter(x=[1, 2, 3], y=[0.1, 0.5, 0.9])),
               "grid": go.Figure(go.Heatmap(z=[[0.0, 1.0], [0.5, 0.2]]))}
    results = [
        StudyResult("systematic", "Systematic generalisation", ["r"], {"final": pd.DataFrame({"accuracy": [0.9]})},
                    figures, {}, ["a note"]),
        StudyResult("halting", "Adaptive halting", ["r"], {}, {"accuracy": go.Figure(go.Bar(x=["a"], y=[0.7]))}, {},
                    ["another note"]),
    ]
    return build_report(results, tmp_path_factory.mktemp("report") / "report", title="offline check").parent


def test_plotly_js_is_in_the_report_once(report):
    copies = [p for p in report.rglob("*") if p.is_file() and PLOTLY_BANNER in p.read_text(errors="ignore")]
    assert copies == [report / PLOTLY_JS]
    assert sum(p.read_text(errors="ignore").count(PLOTLY_BANNER) for p in copies) == 1
    size = copies[0].stat().st_size
    rest = sum(p.stat().st_size for p in report.rglob("*") if p.is_file()) - size
    assert size > 1_000_000 and rest < 200_000, (size, rest)  # the pages themselves are small


def test_every_page_loads_the_one_copy_and_nothing_remote(report):
    pages = [report / "index.html", *sorted((report / "figures").glob("*.html"))]
    assert len(pages) == 1 + 3
    for page in pages:
        text = page.read_text()
        sources = SCRIPT_SRC.findall(text)
        assert sources, f"{page.name} loads no script: its figures would not draw"
        assert all((page.parent / s).resolve() == (report / PLOTLY_JS).resolve() for s in sources), (page, sources)
        assert not re.search(r"\b(src|href)=['\"](https?:)?//", text), f"{page.name} refers to the network"
    assert (report / "index.html").read_text().count("Plotly.newPlot") == 3


# In the page: is plotly loaded, how many figures are drawn, where its scripts and any other resource
# came from (file:// URLs are not in the resource timing list, network ones would be).
DRAWN_JS = """({plotly: typeof window.Plotly === 'object',
  drawn: [...document.querySelectorAll('.js-plotly-plot')].filter(e => e.querySelector('.main-svg')).length,
  scripts: [...document.scripts].map(s => s.src).filter(Boolean),
  fetched: performance.getEntriesByType('resource').map(e => e.name)})"""


@pytest.mark.browser
def test_report_draws_offline_in_chromium(report, tmp_path):
    from app_browser import Browser, find_chromium  # tests/ is on sys.path

    chromium = find_chromium()
    if chromium is None:
        pytest.fail("no Chromium found: install it with `apt-get install -y chromium` (or set LOOPLENS_CHROMIUM)")
    browser = Browser(chromium, tmp_path / "profile")  # --disable-background-networking, no other origin
    try:
        for page, n in [(report / "index.html", 3), (next((report / "figures").glob("systematic__*.html")), 1)]:
            browser.goto(page.as_uri())
            deadline, state = time.monotonic() + 60, {}
            while time.monotonic() < deadline:
                state = browser.eval(DRAWN_JS) or {}
                if state.get("plotly") and state.get("drawn", 0) == n:
                    break
                time.sleep(0.25)
            assert state.get("plotly") and state.get("drawn", 0) == n, (page.name, state)
            assert state["scripts"] == [(report / PLOTLY_JS).as_uri()], state["scripts"]
            assert all(url.startswith("file://") for url in state["fetched"]), state["fetched"]
    finally:
        browser.close()
