"""Benchmark: a full residual-stream patching sweep (every iteration x block x position) on CPU.

    OMP_NUM_THREADS=1 python benchmarks/patching_sweep.py            # writes benchmarks/results/patching_sweep.json

Tiny-preset-sized model (d_model 128, 2 blocks x 4 iterations, 4 heads), a permutation world of 300
entities and 20 relations, 256 clean/corrupted 2-hop pairs (corrupted head). The model is untrained:
timing does not depend on the weights. Compares interp.activation_patching (cells batched along the
batch axis) with transformer_lens.patching.get_act_patch_resid_pre (one forward per cell) and checks
that both give the same numbers. Not a test: nothing here asserts a time.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from looplens.data import Vocab, make_world
from looplens.interp import activation_patching, logit_diff, make_patching_pairs
from looplens.models import LoopedConfig, LoopedTransformer

REPEATS = 5
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

    # variants interleaved, best of REPEATS: the machine is shared, so the minimum is the stable number
    variants = {f"interp_batch_size_{b}": (lambda b=b: activation_patching(model, pairs, hook="resid_pre", batch_size=b,
                                                                            progress=False))
                for b in (256, 1024, 4096, 16384)}
    variants["transformer_lens_one_forward_per_cell"] = run_tl
    variants["transformer_lens_end_to_end"] = run_tl_end_to_end
    timings: dict[str, list[float]] = {k: [] for k in variants}
    results = {}
    for _ in range(REPEATS):
        for key, fn in variants.items():
            start = time.perf_counter()
            results[key] = fn()
            timings[key].append(time.perf_counter() - start)
    tl = results["transformer_lens_one_forward_per_cell"]
    results[4096] = results["interp_batch_size_4096"]
    ours = torch.tensor(results[4096]["effect"].to_numpy(), dtype=torch.float32).view(cfg.n_layers, 3)
    max_diff = float((ours - tl).abs().max())

    best = {k: min(v) for k, v in timings.items()}
    record = {
        "benchmark": "full resid_pre patching sweep: every (iteration, block, position) cell",
        "command": "OMP_NUM_THREADS=1 python benchmarks/patching_sweep.py",
        "model": {"d_model": 128, "n_heads": 4, "n_blocks": 2, "n_iterations": 4, "virtual_layers": cfg.n_layers,
                  "d_vocab": cfg.d_vocab, "positional": cfg.positional},
        "world": {"kind": "permutation", "n_entities": 300, "n_relations": 20},
        "pairs": len(pairs), "positions": 3, "cells": n_cells, "patched_rows": n_cells * len(pairs),
        "seconds_all_runs": {k: [round(x, 4) for x in v] for k, v in timings.items()},
        "seconds_best_of_5": {k: round(v, 4) for k, v in best.items()},
        "seconds_median_of_5": {k: round(statistics.median(v), 4) for k, v in timings.items()},
        "speedup_vs_transformer_lens_sweep_only": round(best["transformer_lens_one_forward_per_cell"]
                                                        / best["interp_batch_size_4096"], 2),
        "speedup_vs_transformer_lens_end_to_end": round(best["transformer_lens_end_to_end"]
                                                        / best["interp_batch_size_4096"], 2),
        "notes": ("interp times include the clean and corrupted runs it needs (clean cache, baselines, the "
                  "corrupted resid_pre it resumes from); transformer_lens_one_forward_per_cell times only "
                  "get_act_patch_resid_pre with a ready clean cache; transformer_lens_end_to_end adds the "
                  "clean cache and the two baseline forwards. On CPU the sweep is compute-bound: the gain "
                  "comes from resuming each cell's run at its own layer (about half the layers on average), "
                  "not from batching; on a GPU batching also removes per-forward overhead."),
        "max_abs_difference_vs_transformer_lens": max_diff,
        "environment": {"python": sys.version.split()[0], "torch": torch.__version__,
                        "torch_threads": torch.get_num_threads(), "machine": platform.machine(),
                        "processor": platform.processor() or platform.machine(), "device": "cpu",
                        "note": "shared 2-core machine; other jobs were running"},
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record["seconds_best_of_5"], indent=2))
    print(f"speedup {record['speedup_vs_transformer_lens_end_to_end']}x end to end, max |diff| vs TL {max_diff:.2e}")


if __name__ == "__main__":
    main()
