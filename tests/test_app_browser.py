"""`looplens app` in a real browser: headless Chromium renders every page without an exception.

Run with ``pytest -m browser``. Needs Chromium (Debian: ``apt-get install -y chromium``); without it the
test fails rather than skips, so CI cannot pass it by accident. The server is `looplens app` itself
on 127.0.0.1 at a free port, stopped by its PID at the end.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from app_browser import PAGES, Browser, find_chromium, serve_app, visit_all  # tests/ is on sys.path

FIXTURE = Path(__file__).parent / "fixtures" / "app_runs"


@pytest.mark.browser
@pytest.mark.slow
def test_every_page_renders_in_chromium(tmp_path):
    chromium = find_chromium()
    if chromium is None:
        pytest.fail("no Chromium found (looked for chromium, chromium-browser, google-chrome; or set "
                    "LOOPLENS_CHROMIUM): install it with `apt-get install -y chromium`")
    runs = tmp_path / "runs"
    shutil.copytree(FIXTURE, runs)
    shots_dir = tmp_path / "screenshots"
    shots_dir.mkdir()
    with serve_app([runs], tmp_path / "server.log") as url:
        browser = Browser(chromium, tmp_path / "profile")
        try:
            shots = visit_all(url, browser, shots_dir)
            browser.goto(f"{url}/query")  # bad input in a real session: an error box, not a traceback
            browser.wait_rendered(PAGES["query"])
            browser.eval(TYPE_QUERY % "e5 r1 x9")
            text = browser.wait_rendered(("is not a known token",))
            assert "Traceback" not in text
        finally:
            browser.close()
    assert sorted(shots) == sorted(p or "training" for p in PAGES)
    for path in shots.values():
        assert path.stat().st_size > 20_000, f"{path} looks blank"
    log = (tmp_path / "server.log").read_text()
    assert "Traceback" not in log, log[-3000:]


# Type into the query box the way a user does (React listens to input events, then Enter submits).
TYPE_QUERY = """
(() => {
  const box = [...document.querySelectorAll('input')].find(i => (i.placeholder || '').includes('entity, then'));
  const set = Object.getOwnPropertyDescriptor(HTMLInputElement.prototype, 'value').set;
  set.call(box, '%s');
  box.dispatchEvent(new Event('input', {bubbles: true}));
  box.dispatchEvent(new KeyboardEvent('keydown', {key: 'Enter', code: 'Enter', keyCode: 13, bubbles: true}));
  return true;
})()
"""
