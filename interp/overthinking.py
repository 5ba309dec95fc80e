"""Overthinking: the answer's logit margin and accuracy as a function of the number of iterations.

The paper (claim 4) reports that the margin rises, peaks and then decays when a looped model runs past
its trained recurrence. Here one forward pass of ``max_iterations`` iterations reads the answer out after
every iteration (exactly what ``model.predict(tokens, n_iterations=t)`` returns, for every t at once).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from looplens.interp._common import (
    Queries,
    TokenIds,
    analysis_mode,
    as_token_ids,
    as_tokens,
    check_positive_int,
    chunks,
    distribution_stats,
    entity_ids,
    frame,
    restrict,
    target_stats,
    to_candidate_index,
)
from looplens.models import LoopedTransformer
from torch import Tensor

OVERTHINKING_COLUMNS = {
    "example": "int64",
    "hops": "int64",
    "n_iterations": "int64",
    "target_token": "int64",
    "prediction": "int64",
    "correct": bool,
    "rank": "int64",
    "prob": "float64",
    "logit": "float64",
    "margin": "float64",
    "entropy": "float64",
}
OVERTHINKING_SUMMARY_COLUMNS = {
    "hops": "int64",
    "n_examples": "int64",
    "max_iterations": "int64",
    "peak_iteration": "int64",
    "peak_margin": "float64",
    "final_margin": "float64",
    "margin_decay": "float64",
    "margin_decay_per_iteration": "float64",
    "accuracy_peak_iteration": "int64",
    "peak_accuracy": "float64",
    "final_accuracy": "float64",
    "accuracy_decay": "float64",
}


def overthinking(
    model: LoopedTransformer,
    tokens: Queries,
    answers: TokenIds,
    *,
    max_iterations: int = 32,
    hops: Tensor | np.ndarray | None = None,
    entities_only: bool = False,
    batch_size: int = 256,
    progress: bool = True,
) -> pd.DataFrame:
    """The answer's margin, rank, probability and correctness after 1 .. max_iterations iterations.

    Args:
        answers: the answer token id per query (or "e5" strings).
        max_iterations: run this many iterations, reading out after each one.
        hops: hop count per query (default: the readout position, i.e. the number of relations).
        entities_only: rank / normalise over entity tokens only (needs model.vocab).

    Returns:
        One row per (example, n_iterations). Columns: example (int64), hops (int64), n_iterations (int64,
        1-based: the readout after that many iterations), target_token (int64, the answer), prediction
        (int64, top-1), correct (bool), rank (int64), prob, logit, margin (answer logit minus the best other
        token's), entropy (float64, nats).
    """
    tokens = as_tokens(model, tokens)
    n = tokens.shape[0]
    N = check_positive_int("max_iterations", max_iterations)
    batch_size = check_positive_int("batch_size", batch_size)
    answers_t = as_token_ids(model, answers, n, "answers")
    candidates = entity_ids(model) if entities_only else None
    answer_index = to_candidate_index(answers_t, candidates, "answers")
    parts = []
    with analysis_mode(model):
        readout = model.readout_positions(tokens)
        hops_t = readout.cpu() if hops is None else torch.as_tensor(np.asarray(hops)).reshape(-1).long()
        if hops_t.shape[0] != n:
            raise ValueError(f"hops must have one entry per query ({n}), got {hops_t.shape[0]}")
        for sl in chunks(n, batch_size, progress, "overthinking"):
            for step in model.steps(tokens[sl], N):  # the readout after every iteration of one run
                t = step.iteration
                logits = restrict(step.answer_logits(), candidates)
                dist = distribution_stats(logits)
                stats = target_stats(logits, dist, answer_index[sl])
                pred = dist["top_index"] if candidates is None else candidates[dist["top_index"]]
                m = logits.shape[0]
                parts.append({
                    "example": np.arange(sl.start, sl.stop), "hops": hops_t[sl].numpy(),
                    "n_iterations": np.full(m, t + 1), "target_token": answers_t[sl].cpu().numpy(),
                    "prediction": pred.cpu().numpy(), "correct": (stats["rank"] == 0).cpu().numpy(),
                    **{k: stats[k].cpu().numpy() for k in ("rank", "prob", "logit", "margin")},
                    "entropy": dist["entropy"].cpu().numpy(),
                })
    cols = {k: np.concatenate([p[k] for p in parts]) for k in OVERTHINKING_COLUMNS}
    order = np.lexsort((cols["n_iterations"], cols["example"]))
    return frame({k: v[order] for k, v in cols.items()}, OVERTHINKING_COLUMNS)


def overthinking_summary(curves: pd.DataFrame) -> pd.DataFrame:
    """Peak and decay of the mean margin and of the accuracy, per hop count.

    Returns one row per hops. Columns: hops, n_examples, max_iterations (int64), peak_iteration (int64,
    n_iterations with the highest mean margin; the first on ties), peak_margin, final_margin (at
    max_iterations), margin_decay (peak - final, >= 0), margin_decay_per_iteration (margin_decay /
    (max_iterations - peak_iteration); 0 when the peak is the last iteration), accuracy_peak_iteration
    (int64), peak_accuracy, final_accuracy, accuracy_decay (float64).
    """
    missing = [c for c in ("hops", "n_iterations", "margin", "correct", "example") if c not in curves.columns]
    if missing:
        raise ValueError(f"overthinking_summary needs an overthinking frame; missing columns {missing}")
    rows = []
    for k, g in curves.groupby("hops", sort=True):
        per_t = g.groupby("n_iterations").agg(margin=("margin", "mean"), accuracy=("correct", "mean"))
        t_max = int(per_t.index.max())
        peak_t = int(per_t["margin"].idxmax())
        acc_t = int(per_t["accuracy"].idxmax())
        peak, final = float(per_t.loc[peak_t, "margin"]), float(per_t.loc[t_max, "margin"])
        rows.append({
            "hops": k, "n_examples": g["example"].nunique(), "max_iterations": t_max, "peak_iteration": peak_t,
            "peak_margin": peak, "final_margin": final, "margin_decay": peak - final,
            "margin_decay_per_iteration": (peak - final) / (t_max - peak_t) if t_max > peak_t else 0.0,
            "accuracy_peak_iteration": acc_t, "peak_accuracy": float(per_t.loc[acc_t, "accuracy"]),
            "final_accuracy": float(per_t.loc[t_max, "accuracy"]),
            "accuracy_decay": float(per_t.loc[acc_t, "accuracy"] - per_t.loc[t_max, "accuracy"]),
        })
    return pd.DataFrame(rows, columns=list(OVERTHINKING_SUMMARY_COLUMNS)).astype(OVERTHINKING_SUMMARY_COLUMNS)
