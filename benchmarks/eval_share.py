"""Benchmark (issue 16.6): the share of a training run's wall time spent in evaluation (target < 5%).

    OMP_NUM_THREADS=1 python benchmarks/eval_share.py              # writes benchmarks/results/eval_share.json
    python benchmarks/eval_share.py --preset tiny-composition --max-steps 500

Trains the preset for --max-steps in a temporary directory (the preset's evaluation cadence, eval
splits and iteration counts unchanged) and times, inside that run, every ``Trainer.evaluate``,
``Trainer.train_step`` and checkpoint/state write. Reports the measured share and the share projected
to the preset's full run (its max_steps, evaluations at step 0, every eval.every steps and at the end)
from the measured per-step and per-evaluation means. Then, in the same process and on the trained
model, it times one evaluation with the evaluation set chunked by query length (what the trainer
does) against the same set cut into plain batch_size chunks padded to their longest query (the chunking
before), interleaved, medians of --repeats, CPU time (``time.process_time``, one thread) and wall time;
both give the same rows (checked). The load average is recorded. Not a test: nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import dataclasses
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
from looplens.models.train.evaluation import EvalSet, evaluate_set
from looplens.models.train.trainer import Trainer

OUT = Path(__file__).resolve().parent / "results" / "eval_share.json"


def padded_chunks(evalset: EvalSet, batch_size: int, pad_id: int) -> list[tuple[int, int, int]]:
    """The chunking before: consecutive batch_size rows (sorted by length), each padded to its longest query."""
    lengths = (evalset.tokens != pad_id).sum(-1)
    return [(start, min(start + batch_size, len(evalset)), int(lengths[start:start + batch_size].max()))
            for start in range(0, len(evalset), batch_size)]


def compare_chunking(trainer: Trainer, repeats: int) -> dict:
    """One evaluation, chunked by length vs padded batch_size chunks, interleaved (CPU and wall seconds)."""
    by_length = trainer.evalset
    padded = dataclasses.replace(by_length, chunks=padded_chunks(by_length, trainer.cfg.eval.batch_size, trainer.model.cfg.pad_token_id))
    run = {name: (lambda es=es: evaluate_set(trainer.model, es, trainer.eval_iterations)) for name, es in
           (("by_length", by_length), ("padded", padded))}
    rows = {name: fn() for name, fn in run.items()}  # warm-up, and the same numbers either way
    same = all(abs(a["accuracy"] - b["accuracy"]) < 1e-9 and abs(a["loss"] - b["loss"]) < 1e-4
               for a, b in zip(rows["by_length"], rows["padded"], strict=True))
    cpu: dict[str, list[float]] = defaultdict(list)
    wall: dict[str, list[float]] = defaultdict(list)
    for _ in range(repeats):
        for name, fn in run.items():
            c0, w0 = time.process_time(), time.perf_counter()
            fn()
            cpu[name].append(time.process_time() - c0)
            wall[name].append(time.perf_counter() - w0)
    med = {f"{k}_{name}": statistics.median(v[name]) for k, v in (("cpu", cpu), ("wall", wall)) for name in run}
    return {"chunks_by_length": [list(c) for c in by_length.chunks], "chunks_padded": [list(c) for c in padded.chunks],
            "same_rows": same, "repeats": repeats,
            "cpu_seconds_by_length": round(med["cpu_by_length"], 4), "cpu_seconds_padded": round(med["cpu_padded"], 4),
            "cpu_ratio_padded_over_by_length": round(med["cpu_padded"] / med["cpu_by_length"], 3),
            "wall_ratio_padded_over_by_length": round(med["wall_padded"] / med["wall_by_length"], 3),
            "raw": {"cpu": cpu, "wall": wall}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="tiny-composition")
    parser.add_argument("--max-steps", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=7, help="interleaved repeats of the chunking comparison")
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args(argv)
    full = preset(args.preset).with_overrides(["run.device=cpu", "run.threads=1"])
    cfg = full.with_overrides([f"run.max_steps={args.max_steps}", "run.time_budget_minutes=None"])
    torch.set_num_threads(1)
    seconds: dict[str, list[float]] = defaultdict(list)
    cpu_seconds: dict[str, list[float]] = defaultdict(list)  # CPU time: what the load moves least
    trainers: list[Trainer] = []
    originals = {name: getattr(Trainer, name) for name in ("evaluate", "train_step", "save_checkpoint", "save_state")}

    def timed(name):
        def wrapper(self, *a, **k):
            if not trainers:
                trainers.append(self)
            t0, c0 = time.perf_counter(), time.process_time()
            try:
                return originals[name](self, *a, **k)
            finally:
                seconds[name].append(time.perf_counter() - t0)
                cpu_seconds[name].append(time.process_time() - c0)
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
    chunking = compare_chunking(trainers[0], args.repeats)
    total = {k: sum(v) for k, v in seconds.items()}
    step_mean, eval_mean = statistics.mean(seconds["train_step"]), statistics.mean(seconds["evaluate"])
    io_per_step = (total["save_checkpoint"] + total["save_state"]) / args.max_steps
    n_full = full.run.max_steps
    evals_full = 1 + n_full // full.eval.every + (0 if n_full % full.eval.every == 0 else 1)
    wall_full = n_full * (step_mean + io_per_step) + evals_full * eval_mean
    cpu = {k: sum(v) for k, v in cpu_seconds.items()}
    cpu_step, cpu_eval = statistics.mean(cpu_seconds["train_step"]), statistics.mean(cpu_seconds["evaluate"])
    cpu_full = n_full * (cpu_step + (cpu["save_checkpoint"] + cpu["save_state"]) / args.max_steps) + evals_full * cpu_eval
    report = {
        "command": "python benchmarks/eval_share.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "preset": args.preset, "max_steps": args.max_steps, "eval_every": cfg.eval.every,
        "eval_iterations": cfg.eval.iterations, "wall_seconds": round(wall, 2),
        "seconds": {k: round(v, 3) for k, v in total.items()},
        "cpu_seconds": {k: round(v, 3) for k, v in cpu.items()},
        "calls": {k: len(v) for k, v in seconds.items()},
        "mean_step_seconds": round(step_mean, 5), "mean_eval_seconds": round(eval_mean, 4),
        "eval_share_measured": round(total["evaluate"] / wall, 4),
        "full_run": {"max_steps": n_full, "evaluations": evals_full, "projected_wall_seconds": round(wall_full, 1),
                     "eval_share_projected": round(evals_full * eval_mean / wall_full, 4),
                     "eval_share_projected_cpu": round(evals_full * cpu_eval / cpu_full, 4),
                     "eval_in_steps": round(eval_mean / step_mean, 2), "eval_in_steps_cpu": round(cpu_eval / cpu_step, 2)},
        "chunking": chunking,
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
                    "torch_threads": 1, "load_average_before": load_before, "load_average_after": os.getloadavg()},
    }
    print(json.dumps({k: report[k] for k in ("seconds", "eval_share_measured", "full_run")}, indent=2))
    print(json.dumps({k: v for k, v in chunking.items() if k != "raw"}, indent=2))
    atomic_write_text(Path(args.out), json.dumps(report, indent=2) + "\n")  # never half-written; creates the folder
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
