"""Benchmark (issue 16.4): N seeds of a preset trained as one batched model vs one seed alone, on CPU.

    OMP_NUM_THREADS=1 python benchmarks/ensemble_train.py          # writes benchmarks/results/ensemble_train.json
    python benchmarks/ensemble_train.py --preset tiny-composition --seeds 8 --threads 1 2 --repeats 5

Side by side in one process, interleaved, medians over --repeats: one optimisation step of a single
seed's Trainer and one step of a SeedEnsemble of N seeds (the same step code ``looplens train --seeds``
runs), and one evaluation. The full-run wall-time ratio is projected from them with the preset's step
count and evaluation cadence (checkpoint writes are not counted; they are the same per seed). The
load average is recorded: on a shared machine only ratios measured side by side mean anything.
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
import warnings
from pathlib import Path

import torch
from looplens.data.files import atomic_write_text
from looplens.models.train import preset
from looplens.models.train.ensemble import SeedEnsemble
from looplens.models.train.trainer import Trainer

OUT = Path(__file__).resolve().parent / "results" / "ensemble_train.json"


def _median_seconds(fn, repeats: int, sync=lambda: None) -> float:
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="tiny-composition")
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    cfg = preset(args.preset).with_overrides([f"run.device={args.device}"])
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    load_before = os.getloadavg()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        single = Trainer(cfg, Path(tmp) / "single", progress=False, command=None)
        ensemble = SeedEnsemble(cfg, list(range(args.seeds)), Path(tmp) / "ens", progress=False, command=None)
        for _ in range(2):  # warm-up (allocator, first vmap trace)
            single.train_step()
            ensemble.train_step()
        for threads in args.threads:
            torch.set_num_threads(threads)
            step_single, step_ens, eval_single = [], [], []
            for _ in range(args.repeats):  # interleaved: both see the same machine load
                step_single.append(_median_seconds(single.train_step, 3, sync))
                step_ens.append(_median_seconds(ensemble.train_step, 1, sync))
                eval_single.append(_median_seconds(single.evaluate, 1, sync))
            s1, sn, e1 = (statistics.median(x) for x in (step_single, step_ens, eval_single))
            steps, evals = cfg.run.max_steps, cfg.run.max_steps // cfg.eval.every + 1
            wall_single = steps * s1 + evals * e1
            wall_ens = steps * sn + evals * e1 * args.seeds  # each seed evaluates its own model
            results.append({
                "threads": threads,
                "step_seconds_single": round(s1, 5), "step_seconds_ensemble": round(sn, 5),
                "step_ratio": round(sn / s1, 3), "eval_seconds_single": round(e1, 4),
                "projected_run_seconds_single": round(wall_single, 1),
                "projected_run_seconds_ensemble": round(wall_ens, 1),
                "projected_run_ratio": round(wall_ens / wall_single, 3),
                "projected_ratio_vs_sequential": round(wall_ens / (args.seeds * wall_single), 3),
                "eval_share_single": round(evals * e1 / wall_single, 4),
                "raw": {"step_single": step_single, "step_ensemble": step_ens, "eval_single": eval_single},
            })
            print(f"threads {threads}: step single {s1 * 1e3:.1f} ms, {args.seeds} seeds {sn * 1e3:.1f} ms "
                  f"({sn / s1:.2f}x); projected run {wall_ens / wall_single:.2f}x one seed", flush=True)
    report = {
        "command": "python benchmarks/ensemble_train.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "preset": args.preset, "seeds": args.seeds, "max_steps": cfg.run.max_steps, "eval_every": cfg.eval.every,
        "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
                    "load_average_before": load_before, "load_average_after": os.getloadavg()},
        "results": results,
    }
    atomic_write_text(Path(args.out), json.dumps(report, indent=2) + "\n")  # never half-written; creates the folder
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
