"""Wall time of `looplens reproduce` for a plan: the whole command and each stage (from its ledger).

    python benchmarks/reproduce_time.py                       # smoke plan, in a temporary directory
    python benchmarks/reproduce_time.py --preset tiny         # ~25 minutes on 2 CPU cores
    python benchmarks/reproduce_time.py --preset tiny --ledger runs/repro --demo-wall 1539
                                  # record a finished `bash scripts/demo.sh` (its ledger and `time`) instead

Not a timed test: the numbers depend on the machine and on what else runs on it, so the load average
before and after is recorded beside them, and so are the command's CPU seconds (user + system), which
say what it needs of an idle core. Results go to benchmarks/results/reproduce_<preset>.json;
the docs quote them from there (tests/test_doc_numbers.py checks the quotes).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from looplens.data.files import atomic_write_text

ROOT = Path(__file__).resolve().parent.parent


def _machine() -> dict:
    return {"platform": platform.platform(), "cpu_count": os.cpu_count(), "python": platform.python_version()}


def _git_sha() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def _ledger(ledger_path: Path) -> tuple[dict[str, float], dict[str, dict]]:
    """Each stage's seconds, and each training stage's last step and why it stopped (max_steps, or a
    safety time cap)."""
    stages = json.loads(ledger_path.read_text())["stages"]
    seconds = {name: info["seconds"] for name, info in stages.items() if "seconds" in info}
    runs = {name.split(":", 1)[1]: {"step": info.get("step"), "stop_reason": info.get("stop_reason")}
            for name, info in stages.items() if name.startswith("train:")}
    return seconds, runs


def measure(preset: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "repro"
        command = [sys.executable, "-m", "looplens", "reproduce", "--preset", preset, "--out", str(out), "--quiet"]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        load_before = os.getloadavg()
        cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        subprocess.run(command, cwd=tmp, env=env, check=True, stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - t0
        cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        stages, runs = _ledger(out / "ledger.json")
    # CPU seconds of the command (user + system): what it needs of an idle core, whatever else ran
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    return {"wall_seconds": round(wall, 1), "cpu_seconds": round(cpu, 1),
            "stage_seconds_total": round(sum(stages.values()), 1),
            "stages": stages, "runs": runs, "load_average_before": [round(x, 2) for x in load_before],
            "load_average_after": [round(x, 2) for x in os.getloadavg()]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="smoke", choices=["smoke", "tiny", "paper"])
    parser.add_argument("--ledger", type=Path, help="a finished reproduce --out directory to record (no run)")
    parser.add_argument("--demo-wall", type=float, help="with --ledger: the demo's measured wall seconds")
    parser.add_argument("--wall", type=float, help="with --ledger: the reproduce command's own wall seconds (its last line)")
    parser.add_argument("--note", default=None, help="with --ledger: what else ran on the machine meanwhile")
    parser.add_argument("--out", type=Path, help="results file (default benchmarks/results/reproduce_<preset>.json)")
    args = parser.parse_args()
    if args.ledger is not None:
        stages, runs = _ledger(args.ledger / "ledger.json")
        result = {"demo_wall_seconds": args.demo_wall, "wall_seconds": args.wall,
                  "stage_seconds_total": round(sum(stages.values()), 1), "stages": stages,
                  "runs": runs, **({"note": args.note} if args.note else {})}
    else:
        result = measure(args.preset)
    record = {"benchmark": f"looplens reproduce --preset {args.preset}", "command": " ".join(["python", *sys.argv]),
              "date": time.strftime("%Y-%m-%d %H:%M:%S"), "git_sha": _git_sha(), "machine": _machine(), **result}
    out = args.out or ROOT / "benchmarks" / "results" / f"reproduce_{args.preset}.json"
    atomic_write_text(out, json.dumps(record, indent=2) + "\n")  # never half-written; creates the folder
    print(f"{out}: whole command {result['wall_seconds']} s (CPU {result.get('cpu_seconds')} s), "
          f"stages {result['stage_seconds_total']} s")


if __name__ == "__main__":
    main()
