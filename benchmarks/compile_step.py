"""Benchmark (issue 16.2): torch.compile on CPU: graph breaks, and the training step compiled vs eager.

    OMP_NUM_THREADS=1 python benchmarks/compile_step.py            # writes benchmarks/results/compile_step.json

1. Graph breaks of ``model.forward`` under ``torch._dynamo.explain`` (tiny model, no hooks).
2. A tiny-composition training step, eager vs with the trainer's step module compiled
   (``trainer.step_module.compile()``, the module every step calls), interleaved, medians of CPU time
   (one thread), plus the one-off compile time. Two trainers of the same seed; their losses are compared.
The load average is recorded. Not a test: nothing here asserts a time.
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
from looplens.models import LoopedConfig, LoopedTransformer
from looplens.models.train import preset
from looplens.models.train.trainer import Trainer

OUT = Path(__file__).resolve().parent / "results" / "compile_step.json"


def graph_breaks() -> dict:
    cfg = LoopedConfig(d_vocab=40, n_ctx=3, d_model=32, n_heads=4, n_blocks=1, n_iterations=2, seed=0)
    model = LoopedTransformer(cfg)
    torch._dynamo.reset()
    ex = torch._dynamo.explain(model)(torch.randint(1, 40, (8, 3)))
    reasons = [f"{str(b.reason).splitlines()[0][:120]} at {b.user_stack[-1] if b.user_stack else '?'}"
               for b in ex.break_reasons]
    return {"graphs": ex.graph_count, "graph_breaks": ex.graph_break_count, "reasons": reasons}


def step_times(preset_name: str, repeats: int, inner: int) -> dict:
    cfg = preset(preset_name).with_overrides(["run.device=cpu", "run.threads=1"])
    with tempfile.TemporaryDirectory() as tmp:
        eager = Trainer(cfg, Path(tmp) / "eager", progress=False, command=None)
        compiled = Trainer(cfg, Path(tmp) / "compiled", progress=False, command=None)
        compiled.step_module.compile()
        t0 = time.perf_counter()
        compiled.train_step()  # compiles
        compile_seconds = time.perf_counter() - t0
        eager.train_step()
        times: dict[str, list[float]] = {"eager": [], "compiled": []}
        for _ in range(repeats):
            for name, tr in (("eager", eager), ("compiled", compiled)):
                c0 = time.process_time()
                for _ in range(inner):
                    tr.train_step()
                times[name].append((time.process_time() - c0) / inner)
        loss_diff = abs(float(eager.window["loss"]) - float(compiled.window["loss"])) / max(eager.window["n"], 1)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"preset": preset_name, "compile_seconds": round(compile_seconds, 2),
            "median_cpu_seconds": {k: round(v, 5) for k, v in med.items()},
            "compiled_over_eager": round(med["compiled"] / med["eager"], 3),
            "mean_train_loss_abs_diff": loss_diff, "raw_cpu_seconds": times}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="tiny-composition")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--inner", type=int, default=3)
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    load_before = os.getloadavg()
    breaks = graph_breaks()
    print(f"graph breaks: {breaks['graph_breaks']} ({breaks['graphs']} graphs)", flush=True)
    steps = step_times(args.preset, args.repeats, args.inner)
    print(f"{args.preset} step: compiled / eager = {steps['compiled_over_eager']} "
          f"(compile {steps['compile_seconds']} s)", flush=True)
    report = {
        "command": "python benchmarks/compile_step.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "forward_graph_breaks": breaks, "train_step": steps,
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
                    "torch_threads": 1, "load_average_before": load_before, "load_average_after": os.getloadavg()},
    }
    atomic_write_text(Path(args.out), json.dumps(report, indent=2) + "\n")  # never half-written; creates the folder
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
