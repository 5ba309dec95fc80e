"""Benchmark (issue 16.4): N seeds of a preset trained as one batched model vs one seed alone, on CPU.

    OMP_NUM_THREADS=1 python benchmarks/ensemble_train.py          # writes benchmarks/results/ensemble_train.json
    python benchmarks/ensemble_train.py --preset tiny-composition --seeds 8 --threads 1 2 --repeats 5

Side by side in one process, interleaved, medians over --repeats: one optimisation step of a single
seed's Trainer and one step of a SeedEnsemble of N seeds (the same step code ``looplens train --seeds``
runs), and one evaluation. The full-run wall-time ratio is projected from them with the preset's step
count and evaluation cadence (checkpoint writes are not counted; they are the same per seed). Both wall
time (``time.perf_counter``) and CPU time (``time.process_time``, what the load moves least at one
thread) are recorded.

Then, at one thread, where one seed's step goes (``decomposition``): CPU time of a single seed's step at
batch sizes 8, 64 and the preset's (interleaved), fitted as ``fixed + per_row * batch``: the fixed part
is what an ensemble can amortise (Python, dispatch, optimizer bookkeeping), the per-row part scales with
the seeds. Beside it the step's FLOPs (``torch.utils.flop_counter``) and the measured fp32 matmul peak of
this core now, and the bounds they put on N seeds / one seed on k cores: ``amortised`` (every fixed cost
paid once, the rest at one seed's efficiency, k cores perfectly parallel) and ``at_peak`` (every FLOP at the
matmul peak, nothing else). The load average is recorded: on a shared machine only ratios measured side
by side mean anything. Not a test: nothing here asserts a time.
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


def _median_seconds(fn, repeats: int, sync=lambda: None, clock=time.perf_counter) -> float:
    times = []
    for _ in range(repeats):
        sync()
        t0 = clock()
        fn()
        sync()
        times.append(clock() - t0)
    return statistics.median(times)


def _matmul_peak(repeats: int = 20) -> float:
    """fp32 FLOP/s of a 512 x 512 matmul on this thread now (CPU time)."""
    a, b = torch.randn(512, 512), torch.randn(512, 512)
    for _ in range(3):
        a @ b
    t0 = time.process_time()
    for _ in range(repeats):
        a @ b
    return 2 * 512**3 * repeats / (time.process_time() - t0)


def decomposition(cfg, tmp: Path, n_seeds: int, repeats: int) -> dict:
    """One thread: a single seed's step CPU time vs batch size, its FLOPs, and the bounds they imply."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.set_num_threads(1)
    full = cfg.optim.batch_size
    sizes = sorted({8, 64, full})
    trainers = {b: Trainer(cfg.with_overrides([f"optim.batch_size={b}"]), tmp / f"batch{b}", progress=False,
                           command=None) for b in sizes}
    for tr in trainers.values():
        for _ in range(2):
            tr.train_step()
    with FlopCounterMode(display=False) as flops:
        trainers[full].train_step()
    cpu: dict[int, list[float]] = {b: [] for b in sizes}
    peaks = []
    for _ in range(repeats):  # interleaved
        for b, tr in trainers.items():
            cpu[b].append(_median_seconds(tr.train_step, 3, clock=time.process_time))
        peaks.append(_matmul_peak())
    med = {b: statistics.median(v) for b, v in cpu.items()}
    xs, ys = list(med), [med[b] for b in med]
    mx, my = statistics.mean(xs), statistics.mean(ys)
    per_row = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    fixed = my - per_row * mx
    step, step_flops, peak = med[full], flops.get_total_flops(), statistics.median(peaks)
    bounds = {}
    for k in (1, 2):
        bounds[f"amortised_{k}_cores"] = round((fixed + n_seeds * per_row * full) / k / step, 3)
        bounds[f"at_peak_{k}_cores"] = round(n_seeds * step_flops / peak / k / step, 3)
    return {"batch_sizes": sizes, "cpu_seconds_by_batch": {str(b): round(v, 5) for b, v in med.items()},
            "fit": {"fixed_seconds": round(fixed, 5), "per_row_seconds": round(per_row, 7),
                    "fixed_share_of_step": round(fixed / step, 3)},
            "step_flops": step_flops, "matmul_peak_flops_per_s": round(peak), "step_flops_per_s": round(step_flops / step),
            "step_mfu_vs_measured_peak": round(step_flops / step / peak, 3),
            "bounds_n_seeds_over_one_seed": bounds, "raw_cpu_seconds": {str(b): v for b, v in cpu.items()}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="tiny-composition")
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--no-decomposition", action="store_true", help="skip the one-thread step decomposition")
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
            step_single, step_ens, eval_single, cpu_single, cpu_ens = [], [], [], [], []
            for _ in range(args.repeats):  # interleaved: both see the same machine load
                step_single.append(_median_seconds(single.train_step, 3, sync))
                step_ens.append(_median_seconds(ensemble.train_step, 1, sync))
                eval_single.append(_median_seconds(single.evaluate, 1, sync))
                cpu_single.append(_median_seconds(single.train_step, 3, sync, time.process_time))
                cpu_ens.append(_median_seconds(ensemble.train_step, 1, sync, time.process_time))
            s1, sn, e1 = (statistics.median(x) for x in (step_single, step_ens, eval_single))
            c1, cn = statistics.median(cpu_single), statistics.median(cpu_ens)
            steps, evals = cfg.run.max_steps, cfg.run.max_steps // cfg.eval.every + 1
            wall_single = steps * s1 + evals * e1
            wall_ens = steps * sn + evals * e1 * args.seeds  # each seed evaluates its own model
            results.append({
                "threads": threads,
                "step_seconds_single": round(s1, 5), "step_seconds_ensemble": round(sn, 5),
                "step_ratio": round(sn / s1, 3), "eval_seconds_single": round(e1, 4),
                "step_cpu_seconds_single": round(c1, 5), "step_cpu_seconds_ensemble": round(cn, 5),
                "step_ratio_cpu": round(cn / c1, 3),
                "projected_run_seconds_single": round(wall_single, 1),
                "projected_run_seconds_ensemble": round(wall_ens, 1),
                "projected_run_ratio": round(wall_ens / wall_single, 3),
                "projected_ratio_vs_sequential": round(wall_ens / (args.seeds * wall_single), 3),
                "eval_share_single": round(evals * e1 / wall_single, 4),
                "raw": {"step_single": step_single, "step_ensemble": step_ens, "eval_single": eval_single,
                        "cpu_step_single": cpu_single, "cpu_step_ensemble": cpu_ens},
            })
            print(f"threads {threads}: step single {s1 * 1e3:.1f} ms, {args.seeds} seeds {sn * 1e3:.1f} ms "
                  f"({sn / s1:.2f}x; CPU time {cn / c1:.2f}x); projected run {wall_ens / wall_single:.2f}x one seed",
                  flush=True)
        decomp = None if args.no_decomposition or args.device != "cpu" else decomposition(
            cfg, Path(tmp), args.seeds, args.repeats)
        if decomp is not None:
            print("one seed's step:", json.dumps({k: decomp[k] for k in ("fit", "step_mfu_vs_measured_peak",
                                                                          "bounds_n_seeds_over_one_seed")}))
    report = {
        "command": "python benchmarks/ensemble_train.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "preset": args.preset, "seeds": args.seeds, "max_steps": cfg.run.max_steps, "eval_every": cfg.eval.every,
        "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
                    "load_average_before": load_before, "load_average_after": os.getloadavg()},
        "results": results,
        "decomposition": decomp,
    }
    atomic_write_text(Path(args.out), json.dumps(report, indent=2) + "\n")  # never half-written; creates the folder
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
