"""Where each hop is resolved (looplens.interp.locate_hops) for a run's checkpoint, per 2-hop split.

    python docs/research/paper-model/hops.py RUN_DIR [--step N] [--n 300] [--out FILE.csv]

Hop i is resolved at (layer, position) when its target (bridge for hop 1, answer for hop 2) is the logit
lens's top-1 entity there and stays top-1 through the last layer (docs/interp.md, "Hop locator").
Prints interp.summarize_hops per split: fraction resolved and mean resolving iteration (0-based).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd
import torch
from looplens.models.train import load_run

from looplens import interp

SPLITS = ["test_inferred_id", "test_inferred_first_ood", "test_inferred_second_ood", "test_inferred_ood"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run", type=Path)
    ap.add_argument("--step", default=None)
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    torch.set_num_threads(1)
    run = load_run(a.run)
    model = run.load_model(int(a.step) if a.step and a.step.isdigit() else a.step)
    frames = []
    for split in SPLITS:
        e = run.dataset.encode(split)
        located = interp.locate_hops(model, e.tokens[: a.n], e.answers[: a.n], e.bridges[: a.n],
                                     entities_only=True, progress=False)
        s = interp.summarize_hops(located)
        s.insert(0, "split", split)
        # where: the resolving position of each hop (1 = first relation, 2 = readout)
        pos = located.groupby("hop")["position"].agg(lambda p: p.dropna().astype(int).value_counts().to_dict())
        s["positions"] = s["hop"].map(pos)
        frames.append(s)
    df = pd.concat(frames, ignore_index=True)
    cols = ["split", "hop", "target", "n", "fraction_resolved", "iteration_mean", "layer_mean", "positions"]
    print(df[cols].to_string(index=False, float_format=lambda x: f"{x:.2f}"))
    if a.out:
        tmp = a.out.with_suffix(".tmp")
        df.to_csv(tmp, index=False)
        tmp.rename(a.out)


if __name__ == "__main__":
    main()
