"""Study "halting" (claim 5): fixed iteration counts vs KL-only vs KL+entropy adaptive halting.

For every looped run, at the final checkpoint: accuracy per hop count at every fixed count
1..max_iterations, and with per-sample halting (``models.LoopedTransformer.forward_adaptive``) under
KL(p_t || p_{t-1}) < eps alone and under the paper's KL < eps AND H(p_t) < h, capped at max_iterations
(mean iterations actually used per hop count). Pooled numbers use the hop counts the model answers at
some fixed count (accuracy >= 0.5), on the test split (depth task) or test_inferred_id (composition).
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
from looplens.analyses.figures import lines
from looplens.analyses.studies.base import (
    StudyOptions,
    StudyResult,
    evaluate_cached,
    final_step,
    fmt,
    run_info,
)
from looplens.analyses.studies.overthinking import SOLVED
from looplens.analyses.studies.overthinking import select as select_looped

NAME = "halting"
TITLE = "Adaptive halting: fixed iteration counts vs KL-only vs KL+entropy"
CLAIMS = (5,)
RULES = {"kl": "KL only", "kl+entropy": "KL+entropy"}


def select(runs: Sequence) -> list:
    return select_looped(runs)


def primary_split(run) -> str:
    return "test" if run.config.data.task == "depth" else "test_inferred_id"


def splits_for(run) -> list[str]:
    if run.config.data.task == "depth":
        return ["test"]
    return [s for s in ("train_inferred", "test_inferred_id") if s in run.dataset.split_names]


def pooled(table: pd.DataFrame, hops: Sequence[int]) -> pd.DataFrame:
    """n-weighted accuracy and mean iterations per (method, iterations) over the given hop counts."""
    t = table[table["hops"].isin(list(hops))].copy()
    t["wa"] = t["accuracy"] * t["n"]
    t["wi"] = t["mean_iterations"] * t["n"]
    g = t.groupby(["method", "iterations"], as_index=False, sort=False).agg(wa=("wa", "sum"), wi=("wi", "sum"),
                                                                            n=("n", "sum"))
    g["accuracy"] = g["wa"] / g["n"]
    g["mean_iterations"] = g["wi"] / g["n"]
    return g[["method", "iterations", "accuracy", "mean_iterations", "n"]]


def run(runs: Sequence, options: StudyOptions) -> StudyResult:
    runs = select(runs)
    N = options.max_iterations
    tables, found, notes, plotted = [], [], [], []
    for r in runs:
        info = run_info(r)
        step = final_step(r)
        splits = splits_for(r)
        parts = [evaluate_cached(r, step, list(range(1, N + 1)), splits, options)]
        for rule, label in RULES.items():
            part = evaluate_cached(r, step, [], splits, options, halting=rule)
            parts.append(part.assign(method=label))
        table = pd.concat(parts, ignore_index=True)
        table.insert(0, "run", r.name)
        tables.append(table)

        split = primary_split(r)
        t = table[table["split"] == split]
        fixed = t[t["method"] == "fixed"]
        best_per_hop = fixed.groupby("hops")["accuracy"].max()
        solved = [int(k) for k, a in best_per_hop.items() if a >= SOLVED]
        pool = pooled(t, solved or list(best_per_hop.index))
        pf = pool[pool["method"] == "fixed"].set_index("iterations")
        best_T = int(pf["accuracy"].idxmax())
        row = {"run": r.name, "recurrence": info["recurrence"], "R": info["R"], "split": split, "max_iterations": N,
               "solved_hops": solved, "train_T": info["R"],
               "fixed_train_T_accuracy": float(pf.loc[info["R"], "accuracy"]) if info["R"] in pf.index else None,
               "fixed_max_accuracy": float(pf.loc[N, "accuracy"]), "best_fixed_T": best_T,
               "best_fixed_accuracy": float(pf.loc[best_T, "accuracy"])}
        for rule, label in RULES.items():
            h = pool[pool["method"] == label].iloc[0]
            key = "kl" if rule == "kl" else "kl_entropy"
            row[f"{key}_accuracy"] = float(h["accuracy"])
            row[f"{key}_mean_iterations"] = float(h["mean_iterations"])
        found.append(row)
        notes.append(f"{info['label']} on {split} (hop counts {solved or 'all'}): best fixed T={best_T} "
                     f"{fmt(row['best_fixed_accuracy'])}, fixed T={N} {fmt(row['fixed_max_accuracy'])}; KL only "
                     f"{fmt(row['kl_accuracy'])} with {fmt(row['kl_mean_iterations'], 1)} iterations on average; "
                     f"KL+entropy {fmt(row['kl_entropy_accuracy'])} with {fmt(row['kl_entropy_mean_iterations'], 1)}.")
        # what the figure shows, per hop count: fixed at R and at N, the best fixed count per hop, both rules
        fx = t[t["method"] == "fixed"]
        shown = [fx[fx["iterations"] == info["R"]].assign(method=f"fixed T={info['R']} (training R)"),
                 fx[fx["iterations"] == N].assign(method=f"fixed T={N}"),
                 fx.loc[fx.groupby("hops")["accuracy"].idxmax()].assign(method="best fixed T per hop (oracle)"),
                 t[t["method"].isin(RULES.values())]]
        plotted.append(pd.concat(shown, ignore_index=True).assign(run=r.name))
    full = pd.concat(tables, ignore_index=True)
    shown = pd.concat(plotted, ignore_index=True)
    figures = {
        "accuracy": lines(shown, "hops", "accuracy", "method", "Accuracy per hop count: fixed iteration counts vs "
                          "adaptive halting", "hops in the query", "accuracy (fraction correct)", unit=True, facet="run"),
        "iterations": lines(shown[shown["method"].isin(RULES.values())], "hops", "mean_iterations", "method",
                            f"Mean iterations used by adaptive halting (cap {N})", "hops in the query",
                            "mean iterations per query", facet="run"),
    }
    return StudyResult(NAME, TITLE, [r.name for r in runs], {"results": full, "summary": pd.DataFrame(found)},
                       figures, {"runs": found, "eps": options.halting_eps, "entropy": options.halting_entropy,
                                 "solved_threshold": SOLVED}, notes, options.to_dict())
