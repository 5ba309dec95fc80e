"""Study "systematic" (claim 1): looped models at several R against vanilla baselines, composition task.

For every composition run: train (train_inferred), ID (test_inferred_id) and OOD (test_inferred_ood)
accuracy against the step, at the run's training iteration count, and a final table. The paper's
baselines are the same physical depth at R = 1 (a looped run with R = 1 is exactly that) and a vanilla
stack with as many distinct layers as the looped model runs (iso-FLOP: ``virtual_layers`` equal).
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
from looplens.analyses.figures import curves_by_split
from looplens.analyses.studies.base import (
    COMPOSITION_CURVES,
    COMPOSITION_DIAGNOSTICS,
    StudyOptions,
    StudyResult,
    accuracy_curves,
    fmt,
    run_info,
    select_task,
)

NAME = "systematic"
TITLE = "Systematic generalization: looped R vs vanilla (composition task)"
CLAIMS = (1,)


def select(runs: Sequence) -> list:
    return select_task(runs, "composition", NAME)


def run(runs: Sequence, options: StudyOptions) -> StudyResult:
    runs = select(runs)
    infos = [run_info(r) for r in runs]
    splits = (*COMPOSITION_CURVES, *COMPOSITION_DIAGNOSTICS)
    curves = pd.concat([accuracy_curves(r, splits) for r in runs], ignore_index=True)
    rows, found = [], []
    for r, info in zip(runs, infos):
        c = curves[curves["run"] == r.name]
        row = {k: info[k] for k in ("run", "kind", "recurrence", "R", "n_blocks", "virtual_layers", "n_parameters",
                                    "final_step")}
        finals, bests = {}, {}
        for split in splits:
            s = c[c["split"] == split]
            if s.empty:
                continue
            finals[split] = float(s["accuracy"].iloc[-1])
            bests[split] = float(s["accuracy"].max())
            row[f"{split}"] = finals[split]
            row[f"{split}_max"] = bests[split]
        # same-depth / iso-FLOP partners of each run, by name, for the reader
        row["same_physical_depth_as"] = ", ".join(o["run"] for o in infos if o is not info
                                                  and o["n_blocks"] == info["n_blocks"] and o["R"] != info["R"])
        row["iso_flop_with"] = ", ".join(o["run"] for o in infos if o is not info
                                         and o["virtual_layers"] == info["virtual_layers"] and o["kind"] != info["kind"])
        rows.append(row)
        found.append({"run": r.name, "kind": info["kind"], "R": info["R"], "n_blocks": info["n_blocks"],
                      "virtual_layers": info["virtual_layers"], "final_step": info["final_step"],
                      "final": finals, "max": bests})
    final = pd.DataFrame(rows).sort_values(["kind", "R", "virtual_layers"], kind="stable").reset_index(drop=True)
    labels = {i["run"]: i["label"] for i in infos}
    figures = {
        "curves": curves_by_split(curves, COMPOSITION_CURVES, "Train / ID / OOD accuracy over training "
                                  "(at each run's training iteration count)", labels),
    }
    if curves["split"].isin(COMPOSITION_DIAGNOSTICS).any():
        figures["diagnostics"] = curves_by_split(curves, COMPOSITION_DIAGNOSTICS, "Diagnostic splits: only the "
                                                 "first hop OOD / only the second hop OOD", labels)
    notes = []
    for f in sorted(found, key=lambda f: (f["kind"], f["R"])):
        notes.append(f"{labels[f['run']]}: final train {fmt(f['final'].get('train_inferred'))}, "
                     f"ID {fmt(f['final'].get('test_inferred_id'))}, OOD {fmt(f['final'].get('test_inferred_ood'))} "
                     f"(best OOD {fmt(f['max'].get('test_inferred_ood'))}) at step {f['final_step']}.")
    return StudyResult(NAME, TITLE, [r.name for r in runs], {"final": final, "curves": curves}, figures,
                       {"runs": found}, notes, options.to_dict())
