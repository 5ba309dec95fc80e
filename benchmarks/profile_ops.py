"""Where the time goes (issue 16): torch.profiler's top operators, by self CPU time, one thread.

    OMP_NUM_THREADS=1 python benchmarks/profile_ops.py             # writes benchmarks/results/profile_ops.json

Profiles (tiny-composition preset, its dataset and model): the hook-free forward of one training batch,
one training step (Trainer.train_step), one evaluation (Trainer.evaluate), and one step of an 8-seed
SeedEnsemble. Records each operator's share of the profiled self CPU time. The load average is recorded.
Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
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
from torch.profiler import profile

OUT = Path(__file__).resolve().parent / "results" / "profile_ops.json"


def top_ops(fn, repeats: int, top: int = 12) -> dict:
    fn()
    with profile() as prof:
        for _ in range(repeats):
            fn()
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    ranked = sorted(events, key=lambda e: -e.self_cpu_time_total)[:top]
    return {"self_cpu_ms_per_call": round(total / repeats / 1e3, 2),
            "ops": [{"op": e.key, "calls_per_call": e.count // repeats,
                     "share": round(e.self_cpu_time_total / total, 3)} for e in ranked]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    cfg = preset("tiny-composition").with_overrides(["run.device=cpu"])
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(cfg, Path(tmp) / "single", progress=False, command=None)
        tokens = trainer.train_tokens[:cfg.optim.batch_size]
        model = trainer.model

        def forward():
            with torch.no_grad():
                model(tokens)

        profiles = {"forward_batch": top_ops(forward, 10), "train_step": top_ops(trainer.train_step, 5),
                    "evaluate": top_ops(trainer.evaluate, 1)}
        ensemble = SeedEnsemble(cfg, list(range(8)), Path(tmp) / "ens", progress=False, command=None)
        profiles["ensemble_8_seeds_step"] = top_ops(ensemble.train_step, 1)
    report = {"command": "python benchmarks/profile_ops.py", "date": time.strftime("%Y-%m-%d %H:%M:%S"),
              "preset": "tiny-composition", "profiles": profiles,
              "machine": {"cpu_count": os.cpu_count(), "torch": torch.__version__, "torch_threads": 1,
                          "load_average_before": load_before, "load_average_after": os.getloadavg()}}
    for name, p in profiles.items():
        print(name, p["self_cpu_ms_per_call"], "ms;", ", ".join(f"{o['op']} {o['share']:.0%}" for o in p["ops"][:5]))
    atomic_write_text(Path(args.out), json.dumps(report, indent=2) + "\n")  # never half-written; creates the folder
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
