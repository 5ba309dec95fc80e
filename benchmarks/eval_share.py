"""Benchmark (issue 16.6): the share of a training run's wall time spent in evaluation (target < 5%).

    OMP_NUM_THREADS=1 python benchmarks/eval_share.py              # writes benchmarks/results/eval_share.json
    python benchmarks/eval_share.py --preset tiny-composition --max-steps 500

Trains the preset for --max-steps in a temporary directory (the preset's evaluation cadence, eval
splits and iteration counts unchanged) and times, inside that run, every ``Trainer.evaluate``,
``Trainer.train_step`` and checkpoint/state write. Reports the measured share and the share projected
to the preset's full run (its max_steps, evaluations at step 0, every eval.every steps and at the end)
from the measured per-step and per-evaluation means. The load average is recorded.
Not a test: nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
from looplens.data.files import atomic_write_text
from looplens.models.train import preset, train
from looplens.models.train.trainer import Trainer

OUT = Path(__file__).resolve().parent / "results" / "eval_share.json"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="tiny-composition")
    parser.add_argument("--max-steps", type=int, default=500)
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args(argv)
    full = preset(args.preset).with_overrides(["run.device=cpu", "run.threads=1"])
    cfg = full.with_overrides([f"run.max_steps={args.max_steps}", "run.time_budget_minutes=None"])
    seconds: dict[str, list[float]] = defaultdict(list)
    originals = {name: getattr(Trainer, name) for name in ("evaluate", "train_step", "save_checkpoint", "save_state")}

    def timed(name):
        def wrapper(self, *a, **k):
            t0 = time.perf_counter()
            try:
                return originals[name](self, *a, **k)
            finally:
                seconds[name].append(time.perf_counter() - t0)
        return wrapper

    load_before = os.getloadavg()
    for name in originals:
        setattr(Trainer, name, timed(name))
    try:
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            train(cfg, Path(tmp) / "run", progress=False)
            wall = time.perf_counter() - t0
    finally:
        for name, fn in originals.items():
            setattr(Trainer, name, fn)
    total = {k: sum(v) for k, v in seconds.items()}
    step_mean, eval_mean = statistics.mean(seconds["train_step"]), statistics.mean(seconds["evaluate"])
    io_per_step = (total["save_checkpoint"] + total["save_state"]) / args.max_steps
    n_full = full.run.max_steps
    evals_full = 1 + n_full // full.eval.every + (0 if n_full % full.eval.every == 0 else 1)
    wall_full = n_full * (step_mean + io_per_step) + evals_full * eval_mean
    report = {
        "command": "python benchmarks/eval_share.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "preset": args.preset, "max_steps": args.max_steps, "eval_every": cfg.eval.every,
        "eval_iterations": cfg.eval.iterations, "wall_seconds": round(wall, 2),
        "seconds": {k: round(v, 3) for k, v in total.items()},
        "calls": {k: len(v) for k, v in seconds.items()},
        "mean_step_seconds": round(step_mean, 5), "mean_eval_seconds": round(eval_mean, 4),
        "eval_share_measured": round(total["evaluate"] / wall, 4),
        "full_run": {"max_steps": n_full, "evaluations": evals_full, "projected_wall_seconds": round(wall_full, 1),
                     "eval_share_projected": round(evals_full * eval_mean / wall_full, 4)},
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
                    "torch_threads": 1, "load_average_before": load_before, "load_average_after": os.getloadavg()},
    }
    print(json.dumps({k: report[k] for k in ("seconds", "eval_share_measured", "full_run")}, indent=2))
    atomic_write_text(Path(args.out), json.dumps(report, indent=2) + "\n")  # never half-written; creates the folder
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
