"""Package trained runs as looplens's shipped run (analyses/shipped_run/), for maintainers.

    python scripts/ship_run.py SRC_PARENT --runs looped vanilla --final-only vanilla
    python scripts/ship_run.py REPRO/runs --runs comp-looped comp-vanilla --as paper-looped paper-vanilla --keep
    looplens report analyses/shipped_run/looped analyses/shipped_run/vanilla --out analyses/shipped_run/report

Copies each SRC_PARENT/<run> (config.json, metrics.csv, summary.json) and a handful of its checkpoints
(step 0, the first evaluated checkpoint at or after each grokking stage at 50% and 95%, the last) into analyses/shipped_run/<run>,
drops the optimiser/resume state (not needed to analyse a run, and the bulk of the bytes), copies the
dataset the runs were trained on into analyses/shipped_run/.datasets/, and rewrites nothing else:
metrics and config stay exactly as the trainer wrote them. The report is built afterwards with
`looplens report analyses/shipped_run/looped analyses/shipped_run/vanilla --out analyses/shipped_run/report`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def stage_steps(run_dir: Path, iterations: int, thresholds: list[float]) -> list[int]:
    """Steps at which train / ID / OOD first pass each threshold (interp.grokking_stages)."""
    from looplens.interp import grokking_stages

    steps: list[int] = []
    for threshold in thresholds:
        stages = grokking_stages(run_dir, threshold=threshold, iterations=iterations)
        steps += [int(s) for s in stages["step"].dropna()]
    return steps


def pick_checkpoints(available: list[int], wanted: list[int], limit: int) -> list[int]:
    chosen = {available[0], available[-1]}
    for step in wanted:
        later = [s for s in available if s >= step]
        if later:
            chosen.add(later[0])
    middle = sorted(chosen - {available[0], available[-1]})[: max(limit - 2, 0)]
    return sorted({available[0], available[-1], *middle})


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", type=Path, help="folder holding the trained run directories")
    ap.add_argument("--runs", nargs="+", required=True)
    ap.add_argument("--dest", type=Path, default=ROOT / "analyses" / "shipped_run")
    ap.add_argument("--max-checkpoints", type=int, default=4)
    ap.add_argument("--final-only", nargs="*", default=[], metavar="RUN",
                    help="runs that ship only their final checkpoint (the 20 MB package budget)")
    ap.add_argument("--thresholds", type=float, nargs="+", default=[0.5, 0.95])
    ap.add_argument("--as", dest="names", nargs="+", default=None, metavar="NAME",
                    help="ship the runs under these names (one per --runs entry; default: their own names)")
    ap.add_argument("--keep", action="store_true",
                    help="keep the runs already shipped in --dest (replace only the ones named here)")
    args = ap.parse_args()
    names = args.names or args.runs
    if len(names) != len(args.runs):
        ap.error(f"--as needs one name per run: {len(args.runs)} runs, {len(names)} names")

    if args.dest.exists() and not args.keep:
        shutil.rmtree(args.dest)
    (args.dest / ".datasets").mkdir(parents=True, exist_ok=True)
    for name, shipped_name in zip(args.runs, names):
        src = args.src / name
        config = json.loads((src / "config.json").read_text())
        iterations = config["model_config"]["n_iterations"]
        saved = {int(p.stem.split("_")[1]) for p in (src / "checkpoints").glob("step_*.json")}
        evaluated = set(pd.read_csv(src / "metrics.csv").query("split != 'train_batch'")["step"])
        available = sorted(saved & evaluated)  # only checkpoints whose accuracies metrics.csv records
        keep = pick_checkpoints(available, stage_steps(src, iterations, args.thresholds), args.max_checkpoints)
        if name in args.final_only:
            keep = [available[-1]]
        dst = args.dest / shipped_name
        if dst.exists():
            shutil.rmtree(dst)
        (dst / "checkpoints").mkdir(parents=True)
        for file in ("config.json", "metrics.csv", "summary.json"):
            shutil.copy2(src / file, dst / file)
        for step in keep:
            for suffix in (".safetensors", ".json"):
                shutil.copy2(src / "checkpoints" / f"step_{step}{suffix}", dst / "checkpoints" / f"step_{step}{suffix}")
        dataset = Path(config["dataset"]["path"])
        target = args.dest / ".datasets" / dataset.name
        if not target.exists():
            shutil.copytree(dataset, target)
        print(f"{name} -> {dst.name}: checkpoints {keep}")
    total = sum(p.stat().st_size for p in args.dest.rglob("*") if p.is_file())
    print(f"{args.dest}: {total / 1e6:.1f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
