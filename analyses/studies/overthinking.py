"""Study "overthinking" (claim 4): the answer's logit margin over 1..N iterations, per hop depth.

For every looped run, sampled queries (depth task: test chains at up to 8 hop counts; composition task:
atomic and trained 2-hop facts) are run for ``options.max_iterations`` iterations with a readout after
each (:func:`interp.overthinking`). Per hop count: the margin's peak and decay and the accuracy's
(:func:`interp.overthinking_summary`); per run, the same over the hop counts the model answers at some
iteration count (peak accuracy >= 0.5), which the claim rule reads.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import torch
import torch.nn.functional as F
from looplens.analyses.figures import lines
from looplens.analyses.studies.base import (
    StudyOptions,
    StudyResult,
    fmt,
    load_model,
    run_info,
    sample_split,
    spread,
)
from looplens.interp import overthinking, overthinking_summary
from looplens.interp.plots import overthinking_figure

NAME = "overthinking"
TITLE = "Overthinking: answer margin and accuracy over inference iterations, per hop depth"
CLAIMS = (4,)
SOLVED = 0.5  # a hop count is "answered" when its accuracy reaches this at some iteration count
MAX_HOP_VALUES = 8


def select(runs: Sequence) -> list:
    chosen = [r for r in runs if run_info(r)["kind"] == "looped"]
    if not chosen:
        raise ValueError(f"study {NAME} needs a looped run (more than one iteration); got "
                         + ", ".join(r.name for r in runs))
    return chosen


def queries(run, options: StudyOptions):
    """(tokens, answers, hops) sampled for the run's task, padded to one width."""
    ds = run.dataset
    parts = []
    if run.config.data.task == "depth":
        test_hops = sorted(set(ds.encode("test").hops.tolist()))
        for k in spread(test_hops, MAX_HOP_VALUES):
            parts.append(sample_split(ds, "test", options.n_queries, options.seed, hops=k))
    else:
        for split in ("id_atomic", "train_inferred"):
            if split in ds.split_names:
                parts.append(sample_split(ds, split, options.n_queries, options.seed))
    parts = [p for p in parts if len(p)]
    width = max(int(p.tokens.shape[1]) for p in parts)
    tokens = torch.cat([F.pad(p.tokens, (0, width - p.tokens.shape[1])) for p in parts])
    return tokens, torch.cat([p.answers for p in parts]), torch.cat([p.hops for p in parts])


def aggregate(curves: pd.DataFrame, hops: Sequence[int]) -> dict:
    """Peak and final of the mean margin and accuracy over the given hop counts' queries."""
    g = curves[curves["hops"].isin(list(hops))].groupby("n_iterations").agg(margin=("margin", "mean"),
                                                                          accuracy=("correct", "mean"))
    t_max = int(g.index.max())
    peak_t = int(g["margin"].idxmax())
    acc_t = int(g["accuracy"].idxmax())
    return {"max_iterations": t_max, "peak_iteration": peak_t, "peak_margin": float(g.loc[peak_t, "margin"]),
            "final_margin": float(g.loc[t_max, "margin"]), "accuracy_peak_iteration": acc_t,
            "peak_accuracy": float(g.loc[acc_t, "accuracy"]), "final_accuracy": float(g.loc[t_max, "accuracy"])}


def run(runs: Sequence, options: StudyOptions) -> StudyResult:
    runs = select(runs)
    summaries, means, found, notes = [], [], [], []
    figures = {}
    for r in runs:
        info = run_info(r)
        model = load_model(r, None, options)
        tokens, answers, hops = queries(r, options)
        curves = overthinking(model, tokens.to(model.W_E.device), answers, max_iterations=options.max_iterations,
                              hops=hops.numpy(), entities_only=True, progress=options.progress)
        summary = overthinking_summary(curves)
        summary.insert(0, "run", r.name)
        summaries.append(summary)
        mean = curves.groupby(["hops", "n_iterations"], as_index=False).agg(margin=("margin", "mean"),
                                                                           accuracy=("correct", "mean"))
        mean.insert(0, "run", r.name)
        means.append(mean)
        solved = [int(k) for k in summary.loc[summary["peak_accuracy"] >= SOLVED, "hops"]]
        agg = aggregate(curves, solved or list(summary["hops"]))
        found.append({"run": r.name, "recurrence": info["recurrence"], "R": info["R"], "solved_hops": solved, **agg})
        for value in ("margin", "accuracy"):
            fig = overthinking_figure(curves, value)
            fig.update_layout(title=f"Overthinking, {info['label']}: {value} per number of iterations "
                              f"(trained at R={info['R']})")
            fig.add_vline(x=info["R"], line_dash="dot", line_color="grey", annotation_text="training R")
            figures[f"{value}_{r.name}"] = fig
        notes.append(f"{info['label']}: over the answered hop counts {solved or 'none (all shown)'}, the mean "
                     f"margin peaks at {fmt(agg['peak_margin'])} after {agg['peak_iteration']} iterations and is "
                     f"{fmt(agg['final_margin'])} after {agg['max_iterations']}; accuracy {fmt(agg['peak_accuracy'])} "
                     f"at {agg['accuracy_peak_iteration']} -> {fmt(agg['final_accuracy'])}.")
    mean_all = pd.concat(means, ignore_index=True)
    if len(runs) > 1:
        pooled = mean_all.groupby(["run", "n_iterations"], as_index=False)["margin"].mean()
        figures["margin_by_run"] = lines(pooled, "n_iterations", "margin", "run", "Mean answer margin per iteration "
                                         "count, all hop depths pooled (fixed vs dynamic R)", "iterations run",
                                         "logit margin (target minus best other)")
    return StudyResult(NAME, TITLE, [r.name for r in runs],
                       {"summary": pd.concat(summaries, ignore_index=True), "curves": mean_all}, figures,
                       {"runs": found, "solved_threshold": SOLVED}, notes, options.to_dict())
