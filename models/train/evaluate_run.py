"""Evaluate a trained run's checkpoint: accuracy per split x hops x iterations, and adaptive halting.

The Python twin of ``looplens eval``::

    df = evaluate("runs/tiny-depth", iterations=range(1, 33), hops=range(2, 17), halting="kl+entropy")

returns a tidy DataFrame with columns step, split, hops, method, iterations, accuracy, loss,
mean_iterations, n. ``method`` is "fixed" (``iterations`` = the count used) or the halting rule's
name (``iterations`` = its max_iterations; ``mean_iterations`` = iterations the samples actually used).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import pandas as pd
import torch
from looplens.data.provenance import atomic_write_text
from looplens.models.halting import make_halting_rule
from looplens.models.train.evaluation import HALTING_ITERATIONS, EvalSet, evaluate_set
from looplens.models.train.run import Run, load_run
from looplens.models.train.trainer import resolve_device

EVAL_COLUMNS = ("step", "split", "hops", "method", "iterations", "accuracy", "loss", "mean_iterations", "n")


def evaluate(
    run: Run | str | os.PathLike,
    checkpoint: int | str | None = None,
    iterations: Iterable[int] | None = None,
    hops: Iterable[int] | None = None,
    splits: Iterable[str] | None = None,
    halting: str | None = None,
    eps: float = 0.01,
    entropy: float = 3.0,
    max_iterations: int = 32,
    batch_size: int = 4096,
    device: str = "cpu",
) -> pd.DataFrame:
    """Evaluate one checkpoint of ``run`` (default: final, or latest for an unfinished run).

    iterations: fixed counts to evaluate (default: the run's evaluation counts; with ``halting``,
    1..max_iterations so the best fixed count can be compared). hops: keep only these hop counts.
    splits: default every evaluation split of the dataset. halting: "kl", "entropy", "kl+entropy" or
    "latent" (with eps / entropy thresholds), run per sample up to ``max_iterations``.
    """
    run = run if isinstance(run, Run) else load_run(run)
    dev = resolve_device(device)
    step = run.resolve_step(checkpoint)
    model = run.load_model(step, device=str(dev))
    ds = run.dataset
    names = list(splits) if splits is not None else [s for s in ds.split_names if s != "train"]
    for name in names:
        if name not in ds.split_names:
            raise ValueError(f"--splits: dataset has no split {name!r} (splits: {', '.join(ds.split_names)})")
    if iterations is None:
        iterations = range(1, max_iterations + 1) if halting else run.meta["eval"]["iterations"]
    iterations = sorted({int(t) for t in iterations})
    if any(t < 1 for t in iterations):
        raise ValueError("--iterations: counts must be >= 1")
    rule = None
    if halting is not None:
        rule = make_halting_rule(halting, eps=eps, entropy=entropy)
    hop_list = None if hops is None else sorted({int(h) for h in hops})
    evalset = EvalSet.build({n: ds.encode(n) for n in names}, batch_size, dev, hops=hop_list)
    bf16 = dev.type == "cuda" and run.config.optim.precision in ("auto", "bf16")
    with torch.no_grad():
        rows = evaluate_set(model, evalset, iterations, bf16=bf16, halting=rule, halting_max_iterations=max_iterations)
    frame = pd.DataFrame(rows)
    frame["step"] = step
    frame["method"] = "fixed"
    if rule is not None:
        is_halt = frame["iterations"] == HALTING_ITERATIONS
        frame.loc[is_halt, "method"] = rule.name
        frame.loc[is_halt, "iterations"] = max_iterations
    return frame[list(EVAL_COLUMNS)].reset_index(drop=True)


def default_output(run: Run, step: int, halting: str | None) -> Path:
    suffix = f"_halting-{halting.replace('+', '-')}" if halting else ""
    return run.paths.eval_dir / f"step_{step}{suffix}.csv"


def write_csv(frame: pd.DataFrame, path: str | os.PathLike) -> Path:
    path = Path(path)
    atomic_write_text(path, frame.to_csv(index=False, float_format="%.6f"))
    return path


def format_tables(frame: pd.DataFrame, max_columns: int = 16) -> str:
    """Compact text: per split, accuracy over hops (rows) x iterations (columns); for halting, its
    accuracy and mean iterations beside the best fixed count."""
    lines = []
    fixed = frame[frame["method"] == "fixed"]
    if len(fixed):
        table = fixed.pivot_table(index=["split", "hops"], columns="iterations", values="accuracy")
        order = list(dict.fromkeys(zip(fixed["split"], fixed["hops"])))  # the frame's order: splits, then hops
        table = table.reindex(pd.MultiIndex.from_tuples(order, names=["split", "hops"]))
        cols = list(table.columns)
        if len(cols) > max_columns:  # keep both ends and an even spread between
            stride = (len(cols) - 1) / (max_columns - 1)
            cols = sorted({cols[round(i * stride)] for i in range(max_columns)})
            table = table[cols]
        width = max(len(str(s)) for s in fixed["split"]) + 1
        lines.append(f"accuracy by split and hops (rows) x iterations (columns), step {int(frame['step'].iloc[0])}")
        lines.append(f"{'split':<{width}}{'hops':>4} " + "".join(f"{c:>6}" for c in cols))
        for (split, hop), values in table.iterrows():
            lines.append(f"{split:<{width}}{hop:>4} " + "".join(f"{v:6.3f}" for v in values))
        lines.append("")
    halting = frame[frame["method"] != "fixed"]
    if len(halting):
        rule = halting["method"].iloc[0]
        lines.append(f"adaptive halting {rule} (max {int(halting['iterations'].iloc[0])} iterations) vs fixed counts")
        lines.append(f"{'split':<26}{'hops':>5}{'halt acc':>10}{'mean it':>9}{'best T':>8}{'acc@T':>8}")
        for _, row in halting.iterrows():
            candidates = fixed[(fixed["split"] == row["split"]) & (fixed["hops"] == row["hops"])]
            if len(candidates):
                best = candidates.loc[candidates["accuracy"].idxmax()]
                best_t, best_acc = f"{int(best['iterations'])}", f"{best['accuracy']:.3f}"
            else:
                best_t, best_acc = "-", "-"
            lines.append(f"{row['split']:<26}{int(row['hops']):>5}{row['accuracy']:>10.3f}"
                         f"{row['mean_iterations']:>9.2f}{best_t:>8}{best_acc:>8}")
    return "\n".join(lines).rstrip() + "\n"
