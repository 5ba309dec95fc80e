"""Study "depth" (claim 3): learnable recursion depth, and depth extrapolation with more iterations.

For every depth-task run (curriculum training, fixed or dynamic R): the learnable depth (last
curriculum stage passed), and test accuracy over hops x inference iterations 1..max_iterations at the
final checkpoint. The *answered depth* at T iterations is the largest k such that every hop count 2..k
reaches ``options.depth_threshold``; *reach* is its maximum over T, and *extension* = the best answered
depth at T >= the training iteration count, minus the answered depth at the training count: how far extra
iterations carry the model (a deeper answer at *fewer* iterations than trained counts in reach, not here).
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
from looplens.analyses.figures import hops_iterations_heatmap, lines
from looplens.analyses.studies.base import (
    StudyOptions,
    StudyResult,
    evaluate_cached,
    final_step,
    fmt,
    run_info,
    select_task,
)

NAME = "depth"
TITLE = "Depth extrapolation: learnable depth, fixed vs dynamic R, hops x inference iterations"
CLAIMS = (3,)


def select(runs: Sequence) -> list:
    return select_task(runs, "depth", NAME)


def answered_depth(acc_by_hops: pd.Series, threshold: float) -> int:
    """Largest k with accuracy >= threshold for every hop count 2..k (1 when 2 hops already fail).

    >>> answered_depth(pd.Series({2: 1.0, 3: 0.95, 4: 0.5, 5: 0.99}), 0.9)
    3
    """
    depth = 1
    for k in sorted(acc_by_hops.index):
        if k < 2:
            continue
        if k != depth + 1 or acc_by_hops[k] < threshold:
            break
        depth = k
    return depth


def depth_profile(table: pd.DataFrame, train_T: int, threshold: float) -> dict:
    """Answered depth per iteration count, reach, best T and extension from a (hops, iterations,
    accuracy) table of one run. Only iteration counts >= ``train_T`` extend the depth:

    >>> t = pd.DataFrame({"hops": [2, 3] * 3, "iterations": [3, 3, 4, 4, 6, 6], "accuracy": [1, 1, 1, .5, 1, .5]})
    >>> p = depth_profile(t, train_T=4, threshold=0.9)
    >>> p["reach"], p["best_T"], p["extension"]
    (3, 3, 0)
    """
    per_T = {int(T): answered_depth(g.set_index("hops")["accuracy"], threshold)
             for T, g in table.groupby("iterations")}
    reach = max(per_T.values())
    best_T = min(T for T, d in per_T.items() if d == reach)
    at_train = per_T.get(int(train_T))
    beyond = [d for T, d in per_T.items() if T >= int(train_T)]
    return {"answered_depth_by_T": per_T, "answered_depth_train_T": at_train, "reach": reach, "best_T": best_T,
            "extension": None if at_train is None else max(beyond) - at_train}


def run(runs: Sequence, options: StudyOptions) -> StudyResult:
    runs = select(runs)
    thr = options.depth_threshold
    iterations = list(range(1, options.max_iterations + 1))
    grids, summary_rows, found, notes = [], [], [], []
    figures = {}
    for r in runs:
        info = run_info(r)
        step = final_step(r)
        table = evaluate_cached(r, step, iterations, ["test"], options)
        table = table[table["method"] == "fixed"][["hops", "iterations", "accuracy", "n"]].copy()
        table.insert(0, "run", r.name)
        grids.append(table)
        prof = depth_profile(table, info["R"], thr)
        row = {"run": r.name, "recurrence": info["recurrence"], "recurrence_mode": info["recurrence_mode"],
               "R": info["R"], "n_blocks": info["n_blocks"], "learnable_depth": info["learnable_depth"],
               "checkpoint": step, "train_T": info["R"], "answered_depth_train_T": prof["answered_depth_train_T"],
               "reach": prof["reach"], "best_T": prof["best_T"], "extension": prof["extension"],
               "max_hops_tested": int(table["hops"].max())}
        summary_rows.append(row)
        found.append({**row, "answered_depth_by_T": prof["answered_depth_by_T"]})
        marks = {"learnable depth": info["learnable_depth"]}
        figures[f"heatmap_{r.name}"] = hops_iterations_heatmap(
            table, f"Test accuracy over hops x inference iterations: {info['label']} (checkpoint {step})", marks)
        notes.append(f"{info['label']}: learnable depth {fmt(info['learnable_depth'])}; answered depth (accuracy >= "
                     f"{thr:g} for every hop count up to k) {fmt(prof['answered_depth_train_T'])} at its training "
                     f"T={info['R']}, reach {prof['reach']} at T={prof['best_T']} "
                     f"(extension {fmt(prof['extension'])} hops).")
    summary = pd.DataFrame(summary_rows)
    per_T = pd.DataFrame([{"run": f["run"], "iterations": T, "answered_depth": d}
                          for f in found for T, d in f["answered_depth_by_T"].items()])
    figures["answered_depth"] = lines(per_T, "iterations", "answered_depth", "run",
                                      f"Answered depth (accuracy >= {thr:g} for all hops up to k) per inference "
                                      "iteration count", "inference iterations", "answered depth (hops)")
    fixed = sorted((f for f in found if f["recurrence"] == "fixed"), key=lambda f: f["R"])
    extends_from = next((f["R"] for f in fixed if (f["extension"] or 0) >= 1), None)
    if fixed:
        notes.append("More iterations extend the answered depth from R = " + (str(extends_from) if extends_from
                     else "(none of the fixed-R runs)") + f" on (fixed-R runs tested: R = {[f['R'] for f in fixed]}).")
    tables = {"summary": summary, "hops_iterations": pd.concat(grids, ignore_index=True), "answered_depth": per_T}
    return StudyResult(NAME, TITLE, [r.name for r in runs], tables, figures,
                       {"runs": found, "threshold": thr, "extends_from_R": extends_from}, notes, options.to_dict())
