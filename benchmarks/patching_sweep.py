"""Benchmark: a full residual-stream patching sweep (every iteration x block x position) on CPU.

    OMP_NUM_THREADS=1 python benchmarks/patching_sweep.py            # writes benchmarks/results/patching_sweep.json

Tiny-preset-sized model (d_model 128, 2 blocks x 4 iterations, 4 heads), a permutation world of 300
entities and 20 relations, 256 clean/corrupted 2-hop pairs (corrupted head). The model is untrained:
timing does not depend on the weights. Compares interp.activation_patching's fast path (issue 16.5:
only layers >= and positions >= each patched cell are computed), its exact path (each cell resumed at
its layer, every position; forced here) and transformer_lens.patching.get_act_patch_resid_pre (one
forward per cell), interleaved, and checks that all give the same numbers. The previous results file is
kept under "before". Not a test: nothing here asserts a time.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from looplens.data import Vocab, make_world
from looplens.data.files import atomic_write_text
from looplens.interp import activation_patching, logit_diff, make_patching_pairs
from looplens.interp import patching as patching_module
from looplens.models import LoopedConfig, LoopedTransformer

REPEATS = 7
OUT = Path(__file__).resolve().parent / "results" / "patching_sweep.json"


def main() -> None:
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    world = make_world("permutation", 300, 20, seed=0)
    vocab = Vocab.for_world(world)
    cfg = LoopedConfig(d_vocab=len(vocab), n_ctx=3, d_model=128, n_heads=4, n_blocks=2, n_iterations=4, seed=0)
    model = LoopedTransformer(cfg, vocab=vocab).eval()
    pairs = make_patching_pairs(world, 256, hops=2, corrupt="head", seed=0)
    n_cells = cfg.n_layers * 3

    # the reference: transformer_lens.patching, one forward pass of 256 pairs per cell
    from transformer_lens import patching

    clean = torch.tensor(pairs["clean_tokens"].tolist())
    corrupted = torch.tensor(pairs["corrupted_tokens"].tolist())
    ca = torch.tensor(pairs["clean_answer_token"].to_numpy())
    xa = torch.tensor(pairs["corrupted_answer_token"].to_numpy())
    with torch.no_grad():
        clean_ld = logit_diff(model.predict(clean), ca, xa).mean()
        corrupt_ld = logit_diff(model.predict(corrupted), ca, xa).mean()
        _, cache = model.run_with_cache(clean)

    def metric(logits):
        return (logit_diff(logits[:, -1], ca, xa).mean() - corrupt_ld) / (clean_ld - corrupt_ld)

    def run_tl():
        with torch.no_grad(), model.iterations(cfg.n_iterations):
            return patching.get_act_patch_resid_pre(model, corrupted, cache, metric)

    def run_tl_end_to_end():  # what activation_patching also does: clean cache and the two baselines
        with torch.no_grad():
            c_ld = logit_diff(model.predict(clean), ca, xa).mean()
            x_ld = logit_diff(model.predict(corrupted), ca, xa).mean()
            _, clean_cache = model.run_with_cache(clean, names_filter=lambda n: n.endswith("hook_resid_pre"))

        def m(logits):
            return (logit_diff(logits[:, -1], ca, xa).mean() - x_ld) / (c_ld - x_ld)

        with torch.no_grad(), model.iterations(cfg.n_iterations):
            return patching.get_act_patch_resid_pre(model, corrupted, clean_cache, m)

    def run_exact():  # the exact path (every position from the patched layer on), as before issue 16.5
        fast_applies = patching_module._fast_path_applies
        patching_module._fast_path_applies = lambda *a: False
        try:
            return activation_patching(model, pairs, hook="resid_pre", batch_size=4096, progress=False)
        finally:
            patching_module._fast_path_applies = fast_applies

    # variants interleaved, medians of REPEATS: the machine is shared and loaded (uptime recorded)
    variants = {
        "interp_fast": lambda: activation_patching(model, pairs, hook="resid_pre", progress=False),
        # the same ready clean cache get_act_patch_resid_pre is given: what a sweep costs per cell
        "interp_fast_with_clean_cache": lambda: activation_patching(model, pairs, hook="resid_pre", progress=False,
                                                                    clean_cache=cache),
        "interp_exact_path": run_exact,
        "transformer_lens_one_forward_per_cell": run_tl,
        "transformer_lens_end_to_end": run_tl_end_to_end,
    }
    uptime_before = _uptime()
    timings: dict[str, list[float]] = {k: [] for k in variants}
    cpu: dict[str, list[float]] = {k: [] for k in variants}  # CPU time: what the load moves least (one thread)
    results = {}
    for _ in range(REPEATS):
        for key, fn in variants.items():
            start, c0 = time.perf_counter(), time.process_time()
            results[key] = fn()
            timings[key].append(time.perf_counter() - start)
            cpu[key].append(time.process_time() - c0)
    tl = results["transformer_lens_one_forward_per_cell"]
    fast = torch.tensor(results["interp_fast"]["effect"].to_numpy(), dtype=torch.float32).view(cfg.n_layers, 3)
    exact = torch.tensor(results["interp_exact_path"]["effect"].to_numpy(), dtype=torch.float32).view(cfg.n_layers, 3)

    med = {k: statistics.median(v) for k, v in timings.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    fast_cache = torch.tensor(results["interp_fast_with_clean_cache"]["effect"].to_numpy(),
                              dtype=torch.float32).view(cfg.n_layers, 3)
    before = json.loads(OUT.read_text()) if OUT.exists() else None
    if before is not None and "before" in before:  # a rerun: keep the first (pre-16.5) record
        before = before["before"]
    record = {
        "benchmark": "full resid_pre patching sweep: every (iteration, block, position) cell",
        "command": "OMP_NUM_THREADS=1 python benchmarks/patching_sweep.py",
        "model": {"d_model": 128, "n_heads": 4, "n_blocks": 2, "n_iterations": 4, "virtual_layers": cfg.n_layers,
                  "d_vocab": cfg.d_vocab, "positional": cfg.positional},
        "world": {"kind": "permutation", "n_entities": 300, "n_relations": 20},
        "pairs": len(pairs), "positions": 3, "cells": n_cells, "patched_rows": n_cells * len(pairs),
        "repeats": REPEATS,
        "seconds_all_runs": {k: [round(x, 4) for x in v] for k, v in timings.items()},
        "seconds_median": {k: round(v, 4) for k, v in med.items()},
        "seconds_best": {k: round(min(v), 4) for k, v in timings.items()},
        "speedup_median_fast_vs_one_forward_per_cell": round(med["transformer_lens_one_forward_per_cell"]
                                                             / med["interp_fast"], 2),
        "speedup_median_fast_with_clean_cache_vs_one_forward_per_cell": round(
            med["transformer_lens_one_forward_per_cell"] / med["interp_fast_with_clean_cache"], 2),
        "cpu_seconds_median": {k: round(v, 4) for k, v in med_cpu.items()},
        "cpu_seconds_all_runs": {k: [round(x, 4) for x in v] for k, v in cpu.items()},
        "speedup_cpu_fast_vs_one_forward_per_cell": round(med_cpu["transformer_lens_one_forward_per_cell"]
                                                          / med_cpu["interp_fast"], 2),
        "speedup_cpu_fast_with_clean_cache_vs_one_forward_per_cell": round(
            med_cpu["transformer_lens_one_forward_per_cell"] / med_cpu["interp_fast_with_clean_cache"], 2),
        "speedup_median_fast_vs_transformer_lens_end_to_end": round(med["transformer_lens_end_to_end"]
                                                                    / med["interp_fast"], 2),
        "speedup_median_exact_path_vs_one_forward_per_cell": round(med["transformer_lens_one_forward_per_cell"]
                                                                   / med["interp_exact_path"], 2),
        "speedup_median_fast_vs_exact_path": round(med["interp_exact_path"] / med["interp_fast"], 2),
        "notes": ("interp_fast times include the clean and corrupted runs it needs (clean cache, baselines, the "
                  "corrupted resid_pre it resumes from); interp_fast_with_clean_cache is given the ready clean "
                  "cache (and reads the clean logits from its last residual), so it includes the corrupted run "
                  "only; transformer_lens_one_forward_per_cell times only "
                  "get_act_patch_resid_pre with a ready clean cache; transformer_lens_end_to_end adds the "
                  "clean cache and the two baseline forwards. The sweep is compute-bound on CPU: the fast "
                  "path computes about a third of the one-forward-per-cell block work (layers >= and "
                  "positions >= each cell, the last block at the readout position only, no-op patches "
                  "skipped), plus the clean and corrupted runs."),
        "max_abs_difference_fast_vs_transformer_lens": float((fast - tl).abs().max()),
        "max_abs_difference_fast_vs_exact_path": float((fast - exact).abs().max()),
        "max_abs_difference_fast_with_clean_cache_vs_transformer_lens": float((fast_cache - tl).abs().max()),
        "environment": {"python": sys.version.split()[0], "torch": torch.__version__,
                        "torch_threads": torch.get_num_threads(), "machine": platform.machine(),
                        "processor": platform.processor() or platform.machine(), "device": "cpu",
                        "uptime_before": uptime_before, "uptime_after": _uptime(),
                        "note": "shared 2-core machine; other jobs were running (see uptime)"},
        "before": before,
    }
    atomic_write_text(OUT, json.dumps(record, indent=2) + "\n")  # never half-written; creates the folder
    print(json.dumps(record["seconds_median"], indent=2))
    print(f"fast with the clean cache vs one forward per cell: "
          f"{record['speedup_median_fast_with_clean_cache_vs_one_forward_per_cell']}x wall, "
          f"{record['speedup_cpu_fast_with_clean_cache_vs_one_forward_per_cell']}x CPU (medians)")
    print(f"fast vs one forward per cell: {record['speedup_median_fast_vs_one_forward_per_cell']}x (medians), "
          f"max |diff| vs TL {record['max_abs_difference_fast_vs_transformer_lens']:.2e}")


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unavailable"


if __name__ == "__main__":
    main()
