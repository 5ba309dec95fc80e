"""Summarise composition run directories: accuracy per split at the training iteration count, every 1k steps.

    python docs/research/paper-model/curve.py RUN_DIR [RUN_DIR ...] [--every 1000] [--split test_inferred_ood]

Prints, per run: steps/s, the strict-OOD curve every --every steps, best (step) and final numbers per split.
Best-so-far is a diagnostic only: the dataset has no OOD validation split disjoint from test_inferred_ood.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

SPLITS = ["train_inferred", "test_inferred_id", "id_atomic", "ood_atomic", "test_inferred_first_ood",
          "test_inferred_second_ood", "test_inferred_ood"]


def load(run: Path) -> tuple[pd.DataFrame, dict]:
    cfg = json.loads((run / "config.json").read_text())
    df = pd.read_csv(run / "metrics.csv")
    r = cfg["config"]["model"]["n_iterations"]
    df = df[(df["iterations"] == r)]
    return df, cfg


def table(df: pd.DataFrame) -> pd.DataFrame:
    return df.pivot_table(index="step", columns="split", values="accuracy", aggfunc="mean")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--every", type=int, default=1000)
    ap.add_argument("--split", default="test_inferred_ood")
    ap.add_argument("--png", type=Path, default=None, help="also plot --split over steps for every run")
    ap.add_argument("--markdown", action="store_true", help="print one markdown row per run (--split every --every steps)")
    ap.add_argument("--csv", type=Path, default=None, help="write one row per run (milestones, final and best) to this file")
    a = ap.parse_args()
    if a.csv:
        rows = pd.DataFrame([milestones(run) for run in a.runs])
        tmp = a.csv.with_suffix(".tmp")
        rows.to_csv(tmp, index=False, float_format="%.4f")
        tmp.replace(a.csv)
        return
    if a.markdown:
        for run in a.runs:
            t = table(load(run)[0])
            c = t[a.split]
            marks = [s for s in range(a.every, int(c.index.max()) + 1, a.every)]
            print(f"| {run.name} | " + " | ".join(f"{c[s]:.2f}" if s in c.index else "" for s in marks)
                  + f" | {c.max():.2f} ({int(c.idxmax()):,}) | {c.iloc[-1]:.2f} ({int(c.index[-1]):,}) |")
        return
    if a.png:
        plot(a.runs, a.split, a.png)
    for run in a.runs:
        df, cfg = load(run)
        t = table(df)
        summ = json.loads((run / "summary.json").read_text()) if (run / "summary.json").exists() else {}
        print(f"== {run.name}  steps {int(t.index.max())}  summary: "
              + ", ".join(f"{k}={summ[k]}" for k in ("status", "steps", "wall_seconds", "steps_per_second",
                                                      "stop_reason") if k in summ))
        curve = t[a.split]
        marks = [s for s in curve.index if s % a.every == 0]
        print("  " + a.split + ": " + " ".join(f"{s / 1000:g}k:{curve[s]:.2f}" for s in marks))
        cols = [c for c in SPLITS if c in t.columns]
        best = t[cols].max()
        beststep = t[cols].idxmax()
        final = t[cols].iloc[-1]
        print("  final: " + " ".join(f"{c}={final[c]:.3f}" for c in cols))
        print("  best : " + " ".join(f"{c}={best[c]:.3f}@{int(beststep[c])}" for c in cols))
        for thr_split, thr in (("train_inferred", 0.9), ("test_inferred_id", 0.9), ("test_inferred_ood", 0.5)):
            hit = t.index[t[thr_split] >= thr] if thr_split in t.columns else []
            print(f"  first step {thr_split} >= {thr}: {int(hit[0]) if len(hit) else 'never'}", end=";")
        print()


def milestones(run: Path) -> dict:
    """One run's row: steps, wall time, first steps past the stage thresholds, final and best strict OOD."""
    df, cfg = load(run)
    t = table(df)
    summ = json.loads((run / "summary.json").read_text()) if (run / "summary.json").exists() else {}
    m = cfg["config"]["model"]
    row = {"run": run.name, "seed": cfg["config"]["run"]["seed"], "blocks": m["n_blocks"], "iterations": m["n_iterations"],
           "betas": "/".join(f"{b:g}" for b in cfg["config"]["optim"]["betas"]), "last_step": int(t.index.max()),
           "status": summ.get("status"), "wall_seconds": summ.get("wall_seconds"),
           "steps_per_second": summ.get("steps_per_second")}
    for name, split, thr in (("train_0.9", "train_inferred", 0.9), ("id_0.9", "test_inferred_id", 0.9),
                             ("ood_0.5", "test_inferred_ood", 0.5), ("ood_0.7", "test_inferred_ood", 0.7)):
        hit = t.index[t[split] >= thr]
        row[f"step_{name}"] = int(hit[0]) if len(hit) else None
    ood = t["test_inferred_ood"]
    last = t.iloc[-1]
    row.update({f"final_{c}": last[c] for c in SPLITS if c in t.columns})
    row.update({"best_ood": ood.max(), "best_ood_step": int(ood.idxmax()),
                "ood_evals_below_0.5_after_0.7": int((ood[ood.index > (row["step_ood_0.7"] or 10**9)] < 0.5).sum())})
    return row


def plot(runs: list[Path], split: str, out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6))
    for run in runs:
        t = table(load(run)[0])
        c = t[split].dropna()
        ax.plot(c.index, c.values, label=run.name, lw=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel(f"{split} (training R)")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = out.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=80)
    tmp.rename(out)


if __name__ == "__main__":
    main()
