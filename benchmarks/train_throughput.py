"""Training throughput of presets: steps/s, tokens/s and a model-FLOPs-utilisation estimate.

    python benchmarks/train_throughput.py                      # tiny presets on CPU (and CUDA if present)
    python benchmarks/train_throughput.py --presets paper-composition --devices cuda --steps 50

Not a timed test: numbers depend on the machine and on what else runs on it (the load average is
recorded). Results go to benchmarks/results/train_throughput.json with the command and the machine.

FLOPs per training step = 3 x forward FLOPs (backward ~ 2 x forward), forward FLOPs per token =
2 x (matmul parameters touched per token: 12 d^2-ish per block per iteration, from the actual weight
shapes) + attention scores and mixing (4 x pos x d per layer) + the unembedding at the readout position.
MFU = achieved FLOP/s / peak, where the CPU peak is a measured fp32 1-thread matmul (so MFU says how
close to this machine's own matmul speed training runs) and the GPU peak is the card's dense bf16 figure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from looplens.data.files import atomic_write_text  # noqa: E402
from looplens.models.train import preset  # noqa: E402
from looplens.models.train.trainer import Trainer  # noqa: E402

GPU_PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12}


def forward_flops_per_query(trainer: Trainer, width: float, n_iterations: float) -> float:
    cfg = trainer.looped_cfg
    d, L = cfg.d_model, cfg.n_blocks
    block_matmul = 4 * cfg.n_heads * cfg.d_head * d + 2 * d * cfg.d_mlp  # W_Q, W_K, W_V, W_O, W_in, W_out
    layers = L * n_iterations + cfg.n_prelude + cfg.n_coda
    per_token = 2 * block_matmul * layers + 2 * 2 * width * cfg.n_heads * cfg.d_head * layers / 2  # causal: ~pos/2
    return per_token * width + 2 * d * cfg.d_vocab * width  # logits at every position (as the trainer computes them)


def cpu_matmul_peak(seconds: float = 1.0) -> float:
    a, b = torch.randn(512, 512), torch.randn(512, 512)
    for _ in range(3):
        a @ b
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        n += 1
    return 2 * 512**3 * n / (time.perf_counter() - t0)


def measure(name: str, device: str, steps: int, warmup: int, overrides: list[str] = ()) -> dict:
    cfg = preset(name).with_overrides([f"run.device={device}", "run.threads=1", *overrides])
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(cfg, Path(tmp) / "bench", progress=False, command=None)
        for _ in range(warmup):
            trainer.train_step()
        iters = []
        original = trainer.iterations.sample

        def record():
            r = original()
            iters.append(r)
            return r

        trainer.iterations.sample = record
        # every batch is trimmed to its longest query; with mixed hop counts that is the pool's longest
        pool = [c.rows for c in trainer.batches.cyclers]
        width = float(max(trainer.train_lengths[rows].max() for rows in pool))
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            trainer.train_step()
        if device == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        t1 = time.perf_counter()
        trainer.evaluate()
        eval_s = time.perf_counter() - t1
    batch = cfg.optim.batch_size
    r_mean = sum(iters) / len(iters)
    flops = 3 * forward_flops_per_query(trainer, width, r_mean) * batch * steps / dt
    return {"preset": name, "device": device, "overrides": list(overrides), "steps": steps, "seconds": round(dt, 3),
            "steps_per_s": round(steps / dt, 3), "tokens_per_s": round(steps * batch * width / dt, 1),
            "batch_size": batch, "mean_width": width, "mean_iterations": r_mean,
            "parameters": sum(p.numel() for p in trainer.params), "model_flops_per_s": flops,
            "eval_seconds": round(eval_s, 3), "eval_queries": len(trainer.evalset)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", nargs="+", default=["tiny-composition", "tiny-depth"])
    parser.add_argument("--devices", nargs="+", default=None, help="default: cpu, and cuda when available")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--set", dest="overrides", nargs="*", default=[], metavar="KEY=VALUE",
                        help="config overrides for every preset (e.g. run.compile=true run.compile_mode=reduce-overhead)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "train_throughput.json"))
    args = parser.parse_args(argv)
    devices = args.devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    torch.set_num_threads(1)

    results = []
    cpu_peak = cpu_matmul_peak()
    for device in devices:
        for name in args.presets:
            res = measure(name, device, args.steps, args.warmup, args.overrides)
            if device == "cpu":
                res["peak_flops_per_s"] = cpu_peak
                res["peak_source"] = "measured fp32 512x512 matmul, 1 thread"
            else:
                gpu = torch.cuda.get_device_name()
                peak = next((v for k, v in GPU_PEAK_BF16.items() if k in gpu), None)
                res["peak_flops_per_s"], res["peak_source"] = peak, f"{gpu} dense bf16 datasheet"
            res["mfu"] = round(res["model_flops_per_s"] / res["peak_flops_per_s"], 4) if res["peak_flops_per_s"] else None
            results.append(res)
            print(f"{name:<20} {device:<5} {res['steps_per_s']:8.2f} steps/s {res['tokens_per_s']:10.0f} tok/s "
                  f"MFU {res['mfu']}", flush=True)
    try:
        cpu_name = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu_name = platform.processor()
    report = {
        "command": "python " + " ".join([os.path.relpath(__file__, ROOT), *(argv if argv is not None else sys.argv[1:])]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": {"platform": platform.platform(), "cpu": cpu_name, "cpu_count": os.cpu_count(),
                    "load_average": os.getloadavg(), "torch": torch.__version__, "torch_threads": 1,
                    "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None},
        "results": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(args.out), json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
