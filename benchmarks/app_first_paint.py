"""First paint of `looplens app` in a real browser: time from the page request to the first visible
content (the page title) and to the first chart, on the shipped run (the app's default).

Each repetition starts a fresh server (`looplens app`, so the Python imports are cold, as on a user's
first visit) and a fresh headless Chromium profile (empty browser cache), asks for the page, and polls
the DOM through Chromium's DevTools protocol (Streamlit renders over a websocket after the page loads,
so a plain ``chromium --screenshot`` would only see an empty page). It then opens the page again once
(server warm, caches filled) and times that too.

    python benchmarks/app_first_paint.py                        # the working tree, 5 repetitions
    python benchmarks/app_first_paint.py --baseline e4224fe     # and the app as of that commit, interleaved

``--baseline REV`` extracts REV's source with ``git archive`` into a temporary folder and serves it
through a ``looplens`` package made of symlinks on PYTHONPATH (ahead of the editable install), so both
versions run side by side on the same machine, the same run and the same browser, alternating
repetitions to share the machine's load. Needs Chromium (Debian: ``apt-get install -y chromium``).

Writes benchmarks/results/app_first_paint.json: per-variant medians and every repetition, with the
machine, the load average before and after, the git SHA and the date. The machine is usually shared:
read the medians, and the load, not a single repetition.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the DevTools driver the browser test uses
from app_browser import Browser, find_chromium, free_port, stop, wait_http  # noqa: E402
from looplens.data.files import atomic_write_text  # noqa: E402

PACKAGE_DIRS = ("data", "models", "interp", "analyses", "app")  # looplens.<name> -> <name>/ (pyproject.toml)
# What the page shows, polled every POLL seconds. The title is the page's <h1> (the sidebar's navigation
# also says "Training", so plain text would match too early); a chart is a drawn plotly figure.
PROBE_JS = """(() => {
  const main = document.querySelector('[data-testid="stMain"]');
  const h1 = main ? [...main.querySelectorAll('h1')].some(h => h.innerText.includes(%s)) : false;
  return {
    nav: !!document.querySelector('[data-testid="stSidebarNav"]'),
    title: h1,
    spinner: !!(main && main.querySelector('[data-testid="stSpinner"]')),
    chart: !!(main && main.querySelector('.js-plotly-plot .main-svg')),
  };
})()"""
POLL = 0.05


def git(*args: str, cwd: Path = REPO) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


@contextlib.contextmanager
def baseline_source(rev: str) -> Iterator[Path]:
    """A folder to put on PYTHONPATH that imports ``looplens`` from ``rev``'s source (shipped run excluded)."""
    with tempfile.TemporaryDirectory(prefix="looplens-baseline-") as tmp:
        src, shim = Path(tmp) / "src", Path(tmp) / "shim" / "looplens"
        src.mkdir()
        shim.mkdir(parents=True)
        archive = subprocess.run(["git", "archive", rev, "--", "looplens", *PACKAGE_DIRS,
                                  ":(exclude)analyses/shipped_run"], cwd=REPO, check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
        for f in (src / "looplens").iterdir():
            (shim / f.name).symlink_to(f)
        for name in PACKAGE_DIRS:
            (shim / name).symlink_to(src / name, target_is_directory=True)
        yield shim.parent


FLOOR = "floor"  # the variant that serves a Streamlit script drawing only the title
FLOOR_SCRIPT = "import streamlit as st\n\nst.title({title!r})\n"


@contextlib.contextmanager
def serve(shipped_run: Path, log: Path, pythonpath: Path | str | None, timeout: float) -> Iterator[tuple[str, str]]:
    """`looplens app` (no RUN_DIR: the shipped run) on a free port: yields its URL and the app's main.py
    as that interpreter finds it (to check which source is served); stopped by its PID afterwards.
    ``pythonpath`` FLOOR: a one-line Streamlit script instead, under the same server flags."""
    from looplens.app.cli import streamlit_command

    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", LOOPLENS_SHIPPED_RUN=str(shipped_run))
    env.pop("PYTHONPATH", None)
    if pythonpath == FLOOR:
        script = log.with_name("floor.py")
        script.write_text(FLOOR_SCRIPT.format(title="Training"))
        cmd = streamlit_command("127.0.0.1", port)
        cmd[cmd.index("run") + 1] = str(script)
    else:
        if pythonpath is not None:
            env["PYTHONPATH"] = str(pythonpath)
        cmd = [sys.executable, "-m", "looplens", "app", "--host", "127.0.0.1", "--port", str(port)]
    # Not from the repository root: `python -m` puts the working directory first on sys.path, and the
    # root's looplens/ folder would shadow the baseline's.
    cwd = log.parent
    source = str(cmd[cmd.index("run") + 1]) if pythonpath == FLOOR else subprocess.run(
        [sys.executable, "-c", "import importlib.util as u; print(u.find_spec('looplens.app.main').origin)"],
        env=env, cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/_stcore/health", timeout, proc, log)
        yield url, source
    finally:
        stop(proc)


def blank(browser: Browser) -> None:
    """Leave the page (so nothing of it is left to be mistaken for the next load)."""
    browser.goto("about:blank")
    deadline = time.monotonic() + 10
    while browser.eval("document.URL") != "about:blank" and time.monotonic() < deadline:
        time.sleep(POLL)


def time_page(browser: Browser, url: str, title: str, timeout: float, chart: bool = True) -> dict:
    """Seconds from the page request to the navigation, the title and the first chart; whether a
    spinner was on screen when the title first showed."""
    probe = PROBE_JS % json.dumps(title)
    blank(browser)
    start = time.monotonic()
    browser.goto(url)
    seen: dict = {}
    while time.monotonic() - start < timeout:
        state = browser.eval(probe) or {}
        now = time.monotonic() - start
        for key in ("nav", "title", "chart"):
            if state.get(key) and key not in seen:
                seen[key] = now
                if key == "title":
                    seen["spinner_with_title"] = bool(state.get("spinner"))
        if state.get("spinner"):
            seen.setdefault("spinner", now)
        if "chart" in seen or (not chart and "title" in seen):
            break
        time.sleep(POLL)
    missing = [k for k in ("title", "chart") if k not in seen and (chart or k == "title")]
    if missing:
        raise TimeoutError(f"{url}: no {' or '.join(missing)} within {timeout:.0f} s; the page shows:\n"
                           f"{browser.text()[:2000]}")
    return {"nav_s": seen.get("nav"), "title_s": seen["title"], "chart_s": seen.get("chart"),
            "spinner_s": seen.get("spinner"), "spinner_with_title": seen.get("spinner_with_title", False)}


def repetition(chromium: str, shipped_run: Path, pythonpath: Path | str | None, title: str, timeout: float) -> dict:
    with tempfile.TemporaryDirectory(prefix="looplens-paint-") as tmp, \
            serve(shipped_run, Path(tmp) / "server.log", pythonpath, timeout) as (url, source):
        browser = Browser(chromium, Path(tmp) / "profile")
        try:
            first = time_page(browser, url, title, timeout, chart=pythonpath != FLOOR)
            time.sleep(1.0)
            warm = time_page(browser, url, title, timeout, chart=pythonpath != FLOOR)  # a second visit
        finally:
            browser.close()
    return {**{f"first_{k}": v for k, v in first.items()}, **{f"second_{k}": v for k, v in warm.items()},
            "app_source": source}


def summarize(reps: list[dict]) -> dict:
    out = {}
    for key in reps[0]:
        values = [r[key] for r in reps if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)]
        if values:
            out[f"median_{key}"] = round(statistics.median(values), 3)
        elif all(isinstance(r.get(key), bool) for r in reps):
            out[f"all_{key}"] = all(r[key] for r in reps)
    return out


def machine() -> dict:
    chromium = find_chromium()
    version = subprocess.run([chromium, "--version"], capture_output=True, text=True).stdout.strip() if chromium else None
    import streamlit

    return {"platform": platform.platform(), "processor": platform.machine(), "cpus": os.cpu_count(),
            "python": platform.python_version(), "streamlit": streamlit.__version__, "chromium": version,
            "chromium_flags": "--headless --no-sandbox --disable-gpu --disable-background-networking (tests/app_browser.py)"}


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5, help="fresh server + browser per repetition (default 5)")
    p.add_argument("--baseline", metavar="REV", help="also time the app as of this git revision, interleaved")
    p.add_argument("--floor", action="store_true",
                   help="also time a Streamlit script that draws only the title (what Streamlit itself takes)")
    p.add_argument("--shipped-run", type=Path, default=REPO / "analyses" / "shipped_run",
                   help="the run the app opens by default (default: analyses/shipped_run)")
    p.add_argument("--title", default="Training", help="the default page's title (default: Training)")
    p.add_argument("--timeout", type=float, default=180, help="seconds to wait for a page (default 180)")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "app_first_paint.json")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error(f"--repeats must be >= 1, got {args.repeats}")
    if not (args.shipped_run / "looped" / "config.json").is_file() and not (args.shipped_run / "config.json").is_file():
        p.error(f"--shipped-run {args.shipped_run} holds no run (config.json)")
    chromium = find_chromium()
    if chromium is None:
        p.error("no Chromium found: apt-get install -y chromium (or set LOOPLENS_CHROMIUM)")

    head = git("rev-parse", "HEAD")
    dirty = bool(git("status", "--porcelain", "--", "app", "tests/app_browser.py"))
    variants = {"working tree": None}
    with contextlib.ExitStack() as stack:
        if args.baseline:
            base_sha = git("rev-parse", args.baseline)
            variants = {f"baseline {base_sha[:7]}": stack.enter_context(baseline_source(base_sha)), **variants}
        if args.floor:
            variants[FLOOR] = FLOOR
        reps: dict[str, list[dict]] = {name: [] for name in variants}
        load_before, started = loadavg(), time.time()
        for i in range(args.repeats):
            for name, pythonpath in variants.items():  # alternate, so both see the same load
                r = repetition(chromium, args.shipped_run.resolve(), pythonpath, args.title, args.timeout)
                r["loadavg_1_5_15"] = loadavg()
                reps[name].append(r)
                print(f"{name} #{i + 1}: title {r['first_title_s']:.2f} s, chart {r['first_chart_s']} s "
                      f"(second visit: {r['second_title_s']:.2f} s, {r['second_chart_s']} s), "
                      f"load {r['loadavg_1_5_15']}", flush=True)
    result = {
        "benchmark": "app_first_paint",
        "what": "seconds from the page request (DevTools Page.navigate) to the navigation, the page title (<h1>) and "
                "the first drawn chart of `looplens app` on the shipped run; first_*: fresh server and browser "
                "profile (cold imports); second_*: the same page opened again once the first load finished "
                "(server warm, caches filled); floor: a Streamlit script that only draws the title",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "git_sha": head, "working_tree_dirty": dirty,
        "baseline_sha": base_sha if args.baseline else None,
        "machine": machine(),
        "load": {"loadavg_before": load_before, "loadavg_after": loadavg(),
                 "uptime": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(),
                 "note": "shared machine: other processes ran at the same time; compare medians"},
        "repeats": args.repeats, "seconds_total": round(time.time() - started, 1),
        "variants": {name: {"summary": summarize(r), "repetitions": r} for name, r in reps.items()},
    }
    atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")  # never half-written; creates the folder
    for name, v in result["variants"].items():
        s = v["summary"]
        print(f"{name}: median title {s['median_first_title_s']} s, chart {s.get('median_first_chart_s')} s; "
              f"second visit: title {s['median_second_title_s']} s, chart {s.get('median_second_chart_s')} s")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
