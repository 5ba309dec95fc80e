"""Study "grokking" (claim 2): memorisation -> in-distribution -> systematic, from a run's metrics.

The steps at which train (train_inferred), ID (test_inferred_id) and OOD (test_inferred_ood) accuracy
first pass their thresholds (:func:`interp.grokking_stages`, at the training iteration count), drawn on
the curves; the checkpoint nearest each stage (and the final one) is analysed with the hop locator on ID
and OOD queries: is the bridge entity decoded, and is the answer?
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from looplens.analyses.figures import lines
from looplens.analyses.studies.base import (
    StudyOptions,
    StudyResult,
    accuracy_curves,
    fmt,
    load_model,
    run_info,
    sample_split,
    select_task,
)
from looplens.interp import grokking_stages, locate_hops, summarize_hops
from looplens.interp.plots import grokking_figure

NAME = "grokking"
TITLE = "Three-stage grokking: memorisation, in-distribution, systematic (composition task)"
CLAIMS = (2,)
# OOD plateaus at ~0.75-0.8 in the paper, so its stage threshold is lower than the others'.
THRESHOLDS = {"train": 0.9, "test_id": 0.9, "test_ood": 0.5}
LOCATOR_SPLITS = ("test_inferred_id", "test_inferred_ood")


def select(runs: Sequence) -> list:
    return select_task(runs, "composition", NAME)


def nearest_checkpoint(steps: Sequence[int], step: int) -> int:
    """The saved step closest to ``step`` on a log scale (checkpoints are log-spaced).

    >>> nearest_checkpoint([0, 64, 96, 128, 300], 100)
    96
    """
    steps = sorted(steps)
    if not steps:
        raise ValueError("no checkpoints")
    return min(steps, key=lambda s: (abs(math.log1p(s) - math.log1p(step)), s))


def run(runs: Sequence, options: StudyOptions) -> StudyResult:
    runs = select(runs)
    stage_tables, locator_rows, found, notes = [], [], [], []
    figures = {}
    curve_splits = ("train_inferred", "test_inferred_id", "test_inferred_ood")
    for r in runs:
        info = run_info(r)
        T = r.config.train_iterations
        try:
            stages = grokking_stages(r.metrics, threshold=THRESHOLDS, iterations=T)
        except ValueError as err:  # a run that never evaluated one of the splits
            notes.append(f"{r.name}: no grokking stages ({err}).")
            continue
        stages.insert(0, "run", r.name)
        stage_tables.append(stages)
        metrics = r.metrics
        shown = metrics[metrics["split"].isin(curve_splits) & (metrics["iterations"] == T)]
        fig = grokking_figure(shown, stages)
        fig.update_layout(title=f"Grokking stages of {info['label']} (thresholds train {THRESHOLDS['train']}, "
                          f"ID {THRESHOLDS['test_id']}, OOD {THRESHOLDS['test_ood']})")
        figures[f"stages_{r.name}"] = fig

        # checkpoints at each reached stage, and the final one
        saved = r.checkpoints
        picks: dict[int, str] = {}
        for row in stages.itertuples():
            if row.reached:
                picks.setdefault(nearest_checkpoint(saved, int(row.step)), row.phase)
        picks.setdefault(r.resolve_step(None), "final")
        ds = r.dataset
        for step, phase in sorted(picks.items()):
            model = load_model(r, step, options)
            for split in LOCATOR_SPLITS:
                if split not in ds.split_names:
                    continue
                enc = sample_split(ds, split, options.n_queries, options.seed)
                if len(enc) == 0:
                    continue
                tokens = enc.tokens.to(model.W_E.device)
                located = locate_hops(model, tokens, enc.answers, enc.bridges, positions="all",
                                      progress=options.progress)
                summary = summarize_hops(located)
                with torch.no_grad():
                    acc = float((model.predict(tokens).argmax(-1).cpu() == enc.answers).double().mean())
                summary.insert(0, "split", split)
                summary.insert(0, "stage", phase)
                summary.insert(0, "checkpoint", step)
                summary.insert(0, "run", r.name)
                summary["accuracy"] = acc
                locator_rows.append(summary)
        by_stage = {row.stage: {"reached": bool(row.reached), "step": None if pd.isna(row.step) else int(row.step),
                                "epoch": None if np.isnan(row.epoch) else float(row.epoch),
                                "final_accuracy": float(row.final_accuracy), "max_accuracy": float(row.max_accuracy)}
                    for row in stages.itertuples()}
        found.append({"run": r.name, "kind": info["kind"], "R": info["R"], "thresholds": THRESHOLDS,
                      "stages": by_stage, "three_stage": bool(stages["three_stage"].iloc[0]),
                      "verdict": str(stages["verdict"].iloc[0])})
        steps = ", ".join(f"{s} at step {v['step']}" if v["reached"] else f"{s} never (max {fmt(v['max_accuracy'])})"
                          for s, v in by_stage.items())
        notes.append(f"{info['label']}: {steps}; furthest phase in order: {stages['verdict'].iloc[0]}.")
    if not stage_tables:
        raise ValueError("study grokking: no run has train / ID / OOD evaluations (test_inferred_* splits)")
    tables = {"stages": pd.concat(stage_tables, ignore_index=True)}
    if locator_rows:
        loc = pd.concat(locator_rows, ignore_index=True)
        tables["hop_locator"] = loc
        shown = loc.assign(what=loc["target"] + " (hop " + loc["hop"].astype(str) + ")")
        for rname, g in shown.groupby("run", sort=False):
            figures[f"hop_locator_{rname}"] = lines(
                g, "checkpoint", "fraction_resolved", "what", f"Hop locator at the stage checkpoints of {rname}: "
                "share of queries whose bridge / answer is decoded (logit lens, stays top-1)", "checkpoint step",
                "fraction of queries resolved", unit=True, facet="split")
    curves = pd.concat([accuracy_curves(r, curve_splits) for r in runs], ignore_index=True)
    tables["curves"] = curves
    return StudyResult(NAME, TITLE, [r.name for r in runs], tables, figures, {"runs": found, "thresholds": THRESHOLDS},
                       notes, options.to_dict())
