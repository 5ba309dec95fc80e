"""`looplens app`: start the Streamlit explorer over run directories.

    looplens app                       # the shipped run (when the package ships one)
    looplens app runs/comp runs/van    # these runs (a folder of runs counts as each run inside it)
    looplens app runs/comp --port 8600 --host 0.0.0.0

The server is headless: it never opens a browser, sends no usage statistics, watches no files and
listens on 127.0.0.1 unless told otherwise. The run directories reach the Streamlit script through the
environment (``LOOPLENS_APP_RUNS``), so the same script also runs under ``streamlit run`` and AppTest.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

RUNS_ENV = "LOOPLENS_APP_RUNS"
MAIN_SCRIPT = Path(__file__).with_name("main.py")

EPILOG = """\
examples:
  looplens app runs/comp-looped runs/comp-vanilla      # overlay two runs
  looplens app runs/                                   # every run directory inside runs/
  looplens app runs/depth --port 8600                  # another port
Stop the server with Ctrl-C. See docs/app.md for the pages."""


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "app",
        help="start the Streamlit explorer (training curves, logit lens, patching, iterations, depth)",
        description="Start the Streamlit explorer over run directories (headless: open the printed URL "
        "in a browser). Without RUN_DIR, the run shipped with the package is shown, if there is one.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("runs", nargs="*", metavar="RUN_DIR",
                   help="run directories (config.json, metrics.csv, checkpoints/), or folders holding several")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8501, help="port to listen on (default 8501)")
    p.set_defaults(func=run)


def streamlit_command(host: str, port: int) -> list[str]:
    """The ``python -m streamlit run`` command line that serves the app headless."""
    return [
        sys.executable, "-m", "streamlit", "run", str(MAIN_SCRIPT),
        "--server.headless", "true",
        "--server.address", host,
        "--server.port", str(port),
        "--browser.gatherUsageStats", "false",
        "--server.fileWatcherType", "none",
        "--server.runOnSave", "false",
        "--client.toolbarMode", "minimal",
        "--theme.base", "light",
    ]


def build_args(argv: list[str]) -> argparse.Namespace:
    """Parse ``looplens app`` arguments on their own (for tests and scripts)."""
    parser = argparse.ArgumentParser(prog="looplens")
    register(parser.add_subparsers())
    return parser.parse_args(["app", *argv])


def run(args: argparse.Namespace) -> int:
    from looplens.app.runs import default_run_dirs, expand_run_dirs

    if not 1 <= args.port <= 65535:
        raise ValueError(f"--port must be in 1..65535, got {args.port}")
    runs = [str(Path(r).expanduser().resolve()) for r in args.runs]
    for r in runs:
        if not Path(r).exists():  # the app shows it too, and keeps serving the other runs
            print(f"looplens app: warning: run directory {r} does not exist", file=sys.stderr)
    if not runs:
        runs = [str(p) for p in default_run_dirs()]
        if not runs:
            print("looplens app: no RUN_DIR given and no shipped run in this installation; the app will "
                  "ask for a run directory (make one with `looplens train --preset smoke-composition --out runs/smoke`)",
                  file=sys.stderr)
    env = dict(os.environ, **{RUNS_ENV: os.pathsep.join(runs)})
    cmd = streamlit_command(args.host, args.port)
    n = len(expand_run_dirs(runs))
    print(f"looplens app: serving {n} run{'s' if n != 1 else ''} at http://{args.host}:{args.port}  (Ctrl-C stops)",
          flush=True)
    # exec, not a child process: the PID the caller holds is the server's, so stopping it stops the app.
    os.execve(sys.executable, cmd, env)
    return 0  # not reached
