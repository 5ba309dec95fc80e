"""Drive headless Chromium against a running `looplens app` (used by tests/test_app_browser.py).

Streamlit renders over a websocket after the page loads, so a plain ``chromium --screenshot`` shows an
empty page. This talks to Chromium through its DevTools protocol instead: navigate, wait until the
page's content (and no "Running..." indicator) is there, read the text, take a screenshot.

Also a script, to refresh the README's screenshots by hand::

    python tests/app_browser.py docs/img RUN_DIR [RUN_DIR ...]
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from websockets.sync.client import connect  # a dependency of streamlit itself

CHROMIUM_CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
                  "--disable-dev-shm-usage", "--mute-audio"]

# url path -> text that shows the page has rendered its content (not only its title)
PAGES = {
    "": ("Training", "Summary"),
    "depth": ("Depth", "Source"),
    "query": ("Query explorer", "True chain"),
    "patching": ("Patching", "Patching effect"),
    "iterations": ("Iterations", "Adaptive halting"),
}
# What a page must never show: Streamlit's exception box, or a Python traceback in any form.
EXCEPTION_JS = ("document.querySelectorAll('[data-testid=\"stException\"]').length"
                " + (document.body.innerText.includes('Traceback (most recent call last)') ? 1 : 0)")
BUSY_JS = ("!!document.querySelector('[data-testid=\"stStatusWidget\"]') "
           "|| document.querySelectorAll('[data-testid=\"stSpinner\"]').length > 0 "
           "|| document.querySelectorAll('[data-testid=\"stSkeleton\"]').length > 0")


def find_chromium() -> str | None:
    if os.environ.get("LOOPLENS_CHROMIUM"):
        return shutil.which(os.environ["LOOPLENS_CHROMIUM"])
    for name in CHROMIUM_CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited ({proc.returncode}) before {url} answered:\n"
                               + (log.read_text()[-3000:] if log and log.exists() else ""))
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                return r.read().decode()
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f} s")


def stop(proc: subprocess.Popen, timeout: float = 10) -> None:
    """Stop a process we started, by its PID: SIGTERM, then SIGKILL if it lingers."""
    if proc.poll() is not None:
        return
    os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout)


@contextlib.contextmanager
def serve_app(runs: list[Path], log: Path, timeout: float = 90) -> Iterator[str]:
    """`looplens app RUNS` on 127.0.0.1 at a free port; yields its URL; stops it by PID afterwards."""
    port = free_port()
    looplens = Path(sys.executable).with_name("looplens")
    cmd = [str(looplens)] if looplens.exists() else [sys.executable, "-m", "looplens.analyses.cli"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    with open(log, "w") as out:
        proc = subprocess.Popen([*cmd, "app", *map(str, runs), "--host", "127.0.0.1", "--port", str(port)],
                                stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/_stcore/health", timeout, proc, log)
        yield url
    finally:
        stop(proc)


class Browser:
    """One headless Chromium tab, driven over the DevTools protocol."""

    def __init__(self, chromium: str, profile: Path, width: int = 1400, height: int = 1000):
        port = free_port()
        self.proc = subprocess.Popen(
            [chromium, *CHROMIUM_FLAGS, f"--remote-debugging-port={port}", f"--user-data-dir={profile}",
             f"--window-size={width},{height}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_http(f"http://127.0.0.1:{port}/json/version", 30, self.proc)
            targets = json.loads(wait_http(f"http://127.0.0.1:{port}/json/list", 10, self.proc))
            page = next(t for t in targets if t.get("type") == "page")
            # entered as a context manager: what websockets >= 16 expects, and what older versions accept
            self._stack = contextlib.ExitStack()
            self.ws = self._stack.enter_context(connect(page["webSocketDebuggerUrl"], max_size=64 * 2**20,
                                                        open_timeout=10))
        except BaseException:
            stop(self.proc)
            raise
        self._id = 0
        self.send("Page.enable")
        self.send("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)

    def send(self, method: str, **params) -> dict:
        self._id += 1
        self.ws.send(json.dumps({"id": self._id, "method": method, "params": params}))
        while True:  # skip events until our answer arrives
            msg = json.loads(self.ws.recv(timeout=60))
            if msg.get("id") == self._id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    def eval(self, expression: str):
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"JS error in {expression!r}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def goto(self, url: str) -> None:
        self.send("Page.navigate", url=url)

    def text(self) -> str:
        return self.eval("document.body ? document.body.innerText : ''") or ""

    def wait_rendered(self, needles: tuple[str, ...], timeout: float = 90, settle: float = 1.0) -> str:
        """Wait until every needle is in the page text, no exception is shown and nothing is running
        (for ``settle`` seconds in a row); returns the page text. Raises on an exception or a timeout."""
        deadline, quiet_since = time.monotonic() + timeout, None
        text = ""
        while time.monotonic() < deadline:
            text = self.text()
            if self.eval(EXCEPTION_JS):
                raise AssertionError(f"the page shows an exception:\n{text[:3000]}")
            ready = all(n in text for n in needles) and not self.eval(BUSY_JS)
            if ready:
                quiet_since = quiet_since or time.monotonic()
                if time.monotonic() - quiet_since >= settle:
                    return text
            else:
                quiet_since = None
            time.sleep(0.25)
        raise TimeoutError(f"page did not render {needles} within {timeout:.0f} s; it shows:\n{text[:3000]}")

    def screenshot(self, path: Path) -> Path:
        height = self.eval("Math.max(document.body.scrollHeight, "
                           "...[...document.querySelectorAll('section, [data-testid=\"stMain\"], "
                           "[data-testid=\"stMainBlockContainer\"]')].map(e => e.scrollHeight))") or 1000
        self.send("Emulation.setDeviceMetricsOverride", width=1400, height=int(min(max(height, 800), 4000)),
                  deviceScaleFactor=1, mobile=False)
        time.sleep(0.5)  # let plotly re-layout to the new viewport
        data = self.send("Page.captureScreenshot", format="png")["data"]
        self.send("Emulation.setDeviceMetricsOverride", width=1400, height=1000, deviceScaleFactor=1, mobile=False)
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._stack.close()
        stop(self.proc)


def visit_all(url: str, browser: Browser, out_dir: Path, timeout: float = 120) -> dict[str, Path]:
    """Open every page, wait for its content, check it shows no exception, save a screenshot."""
    shots = {}
    for path, needles in PAGES.items():
        browser.goto(f"{url}/{path}")
        browser.wait_rendered(needles, timeout)
        shots[path or "training"] = browser.screenshot(out_dir / f"app-{path or 'training'}.png")
    return shots


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    out_dir, runs = Path(argv[0]), [Path(r) for r in argv[1:]]
    out_dir.mkdir(parents=True, exist_ok=True)
    chromium = find_chromium()
    if chromium is None:
        print("no chromium found (apt-get install -y chromium)", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory() as tmp, serve_app(runs, Path(tmp) / "server.log") as url:
        browser = Browser(chromium, Path(tmp) / "profile")
        try:
            for name, shot in visit_all(url, browser, out_dir).items():
                print(f"{name}: {shot}")
        finally:
            browser.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
