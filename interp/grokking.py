"""Grokking stages from a run's metrics.csv: memorisation -> in-distribution -> systematic.

A stage is reached at the first evaluated step where its split's accuracy is >= the threshold (for
``patience`` consecutive evaluations). The paper's claim 2 is that the three stages are reached in this
order, with the systematic (OOD) one long after the others.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
from looplens.interp._common import check_positive_int

STAGES = ("train", "test_id", "test_ood")
PHASES = {"train": "memorisation", "test_id": "in-distribution", "test_ood": "systematic"}
DEFAULT_SPLITS = {"train": "train_inferred", "test_id": "test_inferred_id", "test_ood": "test_inferred_ood"}
VERDICTS = ("none", "memorisation", "in-distribution", "systematic")

GROKKING_COLUMNS = {
    "stage": object,
    "phase": object,
    "split": object,
    "threshold": "float64",
    "reached": bool,
    "step": "Int64",
    "epoch": "float64",
    "accuracy": "float64",
    "max_accuracy": "float64",
    "final_accuracy": "float64",
    "gap_steps": "Int64",
    "verdict": object,
    "three_stage": bool,
}


def read_metrics(metrics: pd.DataFrame | str | os.PathLike) -> pd.DataFrame:
    """A metrics DataFrame from a frame, a metrics.csv path or a run directory holding metrics.csv."""
    if isinstance(metrics, pd.DataFrame):
        return metrics
    path = Path(metrics)
    if path.is_dir():
        path = path / "metrics.csv"
    if not path.is_file():
        raise FileNotFoundError(f"no metrics file at {path} (expected runs/NAME/metrics.csv)")
    return pd.read_csv(path)


def grokking_stages(
    metrics: pd.DataFrame | str | os.PathLike,
    *,
    threshold: float | int | Mapping[str, float | int] = 0.9,
    splits: Mapping[str, str] | None = None,
    hops: int | None = None,
    iterations: int | None = None,
    patience: int = 1,
) -> pd.DataFrame:
    """When train, in-distribution test and OOD test accuracy each first pass a threshold.

    Args:
        metrics: a run's metrics (DataFrame with columns step, split, accuracy and optionally epoch, hops,
            iterations, n), a metrics.csv path, or the run directory.
        threshold: one value, or per stage ({"train": .99, "test_id": .9, "test_ood": .5}).
        splits: which split is which stage (default train_inferred / test_inferred_id / test_inferred_ood).
        hops, iterations: keep only these rows (needed when the file evaluates several iteration counts).
            Rows of several hop counts at one step are averaged, weighted by ``n`` when present.
        patience: the accuracy must stay >= threshold for this many consecutive evaluations.

    Returns:
        Three rows (train, test_id, test_ood). Columns: stage (str), phase ("memorisation",
        "in-distribution", "systematic"), split (str), threshold (float64), reached (bool), step (Int64, the
        first step; <NA> if never), epoch (float64 at that step, NaN if unknown), accuracy (float64 at that
        step), max_accuracy, final_accuracy (float64 over the run), gap_steps (Int64, step minus the
        previous stage's step), verdict (str, the same on every row: the furthest phase reached in order,
        "none" if even train never passes), three_stage (bool, the same on every row: all three reached
        at strictly increasing steps).
    """
    df = read_metrics(metrics)
    splits = dict(DEFAULT_SPLITS if splits is None else splits)
    if set(splits) != set(STAGES):
        raise ValueError(f"splits must map exactly {STAGES} to split names, got {sorted(splits)}")
    thresholds = dict(threshold) if isinstance(threshold, Mapping) else dict.fromkeys(STAGES, threshold)
    if set(thresholds) != set(STAGES):
        raise ValueError(f"threshold mapping must have keys {STAGES}, got {sorted(thresholds)}")
    for stage, thr in thresholds.items():
        if not 0 <= float(thr) <= 1:
            raise ValueError(f"threshold for {stage} must be in [0, 1], got {thr!r}")
    patience = check_positive_int("patience", patience)
    missing = [c for c in ("step", "split", "accuracy") if c not in df.columns]
    if missing:
        raise ValueError(f"metrics lack columns {missing}; got {list(df.columns)}")
    unknown = [s for s in splits.values() if s not in set(df["split"])]
    if unknown:
        raise ValueError(f"metrics have no rows for split(s) {unknown}; splits present: {sorted(set(df['split']))}")
    df = df[df["split"].isin(list(splits.values()))]
    for col, value in (("hops", hops), ("iterations", iterations)):
        if value is not None:
            if col not in df.columns:
                raise ValueError(f"{col}={value} given but the metrics have no {col!r} column")
            df = df[df[col] == value]
            if df.empty:
                raise ValueError(f"no metrics rows with {col} == {value}")
    if iterations is None and "iterations" in df.columns and df["iterations"].nunique() > 1:
        raise ValueError(f"the metrics evaluate several iteration counts {sorted(df['iterations'].unique())}; "
                         "pick one with iterations=")

    rows = []
    prev_step = None
    for stage in STAGES:
        curve = _curve(df[df["split"] == splits[stage]])
        thr = float(thresholds[stage])
        ok = (curve["accuracy"] >= thr).to_numpy()
        window = np.lib.stride_tricks.sliding_window_view(ok, patience).all(1) if len(ok) >= patience else np.zeros(0, bool)
        reached = bool(window.any())
        i = int(window.argmax()) if reached else None
        step = int(curve["step"].iloc[i]) if reached else None
        rows.append({
            "stage": stage, "phase": PHASES[stage], "split": splits[stage], "threshold": thr, "reached": reached,
            "step": step if reached else pd.NA,
            "epoch": float(curve["epoch"].iloc[i]) if reached else np.nan,
            "accuracy": float(curve["accuracy"].iloc[i]) if reached else np.nan,
            "max_accuracy": float(curve["accuracy"].max()), "final_accuracy": float(curve["accuracy"].iloc[-1]),
            "gap_steps": step - prev_step if reached and prev_step is not None else pd.NA,
        })
        prev_step = step if reached else None
    verdict = "none"
    for row in rows:  # the furthest phase reached in order
        if not row["reached"]:
            break
        verdict = row["phase"]
    steps = [r["step"] for r in rows]
    three = all(r["reached"] for r in rows) and steps[0] < steps[1] < steps[2]
    out = pd.DataFrame(rows)
    out["verdict"] = verdict
    out["three_stage"] = three
    return out[list(GROKKING_COLUMNS)].astype(GROKKING_COLUMNS)


def _curve(rows: pd.DataFrame) -> pd.DataFrame:
    """Accuracy per step (hop counts averaged, weighted by n when present), sorted by step."""
    rows = rows.dropna(subset=["accuracy"])
    if rows.empty:
        raise ValueError("a split has no accuracy values")
    weights = rows["n"].astype(float) if "n" in rows.columns else pd.Series(1.0, index=rows.index)
    tmp = pd.DataFrame({"step": rows["step"], "w": weights, "wa": weights * rows["accuracy"],
                        "epoch": rows["epoch"] if "epoch" in rows.columns else np.nan})
    g = tmp.groupby("step", sort=True).agg(w=("w", "sum"), wa=("wa", "sum"), epoch=("epoch", "first")).reset_index()
    g["accuracy"] = g["wa"] / g["w"]
    return g[["step", "epoch", "accuracy"]]
